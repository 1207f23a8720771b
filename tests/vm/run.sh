#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# QEMU hardware-in-loop tests for vdpa-vsock (see tests/vm/README.md).
#
#   tests/vm/run.sh            run every default test in one boot
#   tests/vm/run.sh NAME...    run only the named tests
#   tests/vm/run.sh --list     list the tests the guest program knows
#
# Environment: VM_CACHE (default tests/vm/.cache), VM_TIMEOUT (seconds, default 300),
# VM_KEEP=1 keeps the temporary run directory (console log, sockets), VM_IOMMU=1 boots q35 with
# QEMU's emulated Intel IOMMU and intel_iommu=on instead (for vfio_type1_iommu; the default tests
# expect no IOMMU).
# A SKIP is not a pass: the run fails when a test skips that is not allowed to skip in this
# configuration (allowed_skip below), and when every selected test skipped.
# Installs what it needs (apt, Debian's 6.12 kernel, out-of-tree modules, vhost-device-vsock) into
# the cache on the first run; later runs reuse it. Needs root and cargo.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${VM_CACHE:-$HERE/.cache}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
VM_TIMEOUT=${VM_TIMEOUT:-300}
VHOST_DEVICE_VSOCK_VERSION=0.3.0
GUEST_CID=3
HOST_ECHO_PORT=1234
# vfio_host_connects_in: the guest says "LISTENING" on host port HOST_IN_READY_PORT, then the
# host program connects IN to guest port HOST_IN_PORT and sends HOST_IN_BYTES (keep in step with
# the constants of the same names in tests/vm/guest/vfio_vsock.rs).
HOST_IN_READY_PORT=1235
HOST_IN_PORT=5000
HOST_IN_BYTES=1048576
export DEBIAN_FRONTEND=noninteractive

log() { printf '[vm %(%T)T] %s\n' -1 "$*" >&2; }
die() {
    printf '[vm] error: %s\n' "$*" >&2
    exit 2
}
stamped() { [[ -f "$CACHE/stamps/$1" ]]; }
stamp() {
    mkdir -p "$CACHE/stamps"
    touch "$CACHE/stamps/$1"
}

[[ $(id -u) -eq 0 ]] || die "run as root (apt-get, and QEMU reads the unpacked kernel)"
command -v cargo >/dev/null || die "cargo is needed to build the guest test program"

# ---------------------------------------------------------------------------------------------
# (a) host packages
# ---------------------------------------------------------------------------------------------
HOST_PACKAGES=(busybox-static cpio kmod xz-utils bc iproute2 socat ca-certificates
    make gcc flex bison libelf-dev patch python3)

apt_updated=0
apt_update_once() {
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
}

# Candidate version of a package, empty when apt does not know it. (apt-cache takes ~2 s a call
# here, so warm runs call it only to resolve the kernel.)
candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { if ($2 != "(none)") print $2 }'
}

# Installs the packages that are not installed yet (dpkg-query only when all are there).
apt_install_missing() {
    local missing=() p
    for p in "$@"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == *"ok installed" ]] || missing+=("$p")
    done
    [[ ${#missing[@]} -gt 0 ]] || return 0
    apt_update_once
    log "apt-get install ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# QEMU is unpacked, not installed: bookworm's qemu-system-x86 7.2 Breaks the newer qemu-utils from
# bookworm-backports that CI machines may carry, and apt would remove it. The unpacked binary runs
# with the system's libraries (the Depends of the unpacked packages, installed here) and `-L` for its
# firmware.
QEMU_DEBS=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
QEMU_ROOT=$CACHE/qemu
setup_qemu() {
    QEMU=$QEMU_ROOT/usr/bin/qemu-system-x86_64
    if ! stamped qemu; then
        [[ -n $(candidate qemu-system-x86) ]] || apt_update_once
        local p vers=() deps
        for p in "${QEMU_DEBS[@]}"; do vers+=("$p=$(candidate "$p")"); done
        log "unpacking ${vers[*]}"
        # First alternative of each dependency, version constraints dropped, minus the unpacked ones.
        mapfile -t deps < <(apt-cache show "${vers[@]}" | sed -n 's/^Depends: //p' | tr ',' '\n' |
            sed -e 's/|.*//' -e 's/(.*)//' -e 's/:any//' -e 's/ //g' |
            grep -v -e '^$' -e '^qemu-' -e '^seabios$' -e '^ipxe-qemu$' | sort -u)
        apt_install_missing "${deps[@]}"
        rm -rf "$QEMU_ROOT" "$CACHE/debs/qemu"
        mkdir -p "$QEMU_ROOT" "$CACHE/debs/qemu"
        (cd "$CACHE/debs/qemu" && apt-get download -qq -o APT::Sandbox::User=root "${vers[@]}")
        for p in "$CACHE"/debs/qemu/*.deb; do dpkg -x "$p" "$QEMU_ROOT"; done
        rm -rf "$CACHE/debs/qemu"
        "$QEMU" --version >/dev/null || die "unpacked QEMU does not run (missing libraries?)"
        stamp qemu
    fi
}

# ---------------------------------------------------------------------------------------------
# kernel: Debian's 6.12, the version the linux-image-6.12-amd64 metapackage points at right now
# ---------------------------------------------------------------------------------------------
resolve_kernel() {
    local meta
    KPKGVER=$(candidate linux-image-6.12-amd64)
    if [[ -z $KPKGVER ]]; then
        apt_update_once
        KPKGVER=$(candidate linux-image-6.12-amd64)
    fi
    [[ -n $KPKGVER ]] || die "apt knows no linux-image-6.12-amd64 (bookworm-security or backports needed)"
    # Captured first: a reader that quits early (`| head -n 1`) can kill the writer with SIGPIPE,
    # which pipefail turns into a failure.
    meta=$(apt-cache show "linux-image-6.12-amd64=$KPKGVER")
    meta=$(sed -n '/^Depends: /{s///p;q}' <<<"$meta")
    # "linux-image-6.12.117+deb12-amd64 (= 6.12.117-1~deb12u1)" -> 6.12.117+deb12
    KABI=$(sed -n 's/.*linux-image-\(6\.12\.[0-9]*+[a-z0-9]*\)-amd64.*/\1/p' <<<"$meta")
    [[ -n $KABI ]] || die "cannot read the kernel ABI name from: $meta"
    KREL=$KABI-amd64
    KDIR=$CACHE/kernel/$KREL
    KROOT=$KDIR/root
}

setup_kernel() {
    if ! stamped "kernel-$KREL"; then
        log "downloading kernel $KREL ($KPKGVER)"
        rm -rf "$KDIR"
        mkdir -p "$KDIR/debs" "$KROOT"
        (cd "$KDIR/debs" && apt-get download -qq -o APT::Sandbox::User=root \
            "linux-image-$KREL=$KPKGVER" \
            "linux-headers-$KREL=$KPKGVER" \
            "linux-headers-$KABI-common=$KPKGVER" \
            "linux-kbuild-$KABI=$KPKGVER" \
            "linux-source-6.12=$KPKGVER")
        local deb
        for deb in "$KDIR"/debs/*.deb; do dpkg -x "$deb" "$KROOT"; done
        rm -rf "$KDIR/debs"
        stamp "kernel-$KREL"
    fi
}

# Out-of-tree modules Debian does not ship: vringh + vdpa_sim + vdpa_sim_net, and vfio rebuilt with
# CONFIG_VFIO_NOIOMMU (its symbol CRCs match Debian's, so the stock vfio-pci loads on top). They
# go to lib/modules/$KREL/updates/, which depmod prefers over the stock vfio.ko.xz.
# vdpa_sim gets vdpa_sim_vsock/vdpa_sim-config-cb.patch first (it keeps the config callback, so
# vdpa_sim_vsock can raise the config interrupt). The stamp hashes every file of vdpa_sim_vsock/
# (the module source and the patch), so editing either rebuilds the modules.
modules_stamp() {
    echo "modules-$KREL-vsock-$(cat "$HERE"/vdpa_sim_vsock/* | sha1sum | cut -c1-12)"
}

build_modules() {
    stamped "$(modules_stamp)" && return 0
    log "building out-of-tree modules for $KREL"
    local hdr src b
    hdr=$KROOT/usr/src/linux-headers-$KREL
    # The arch headers' Makefile includes the common headers by absolute /usr/src path.
    # A cache copied from another checkout carries that checkout's path: rewrite any prefix.
    sed -i "s|^include .*/usr/src/linux-headers-|include $KROOT/usr/src/linux-headers-|" "$hdr/Makefile"
    src=$KDIR/src
    rm -rf "$src"
    mkdir -p "$src"
    tar -xJf "$KROOT/usr/src/linux-source-6.12.tar.xz" -C "$src" --strip-components=1 --wildcards \
        'linux-source-6.12/drivers/vdpa/vdpa_sim/*' 'linux-source-6.12/drivers/vhost/vringh.c' \
        'linux-source-6.12/drivers/vfio/*.[ch]'
    b=$KDIR/build
    rm -rf "$b"
    mkdir -p "$b/vdpa_sim" "$b/vfio"
    patch -s -d "$src" -p1 <"$HERE/vdpa_sim_vsock/vdpa_sim-config-cb.patch" ||
        die "vdpa_sim-config-cb.patch does not apply to linux-source $KPKGVER"
    cp "$src"/drivers/vdpa/vdpa_sim/*.[ch] "$src/drivers/vhost/vringh.c" "$b/vdpa_sim/"
    # Our virtio-vsock test device (tests/vm/vdpa_sim_vsock), built beside vdpa_sim (vdpa_sim.h).
    cp "$HERE/vdpa_sim_vsock/vdpa_sim_vsock.c" "$b/vdpa_sim/"
    echo 'obj-m += vringh.o vdpa_sim.o vdpa_sim_net.o vdpa_sim_vsock.o' >"$b/vdpa_sim/Kbuild"
    cp "$src"/drivers/vfio/*.[ch] "$b/vfio/"
    cat >"$b/vfio/Kbuild" <<'EOF'
ccflags-y += -DCONFIG_VFIO_NOIOMMU=1
obj-m += vfio.o
vfio-y += vfio_main.o group.o container.o virqfd.o
EOF
    local m
    for m in vdpa_sim vfio; do
        make -s -C "$hdr" M="$b/$m" CONFIG_DEBUG_INFO_BTF_MODULES= -j"$(nproc)" modules
    done
    mkdir -p "$KROOT/lib/modules/$KREL/updates"
    cp "$b"/vdpa_sim/*.ko "$b"/vfio/*.ko "$KROOT/lib/modules/$KREL/updates/"
    depmod -b "$KROOT" "$KREL"
    rm -rf "$src" "$b"
    stamp "$(modules_stamp)"
}

# ---------------------------------------------------------------------------------------------
# vhost-device-vsock (rust-vmm's vhost-user vsock device): the device behind the guest's PCI function
# ---------------------------------------------------------------------------------------------
setup_vhost_device_vsock() {
    VHOST_DEVICE_VSOCK=$CACHE/cargo/bin/vhost-device-vsock
    stamped "vhost-device-vsock-$VHOST_DEVICE_VSOCK_VERSION" && return 0
    log "cargo install vhost-device-vsock $VHOST_DEVICE_VSOCK_VERSION"
    # A private target dir that cargo install deletes afterwards (not the project's).
    env -u CARGO_TARGET_DIR cargo install --quiet --locked --root "$CACHE/cargo" \
        --version "$VHOST_DEVICE_VSOCK_VERSION" vhost-device-vsock
    stamp "vhost-device-vsock-$VHOST_DEVICE_VSOCK_VERSION"
}

# ---------------------------------------------------------------------------------------------
# Debian's udev (systemd-udevd and udevadm are one binary), unpacked, to apply udev/ in the guest
# ---------------------------------------------------------------------------------------------
setup_udev() {
    UDEVADM=$CACHE/udev/root/bin/udevadm
    [[ -x $UDEVADM ]] && return 0
    apt_update_once
    log "apt-get download udev"
    rm -rf "$CACHE/udev"
    mkdir -p "$CACHE/udev/root"
    (cd "$CACHE/udev" && apt-get download -qq -o APT::Sandbox::User=root udev)
    dpkg -x "$CACHE"/udev/udev_*.deb "$CACHE/udev/root"
    rm -f "$CACHE"/udev/udev_*.deb
    [[ -x $UDEVADM ]] || die "no udevadm in Debian's udev package"
}

# ---------------------------------------------------------------------------------------------
# (b) the guest test program, a static glibc binary
# ---------------------------------------------------------------------------------------------
build_vmtest() {
    log "building the vmtest example and the vdpa-vsock CLI (static)"
    local target=${CARGO_TARGET_DIR:-$ROOT/target}
    (cd "$ROOT" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet --release \
        --example vmtest --bin vdpa-vsock --target x86_64-unknown-linux-gnu)
    VMTEST=$target/x86_64-unknown-linux-gnu/release/examples/vmtest
    CLI=$target/x86_64-unknown-linux-gnu/release/vdpa-vsock
    [[ -x $VMTEST ]] || die "no $VMTEST after the build"
    [[ -x $CLI ]] || die "no $CLI after the build"
}

# ---------------------------------------------------------------------------------------------
# (c) the initramfs
# ---------------------------------------------------------------------------------------------
# Modules the tests need; modprobe --show-depends puts their dependencies first, in load order.
GUEST_MODULES=(vhost_vsock vsock_loopback vmw_vsock_virtio_transport vhost_vdpa vdpa_sim_net
    vdpa_sim_vsock vfio_iommu_type1 vfio_pci)
declare -A MODULE_PARAMS=([vfio]="enable_unsafe_noiommu_mode=1")

build_initramfs() {
    local out=$1 ir=$2 m path name seen=" "
    rm -rf "$ir"
    mkdir -p "$ir"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,modules}
    cp /bin/busybox "$ir/bin/busybox"
    for m in sh mount mkdir cat echo ls insmod sleep poweroff dmesg grep uname tr sed readlink printf modprobe chgrp chmod; do
        ln -s busybox "$ir/bin/$m"
    done
    # Dependencies first; a module named twice (shared dependency) is loaded once.
    : >"$ir/modules/order"
    while read -r _ path; do
        name=$(basename "$path")
        name=${name%.xz}
        name=${name%.ko}
        [[ $seen == *" $name "* ]] && continue
        seen+="$name "
        case $path in
        *.ko.xz) xz -dc "$path" >"$ir/modules/$name.ko" ;;
        *) cp "$path" "$ir/modules/$name.ko" ;;
        esac
        printf '%s %s\n' "$name" "${MODULE_PARAMS[$name]:-}" >>"$ir/modules/order"
    done < <(for m in "${GUEST_MODULES[@]}"; do
        modprobe -d "$KROOT" -S "$KREL" --show-depends "$m" | grep '^insmod '
    done)
    # iproute2's vdpa tool and its shared libraries (and those of bash, for tools/bind.sh, and of
    # udevadm, for the udev/ rules).
    cp /usr/sbin/vdpa "$ir/usr/sbin/vdpa"
    local lib libs
    libs=$(ldd /usr/sbin/vdpa /bin/bash "$UDEVADM")
    if grep -q 'not found' <<<"$libs"; then
        die "shared libraries missing: $(grep 'not found' <<<"$libs" | tr -s ' \t\n' ' ')"
    fi
    while read -r lib; do
        mkdir -p "$ir$(dirname "$lib")"
        cp -L "$lib" "$ir$lib"
    done < <(grep -o '/[^ ]*' <<<"$libs" | grep -v ':$' | sort -u)
    cp "$VMTEST" "$ir/bin/vmtest"
    # udev with only our rules, installed as udev/README.md says; group vsock as gid 990.
    cp "$UDEVADM" "$ir/bin/udevadm"
    ln -s udevadm "$ir/bin/systemd-udevd"
    mkdir -p "$ir/etc/udev/rules.d" "$ir/lib/udev" "$ir/usr/lib" "$ir/run"
    cp "$ROOT/udev/70-vdpa-vsock.rules" "$ir/etc/udev/rules.d/"
    install -m 0755 "$ROOT/udev/vdpa-vsock-vfio-group" "$ROOT/udev/vdpa-vsock-vdpa-node" "$ir/lib/udev/"
    ln -s ../../lib/udev "$ir/usr/lib/udev"
    printf 'root:x:0:0:root:/:/bin/sh\n' >"$ir/etc/passwd"
    printf 'root:x:0:\nvsock:x:990:\n' >"$ir/etc/group"
    # The CLI, for the tests of `inspect`, `serve` and friends as an operator runs them.
    cp "$CLI" "$ir/bin/vdpa-vsock"
    # tools/bind.sh as operators run it: under bash (with its libraries), busybox for the rest.
    mkdir -p "$ir/tools"
    cp "$ROOT/tools/bind.sh" "$ir/tools/bind.sh"
    cp /bin/bash "$ir/bin/bash"
    ln -s ../../bin/busybox "$ir/usr/bin/env"
    cp "$HERE/guest/init" "$ir/init"
    chmod +x "$ir/init"
    (cd "$ir" && find . | cpio -o -H newc --quiet) | gzip -1 >"$out"
}

# ---------------------------------------------------------------------------------------------
# (d) boot, (e) report, (f) verdict
# ---------------------------------------------------------------------------------------------
RUN=""
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ -n $RUN && -z ${VM_KEEP:-} ]]; then rm -rf "$RUN"; fi
}
trap cleanup EXIT

# Host side of vfio_host_connects_in. It waits until the guest test says it listens (a guest
# connection to CID 2 port $HOST_IN_READY_PORT, i.e. the Unix socket <uds-path>_$HOST_IN_READY_PORT,
# carrying `LISTENING <port>`): host connections attempted while nobody drives the function wedged
# vhost-device-vsock 0.3.0 for the rest of the boot (no packet reached the guest any more). Then it
# connects IN through vhost-device-vsock's Unix socket (`CONNECT <port>\n` -> `OK <port>\n`),
# retrying about once a second for a while, sends a deterministic pattern, reads the echo back
# and checks it, then sends one line `HOST-OK <fnv-1a of the echo>` (or `HOST-BAD <why>`) and
# closes. Logs to $1.
host_connect_in() {
    exec python3 - "$RUN/vm.vsock" "$HOST_IN_READY_PORT" "$HOST_IN_PORT" "$HOST_IN_BYTES" >"$1" 2>&1 <<'EOF'
import socket, sys, threading, time

path, ready_port, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
# The same formula as host_pattern() in tests/vm/guest/vfio_vsock.rs.
data = bytes(((i * 2654435761) & 0xFFFFFFFF) >> 13 & 0xFF for i in range(total))


def fnv(buf):
    h = 0xCBF29CE484222325
    for b in buf:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def say(msg):
    print(f"[{time.strftime('%T')}] {msg}", flush=True)


ready = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
ready.bind(f"{path}_{ready_port}")
ready.listen(4)
while True:
    r, _ = ready.accept()
    r.settimeout(10)
    try:
        msg = r.recv(64)
    except OSError as e:
        msg = repr(e).encode()
    r.close()
    say(f"guest says {msg!r}")
    if msg.startswith(b"LISTENING %d" % port):
        break
attempt = 0
while True:
    attempt += 1
    if attempt > 30:
        say("gave up after 30 attempts")
        sys.exit(1)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        s.sendall(b"CONNECT %d\n" % port)
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            c = s.recv(1)
            if not c:
                raise ConnectionError("closed (no listener yet)")
            line += c
        if not line.startswith(b"OK "):
            raise ConnectionError(f"answer {line!r}")
        break
    except OSError as e:
        s.close()
        say(f"attempt {attempt}: {e}")
        time.sleep(1)
say(f"connected to guest port {port} on attempt {attempt}: {line.decode().strip()}")
s.settimeout(60)
sent_err = []


def writer():
    try:
        s.sendall(data)
    except OSError as e:
        sent_err.append(e)


t = threading.Thread(target=writer)
t.start()
echo = bytearray()
try:
    while len(echo) < total:
        chunk = s.recv(min(65536, total - len(echo)))
        if not chunk:
            break
        echo += chunk
except OSError as e:
    say(f"reading the echo: {e}")
t.join()
if sent_err:
    verdict = f"HOST-BAD send failed: {sent_err[0]}"
elif len(echo) != total:
    verdict = f"HOST-BAD echo ended after {len(echo)} of {total} bytes"
elif echo != data:
    first = next(i for i in range(total) if echo[i] != data[i])
    verdict = f"HOST-BAD echo differs at byte {first}"
else:
    verdict = f"HOST-OK {fnv(echo):016x}"
say(f"verdict: {verdict}")
s.sendall(verdict.encode() + b"\n")
s.shutdown(socket.SHUT_WR)
try:
    while s.recv(4096):
        pass
except OSError:
    pass
s.close()
EOF
}

wait_for_socket() {
    local _
    for _ in $(seq 100); do
        [[ -S $1 ]] && return 0
        sleep 0.05
    done
    die "$1 did not appear"
}

boot() {
    local tests=$1 rc=0
    RUN=$(mktemp -d /tmp/vdpa-vsock-vm.XXXXXX)
    log "run directory $RUN"
    build_initramfs "$RUN/initramfs.cpio.gz" "$RUN/initramfs"
    # Host side of kernel_vsock_to_host: the guest's connection to CID 2 port $HOST_ECHO_PORT arrives
    # as a Unix connection on <uds-path>_$HOST_ECHO_PORT; echo it back.
    socat -d -d "UNIX-LISTEN:$RUN/vm.vsock_$HOST_ECHO_PORT,fork" EXEC:cat 2>"$RUN/socat.log" &
    PIDS+=($!)
    "$VHOST_DEVICE_VSOCK" --guest-cid "$GUEST_CID" --socket "$RUN/vhu.sock" \
        --uds-path "$RUN/vm.vsock" >"$RUN/vhost-device-vsock.log" 2>&1 &
    PIDS+=($!)
    wait_for_socket "$RUN/vhu.sock"
    host_connect_in "$RUN/host-connect-in.log" &
    PIDS+=($!)
    local machine=(-machine pc) iommu_arg=""
    if [[ -n ${VM_IOMMU:-} ]]; then
        # The IOMMU device must come before the devices it translates for.
        machine=(-machine "q35,kernel-irqchip=split" -device "intel-iommu,intremap=on")
        iommu_arg=" intel_iommu=on"
    fi
    log "booting $KREL (TCG, ${machine[*]}, timeout ${VM_TIMEOUT}s)"
    timeout --kill-after=10 "$VM_TIMEOUT" "$QEMU" \
        -L "$QEMU_ROOT/usr/share/qemu" -L "$QEMU_ROOT/usr/share/seabios" -accel tcg "${machine[@]}" -cpu max -m 1G -smp 2 \
        -display none -vga none -monitor none -serial "file:$RUN/console.log" \
        -nic none -no-reboot \
        -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
        -chardev "socket,id=c0,path=$RUN/vhu.sock" -device vhost-user-vsock-pci,chardev=c0 \
        -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
        -kernel "$KROOT/boot/vmlinuz-$KREL" -initrd "$RUN/initramfs.cpio.gz" \
        -append "console=ttyS0 panic=-1 loglevel=3$iommu_arg vmtest.tests=$tests" </dev/null || rc=$?
    QEMU_RC=$rc
}

# True when test $1 may skip in this configuration: the harness provides everything else the
# guest tests need (vhost_vsock is loaded, the CLI is in the initramfs), so a skip there means
# the environment is broken and the test did not run. vfio_type1_iommu needs the IOMMU boot.
allowed_skip() {
    case $1 in
    vfio_type1_iommu) [[ -z ${VM_IOMMU:-} ]] ;;
    *) false ;;
    esac
}

# True when the last boot died in a kernel panic before /init reported anything.
early_panic() {
    local log=$RUN/console.log
    [[ $QEMU_RC -ne 1 && $QEMU_RC -ne 3 ]] &&
        grep -q 'Kernel panic' "$log" &&
        ! grep -qE '^(PASS|FAIL|SKIP) ' <(tr -d '\r' <"$log")
}

report() {
    local log=$RUN/console.log pass fail skip
    tr -d '\r' <"$log" >"$log.txt"
    # Results, with each test's diagnostics ("# ..." lines: timings, the throughput comparison).
    grep -E '^(PASS|FAIL|SKIP) |^# ' "$log.txt" || true
    # What the host side of vfio_host_connects_in saw.
    if [[ -s $RUN/host-connect-in.log ]]; then
        sed 's/^/# host-connect-in: /' "$RUN/host-connect-in.log"
    fi
    pass=$(grep -c '^PASS ' "$log.txt" || true)
    fail=$(grep -c '^FAIL ' "$log.txt" || true)
    skip=$(grep -c '^SKIP ' "$log.txt" || true)
    local verdict=ok
    case $QEMU_RC in
    1) ;; # guest wrote 0 to isa-debug-exit: all ran, none failed
    3) verdict="guest reported failure" ;;
    124 | 137) verdict="timeout after ${VM_TIMEOUT}s (boot hung?)" ;;
    0) verdict="guest powered off without a verdict" ;;
    *) verdict="QEMU exited with status $QEMU_RC" ;;
    esac
    if [[ $verdict == ok ]] && ! grep -q '^VMTEST-DONE' "$log.txt"; then
        verdict="no VMTEST-DONE marker on the console"
    fi
    if [[ $verdict == ok && $((pass + fail + skip)) -eq 0 ]]; then
        verdict="no test reported a result"
    fi
    # Skips: each must be allowed here, and at least one test must have run.
    local name unexpected=()
    while read -r name; do
        allowed_skip "$name" || unexpected+=("$name")
    done < <(sed -n 's/^SKIP \([^:]*\):.*/\1/p' "$log.txt")
    if [[ $verdict == ok && ${#unexpected[@]} -gt 0 ]]; then
        verdict="skipped but expected to run in this configuration: ${unexpected[*]}"
    elif [[ $verdict == ok && $skip -gt 0 && $((pass + fail)) -eq 0 ]]; then
        verdict="every selected test skipped: nothing was tested"
    fi
    if [[ $verdict != ok || $fail -gt 0 ]]; then
        # Prefixed, so the result lines above are the only ones that start with PASS/FAIL/SKIP.
        printf '%s\n' "----- end of the console log ($log) -----" >&2
        tail -n 60 "$log.txt" | sed 's/^/console| /' >&2
        # A failing test explains status 3 by itself; anything else gets its own line.
        if [[ $verdict != ok && ! ($QEMU_RC -eq 3 && $fail -gt 0) ]]; then
            printf 'FAIL harness: %s\n' "$verdict"
        fi
        VM_KEEP=1
    fi
    # The harness's own verdict counts as one failure when no test failed; skips stay apart.
    if [[ $verdict != ok && $fail -eq 0 ]]; then fail=1; fi
    echo "$pass passed, $fail failed, $skip skipped"
    [[ $verdict == ok && $fail -eq 0 ]]
}

main() {
    local start=$SECONDS tests t rc=0
    # The guest program first: it knows the test names, so a typo fails before any download.
    build_vmtest
    if [[ ${1:-} == --list ]]; then
        "$VMTEST" --list
        return 0
    fi
    # The list is read whole first: `vmtest --list | grep -q` let grep exit at the first match,
    # and vmtest then died of the closed pipe (pipefail), a race that failed CI once.
    local known
    known=$("$VMTEST" --list)
    for t in "$@"; do
        grep -qx -- "$t" <<<"$known" || die "unknown test '$t' (see: tests/vm/run.sh --list)"
    done
    apt_install_missing "${HOST_PACKAGES[@]}"
    setup_qemu
    resolve_kernel
    setup_kernel
    build_modules
    setup_vhost_device_vsock
    setup_udev
    tests=$(IFS=,; echo "$*")
    boot "${tests:-default}"
    # QEMU's TCG occasionally crashes the guest kernel while it patches its own code at boot
    # (seen about once in ten boots here: an oops in text_poke/jump-label code, before /init
    # runs). That is the emulator, not a test: boot once more, and say so.
    if early_panic; then
        log "the guest kernel panicked before any test ran (TCG code-patching flake, console in $RUN); booting again"
        boot "${tests:-default}"
    fi
    report || rc=$?
    log "done in $((SECONDS - start))s"
    return "$rc"
}

main "$@"
