// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `tools/bind.sh` on a fake sysfs tree (`SYSFS_ROOT`): what it writes where, what it refuses,
//! its exit codes. Nothing here touches the real /sys. The real rebind (a virtio-vsock function
//! in a QEMU guest moved to vfio-pci and back) belongs to the VM tests, `tests/vm/`.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/bind.sh");

/// A fake /sys:
/// - 0000:03:00.0 virtio-vsock (1053) on virtio-pci
/// - 0000:04:00.0 virtio-vsock (1012) on vfio-pci, override vfio-pci, iommu group 12
/// - 0000:05:00.0 virtio-net (1041) on virtio-pci, netdev eth0 (state set per test)
/// - 0000:06:00.0 virtio-vsock with no driver
/// - vdpa0 on virtio_vdpa (with driver_override), vdpa1 on nothing (without it)
struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn new() -> Fake {
        let f = Fake {
            dir: tempfile::tempdir().unwrap(),
        };
        for d in ["vfio-pci", "virtio-pci"] {
            f.put(&format!("bus/pci/drivers/{d}/bind"), "");
            f.put(&format!("bus/pci/drivers/{d}/unbind"), "");
        }
        f.put("bus/pci/drivers_probe", "");
        for (bdf, dev, drv, ov) in [
            ("0000:03:00.0", "0x1053", Some("virtio-pci"), "(null)"),
            ("0000:04:00.0", "0x1012", Some("vfio-pci"), "vfio-pci"),
            ("0000:05:00.0", "0x1041", Some("virtio-pci"), "(null)"),
            ("0000:06:00.0", "0x1053", None, "(null)"),
        ] {
            let base = format!("bus/pci/devices/{bdf}");
            f.put(&format!("{base}/vendor"), "0x1af4\n");
            f.put(&format!("{base}/device"), &format!("{dev}\n"));
            f.put(&format!("{base}/driver_override"), &format!("{ov}\n"));
            if let Some(d) = drv {
                symlink(
                    format!("../../drivers/{d}"),
                    f.sys(&format!("{base}/driver")),
                )
                .unwrap();
            }
        }
        f.put("kernel/iommu_groups/12/type", "DMA\n");
        symlink(
            "../../../kernel/iommu_groups/12",
            f.sys("bus/pci/devices/0000:04:00.0/iommu_group"),
        )
        .unwrap();
        f.put(
            "bus/pci/devices/0000:05:00.0/virtio2/net/eth0/operstate",
            "down\n",
        );
        for d in ["vhost_vdpa", "virtio_vdpa"] {
            f.put(&format!("bus/vdpa/drivers/{d}/bind"), "");
            f.put(&format!("bus/vdpa/drivers/{d}/unbind"), "");
        }
        f.put("bus/vdpa/drivers_probe", "");
        f.put("bus/vdpa/devices/vdpa0/driver_override", "(null)\n");
        f.put("bus/vdpa/devices/vdpa0/virtio0/device", "0x0013\n");
        symlink(
            "../../drivers/virtio_vdpa",
            f.sys("bus/vdpa/devices/vdpa0/driver"),
        )
        .unwrap();
        std::fs::create_dir_all(f.sys("bus/vdpa/devices/vdpa1")).unwrap();
        f
    }

    fn sys(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn put(&self, rel: &str, content: &str) {
        let p = self.sys(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn get(&self, rel: &str) -> String {
        std::fs::read_to_string(self.sys(rel)).unwrap()
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(SCRIPT)
            .args(args)
            .env("SYSFS_ROOT", self.dir.path())
            .output()
            .unwrap()
    }

    /// Every regular file under the tree with its content, to prove nothing changed.
    fn snapshot(&self) -> Vec<(PathBuf, String)> {
        fn walk(p: &Path, out: &mut Vec<(PathBuf, String)>) {
            for e in std::fs::read_dir(p).unwrap() {
                let e = e.unwrap();
                let ft = e.file_type().unwrap();
                if ft.is_dir() {
                    walk(&e.path(), out);
                } else if ft.is_file() {
                    out.push((e.path(), std::fs::read_to_string(e.path()).unwrap()));
                }
            }
        }
        let mut v = Vec::new();
        walk(self.dir.path(), &mut v);
        v.sort();
        v
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
fn expect(out: &Output, code: i32, stderr_has: &str) {
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(code), "stdout:\n{o}\nstderr:\n{e}");
    assert!(e.contains(stderr_has), "{stderr_has:?} not in stderr:\n{e}");
}

#[test]
fn shellcheck_clean() {
    let helpers = [
        concat!(env!("CARGO_MANIFEST_DIR"), "/udev/vdpa-vsock-vfio-group"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/udev/vdpa-vsock-vdpa-node"),
    ];
    match Command::new("shellcheck")
        .arg(SCRIPT)
        .args(helpers)
        .output()
    {
        Ok(out) => assert!(out.status.success(), "{}", text(&out.stdout)),
        Err(e) => {
            eprintln!("skipped: shellcheck not installed ({e}); apt-get install -y shellcheck")
        }
    }
}

/// The unit passes `systemd-analyze verify`, with ExecStart pointed at the built binary.
#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tools/systemd/vdpa-vsock.service"
    ))
    .unwrap()
    .replace(
        "/usr/local/bin/vdpa-vsock",
        env!("CARGO_BIN_EXE_vdpa-vsock"),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vdpa-vsock.service");
    std::fs::write(&path, unit).unwrap();
    match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
    {
        Ok(out) => assert!(
            out.status.success() && out.stderr.is_empty(),
            "{}{}",
            text(&out.stdout),
            text(&out.stderr)
        ),
        Err(e) => eprintln!("skipped: systemd-analyze not installed ({e})"),
    }
}

#[test]
fn help_and_usage_errors() {
    let f = Fake::new();
    let out = f.run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    assert!(
        help.contains("Exit codes:") && help.contains("--dry-run") && help.contains("SYSFS_ROOT")
    );
    expect(&f.run(&[]), 2, "Usage:");
    expect(
        &f.run(&["--frobnicate"]),
        2,
        "unknown option '--frobnicate'",
    );
    expect(&f.run(&["--bind"]), 2, "--bind needs a driver and devices");
    expect(
        &f.run(&["--bind", "vfio-pci"]),
        2,
        "needs at least one device",
    );
    expect(
        &f.run(&["--status", "--unbind", "x"]),
        2,
        "one action at a time",
    );
}

#[test]
fn status_lists_devices_and_drivers() {
    let f = Fake::new();
    f.put("bus/pci/devices/0000:03:00.0/net/eth9/operstate", "up\n");
    let out = f.run(&["--status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.contains("0000:03:00.0  0x1af4:0x1053  driver=virtio-pci  override=(none)"),
        "{s}"
    );
    assert!(s.contains("IN USE: network interface eth9 is up"), "{s}");
    assert!(
        s.contains(
            "0000:04:00.0  0x1af4:0x1012  driver=vfio-pci  override=vfio-pci  iommu_group=12"
        ),
        "{s}"
    );
    assert!(
        s.contains("0000:06:00.0  0x1af4:0x1053  driver=none"),
        "{s}"
    );
    assert!(!s.contains("0000:05:00.0"), "virtio-net listed: {s}");
    assert!(s.contains("vdpa0  driver=virtio_vdpa"), "{s}");
    assert!(s.contains("vdpa1  driver=none"), "{s}");
}

#[test]
fn bind_pci_to_vfio_like_driverctl() {
    let f = Fake::new();
    let out = f.run(&["--bind", "vfio-pci", "03:00.0", "0000:06:00.0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        f.get("bus/pci/devices/0000:03:00.0/driver_override"),
        "vfio-pci\n"
    );
    assert_eq!(f.get("bus/pci/drivers/virtio-pci/unbind"), "0000:03:00.0\n");
    // Both went through drivers_probe; the last write is what the file holds.
    assert_eq!(f.get("bus/pci/drivers_probe"), "0000:06:00.0\n");
    assert_eq!(
        f.get("bus/pci/devices/0000:06:00.0/driver_override"),
        "vfio-pci\n"
    );
    let s = text(&out.stdout);
    assert!(s.contains("0000:03:00.0: virtio-pci -> vfio-pci"), "{s}");
    assert!(s.contains("0000:06:00.0: no driver -> vfio-pci"), "{s}");
    assert!(text(&out.stderr).contains("kernel's own vsock transport loses this device"));
    // Already there: nothing to do.
    let out = f.run(&["--bind", "vfio-pci", "0000:04:00.0"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("already bound to vfio-pci"));
    // And back to the kernel.
    let out = f.run(&["--bind", "virtio-pci", "0000:04:00.0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        f.get("bus/pci/devices/0000:04:00.0/driver_override"),
        "virtio-pci\n"
    );
    assert_eq!(f.get("bus/pci/drivers/vfio-pci/unbind"), "0000:04:00.0\n");
}

#[test]
fn dry_run_writes_nothing() {
    let f = Fake::new();
    let before = f.snapshot();
    let out = f.run(&["--dry-run", "--bind", "vfio-pci", "0000:03:00.0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    for path in [
        "bus/pci/devices/0000:03:00.0/driver_override",
        "bus/pci/devices/0000:03:00.0/driver/unbind",
        "bus/pci/drivers_probe",
    ] {
        assert!(
            s.contains(&format!("to {}", f.sys(path).display())),
            "{path} not in:\n{s}"
        );
    }
    assert!(s.contains("would write vfio-pci to"), "{s}");
    let out = f.run(&["--dry-run", "--unbind", "0000:04:00.0", "vdpa0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = f.run(&["--dry-run", "--noiommu"]);
    assert_eq!(out.status.code(), Some(1)); // the parameter is missing in this tree
    f.put("module/vfio/parameters/enable_unsafe_noiommu_mode", "N\n");
    let before_noiommu = f.snapshot();
    let out = f.run(&["--dry-run", "--noiommu"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(f.snapshot(), before_noiommu);
    assert_ne!(before, before_noiommu);
}

#[test]
fn refuses_an_active_netdev_unless_forced() {
    let f = Fake::new();
    f.put("bus/pci/devices/0000:03:00.0/net/eth0/operstate", "up\n");
    let before = f.snapshot();
    expect(
        &f.run(&["--bind", "vfio-pci", "0000:03:00.0"]),
        3,
        "0000:03:00.0 is in use: network interface eth0 is up; --force",
    );
    assert_eq!(f.snapshot(), before, "a refusal wrote something");
    let out = f.run(&["--force", "--bind", "vfio-pci", "0000:03:00.0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("taking it anyway"));
    assert_eq!(
        f.get("bus/pci/devices/0000:03:00.0/driver_override"),
        "vfio-pci\n"
    );
    // A down interface is no reason to refuse.
    let f = Fake::new();
    f.put("bus/pci/devices/0000:03:00.0/net/eth0/operstate", "down\n");
    assert_eq!(
        f.run(&["--bind", "vfio-pci", "0000:03:00.0"]).status.code(),
        Some(0)
    );
}

#[test]
fn refuses_what_is_not_vsock() {
    let f = Fake::new();
    expect(
        &f.run(&["--bind", "vfio-pci", "0000:05:00.0"]),
        3,
        "not a virtio-vsock function",
    );
    // Forced, the virtio-net function's interface under virtio2/ is still checked.
    f.put(
        "bus/pci/devices/0000:05:00.0/virtio2/net/eth0/operstate",
        "up\n",
    );
    expect(
        &f.run(&["--force", "--bind", "vfio-pci", "0000:05:00.0"]),
        0,
        "taking it anyway",
    );
}

#[test]
fn rejects_bad_bdfs_unknown_drivers_and_missing_devices() {
    let f = Fake::new();
    for bad in [
        "0000:03:00",
        "zz:00.0",
        "0000:03:20.0",
        "0000:03:00.8",
        "3:0.0",
    ] {
        expect(
            &f.run(&["--bind", "vfio-pci", bad]),
            2,
            &format!("'{bad}' is not a PCI address"),
        );
    }
    expect(
        &f.run(&["--bind", "vfio-pci", "0000:09:00.0"]),
        2,
        "no PCI device 0000:09:00.0",
    );
    expect(
        &f.run(&["--bind", "e1000e", "0000:03:00.0"]),
        2,
        "unknown driver 'e1000e'",
    );
    std::fs::remove_dir_all(f.sys("bus/pci/drivers/vfio-pci")).unwrap();
    expect(
        &f.run(&["--bind", "vfio-pci", "0000:03:00.0"]),
        2,
        "modprobe vfio_pci",
    );
    expect(
        &f.run(&["--bind", "vhost_vdpa", "vdpa9"]),
        2,
        "no vDPA device vdpa9",
    );
    expect(
        &f.run(&["--unbind", "nosuch"]),
        2,
        "no PCI device or vDPA device named 'nosuch'",
    );
}

#[test]
fn bind_vdpa_to_vhost_vdpa() {
    let f = Fake::new();
    let out = f.run(&["--bind", "vhost_vdpa", "vdpa0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        f.get("bus/vdpa/devices/vdpa0/driver_override"),
        "vhost_vdpa\n"
    );
    assert_eq!(f.get("bus/vdpa/drivers/virtio_vdpa/unbind"), "vdpa0\n");
    assert_eq!(f.get("bus/vdpa/drivers_probe"), "vdpa0\n");
    // No driver_override (kernels before 5.19): the driver's bind file.
    let out = f.run(&["--bind", "vhost_vdpa", "vdpa1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(f.get("bus/vdpa/drivers/vhost_vdpa/bind"), "vdpa1\n");
}

#[test]
fn unbind_clears_the_override() {
    let f = Fake::new();
    let out = f.run(&["--unbind", "0000:04:00.0", "vdpa0", "0000:06:00.0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(f.get("bus/pci/devices/0000:04:00.0/driver_override"), "\n");
    assert_eq!(f.get("bus/pci/drivers/vfio-pci/unbind"), "0000:04:00.0\n");
    assert_eq!(f.get("bus/vdpa/drivers/virtio_vdpa/unbind"), "vdpa0\n");
    assert!(text(&out.stdout).contains("0000:06:00.0: not bound to any driver"));
}

#[test]
fn noiommu_warns_loudly() {
    let f = Fake::new();
    expect(
        &f.run(&["--noiommu"]),
        1,
        "modprobe vfio enable_unsafe_noiommu_mode=1",
    );
    f.put("module/vfio/parameters/enable_unsafe_noiommu_mode", "N\n");
    let out = f.run(&["--noiommu", "--bind", "vfio-pci", "0000:06:00.0"]);
    expect(
        &out,
        0,
        "WARNING: VFIO no-IOMMU mode gives devices unrestricted DMA",
    );
    assert_eq!(
        f.get("module/vfio/parameters/enable_unsafe_noiommu_mode"),
        "Y\n"
    );
    assert_eq!(
        f.get("bus/pci/devices/0000:06:00.0/driver_override"),
        "vfio-pci\n"
    );
}

#[test]
fn udev_vfio_group_helper() {
    const HELPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/udev/vdpa-vsock-vfio-group");
    let f = Fake::new();
    let group = |n: &str, members: &[&str]| {
        for m in members {
            let d = f.sys(&format!("kernel/iommu_groups/{n}/devices"));
            std::fs::create_dir_all(&d).unwrap();
            symlink(format!("../../../../bus/pci/devices/{m}"), d.join(m)).unwrap();
        }
    };
    group("12", &["0000:04:00.0"]); // vsock on vfio-pci
    group("13", &["0000:03:00.0", "0000:05:00.0"]); // vsock + virtio-net
    group("14", &["0000:05:00.0"]); // virtio-net only
    let run = |arg: &str| {
        Command::new("sh")
            .arg(HELPER)
            .arg(arg)
            .env("SYSFS_ROOT", f.dir.path())
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(run("12"), Some(0));
    assert_eq!(run("noiommu-12"), Some(0));
    assert_eq!(
        run("13"),
        Some(0),
        "virtio-net of group 13 is not on vfio-pci"
    );
    assert_eq!(run("14"), Some(1));
    assert_eq!(run("99"), Some(1));
    assert_eq!(run("vfio"), Some(1));
    // A non-vsock member handed to vfio-pci takes the group out.
    let net = f.sys("bus/pci/devices/0000:05:00.0/driver");
    std::fs::remove_file(&net).unwrap();
    symlink("../../drivers/vfio-pci", &net).unwrap();
    assert_eq!(run("13"), Some(1));
}

#[test]
fn udev_vdpa_node_helper() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    const HELPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/udev/vdpa-vsock-vdpa-node");
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "skipped: creating the character device node needs root (mknod); CI runs as root"
        );
        return;
    }
    let f = Fake::new();
    std::fs::create_dir_all(f.sys("bus/vdpa/devices/vdpa0/vhost-vdpa-3")).unwrap();
    std::fs::create_dir_all(f.sys("bus/vdpa/devices/vdpa1")).unwrap(); // not on vhost_vdpa
    let dev = tempfile::tempdir().unwrap();
    let node = dev.path().join("vhost-vdpa-3");
    let other = dev.path().join("vhost-vdpa-4");
    for n in [&node, &other] {
        nix::sys::stat::mknod(
            n,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
    }
    let run = |arg: &str| {
        Command::new("sh")
            .arg(HELPER)
            .arg(arg)
            .env("SYSFS_ROOT", f.dir.path())
            .env("DEV_ROOT", dev.path())
            .env("VSOCK_GROUP", "nogroup")
            .status()
            .unwrap()
            .code()
    };
    let meta = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.gid(), m.permissions().mode() & 0o777)
    };
    assert_eq!(run("vdpa1"), Some(1), "no vhost-vdpa node under vdpa1");
    assert_eq!(run("../vdpa0"), Some(1), "a path is not a device name");
    assert_eq!(run(""), Some(1));
    assert_eq!(meta(&node), (0, 0o600), "nothing changed yet");
    assert_eq!(run("vdpa0"), Some(0));
    assert_eq!(
        meta(&node),
        (65534, 0o660),
        "vdpa0's node: group nogroup, 0660"
    );
    assert_eq!(
        meta(&other),
        (0, 0o600),
        "another device's node is left alone"
    );
}
