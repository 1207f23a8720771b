// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! VM tests of the operator tooling, run as an operator would: the static `vdpa-vsock` CLI at
//! `/bin/vdpa-vsock` (`serve` on the kernel's vhost-vsock) and `tools/bind.sh` under bash at
//! `/tools/bind.sh` (a real rebind of the guest's virtio-vsock function, and of a vDPA device).
//!
//! Included from `vmtest.rs`; the rows are in its `TESTS` table.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use vdpa_vsock::device::{DeviceSpec, VHOST_VSOCK_PATH};
use vdpa_vsock::driver::{DriverConfig, VsockDriver};

use super::vhost_vsock_tests::{kernel_accept, kernel_listen, recv_checksum, send_pattern};
use super::{fail, pci_driver, rebind_virtio_pci, skip, wait_for_path, TestResult};

/// The kernel AF_VSOCK echo service `serve`'s clients reach (our driver is CID 4 on vhost-vsock,
/// the guest kernel is its host, CID 2).
const ECHO_PORT: u32 = 7000;
/// A port nobody listens on: the kernel answers REQUEST with RST.
const CLOSED_PORT: u32 = 7001;
/// Concurrent `serve` clients, and the bytes each echoes.
const CLIENTS: usize = 100;
const CLIENT_BYTES: usize = 1 << 20;
const UDS: &str = "/tmp/serve.sock";
/// `serve --listen-port`: peer connections to this port of ours go to `UDS_<port>`.
const FORWARD_PORT: u32 = 7100;
const SERVE_LOG: &str = "/tmp/serve.log";
const STEP: Duration = Duration::from_secs(60);

/// The `serve` daemon as a child process; killed on drop if the test did not stop it.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve_log() -> String {
    fs::read_to_string(SERVE_LOG).unwrap_or_default()
}

fn read_line(s: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => break,
            _ if b[0] == b'\n' => break,
            _ => line.push(b[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Connects to `serve`, sends `line`, returns the stream and the answer line.
fn hello(line: &[u8]) -> io::Result<(UnixStream, String)> {
    let mut s = UnixStream::connect(UDS)?;
    s.set_read_timeout(Some(STEP))?;
    s.set_write_timeout(Some(STEP))?;
    // An error line may come before the whole line is written.
    let _ = s.write_all(line);
    let reply = read_line(&mut s)?;
    Ok((s, reply))
}

/// One client: `CONNECT ECHO_PORT`, then `len` bytes of pattern `seed` out while reading the echo
/// back; the checksums of both must match.
fn echo_client(seed: u64, len: usize) -> io::Result<()> {
    let (s, reply) = hello(format!("CONNECT {ECHO_PORT}\n").as_bytes())?;
    let port = reply
        .strip_prefix("OK ")
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or_else(|| io::Error::other(format!("client {seed}: handshake answer {reply:?}")))?;
    let mut w = s.try_clone()?;
    let writer = thread::spawn(move || send_pattern(&mut w, seed, len));
    let mut r = s;
    let got = recv_checksum(&mut r, len)?;
    let sent = writer
        .join()
        .map_err(|_| io::Error::other("writer panicked"))??;
    if got != sent {
        return Err(io::Error::other(format!(
            "client {seed} (local port {port}): echo checksum {got:#x}, sent {sent:#x}"
        )));
    }
    Ok(())
}

/// The kernel's echo service: accepts `n` connections and echoes each until EOF.
fn kernel_echo_server(n: usize) -> io::Result<thread::JoinHandle<io::Result<()>>> {
    let listener = kernel_listen(ECHO_PORT)?;
    Ok(thread::spawn(move || {
        let mut conns = Vec::new();
        for _ in 0..n {
            let (s, _cid) = kernel_accept(&listener)?;
            conns.push(thread::spawn(move || -> io::Result<()> {
                let mut w = s.try_clone()?;
                let mut r = s;
                io::copy(&mut r, &mut w)?;
                w.shutdown(std::net::Shutdown::Write)
            }));
        }
        for c in conns {
            c.join().map_err(|_| io::Error::other("echo panicked"))??;
        }
        Ok(())
    }))
}

/// `vdpa-vsock serve` on the kernel's vhost-vsock: 100 Unix-socket clients each echo 1 MiB
/// through it intact while bad clients (garbage, a refused port, closing mid-handshake) come and
/// go; a kernel connection to our `--listen-port` reaches the program on `UDS_<port>`; then
/// SIGTERM with a connection open ends it within a second, exit 0, socket removed, and the
/// CID is free again.
pub(crate) fn serve_vhost_vsock_100_clients() -> TestResult {
    if !Path::new(VHOST_VSOCK_PATH).exists() {
        return Err(skip(format!("{VHOST_VSOCK_PATH} is absent")));
    }
    // The 100 clients, the check after the bad ones, and the one open at SIGTERM.
    let server = kernel_echo_server(CLIENTS + 2)?;
    let log = fs::File::create(SERVE_LOG)?;
    let _ = fs::remove_file(UDS);
    let mut daemon = Daemon(
        Command::new("/bin/vdpa-vsock")
            .args(["serve", "--device", "vhost-vsock,cid=4", "--uds", UDS])
            .args(["--listen-port", &FORWARD_PORT.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    );
    if !wait_for_path(Path::new(UDS), Duration::from_secs(20)) {
        return Err(fail(format!("{UDS} did not appear: {}", serve_log())));
    }
    let t0 = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| thread::spawn(move || echo_client(i as u64 + 1, CLIENT_BYTES)))
        .collect();
    // Bad clients among them: each gets an error line (or just a close) and the others go on.
    let mut bad = Vec::new();
    for (line, want) in [
        (&b"GET / HTTP/1.1\n"[..], "ERR expected"),
        (b"CONNECT banana\n", "ERR bad port"),
        (
            format!("CONNECT {CLOSED_PORT}\n").as_bytes(),
            "ERR connect to 2:7001 failed",
        ),
    ] {
        let (_, reply) = hello(line)?;
        bad.push((reply, want));
    }
    for _ in 0..10 {
        let mut s = UnixStream::connect(UDS)?;
        s.write_all(b"CONN")?;
    }
    let mut failures = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        match c.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("client {i}: {e}")),
            Err(_) => failures.push(format!("client {i}: panicked")),
        }
    }
    let took = t0.elapsed();
    if !failures.is_empty() {
        return Err(fail(format!(
            "{} of {CLIENTS} clients failed, first: {}; serve log: {}",
            failures.len(),
            failures[0],
            serve_log()
        )));
    }
    println!(
        "# serve on vhost-vsock: {CLIENTS} clients x 1 MiB echoed intact in {:.2} s",
        took.as_secs_f64()
    );
    for (reply, want) in &bad {
        if !reply.starts_with(want) {
            return Err(fail(format!(
                "bad client got {reply:?}, expected {want:?}…"
            )));
        }
        println!("# bad client answered: {reply}");
    }
    // Still serving after the bad clients.
    echo_client(1000, 4096).map_err(|e| fail(format!("after the bad clients: {e}")))?;

    // The other direction: the kernel connects to our CID 4, port FORWARD_PORT; serve forwards
    // the connection to the program listening on UDS_<port>, which echoes.
    forward_round_trip().map_err(|e| fail(format!("peer -> {UDS}_{FORWARD_PORT}: {e}")))?;

    // SIGTERM with one connection open.
    let (mut open, reply) = hello(format!("CONNECT {ECHO_PORT}\n").as_bytes())?;
    if !reply.starts_with("OK ") {
        return Err(fail(format!("last client: {reply:?}")));
    }
    let pid = libc::pid_t::try_from(daemon.0.id()).map_err(fail)?;
    let t = Instant::now();
    // SAFETY: kill(2) with a pid we spawned and have not reaped; no memory is involved.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(io::Error::last_os_error().into());
    }
    let status = loop {
        if let Some(st) = daemon.0.try_wait()? {
            break st;
        }
        if t.elapsed() > Duration::from_secs(5) {
            return Err(fail(format!(
                "serve still running 5 s after SIGTERM: {}",
                serve_log()
            )));
        }
        thread::sleep(Duration::from_millis(5));
    };
    let stop = t.elapsed();
    println!("# SIGTERM to exit: {} ms, {status}", stop.as_millis());
    if stop > Duration::from_secs(1) || status.code() != Some(0) {
        return Err(fail(format!(
            "SIGTERM: exit {status} after {stop:?} (want 0 within 1 s): {}",
            serve_log()
        )));
    }
    if Path::new(UDS).exists() {
        return Err(fail(format!("{UDS} left behind after SIGTERM")));
    }
    let mut rest = Vec::new();
    let n = open.read_to_end(&mut rest).unwrap_or(0);
    if n != 0 {
        return Err(fail(format!(
            "the open client read {n} bytes after SIGTERM"
        )));
    }
    drop(open);
    server
        .join()
        .map_err(|_| fail("kernel echo server panicked"))?
        .map_err(|e| fail(format!("kernel echo server: {e}")))?;
    // The daemon reset the device and closed it: CID 4 is free for the next user.
    let spec = DeviceSpec::VhostVsock {
        path: VHOST_VSOCK_PATH.into(),
        cid: 4,
    };
    VsockDriver::open_with(&spec, DriverConfig::default())
        .map_err(|e| fail(format!("reopening {spec} after serve: {e}")))?;
    Ok(())
}

/// A kernel AF_VSOCK client connects to 4:FORWARD_PORT; a Unix listener at `UDS_<port>` (where
/// `serve --listen-port` forwards) echoes 256 KiB back; the checksums must match.
fn forward_round_trip() -> io::Result<()> {
    let path = format!("{UDS}_{FORWARD_PORT}");
    let _ = fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    let echo = thread::spawn(move || -> io::Result<()> {
        let (s, _) = listener.accept()?;
        s.set_read_timeout(Some(STEP))?;
        let mut w = s.try_clone()?;
        let mut r = s;
        io::copy(&mut r, &mut w)?;
        w.shutdown(std::net::Shutdown::Write)
    });
    let s = super::vsock_connect(4, FORWARD_PORT)?;
    s.set_read_timeout(Some(STEP))?;
    s.set_write_timeout(Some(STEP))?;
    let len = 256 << 10;
    let mut w = s.try_clone()?;
    let writer = thread::spawn(move || -> io::Result<u64> {
        let sum = send_pattern(&mut w, 77, len)?;
        w.shutdown(std::net::Shutdown::Write)?;
        Ok(sum)
    });
    let mut r = s;
    let got = recv_checksum(&mut r, len)?;
    let sent = writer
        .join()
        .map_err(|_| io::Error::other("writer panicked"))??;
    echo.join()
        .map_err(|_| io::Error::other("echo panicked"))??;
    let _ = fs::remove_file(&path);
    if got != sent {
        return Err(io::Error::other(format!(
            "echo checksum {got:#x}, sent {sent:#x}"
        )));
    }
    println!("# serve --listen-port {FORWARD_PORT}: kernel -> 4:{FORWARD_PORT} -> {UDS}_{FORWARD_PORT}, {len} bytes echoed intact");
    Ok(())
}

fn bind_sh(args: &[&str]) -> io::Result<Output> {
    Command::new("/bin/bash")
        .arg("/tools/bind.sh")
        .args(args)
        .stdin(Stdio::null())
        .output()
}

/// Runs bind.sh, checks its exit code and that its output (stdout and stderr) has every needle;
/// returns the output.
fn expect_bind(args: &[&str], code: i32, needles: &[&str]) -> Result<String, super::NotPassed> {
    let out = bind_sh(args)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.code() != Some(code) {
        return Err(fail(format!(
            "bind.sh {}: exit {:?}, expected {code}: {text}",
            args.join(" "),
            out.status.code()
        )));
    }
    for n in needles {
        if !text.contains(n) {
            return Err(fail(format!(
                "bind.sh {}: output lacks {n:?}: {text}",
                args.join(" ")
            )));
        }
    }
    println!("# bind.sh {} -> {code}", args.join(" "));
    Ok(text)
}

/// tools/bind.sh on the real sysfs: status, a dry run that changes nothing, bad input, the
/// virtio-vsock function to vfio-pci (our driver then runs on it), a refusal while our driver has
/// the VFIO group open, unbind, and back to virtio-pci, where the kernel's vsock works again.
pub(crate) fn bind_sh_rebinds_vsock_function() -> TestResult {
    let (dev, bdf) = super::vsock_function()?;
    if pci_driver(&dev).as_deref() != Some("virtio-pci") {
        return Err(fail(format!("{bdf} does not start on virtio-pci")));
    }
    let result = (|| {
        expect_bind(&["--status"], 0, &[&bdf, "virtio-pci"])?;
        let dry = expect_bind(
            &["--dry-run", "--bind", "vfio-pci", &bdf],
            0,
            &["driver_override", "drivers_probe"],
        )?;
        if pci_driver(&dev).as_deref() != Some("virtio-pci") {
            return Err(fail(format!("--dry-run changed the driver: {dry}")));
        }
        expect_bind(
            &["--bind", "vfio-pci", "00:1f.9"],
            2,
            &["not a PCI address"],
        )?;
        expect_bind(
            &["--bind", "vfio-pci", "0000:00:1f.7"],
            2,
            &["no PCI device"],
        )?;
        expect_bind(
            &["--bind", "vfio-pci", &bdf],
            0,
            &["virtio-pci -> vfio-pci"],
        )?;
        if pci_driver(&dev).as_deref() != Some("vfio-pci") {
            return Err(fail(format!("{bdf}: not on vfio-pci after bind.sh")));
        }
        // Our driver on it, and bind.sh refusing to take it away while the group is open.
        fs::write("/proc/sys/vm/nr_hugepages", "16")?;
        let spec = DeviceSpec::Vfio {
            bdf: bdf.clone(),
            noiommu: true,
        };
        // 128-entry queues of 4 KiB payloads: rings, TX pool and RX pool fit one 2 MiB huge
        // page, which is physically contiguous (no-IOMMU IOVAs are physical addresses).
        let config = DriverConfig {
            queue_size: 128,
            rx_buf_size: 4096 + 44,
            tx_buf_size: 4096 + 44,
            ..DriverConfig::default()
        };
        let drv = VsockDriver::open_with(&spec, config)
            .map_err(|e| fail(format!("our driver on {spec} after bind.sh: {e}")))?;
        println!("# our driver up on {spec}, local CID {}", drv.local_cid());
        expect_bind(
            &["--bind", "virtio-pci", &bdf],
            3,
            &["in use", "is open by a process", "--force"],
        )?;
        drop(drv);
        expect_bind(&["--unbind", &bdf], 0, &[])?;
        if let Some(d) = pci_driver(&dev) {
            return Err(fail(format!("{bdf}: still on {d} after --unbind")));
        }
        let over = fs::read_to_string(dev.join("driver_override")).unwrap_or_default();
        if !matches!(over.trim(), "" | "(null)") {
            return Err(fail(format!("--unbind left driver_override {over:?}")));
        }
        expect_bind(&["--bind", "virtio-pci", &bdf], 0, &["-> virtio-pci"])?;
        if pci_driver(&dev).as_deref() != Some("virtio-pci") {
            return Err(fail(format!("{bdf}: not back on virtio-pci")));
        }
        // The kernel's vsock transport has its device back.
        super::kernel_vsock_to_host()
    })();
    if pci_driver(&dev).as_deref() == Some("virtio-pci") {
        result
    } else {
        result.and(rebind_virtio_pci(&dev, &bdf))
    }
}

/// tools/bind.sh on a vDPA device: unbind it from vhost_vdpa (its /dev/vhost-vdpa-N goes away),
/// bind it back (the node returns), refuse a bad name and an unknown device.
pub(crate) fn bind_sh_rebinds_vdpa_device() -> TestResult {
    super::vdpa_tests::with_vdpa_dev("vdpasim_net", "vdpa-bind", |node| {
        let name = "vdpa-bind";
        let dir = Path::new("/sys/bus/vdpa/devices").join(name);
        expect_bind(&["--status"], 0, &[name, "vhost_vdpa"])?;
        expect_bind(&["--unbind", name], 0, &[])?;
        if pci_driver(&dir).is_some() {
            return Err(fail(format!("{name} still has a driver after --unbind")));
        }
        let start = Instant::now();
        while Path::new(node).exists() && start.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(20));
        }
        if Path::new(node).exists() {
            return Err(fail(format!("{node} still there after --unbind")));
        }
        expect_bind(&["--bind", "vhost_vdpa", name], 0, &["-> vhost_vdpa"])?;
        if pci_driver(&dir).as_deref() != Some("vhost_vdpa") {
            return Err(fail(format!("{name}: not on vhost_vdpa after --bind")));
        }
        // The node comes back (its number may differ if another was taken meanwhile).
        let back = super::vdpa_tests::wait_vhost_vdpa_node(name)?;
        println!("# {name}: {node} gone after --unbind, {back} back after --bind");
        expect_bind(
            &["--bind", "vhost_vdpa", "bad/name"],
            2,
            &["not a vDPA device name"],
        )?;
        expect_bind(
            &["--bind", "vhost_vdpa", "vdpa-nope"],
            2,
            &["no vDPA device"],
        )?;
        Ok(())
    })
}

/// The gid `tests/vm/run.sh` gives group `vsock` in the guest's /etc/group.
const VSOCK_GID: u32 = 990;

/// Group and permission bits of `path`.
fn owner_mode(path: &Path) -> io::Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path)?;
    Ok((m.gid(), m.mode() & 0o777))
}

/// Waits up to 10 s for udev to have handled every event so far.
fn udev_settle() -> TestResult {
    super::run_cmd("/bin/udevadm", &["settle", "--timeout=10"])
}

/// `path` ends up group vsock, mode 0660 (udev applies rules asynchronously: settle first).
fn expect_vsock_group(path: &Path) -> TestResult {
    udev_settle()?;
    let (gid, mode) = owner_mode(path)?;
    if (gid, mode) != (VSOCK_GID, 0o660) {
        return Err(fail(format!(
            "{}: gid {gid} mode {mode:o}, expected gid {VSOCK_GID} (vsock) mode 660",
            path.display()
        )));
    }
    println!("# {}: group vsock, mode 660", path.display());
    Ok(())
}

/// udev/70-vdpa-vsock.rules and its helper, installed as udev/README.md says, under Debian's
/// systemd-udevd: /dev/vhost-vsock, a new /dev/vhost-vdpa-N and the VFIO group node of the
/// virtio-vsock function bound with bind.sh become group vsock, mode 0660; /dev/vfio/vfio and
/// unrelated nodes are left alone.
pub(crate) fn udev_rules_give_group_vsock() -> TestResult {
    fs::create_dir_all("/run/udev")?;
    let mut udevd = Daemon(
        Command::new("/bin/systemd-udevd")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create("/tmp/udevd.log")?)
            .spawn()?,
    );
    let result = (|| {
        if !wait_for_path(Path::new("/run/udev/control"), Duration::from_secs(10)) {
            return Err(fail(
                "systemd-udevd did not open /run/udev/control within 10 s",
            ));
        }
        // The rules parse: udevadm reports no error for them (udev 252 has no `verify`).
        let out = Command::new("/bin/udevadm")
            .args(["control", "--reload"])
            .output()?;
        if !out.status.success() {
            return Err(fail(format!(
                "udevadm control --reload: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        // Nodes that existed before udevd started: replay their add events.
        super::run_cmd(
            "/bin/udevadm",
            &["trigger", "--action=add", "--subsystem-match=misc"],
        )?;
        expect_vsock_group(Path::new(VHOST_VSOCK_PATH))?;
        // What the group is for: a user in it drives the device without root; one outside cannot.
        for (gid, ok) in [(VSOCK_GID, true), (1000, false)] {
            use std::os::unix::process::CommandExt;
            let out = Command::new("/bin/vdpa-vsock")
                .args(["inspect", "vhost-vsock,cid=4"])
                .uid(1000)
                .gid(gid)
                .stdin(Stdio::null())
                .output()?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let good = if ok {
                out.status.success() && text.contains("brought up, local CID 4")
            } else {
                out.status.code() == Some(1) && text.contains("no read-write access")
            };
            if !good {
                return Err(fail(format!(
                    "inspect as uid 1000 gid {gid}: {}: {text}",
                    out.status
                )));
            }
            println!(
                "# inspect vhost-vsock as uid 1000 gid {gid}: {}",
                if ok {
                    "brought up"
                } else {
                    "refused, no read-write access"
                }
            );
        }
        for other in ["/dev/null", "/dev/vfio/vfio"] {
            let (gid, mode) = owner_mode(Path::new(other))?;
            if gid == VSOCK_GID {
                return Err(fail(format!("{other} got group vsock (mode {mode:o})")));
            }
        }
        // A vDPA device added now: its node is created with the rule applied.
        super::vdpa_tests::with_vdpa_dev("vdpasim_net", "vdpa-udev", |node| {
            expect_vsock_group(Path::new(node))
        })?;
        // The virtio-vsock function handed to vfio-pci with bind.sh: the helper accepts its group.
        let (dev, bdf) = super::vsock_function()?;
        let bound = (|| {
            expect_bind(&["--bind", "vfio-pci", &bdf], 0, &["-> vfio-pci"])?;
            let group = fs::read_link(dev.join("iommu_group"))?;
            let group = group
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let node = Path::new("/dev/vfio").join(format!("noiommu-{group}"));
            if !wait_for_path(&node, Duration::from_secs(5)) {
                return Err(fail(format!("{} did not appear", node.display())));
            }
            expect_vsock_group(&node)
        })();
        let back = expect_bind(&["--bind", "virtio-pci", &bdf], 0, &["-> virtio-pci"]).map(|_| ());
        bound.and(back)
    })();
    let _ = udevd.0.kill();
    let _ = udevd.0.wait();
    if result.is_err() {
        println!(
            "# udevd log: {}",
            fs::read_to_string("/tmp/udevd.log")
                .unwrap_or_default()
                .trim()
        );
    }
    result
}

/// `vdpa-vsock list --json` as an operator runs it, parsed.
fn list_json() -> Result<Vec<serde_json::Value>, super::NotPassed> {
    let out = Command::new("/bin/vdpa-vsock")
        .args(["list", "--json"])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(fail(format!(
            "list --json: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| fail(format!("list --json is not JSON: {e}")))?;
    v["devices"]
        .as_array()
        .cloned()
        .ok_or_else(|| fail(format!("list --json has no devices array: {v}")))
}

/// The entry of `kind` named `name` in `list --json`.
fn listed(
    devs: &[serde_json::Value],
    kind: &str,
    name: &str,
) -> Result<serde_json::Value, super::NotPassed> {
    devs.iter()
        .find(|d| d["kind"] == kind && d["name"] == name)
        .cloned()
        .ok_or_else(|| fail(format!("list --json has no {kind} {name}: {devs:?}")))
}

/// `vdpa-vsock list` on the guest's real devices: the vsock PCI function on virtio-pci is listed
/// as not usable with the bind.sh command to run, usable once bind.sh moved it to vfio-pci; a vDPA
/// device with its node; /dev/vhost-vsock usable.
pub(crate) fn cli_list_sees_real_devices() -> TestResult {
    let (_, bdf) = super::vsock_function()?;
    super::vdpa_tests::with_vdpa_dev("vdpasim_net", "vdpa-list", |node| {
        let devs = list_json()?;
        let pci = listed(&devs, "pci", &bdf)?;
        let reason = pci["reason"].as_str().unwrap_or_default();
        if pci["usable"] != false || !reason.contains("tools/bind.sh --bind vfio-pci") {
            return Err(fail(format!("{bdf} on virtio-pci: {pci}")));
        }
        println!("# list: {bdf}: not usable: {reason}");
        let vv = listed(&devs, "vhost-vsock", VHOST_VSOCK_PATH)?;
        if vv["usable"] != true {
            return Err(fail(format!("/dev/vhost-vsock not usable: {vv}")));
        }
        let vdpa = devs
            .iter()
            .find(|d| d["kind"] == "vdpa" && d["spec"] == format!("vhost-vdpa:{node}"))
            .ok_or_else(|| {
                fail(format!(
                    "list --json has no vdpa device with {node}: {devs:?}"
                ))
            })?;
        if vdpa["usable"] != false
            || vdpa["reason"] != "not a vsock device"
            || vdpa["facts"]["device_id"] != "1 (net)"
        {
            return Err(fail(format!(
                "the vdpa_sim_net device is not refused: {vdpa}"
            )));
        }
        println!("# list: vdpa-list: {vdpa}");
        expect_bind(&["--bind", "vfio-pci", &bdf], 0, &["-> vfio-pci"])?;
        let after = list_json().and_then(|d| listed(&d, "pci", &bdf));
        let back = expect_bind(&["--bind", "virtio-pci", &bdf], 0, &["-> virtio-pci"]);
        let after = after?;
        back?;
        if after["facts"]["driver"] != "vfio-pci"
            || after["usable"] != true
            || after["spec"] != format!("vfio:{bdf},noiommu")
        {
            return Err(fail(format!("{bdf} after bind.sh: {after}")));
        }
        println!(
            "# list after bind.sh: {bdf}: usable, spec {}",
            after["spec"]
        );
        Ok(())
    })
}

/// `vdpa-vsock inspect vhost-vsock,cid=4 --json` on the guest's /dev/vhost-vsock: VERSION_1
/// negotiated, two queues, the backend's details, the driver brought up with CID 4.
pub(crate) fn cli_inspect_vhost_vsock() -> TestResult {
    let out = Command::new("/bin/vdpa-vsock")
        .args(["inspect", "vhost-vsock,cid=4", "--json"])
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(fail(format!(
            "inspect: {}: {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| fail(format!("not JSON ({e}): {text}")))?;
    let negotiated: Vec<&str> = v["negotiated"]["names"]
        .as_array()
        .map(|a| a.iter().filter_map(|n| n.as_str()).collect())
        .unwrap_or_default();
    let checks = [
        ("VERSION_1 negotiated", negotiated.contains(&"VERSION_1")),
        ("guest_cid 4", v["guest_cid"] == 4),
        ("2 queues", v["num_queues"] == 2),
        (
            "rx queue sized",
            v["queues"][0]["max_size"].as_u64().unwrap_or(0) > 0,
        ),
        (
            "backend detail",
            v["details"]["backend"]
                .as_str()
                .unwrap_or_default()
                .contains("vhost-vsock"),
        ),
        ("driver up", v["driver_up"] == true),
    ];
    if let Some((what, _)) = checks.iter().find(|(_, ok)| !ok) {
        return Err(fail(format!("inspect --json: no {what}: {v}")));
    }
    println!(
        "# inspect vhost-vsock: negotiated {} ({}), {} queues",
        v["negotiated"]["bits"],
        negotiated.join(" "),
        v["num_queues"]
    );
    Ok(())
}
