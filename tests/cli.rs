// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `vdpa-vsock` binary as a user meets it: help, error lines and exit codes, `list` and
//! `inspect` (also on a fake sysfs tree), and the `serve` daemon over the sim device.

use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "common/serve.rs"]
mod serve;

use serve::{proc_status, read_line, Daemon, BIN};

fn cmd() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("SYSFS_ROOT")
        .env_remove("DEV_ROOT")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    c
}

fn run(args: &[&str]) -> Output {
    cmd().args(args).output().expect("running vdpa-vsock")
}

/// The run failed with `code`, and stderr has exactly one error line holding a hint and every
/// one of `needles`. Returns that line.
#[track_caller]
fn expect_error(out: &Output, code: i32, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr:\n{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("vdpa-vsock: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one error line, stderr:\n{stderr}");
    let line = lines[0];
    assert!(line.contains("(hint: "), "no hint in {line:?}");
    for n in needles {
        assert!(line.contains(n), "{n:?} missing from {line:?}");
    }
    line.to_string()
}

#[test]
fn help_on_every_subcommand() {
    for sub in [
        &["--help"][..],
        &["connect", "--help"],
        &["listen", "--help"],
        &["bench", "--help"],
        &["list", "--help"],
        &["inspect", "--help"],
        &["serve", "--help"],
    ] {
        let out = run(sub);
        assert_eq!(out.status.code(), Some(0), "{sub:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{sub:?}"
        );
    }
    let top = String::from_utf8_lossy(&run(&["--help"]).stdout).to_string();
    assert!(top.contains("Exit codes: 0 success, 1 runtime failure, 2 usage error"));
}

#[test]
fn bad_spec_is_a_usage_error() {
    let out = run(&["connect", "--device", "vhost-vdpa", "2:7"]);
    expect_error(&out, 2, &["invalid device spec", "absolute path"]);
    let out = run(&["serve", "--device", "bogus", "--uds", "/tmp/x"]);
    expect_error(&out, 2, &["unknown device kind", "expected one of"]);
    let out = run(&["inspect", "vfio:03:00.0"]);
    expect_error(&out, 2, &["DDDD:BB:DD.F"]);
}

#[test]
fn bad_cid_port_is_a_usage_error() {
    expect_error(&run(&["connect", "2x7"]), 2, &["expected CID:PORT"]);
    expect_error(&run(&["connect", "two:7"]), 2, &["bad CID"]);
    expect_error(&run(&["connect", "2:99999999999"]), 2, &["bad port"]);
    let t = Instant::now();
    expect_error(
        &run(&["connect", "99999999999:1"]),
        2,
        &["CID 99999999999", "does not fit in 32 bits"],
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    expect_error(&run(&["serve"]), 2, &["--uds"]);
}

#[test]
fn missing_device_node() {
    let out = run(&["connect", "--device", "vhost-vdpa:/dev/nonexistent", "2:7"]);
    expect_error(
        &out,
        1,
        &["/dev/nonexistent does not exist", "vdpa-vsock list"],
    );
    let out = run(&["inspect", "vhost-vsock:/dev/nonexistent,cid=3"]);
    expect_error(&out, 1, &["does not exist"]);
    let out = run(&[
        "serve",
        "--device",
        "vfio:0000:ff:1f.7",
        "--uds",
        "/tmp/never",
    ]);
    expect_error(&out, 1, &["no PCI function 0000:ff:1f.7"]);
}

#[test]
fn wrong_kind_of_node() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vhost-vdpa-0");
    std::fs::write(&file, b"").unwrap();
    let spec = format!("vhost-vdpa:{}", file.display());
    let out = run(&["connect", "--device", &spec, "2:7"]);
    expect_error(
        &out,
        1,
        &[
            "is a regular file, not a character device",
            "vdpa-vsock list",
        ],
    );
    let spec = format!("vhost-vsock:{},cid=5", dir.path().display());
    let out = run(&["inspect", &spec]);
    expect_error(&out, 1, &["is a directory, not a character device"]);
    // A character device that is not a vhost node: its first ioctl fails with ENOTTY.
    let out = run(&["connect", "--device", "vhost-vdpa:/dev/null", "2:7"]);
    expect_error(
        &out,
        1,
        &["Inappropriate ioctl", "not a vhost device of this kind"],
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `cmd()` as user nobody when we are root (CI), else as ourselves.
fn cmd_unprivileged() -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = cmd();
    if is_root() {
        c.uid(65534).gid(65534);
    }
    c
}

#[test]
fn no_permission() {
    use std::os::unix::fs::PermissionsExt;
    // A directory the user cannot enter: the node inside cannot even be looked at.
    let dir = tempfile::tempdir().unwrap();
    let closed = dir.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o000)).unwrap();
    let spec = format!("vhost-vdpa:{}/vhost-vdpa-0", closed.display());
    let out = cmd_unprivileged()
        .args(["connect", "--device", &spec, "2:7"])
        .output()
        .unwrap();
    expect_error(&out, 1, &["Permission denied", "group vsock"]);

    // A node without read-write access for the user (creating one needs root: mknod).
    if !is_root() {
        eprintln!(
            "no_permission: not root, the device-node half needs mknod; covered in CI (root)"
        );
        return;
    }
    let node = dir.path().join("vhost-vsock");
    nix::sys::stat::mknod(
        &node,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let spec = format!("vhost-vsock:{},cid=5", node.display());
    for args in [
        &["connect", "--device", &spec, "2:7"][..],
        &["inspect", &spec],
        &[
            "serve",
            "--device",
            &spec,
            "--uds",
            "/tmp/vdpa-vsock-never.sock",
        ],
    ] {
        let out = cmd_unprivileged().args(args).output().unwrap();
        expect_error(
            &out,
            1,
            &[
                "no read-write access to",
                "join group vsock",
                "udev/README.md",
            ],
        );
    }
}

#[test]
fn listen_on_port_any_prints_the_port_picked() {
    use std::io::BufRead;
    let mut child = cmd()
        .args(["listen", "4294967295"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning vdpa-vsock listen");
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let port: u32 = line
        .strip_prefix("listening on 3:")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    assert_ne!(port, u32::MAX, "{line:?}");
}

#[test]
fn connection_refused_has_a_hint() {
    let out = run(&["connect", "2:1234"]);
    expect_error(&out, 1, &["connecting to 2:1234", "sim host serves 7"]);
}

/// `vdpa-vsock list | head -1` and the like: the reader is gone before we write. Every printing
/// subcommand stops quietly with status 0 (no panic, no error line), as a Unix tool would.
#[test]
fn stdout_closed_by_the_reader_is_quiet() {
    for args in [
        &["list"][..],
        &["list", "--json"],
        &["inspect", "sim"],
        &["inspect", "sim", "--json"],
    ] {
        let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
        drop(read_end);
        let out = cmd()
            .args(args)
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::piped())
            .output()
            .expect("running vdpa-vsock");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: stderr:\n{stderr}");
        assert!(stderr.is_empty(), "{args:?}: stderr:\n{stderr}");
    }
    // A device that fails to open still fails, closed pipe or not.
    let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
    drop(read_end);
    let out = cmd()
        .args(["inspect", "vhost-vdpa:/nonexistent/vhost-vdpa-9"])
        .stdout(Stdio::from(write_end))
        .output()
        .expect("running vdpa-vsock");
    expect_error(&out, 1, &["/nonexistent/vhost-vdpa-9"]);
}

/// A short bench run: every row is there, measured (no speed is asserted: that is the bench's
/// job, not a test's), and a bad `--buffer-offset` is a usage error.
#[test]
fn bench_json_has_every_row() {
    let out = run(&[
        "bench",
        "--bytes",
        "1048576",
        "--round-trips",
        "50",
        "--buffer-offset",
        "16",
        "--scale",
        "10,30",
        "--scale-ops",
        "20",
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_slice(&out.stdout).expect("bench --json is JSON");
    let rows = rows.as_array().expect("an array of rows");
    let names: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["workload"].as_str().unwrap(),
                r["transport"].as_str().unwrap(),
            )
        })
        .collect();
    for t in [
        "vdpa-vsock sim",
        "unix socketpair",
        "tcp loopback",
        "memcpy",
    ] {
        assert!(
            names.contains(&("one-way 64KiB writes", t)),
            "{t}: {names:?}"
        );
    }
    for t in [
        "vdpa-vsock sim eventfd",
        "vdpa-vsock sim busy-poll",
        "unix socketpair",
        "tcp loopback",
    ] {
        assert!(names.contains(&("ping-pong 64B", t)), "{t}: {names:?}");
    }
    // With the tokio feature: the async one-way and ping-pong rows beside the blocking ones.
    let async_rows = if cfg!(feature = "tokio") {
        for w in ["one-way 64KiB writes", "ping-pong 64B"] {
            assert!(
                names.contains(&(w, "vdpa-vsock sim async")),
                "{w}: {names:?}"
            );
        }
        2
    } else {
        0
    };
    // 8 rows as before, the 16-connection row, the async rows, and two rows per --scale value
    // (no memory row below 1,000 open streams).
    assert_eq!(rows.len(), 8 + 1 + async_rows + 2 * 2, "{names:?}");
    for r in rows {
        assert!(r["value"].as_f64().unwrap() > 0.0, "{r}");
        for field in ["unit", "vs_socketpair", "device"] {
            assert!(!r[field].is_null(), "{field} missing: {r}");
        }
    }
    let find = |w: &str| {
        rows.iter()
            .find(|r| r["workload"] == w)
            .unwrap_or_else(|| panic!("no row {w:?}: {names:?}"))
    };
    assert_eq!(find("one-way 64KiB writes, 16 conns")["connections"], 16);
    for n in [10, 30] {
        for w in [
            format!("connect+close, {n} open"),
            format!("echo 1B rtt, {n} open"),
        ] {
            let r = find(&w);
            assert_eq!(r["open_streams"], n, "{r}");
            assert_eq!(r["ops"], 20, "{r}");
            assert_eq!(r["unit"], "us/op", "{r}");
        }
    }
    let out = run(&["bench", "--buffer-offset", "4096"]);
    expect_error(&out, 2, &["--buffer-offset", "4096"]);
}

/// `--peer`: a malformed value and a real device without one are usage errors; a peer that
/// refuses is a runtime error naming the address that refused.
#[test]
fn bench_peer_errors() {
    for (bad, why) in [
        ("2x9", "expected CID:PORT"),
        ("2:9,x", "bad echo port"),
        ("2:9,9", "different ports"),
    ] {
        let out = run(&["bench", "--peer", bad]);
        expect_error(&out, 2, &["--peer", "CID:PORT[,ECHO_PORT]", why]);
    }
    let out = run(&["bench", "--device", "vhost-vsock:/nonexistent,cid=4"]);
    expect_error(&out, 2, &["needs --peer"]);
    let small = ["--bytes", "65536", "--round-trips", "10", "--scale", "1"];
    let out = run(&[&["bench", "--peer", "2:4242"][..], &small].concat());
    expect_error(&out, 1, &["sink at 2:4242", "refused"]);
    let out = run(&[&["bench", "--peer", "2:9,4243"][..], &small].concat());
    expect_error(&out, 1, &["echo service at 2:4243", "refused"]);
}

/// Without an echo port only the one-way rows of vdpa-vsock run, and the table says so.
#[test]
fn bench_sink_only_peer() {
    let out = run(&[
        "bench",
        "--peer",
        "2:9",
        "--bytes",
        "1048576",
        "--round-trips",
        "10",
        "--parallel",
        "3",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("one-way 64KiB writes, 3 conns"), "{stdout}");
    assert!(!stdout.contains("vdpa-vsock sim eventfd"), "{stdout}");
    assert!(stdout.contains("ping-pong and scale rows of vdpa-vsock were skipped"));
}

/// With stderr a pipe (as in CI and logs) the progress display is hidden: no `\r`, no escape
/// codes, nothing at all on stderr.
#[test]
fn bench_stderr_is_quiet_without_a_terminal() {
    let out = run(&[
        "bench",
        "--bytes",
        "1048576",
        "--round-trips",
        "100",
        "--scale",
        "10",
        "--scale-ops",
        "20",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.stderr.contains(&0x1b) && !out.stderr.contains(&b'\r'),
        "progress codes on stderr: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "stderr: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ping-pong"));
}

#[test]
fn list_json_parses() {
    // An empty /sys and /dev: the machine's own devices are never looked at by a test.
    let t = tempfile::tempdir().unwrap();
    for d in ["sys", "dev"] {
        std::fs::create_dir(t.path().join(d)).unwrap();
    }
    let run = |args: &[&str]| fake_cmd(&t).args(args).output().unwrap();
    let out = run(&["list", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).expect("list --json is JSON");
    let devs = v["devices"].as_array().unwrap();
    let sim = devs.iter().find(|d| d["kind"] == "sim").unwrap();
    assert_eq!(sim["usable"], true);
    assert_eq!(sim["spec"], "sim");
    assert!(devs.iter().any(|d| d["kind"] == "vhost-vsock"));
    assert_eq!(run(&["list"]).status.code(), Some(0));
}

/// A fake /sys and /dev: two vDPA devices, three PCI functions, vhost-vsock missing.
fn fake_tree() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let sys = t.path().join("sys");
    let dev = t.path().join("dev");
    let mk = |p: &Path| std::fs::create_dir_all(p).unwrap();
    let put = |p: PathBuf, s: &str| {
        mk(p.parent().unwrap());
        std::fs::write(p, s).unwrap()
    };
    for d in ["vhost_vdpa", "virtio_vdpa"] {
        mk(&sys.join("bus/vdpa/drivers").join(d));
    }
    for d in ["vfio-pci", "virtio-pci"] {
        mk(&sys.join("bus/pci/drivers").join(d));
    }
    // vdpa0: bound to vhost_vdpa, node present.
    let v0 = sys.join("bus/vdpa/devices/vdpa0");
    mk(&v0.join("vhost-vdpa-0"));
    symlink("../../drivers/vhost_vdpa", v0.join("driver")).unwrap();
    put(dev.join("vhost-vdpa-0"), "");
    // vdpa1: a net device on virtio_vdpa.
    let v1 = sys.join("bus/vdpa/devices/vdpa1");
    put(v1.join("virtio1/device"), "0x0001\n");
    symlink("../../drivers/virtio_vdpa", v1.join("driver")).unwrap();
    // PCI: vsock on vfio-pci (group 7), vsock on virtio-pci, a virtio-net function.
    let pci = sys.join("bus/pci/devices");
    for (bdf, id, drv) in [
        ("0000:03:00.0", "0x1053", Some("vfio-pci")),
        ("0000:04:00.0", "0x1012", Some("virtio-pci")),
        ("0000:05:00.0", "0x1041", Some("virtio-pci")),
        ("0000:06:00.0", "0x1053", None),
        ("0000:07:00.0", "0x1053", Some("vfio-pci")),
    ] {
        put(pci.join(bdf).join("vendor"), "0x1af4\n");
        put(pci.join(bdf).join("device"), &format!("{id}\n"));
        if let Some(d) = drv {
            symlink(format!("../../drivers/{d}"), pci.join(bdf).join("driver")).unwrap();
        }
    }
    mk(&sys.join("kernel/iommu_groups/7"));
    symlink(
        "../../../kernel/iommu_groups/7",
        pci.join("0000:03:00.0/iommu_group"),
    )
    .unwrap();
    put(dev.join("vfio/7"), "");
    put(dev.join("vfio/vfio"), "");
    // 0000:07:00.0: on vfio-pci in VFIO's no-IOMMU mode (group 8 has only a noiommu-8 node).
    mk(&sys.join("kernel/iommu_groups/8"));
    symlink(
        "../../../kernel/iommu_groups/8",
        pci.join("0000:07:00.0/iommu_group"),
    )
    .unwrap();
    put(dev.join("vfio/noiommu-8"), "");
    t
}

fn fake_cmd(t: &tempfile::TempDir) -> Command {
    let mut c = cmd();
    c.env("SYSFS_ROOT", t.path().join("sys"))
        .env("DEV_ROOT", t.path().join("dev"));
    c
}

#[test]
fn list_on_a_fake_tree() {
    let t = fake_tree();
    let out = fake_cmd(&t).args(["list", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let devs = v["devices"].as_array().unwrap();
    let by_name = |n: &str| {
        devs.iter()
            .find(|d| d["name"] == n)
            .unwrap_or_else(|| panic!("{n} not listed: {v:#}"))
    };
    let reason = |n: &str| by_name(n)["reason"].as_str().unwrap_or("").to_string();

    let vdpa0 = by_name("vdpa0");
    assert_eq!(vdpa0["facts"]["driver"], "vhost_vdpa");
    let node = t.path().join("dev/vhost-vdpa-0");
    assert_eq!(vdpa0["spec"], format!("vhost-vdpa:{}", node.display()));
    assert_eq!(vdpa0["usable"], true, "{vdpa0}");
    assert_eq!(by_name("vdpa1")["usable"], false);
    assert!(reason("vdpa1").contains("not a vsock device"));
    assert!(by_name("vdpa1")["facts"]["device_id"]
        .as_str()
        .unwrap()
        .contains("net"));

    let p3 = by_name("0000:03:00.0");
    assert_eq!(p3["facts"]["driver"], "vfio-pci");
    assert_eq!(p3["facts"]["iommu_group"], "7");
    assert_eq!(p3["usable"], true, "{p3}");
    assert_eq!(p3["spec"], "vfio:0000:03:00.0");
    let p7 = by_name("0000:07:00.0");
    assert_eq!(p7["spec"], "vfio:0000:07:00.0,noiommu", "{p7}");
    assert!(p7["facts"]["iommu"]
        .as_str()
        .unwrap_or_default()
        .contains("no DMA isolation"));
    assert_eq!(p7["usable"], true, "{p7}");
    // The transitional function is offered like the modern ones (one check for list, auto and
    // vfio open): it is driven through its modern interface.
    assert!(by_name("0000:04:00.0")["facts"]["device"]
        .as_str()
        .unwrap()
        .starts_with("0x1012 (transitional virtio-vsock"));
    assert!(by_name("0000:03:00.0")["facts"]["device"]
        .as_str()
        .unwrap()
        .starts_with("0x1053 (modern virtio-vsock"));
    assert!(reason("0000:04:00.0").contains("bound to virtio-pci"));
    assert!(reason("0000:04:00.0").contains("tools/bind.sh --bind vfio-pci 0000:04:00.0"));
    assert!(reason("0000:06:00.0").contains("no driver bound"));
    assert!(
        devs.iter().all(|d| d["name"] != "0000:05:00.0"),
        "virtio-net listed"
    );
    assert!(
        reason(&t.path().join("dev/vhost-vsock").display().to_string()).contains("does not exist")
    );

    // The flags do the same as the variables.
    let out = cmd()
        .arg("--sysfs-root")
        .arg(t.path().join("sys"))
        .arg("--dev-root")
        .arg(t.path().join("dev"))
        .arg("list")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("0000:04:00.0"), "{text}");
}

#[test]
fn inspect_sim_json() {
    let out = run(&["inspect", "sim", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("inspect --json is JSON");
    let names = |k: &str| -> Vec<String> {
        v[k]["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect()
    };
    for f in ["VERSION_1", "EVENT_IDX", "SEQPACKET"] {
        assert!(names("negotiated").contains(&f.to_string()), "{v:#}");
        assert!(names("offered").contains(&f.to_string()), "{v:#}");
    }
    assert_eq!(v["guest_cid"], 3);
    assert_eq!(v["num_queues"], 3);
    assert_eq!(v["queues"][0]["name"], "rx");
    // The event queue holds the driver's 8 event buffers.
    assert_eq!(v["queues"][2]["name"], "event");
    assert_eq!(v["queues"][2]["driver_size"], 8);
    assert!(v["queues"][0]["max_size"].as_u64().unwrap() > 0);
    assert_eq!(v["driver_up"], true);
    // The driver's pools as it came up: the ring full of RX buffers from a larger pool, and
    // nothing held or copied yet.
    let stats = &v["driver_stats"];
    let on_ring = stats["rx_buffers_on_ring"].as_u64().unwrap();
    assert_eq!(
        on_ring,
        v["queues"][0]["driver_size"].as_u64().unwrap(),
        "{v:#}"
    );
    assert!(stats["rx_buffers"].as_u64().unwrap() > on_ring, "{v:#}");
    assert_eq!(stats["rx_buffers_held"], 0, "{v:#}");
    assert!(stats["tx_chunks"].as_u64().unwrap() > 0, "{v:#}");
    assert_eq!(stats["tx_payload_bytes_copied"], 0, "{v:#}");
    assert_eq!(stats["connections"], 0, "{v:#}");
    assert!(
        v["details"]["host"]
            .as_str()
            .unwrap_or_default()
            .contains("echo on port 7"),
        "{v:#}"
    );
    let text = run(&["inspect", "sim"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("negotiated:"));
}

#[test]
fn inspect_other_specs_on_a_fake_tree() {
    let t = fake_tree();
    let out = fake_cmd(&t)
        .args(["inspect", "vfio:0000:03:00.0", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sysfs"]["facts"]["driver"], "vfio-pci");
    let open = v["open"].as_str().unwrap();
    assert!(open.starts_with("cannot open"), "{open}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vdpa-vsock: error: opening device vfio:0000:03:00.0"),
        "{err}"
    );
}

// ---- serve ----

/// How long serve may take to start, and to exit after a signal.
const SERVE_START: Duration = Duration::from_secs(10);
const SERVE_EXIT: Duration = Duration::from_secs(5);

/// `serve --uds DIR/v.sock extra..`, run as [`cmd`] runs the binary.
#[track_caller]
fn start_serve(extra: &[&str]) -> Daemon {
    Daemon::start(cmd(), extra, SERVE_START)
}

/// Connect to `path`, send `line`, return the stream and the answer line.
fn hello(path: &Path, line: &[u8]) -> (UnixStream, String) {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // A refusal (ERR too many connections) may come before we have written.
    let _ = s.write_all(line);
    let reply = read_line(&mut s);
    (s, reply)
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Echo `len` bytes through `CONNECT 7` and check they come back intact.
fn echo_client(path: &Path, seed: u32, len: usize) {
    let (s, reply) = hello(path, b"CONNECT 7\n");
    assert!(reply.starts_with("OK "), "client {seed}: {reply:?}");
    reply[3..].parse::<u32>().expect("OK <local_port>");
    let data = pattern(seed, len);
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = thread::spawn(move || {
        for chunk in sent.chunks(32 * 1024) {
            w.write_all(chunk).unwrap();
        }
    });
    let mut got = vec![0u8; len];
    let mut r = s;
    r.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    assert!(got == data, "client {seed}: echoed bytes differ");
}

#[test]
fn serve_100_clients_echo_1mib_each_despite_bad_clients() {
    let d = start_serve(&[]);
    let t0 = Instant::now();
    let mut threads = Vec::new();
    for i in 0..100 {
        let p = d.uds.clone();
        threads.push(thread::spawn(move || echo_client(&p, i, 1 << 20)));
    }
    // Bad clients in between: garbage, an overlong line, a bad port, closing mid-handshake.
    let mut errs = Vec::new();
    for (line, want) in [
        (&b"GET / HTTP/1.1\n"[..], "ERR expected \"CONNECT <port>\""),
        (&[b'A'; 200][..], "ERR handshake line too long"),
        (b"CONNECT 99999999999\n", "ERR bad port"),
        (b"CONNECT -1\n", "ERR bad port"),
        (b"\xff\xfe\n", "ERR expected"),
        (b"CONNECT 1234\n", "ERR connect to 2:1234 failed"),
    ] {
        let (_, reply) = hello(&d.uds, line);
        errs.push((reply, want));
    }
    for _ in 0..10 {
        let mut s = UnixStream::connect(&d.uds).unwrap();
        s.write_all(b"CONN").unwrap();
        drop(s);
    }
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = t0.elapsed();
    eprintln!("serve: 100 clients x 1 MiB echoed in {elapsed:?}");
    for (reply, want) in errs {
        assert!(reply.starts_with(want), "{reply:?} is not {want:?}");
    }
    // Still serving.
    echo_client(&d.uds, 1000, 4096);
}

#[test]
fn serve_handshake_timeout() {
    let d = start_serve(&[]);
    let t0 = Instant::now();
    let mut idle = UnixStream::connect(&d.uds).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    idle.write_all(b"CONNECT 7").unwrap(); // no newline
                                           // Others are served meanwhile.
    echo_client(&d.uds, 1, 1 << 16);
    let reply = read_line(&mut idle);
    let waited = t0.elapsed();
    assert_eq!(
        reply,
        "ERR handshake timed out after 5s",
        "after {waited:?}; serve's log:\n{}",
        d.log()
    );
    assert!(
        waited >= Duration::from_millis(4900) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    let mut rest = Vec::new();
    assert_eq!(
        idle.read_to_end(&mut rest).unwrap_or(0),
        0,
        "closed after ERR"
    );
}

#[test]
fn serve_connection_limit() {
    let d = start_serve(&["--max-conns", "2"]);
    let (a, ra) = hello(&d.uds, b"CONNECT 7\n");
    let (_b, rb) = hello(&d.uds, b"CONNECT 9\n");
    assert!(
        ra.starts_with("OK ") && rb.starts_with("OK "),
        "{ra:?} {rb:?}"
    );
    let (_, rc) = hello(&d.uds, b"CONNECT 7\n");
    assert_eq!(rc, "ERR too many connections");
    drop(a);
    // The slot comes back once the connection has wound down.
    let t0 = Instant::now();
    loop {
        let (_s, r) = hello(&d.uds, b"CONNECT 7\n");
        if r.starts_with("OK ") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "slot not released: {r:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let out = run(&["serve", "--uds", "/tmp/x", "--max-conns", "0"]);
    expect_error(&out, 2, &["--max-conns"]);
}

#[test]
fn serve_sigterm_is_quick_and_clean() {
    let mut d = start_serve(&["--listen-port", "5000"]);
    let (mut open, r) = hello(&d.uds, b"CONNECT 7\n");
    assert!(r.starts_with("OK "));
    let (took, code) = d.signal_and_wait(libc::SIGTERM, SERVE_EXIT);
    eprintln!("serve: SIGTERM to exit with an open connection: {took:?}");
    assert_eq!(code, Some(0), "{}", d.log());
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(!d.uds.exists(), "socket file left behind");
    let mut rest = Vec::new();
    assert_eq!(
        open.read_to_end(&mut rest).unwrap_or(0),
        0,
        "open connection ended"
    );
    assert!(d.log().contains("stopped"), "{}", d.log());

    // SIGINT does the same.
    let mut d = start_serve(&[]);
    let (_, code) = d.signal_and_wait(libc::SIGINT, SERVE_EXIT);
    assert_eq!(code, Some(0));
    assert!(!d.uds.exists());
}

#[test]
fn serve_port_in_use_and_socket_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let out = cmd()
        .args([
            "serve",
            "--listen-port",
            "5000",
            "--listen-port",
            "5000",
            "--uds",
        ])
        .arg(&uds)
        .output()
        .unwrap();
    expect_error(
        &out,
        1,
        &["--listen-port 5000 is given twice", "another listener"],
    );
    assert!(!uds.exists(), "socket file created although startup failed");

    let d = start_serve(&[]);
    let out = cmd().args(["serve", "--uds"]).arg(&d.uds).output().unwrap();
    expect_error(&out, 1, &["served by a running program"]);
    assert!(d.uds.exists(), "the running daemon's socket was removed");
}

#[test]
fn serve_forwards_peer_connections_to_path_port() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host.sock");
    let d = start_serve(&[
        "--listen-port",
        "5000",
        "--sim-host-uds",
        host.to_str().unwrap(),
    ]);
    let target = UnixListener::bind(d.uds.with_file_name("v.sock_5000")).unwrap();
    let app = thread::spawn(move || {
        let (mut s, _) = target.accept().unwrap();
        let mut buf = [0u8; 23];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"hi back").unwrap();
        buf.to_vec()
    });
    // The sim host (CID 2) connects to our port 5000.
    let (mut peer, reply) = hello(&host, b"CONNECT 5000\n");
    assert!(reply.starts_with("OK "), "{reply:?}");
    peer.write_all(b"hello from the sim host").unwrap();
    let mut back = [0u8; 7];
    peer.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hi back");
    assert_eq!(app.join().unwrap(), b"hello from the sim host");

    // No program on PATH_5001: the peer's connection is refused with RST before any
    // RESPONSE (Firecracker's muxer), not accepted and closed; the daemon goes on.
    drop(d);
    let d = start_serve(&[
        "--listen-port",
        "5001",
        "--sim-host-uds",
        host.to_str().unwrap(),
    ]);
    let (_peer, reply) = hello(&host, b"CONNECT 5001\n");
    assert!(
        reply.starts_with("ERR connect to 3:5001 failed") && reply.contains("refused"),
        "{reply:?}"
    );
    echo_client(&d.uds, 7, 1024);
}

#[test]
fn serve_forwards_a_peer_connection_to_any_port_with_a_listener_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host.sock");
    // No --listen-port at all: every port is forwarded when PATH_<port> has a program.
    let d = start_serve(&["--sim-host-uds", host.to_str().unwrap()]);
    for port in [6001u32, 52000] {
        let target = UnixListener::bind(d.uds.with_file_name(format!("v.sock_{port}"))).unwrap();
        let app = thread::spawn(move || {
            let (mut s, _) = target.accept().unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        });
        let (mut peer, reply) = hello(&host, format!("CONNECT {port}\n").as_bytes());
        assert!(reply.starts_with("OK "), "{port}: {reply:?}");
        peer.write_all(b"howdy").unwrap();
        let mut back = [0u8; 5];
        peer.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"howdy");
        app.join().unwrap();
    }
    // A port nobody serves: refused at once, not after a timeout.
    let t = Instant::now();
    let (_peer, reply) = hello(&host, b"CONNECT 6002\n");
    assert!(reply.contains("refused"), "{reply:?}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // A socket file nobody listens on is no target either.
    drop(UnixListener::bind(d.uds.with_file_name("v.sock_6003")).unwrap());
    let (_peer, reply) = hello(&host, b"CONNECT 6003\n");
    assert!(reply.contains("refused"), "{reply:?}");
    echo_client(&d.uds, 7, 1024);
}

#[test]
fn serve_parses_connect_as_firecracker_does() {
    let d = start_serve(&[]);
    for line in [
        &b"connect 7\n"[..],
        b"CONNECT   7\n",
        b"Connect\t7\r\n",
        b"  CONNECT 7  \n",
        b"CONNECT 7 trailing words are ignored\n",
    ] {
        let (mut s, reply) = hello(&d.uds, line);
        assert!(
            reply.starts_with("OK "),
            "{:?}: {reply:?}",
            String::from_utf8_lossy(line)
        );
        s.write_all(b"ping").unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ping");
    }
    for (line, want) in [
        (&b"CONNECT\n"[..], "ERR expected \"CONNECT <port>\""),
        (b"CONNECTX 7\n", "ERR expected \"CONNECT <port>\""),
        (b"7 CONNECT\n", "ERR expected \"CONNECT <port>\""),
        (b"CONNECT seven\n", "ERR bad port \"seven\""),
    ] {
        let (_s, reply) = hello(&d.uds, line);
        assert!(
            reply.starts_with(want),
            "{:?}: {reply:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn serve_data_right_after_the_handshake_line_is_kept() {
    let d = start_serve(&[]);
    let mut s = UnixStream::connect(&d.uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"CONNECT 7\nhello in the same write").unwrap();
    assert!(read_line(&mut s).starts_with("OK "));
    let mut buf = [0u8; 23];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello in the same write");
}

#[test]
fn serve_unbindable_path_is_a_clear_runtime_error() {
    let out = run(&["serve", "--uds", "/nonexistent-dir/v.sock"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot bind the Unix socket /nonexistent-dir/v.sock")
            && stderr.contains("does the directory exist"),
        "{stderr}"
    );
}

/// socat as the client, as Firecracker's docs use it: `connect 7` and `CONNECT   7` both
/// reach the sim host's echo service.
#[test]
fn serve_with_socat_as_the_client() {
    if Command::new("socat").arg("-V").output().is_err() {
        eprintln!("skipped: socat is not installed");
        return;
    }
    let d = start_serve(&[]);
    for greeting in ["connect 7", "CONNECT   7"] {
        let mut child = Command::new("socat")
            .args(["-t", "2", "-", &format!("UNIX-CONNECT:{}", d.uds.display())])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(format!("{greeting}\nover socat\n").as_bytes())
            .unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        assert!(
            lines.next().is_some_and(|l| l.starts_with("OK ")),
            "{greeting:?}: {text:?}"
        );
        assert_eq!(lines.next(), Some("over socat"), "{greeting:?}: {text:?}");
    }
}

/// Whether `s` turns writable within `ms` milliseconds.
fn writable_within(s: &UnixStream, ms: i32) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd that outlives the call; the descriptor is open (borrowed).
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    assert!(r >= 0, "poll: {}", std::io::Error::last_os_error());
    p.revents & libc::POLLOUT != 0
}

/// Backpressure and half-close through two serve connections (a sim-host client, CID 2, to
/// our port 7000, forwarded to a program on `PATH_7000`): while the program reads nothing the
/// peer's writes stop after a bounded amount (Unix buffers, serve's 64 KiB per direction, the
/// vsock credit) and serve's memory stays bounded; once it reads, every byte arrives intact;
/// the peer's write half-close reaches the program as EOF while the other direction still
/// works, and the program's own half-close reaches the peer after its last bytes.
#[test]
fn serve_backpressure_and_half_close_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host.sock");
    let d = start_serve(&["--sim-host-uds", host.to_str().unwrap()]);
    let target = UnixListener::bind(d.uds.with_file_name("v.sock_7000")).unwrap();
    let (mut peer, reply) = hello(&host, b"CONNECT 7000\n");
    assert!(reply.starts_with("OK "), "{reply:?}");
    let (mut app, _) = target.accept().unwrap();
    app.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let pid = d.pid();
    let rss0 = proc_status(pid, "VmRSS");

    // The program reads nothing: the peer writes until it stays blocked for a second (the
    // only way to see that nothing more is taken), and far less than 64 MiB went in.
    const TRY: usize = 64 << 20;
    let data = pattern(5, TRY + (1 << 20));
    peer.set_nonblocking(true).unwrap();
    let mut sent = 0;
    loop {
        match peer.write(&data[sent..TRY]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !writable_within(&peer, 1000) {
                    break;
                }
            }
            Err(e) => panic!("peer write: {e}"),
        }
        assert!(
            sent < TRY,
            "64 MiB went in although the program reads nothing"
        );
    }
    let grew = proc_status(pid, "VmRSS").saturating_sub(rss0);
    eprintln!("serve: the peer blocked after {sent} bytes; serve's RSS grew {grew} kB");
    assert!(sent < 16 << 20, "{sent} bytes in flight: no backpressure");
    assert!(grew < 16 * 1024, "serve's RSS grew {grew} kB");

    // The program reads; the peer sends 1 MiB more, then shuts down its write half.
    let total = sent + (1 << 20);
    let reader = thread::spawn(move || {
        let mut got = Vec::with_capacity(total);
        app.read_to_end(&mut got).expect("program reads to EOF");
        // EOF came, our write half still works: answer, then close it.
        app.write_all(b"bye").unwrap();
        app.shutdown(std::net::Shutdown::Write).unwrap();
        got
    });
    peer.set_nonblocking(false).unwrap();
    peer.write_all(&data[sent..total]).unwrap();
    peer.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    peer.read_to_end(&mut back).expect("peer reads to EOF");
    assert_eq!(
        back, b"bye",
        "the program's answer after the peer's half-close"
    );
    let got = reader.join().unwrap();
    assert_eq!(got.len(), total, "bytes lost or added");
    assert!(got == data[..total], "bytes differ");
}

/// The scale counts take turns, up and back down twice (`30,10` runs as 10, 30, 10, 30, 10),
/// and the note on the larger count compares it with the smaller one's three runs.
#[test]
fn bench_scale_brackets_the_larger_count() {
    let out = run(&[
        "bench",
        "--bytes",
        "65536",
        "--round-trips",
        "10",
        "--scale",
        "30,10",
        "--scale-ops",
        "20",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let note = stdout
        .lines()
        .find(|l| l.starts_with("connect+close with 30 open = "))
        .unwrap_or_else(|| panic!("no scale note: {stdout}"));
    let runs = note
        .split("its runs in turn with it: ")
        .nth(1)
        .and_then(|r| r.split(" us (").next())
        .unwrap_or_else(|| panic!("no bracketing runs: {note}"));
    let runs: Vec<f64> = runs.split(" / ").map(|v| v.parse().unwrap()).collect();
    assert_eq!(runs.len(), 3, "{note}");
    assert!(runs.iter().all(|&us| us > 0.0), "{note}");
    assert!(stdout.contains("echo 1B rtt with 30 open = "), "{stdout}");
    assert!(!stdout.contains("with 10 open = "), "{stdout}");
}
