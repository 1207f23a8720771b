#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# bind.sh: hand virtio-vsock devices to the drivers vdpa-vsock needs (vfio-pci for PCI
# functions, vhost_vdpa for vDPA devices) and back, the way driverctl does it:
# driver_override, unbind from the current driver, drivers_probe.

set -euo pipefail

SYSFS_ROOT="${SYSFS_ROOT:-/sys}"
PROG="${0##*/}"

# Exit codes.
readonly EXIT_OK=0 EXIT_FAIL=1 EXIT_USAGE=2 EXIT_REFUSED=3

readonly VIRTIO_VENDOR=0x1af4
readonly VSOCK_MODERN=0x1053
readonly VSOCK_TRANSITIONAL=0x1012

DRY_RUN=0
FORCE=0

usage() {
    cat <<EOF
Usage: $PROG [--dry-run] [--force] ACTION

Hand virtio-vsock devices to vfio-pci / vhost_vdpa (for vdpa-vsock) and back.

Actions:
  --status                     show virtio-vsock PCI functions, vDPA devices, their drivers
  --bind vfio-pci BDF...       bind PCI functions to vfio-pci (or any PCI driver, e.g.
                               virtio-pci to give them back to the kernel)
  --bind vhost_vdpa VDPA_DEV...
                               bind vDPA devices (e.g. vdpa0) to vhost_vdpa (or virtio_vdpa)
  --unbind DEV...              unbind PCI functions or vDPA devices and clear driver_override
  --noiommu                    turn on VFIO's unsafe no-IOMMU mode (no DMA isolation!);
                               may be combined with --bind
  -h, --help                   this text

Options:
  --dry-run                    print every sysfs write instead of doing it
  --force                      bind even a device that is in use (an UP network interface,
                               an open VFIO group) or that is not a virtio-vsock function

BDF: DDDD:BB:DD.F, or BB:DD.F (domain 0000 assumed).
Environment: SYSFS_ROOT (default /sys) to work on a copy or fake tree of sysfs.

Exit codes:
  0  success
  1  a sysfs write failed, or the device did not end up on the driver
  2  usage error: bad option, malformed BDF, unknown driver, no such device
  3  refused: the device is in use or not a virtio-vsock function (see --force)
EOF
}

die() {
    local code=$1
    shift
    echo "$PROG: error: $*" >&2
    exit "$code"
}

warn() {
    echo "$PROG: warning: $*" >&2
}

# sysfs_write VALUE PATH: the one place that changes sysfs.
sysfs_write() {
    local value=$1 path=$2
    if ((DRY_RUN)); then
        printf 'would write %q to %s\n' "$value" "$path"
        return 0
    fi
    if ! printf '%s\n' "$value" >"$path" 2>/dev/null; then
        echo "$PROG: error: writing '$value' to $path failed" >&2
        return 1
    fi
}

# read_file PATH: its content, or nothing.
read_file() {
    if [[ -r $1 ]]; then
        cat -- "$1" 2>/dev/null || true
    fi
}

# override_of DEVDIR: the driver_override, or nothing ("(null)" is the kernel's nothing).
override_of() {
    local ov
    ov=$(read_file "$1/driver_override")
    [[ $ov == "(null)" ]] || echo "$ov"
}

# driver_of DEVDIR: the name of the bound driver, or nothing.
driver_of() {
    local link
    link=$(readlink -- "$1/driver" 2>/dev/null) || return 0
    echo "${link##*/}"
}

# normalize_bdf ARG: prints DDDD:BB:DD.F in lower case, or fails.
normalize_bdf() {
    local b=${1,,}
    if [[ $b =~ ^[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$ ]]; then
        b="0000:$b"
    fi
    [[ $b =~ ^[0-9a-f]{4}:[0-9a-f]{2}:([0-9a-f]{2})\.[0-7]$ ]] || return 1
    ((16#${BASH_REMATCH[1]} <= 0x1f)) || return 1
    echo "$b"
}

is_bdf_like() {
    [[ ${1,,} =~ ^([0-9a-f]{4}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-9a-f]+$ ]]
}

pci_dir() { echo "$SYSFS_ROOT/bus/pci/devices/$1"; }
vdpa_dir() { echo "$SYSFS_ROOT/bus/vdpa/devices/$1"; }

is_vsock_pci() {
    local dir=$1
    [[ $(read_file "$dir/vendor") == "$VIRTIO_VENDOR" ]] || return 1
    case $(read_file "$dir/device") in
        "$VSOCK_MODERN" | "$VSOCK_TRANSITIONAL") return 0 ;;
    esac
    return 1
}

# in_use DEVDIR: prints why the device is in use, if it is.
in_use() {
    local dir=$1 op net
    # Its own network interfaces and those of a virtio child (virtio-net puts them there).
    for op in "$dir"/net/*/operstate "$dir"/virtio*/net/*/operstate; do
        [[ -e $op ]] || continue
        if [[ $(read_file "$op") == up ]]; then
            net=${op%/operstate}
            echo "network interface ${net##*/} is up"
            return 0
        fi
    done
    # An open VFIO group (only checkable on the real sysfs).
    if [[ $SYSFS_ROOT == /sys && $(driver_of "$dir") == vfio-pci ]]; then
        local group
        group=$(readlink -- "$dir/iommu_group" 2>/dev/null) || group=
        group=${group##*/}
        for node in "/dev/vfio/$group" "/dev/vfio/noiommu-$group"; do
            if [[ -n $group && -e $node ]] && node_open "$node"; then
                echo "$node is open by a process"
                return 0
            fi
        done
    fi
    return 1
}

# node_open PATH: true when a process has PATH open. fuser when installed (psmisc), else a scan
# of /proc/*/fd (minimal systems and initramfs have no fuser).
node_open() {
    if command -v fuser >/dev/null; then
        fuser -s "$1" 2>/dev/null
        return
    fi
    local fd
    for fd in /proc/[0-9]*/fd/*; do
        [[ $(readlink -- "$fd" 2>/dev/null) == "$1" ]] && return 0
    done
    return 1
}

verify_bound() {
    local dir=$1 want=$2 name=$3
    if [[ $SYSFS_ROOT != /sys ]] || ((DRY_RUN)); then
        return 0 # no kernel behind a fake tree or a dry run
    fi
    local now
    now=$(driver_of "$dir")
    if [[ $now != "$want" ]]; then
        echo "$PROG: error: $name is bound to '${now:-nothing}' after probing, not $want" >&2
        return 1
    fi
}

bind_pci() {
    local driver=$1 arg=$2 bdf dir cur why
    bdf=$(normalize_bdf "$arg") || die "$EXIT_USAGE" "'$arg' is not a PCI address: expected DDDD:BB:DD.F or BB:DD.F (hex, device <= 1f, function 0-7)"
    dir=$(pci_dir "$bdf")
    [[ -d $dir ]] || die "$EXIT_USAGE" "no PCI device $bdf ($dir is missing); see $PROG --status"
    if ! is_vsock_pci "$dir"; then
        ((FORCE)) || die "$EXIT_REFUSED" "$bdf is $(read_file "$dir/vendor"):$(read_file "$dir/device"), not a virtio-vsock function (1af4:1053 or 1af4:1012); --force to bind it anyway"
        warn "$bdf is not a virtio-vsock function; binding it anyway (--force)"
    fi
    if why=$(in_use "$dir"); then
        ((FORCE)) || die "$EXIT_REFUSED" "$bdf is in use: $why; --force to take it anyway"
        warn "$bdf is in use ($why); taking it anyway (--force)"
    fi
    cur=$(driver_of "$dir")
    if [[ $cur == "$driver" ]]; then
        echo "$bdf: already bound to $driver"
        return 0
    fi
    if [[ $cur == virtio-pci && $driver != virtio-pci ]]; then
        warn "$bdf leaves virtio-pci: the kernel's own vsock transport loses this device"
    fi
    sysfs_write "$driver" "$dir/driver_override" || return 1
    if [[ -n $cur ]]; then
        sysfs_write "$bdf" "$dir/driver/unbind" || return 1
    fi
    sysfs_write "$bdf" "$SYSFS_ROOT/bus/pci/drivers_probe" || return 1
    verify_bound "$dir" "$driver" "$bdf" || return 1
    echo "$bdf: ${cur:-no driver} -> $driver"
}

bind_vdpa() {
    local driver=$1 name=$2 dir cur why
    [[ $name =~ ^[A-Za-z0-9_.:-]+$ ]] || die "$EXIT_USAGE" "'$name' is not a vDPA device name (e.g. vdpa0)"
    dir=$(vdpa_dir "$name")
    [[ -d $dir ]] || die "$EXIT_USAGE" "no vDPA device $name ($dir is missing); see $PROG --status"
    if why=$(in_use "$dir"); then
        ((FORCE)) || die "$EXIT_REFUSED" "$name is in use: $why; --force to take it anyway"
        warn "$name is in use ($why); taking it anyway (--force)"
    fi
    cur=$(driver_of "$dir")
    if [[ $cur == "$driver" ]]; then
        echo "$name: already bound to $driver"
        return 0
    fi
    if [[ -e $dir/driver_override ]]; then
        sysfs_write "$driver" "$dir/driver_override" || return 1
        if [[ -n $cur ]]; then
            sysfs_write "$name" "$dir/driver/unbind" || return 1
        fi
        sysfs_write "$name" "$SYSFS_ROOT/bus/vdpa/drivers_probe" || return 1
    else
        # Kernels before 5.19 have no driver_override on the vdpa bus.
        if [[ -n $cur ]]; then
            sysfs_write "$name" "$dir/driver/unbind" || return 1
        fi
        sysfs_write "$name" "$SYSFS_ROOT/bus/vdpa/drivers/$driver/bind" || return 1
    fi
    verify_bound "$dir" "$driver" "$name" || return 1
    echo "$name: ${cur:-no driver} -> $driver"
}

unbind_one() {
    local arg=$1 dir name cur
    if is_bdf_like "$arg"; then
        name=$(normalize_bdf "$arg") || die "$EXIT_USAGE" "'$arg' is not a PCI address: expected DDDD:BB:DD.F or BB:DD.F"
        dir=$(pci_dir "$name")
        [[ -d $dir ]] || die "$EXIT_USAGE" "no PCI device $name ($dir is missing)"
    else
        name=$arg
        dir=$(vdpa_dir "$name")
        [[ -d $dir ]] || die "$EXIT_USAGE" "no PCI device or vDPA device named '$arg'"
    fi
    cur=$(driver_of "$dir")
    if [[ -n $(override_of "$dir") ]]; then
        sysfs_write "" "$dir/driver_override" || return 1
    fi
    if [[ -z $cur ]]; then
        echo "$name: not bound to any driver"
        return 0
    fi
    sysfs_write "$name" "$dir/driver/unbind" || return 1
    echo "$name: unbound from $cur (bind it again with $PROG --bind DRIVER $name)"
}

set_noiommu() {
    local param=$SYSFS_ROOT/module/vfio/parameters/enable_unsafe_noiommu_mode
    cat >&2 <<'EOF'
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! WARNING: VFIO no-IOMMU mode gives devices unrestricted DMA to all memory. !!
!! Any device bound to vfio-pci can then read and write the whole machine,   !!
!! and the kernel is tainted. Use it only in a throwaway VM without an IOMMU.!!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
EOF
    if [[ ! -e $param ]]; then
        die "$EXIT_FAIL" "$param is missing: load the vfio module first (modprobe vfio enable_unsafe_noiommu_mode=1)"
    fi
    sysfs_write Y "$param" || return 1
    echo "VFIO no-IOMMU mode: on"
}

status() {
    local dir bdf found=0 ov group name node child
    echo "PCI virtio-vsock functions (1af4:1053 modern, 1af4:1012 transitional):"
    for dir in "$SYSFS_ROOT"/bus/pci/devices/*; do
        [[ -e $dir ]] || continue
        is_vsock_pci "$dir" || continue
        found=1
        bdf=${dir##*/}
        ov=$(override_of "$dir")
        group=$(readlink -- "$dir/iommu_group" 2>/dev/null) || group=
        printf '  %s  %s:%s  driver=%s  override=%s  iommu_group=%s%s\n' "$bdf" \
            "$(read_file "$dir/vendor")" "$(read_file "$dir/device")" \
            "$(driver_of "$dir" | grep . || echo none)" "${ov:-(none)}" "${group##*/}" \
            "$(in_use "$dir" | sed 's/^/  IN USE: /')"
    done
    ((found)) || echo "  (none)"
    found=0
    echo "vDPA devices:"
    for dir in "$SYSFS_ROOT"/bus/vdpa/devices/*; do
        [[ -e $dir ]] || continue
        found=1
        name=${dir##*/}
        node=
        for child in "$dir"/vhost-vdpa-*; do
            [[ -e $child ]] && node=/dev/${child##*/}
        done
        printf '  %s  driver=%s%s\n' "$name" "$(driver_of "$dir" | grep . || echo none)" \
            "${node:+  node=$node}"
    done
    ((found)) || echo "  (none)"
    local param=$SYSFS_ROOT/module/vfio/parameters/enable_unsafe_noiommu_mode
    echo "VFIO no-IOMMU mode: $(read_file "$param" | grep . || echo 'unknown (vfio not loaded)')"
}

main() {
    local action='' driver='' noiommu=0
    local -a devs=()
    (($#)) || {
        usage >&2
        exit "$EXIT_USAGE"
    }
    while (($#)); do
        case $1 in
            -h | --help)
                usage
                exit "$EXIT_OK"
                ;;
            --dry-run) DRY_RUN=1 ;;
            --force) FORCE=1 ;;
            --noiommu) noiommu=1 ;;
            --status | --unbind)
                [[ -z $action ]] || die "$EXIT_USAGE" "one action at a time ($action and $1 given)"
                action=$1
                ;;
            --bind)
                [[ -z $action ]] || die "$EXIT_USAGE" "one action at a time ($action and $1 given)"
                action=$1
                (($# >= 2)) || die "$EXIT_USAGE" "--bind needs a driver and devices, e.g. --bind vfio-pci 0000:03:00.0"
                driver=$2
                shift
                ;;
            -*) die "$EXIT_USAGE" "unknown option '$1' (see $PROG --help)" ;;
            *) devs+=("$1") ;;
        esac
        shift
    done
    if [[ -z $action ]] && ((noiommu)); then
        set_noiommu || exit "$EXIT_FAIL"
        exit "$EXIT_OK"
    fi
    [[ -n $action ]] || die "$EXIT_USAGE" "no action given: --status, --bind, --unbind or --noiommu (see $PROG --help)"
    if ((DRY_RUN)); then
        echo "dry run: nothing is written under $SYSFS_ROOT"
    fi
    case $action in
        --status)
            ((${#devs[@]} == 0)) || die "$EXIT_USAGE" "--status takes no devices"
            status
            ;;
        --bind | --unbind)
            ((${#devs[@]} > 0)) || die "$EXIT_USAGE" "$action needs at least one device"
            if ((noiommu)); then
                set_noiommu || exit "$EXIT_FAIL"
            fi
            local bus='' rc=0 d
            if [[ $action == --bind ]]; then
                if [[ -d $SYSFS_ROOT/bus/pci/drivers/$driver ]]; then
                    bus=pci
                elif [[ -d $SYSFS_ROOT/bus/vdpa/drivers/$driver ]]; then
                    bus=vdpa
                else
                    case $driver in
                        vfio-pci | virtio-pci | vhost_vdpa | virtio_vdpa)
                            die "$EXIT_USAGE" "driver $driver is not loaded: run modprobe ${driver//-/_}"
                            ;;
                        *) die "$EXIT_USAGE" "unknown driver '$driver': not under $SYSFS_ROOT/bus/{pci,vdpa}/drivers (expected vfio-pci, virtio-pci, vhost_vdpa or virtio_vdpa)" ;;
                    esac
                fi
            fi
            for d in "${devs[@]}"; do
                if [[ $action == --unbind ]]; then
                    unbind_one "$d" || rc=$EXIT_FAIL
                elif [[ $bus == pci ]]; then
                    bind_pci "$driver" "$d" || rc=$EXIT_FAIL
                else
                    bind_vdpa "$driver" "$d" || rc=$EXIT_FAIL
                fi
            done
            exit "$rc"
            ;;
    esac
}

main "$@"
