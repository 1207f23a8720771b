//! `vdpa-vsock serve`: the transport exposed over Unix sockets with Firecracker's hybrid-vsock
//! protocol.
//!
//! Read Firecracker's `docs/vsock.md` and `src/vmm/src/devices/virtio/vsock/unix/muxer.rs`
//! first: this is its hybrid vsock, with our driver on the vsock side.
//!
//! - A client connects to `--uds PATH` and sends `CONNECT <port>\n`, parsed as Firecracker does
//!   (split on whitespace, the keyword in any case, words after the port ignored); the daemon
//!   connects a vsock stream to the peer (CID 2) on that port and answers `OK <local_port>\n`;
//!   from then on bytes flow both ways. A bad handshake (not `CONNECT <port>`, a line over
//!   [`MAX_LINE`] bytes, a bad port, silence for `--handshake-timeout` seconds) is answered with
//!   `ERR <reason>\n` and a close.
//! - A connection the peer opens to *any* port P of ours is forwarded to the Unix socket
//!   `PATH_P` if a program listens there, and refused with `RST` (no `RESPONSE`) if not, as
//!   Firecracker's muxer does (`--listen-port` is kept for compatibility; every port is
//!   forwarded).
//! - Differences from Firecracker, and why: a bad handshake gets `ERR <reason>` before the
//!   close (Firecracker closes silently; a reason helps and a Firecracker client ignores it);
//!   `OK` carries our vsock port (Firecracker's host-side port number; both are a number the
//!   client may ignore); the peer is always CID 2, the device's other end (Firecracker's
//!   muxer is the device, so it has no choice either); a connection limit (`--max-conns`) is
//!   answered with `ERR too many connections` (Firecracker drops the client).
//! - Each connection gets two pump threads, one per direction; a write half closed on one side
//!   is shut down on the other. At most `--max-conns` connections (handshaking or open) at a
//!   time; one over the limit is answered `ERR too many connections`.
//! - With `--device sim`, `--sim-host-uds PATH2` exposes the other end too: a client of PATH2
//!   speaks the same handshake and is connected *from the sim host* (CID 2) to our port, which
//!   is how a peer-initiated connection is tried (and tested) without hardware.
//! - SIGTERM or SIGINT: stop accepting, remove PATH, shut every connection down, drop the
//!   driver, exit 0, within a second.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use vdpa_vsock::device::DeviceSpec;
use vdpa_vsock::driver::{
    DriverConfig, VsockAddr, VsockDriver, VsockListener, VsockRequest, VsockStream,
};
use vdpa_vsock::packet::VMADDR_CID_HOST;
use vdpa_vsock::sim::{SimConfig, SimHost};

use super::{preflight, Roots};

/// Longest handshake line accepted, newline included.
pub(crate) const MAX_LINE: usize = 64;
/// How often the vsock listener threads look at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);
/// Size of each pump's copy buffer.
const PUMP_BUF: usize = 64 * 1024;

/// Options of `vdpa-vsock serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Device spec (see `connect --help`).
    #[arg(long, default_value = "sim")]
    device: DeviceSpec,
    /// Unix socket to serve clients on; peer connections to port P go to PATH_P.
    #[arg(long, value_name = "PATH")]
    uds: PathBuf,
    /// Most connections at a time (handshaking or open, both directions).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_conns: u32,
    /// Kept for compatibility: peer connections to every port P are forwarded to PATH_P (when
    /// a program listens there; otherwise refused), declared or not. Repeatable.
    #[arg(long = "listen-port", value_name = "PORT")]
    listen_ports: Vec<u32>,
    /// With --device sim: a second Unix socket whose clients connect from the sim host (CID 2)
    /// to our ports, e.g. to a --listen-port (same `CONNECT <port>` handshake).
    #[arg(long, value_name = "PATH")]
    sim_host_uds: Option<PathBuf>,
    /// Seconds a client has to send its `CONNECT <port>` line.
    #[arg(long, default_value_t = 5, value_name = "SECS")]
    handshake_timeout: u64,
}

/// What every connection thread shares.
struct Shared {
    driver: VsockDriver,
    /// The host side of the device, when it is `sim`.
    sim_host: Option<SimHost>,
    stop: AtomicBool,
    active: AtomicUsize,
    max_conns: usize,
    next_id: AtomicU64,
    /// Open connections, to shut them down on exit.
    conns: Mutex<HashMap<u64, (UnixStream, VsockStream)>>,
    handshake_timeout: Duration,
}

/// A slot under the connection limit; released on drop.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    fn take_slot(&self) -> Option<Slot<'_>> {
        let prev = self.active.fetch_add(1, Ordering::SeqCst);
        let slot = Slot(&self.active);
        (prev < self.max_conns).then_some(slot)
    }
}

/// Why a handshake failed: the text after `ERR `.
#[derive(Debug)]
enum Handshake {
    /// The client closed before a full line: nothing to answer.
    Closed,
    /// Answer `ERR <reason>`.
    Bad(String),
}

/// Read the `CONNECT <port>\n` line byte by byte (so no stream byte after it is consumed).
fn read_handshake(s: &mut UnixStream, timeout: Duration) -> Result<u32, Handshake> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::with_capacity(MAX_LINE);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Handshake::Bad(format!(
                "handshake timed out after {}s",
                timeout.as_secs()
            )));
        }
        s.set_read_timeout(Some(left))
            .map_err(|e| Handshake::Bad(e.to_string()))?;
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => return Err(Handshake::Closed),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => {
                line.push(b[0]);
                if line.len() >= MAX_LINE {
                    return Err(Handshake::Bad(format!(
                        "handshake line too long (max {MAX_LINE} bytes)"
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Handshake::Bad(format!(
                    "handshake timed out after {}s",
                    timeout.as_secs()
                )))
            }
            Err(_) => return Err(Handshake::Closed),
        }
    }
    parse_connect(&line).map_err(Handshake::Bad)
}

/// Parse `CONNECT <port>` as Firecracker's muxer (`read_local_stream_port`) does: the line is
/// split on whitespace, the first word is the keyword in any case, the second the port; words
/// after it are ignored.
fn parse_connect(line: &[u8]) -> Result<u32, String> {
    let expected = || "expected \"CONNECT <port>\"".to_string();
    let line = std::str::from_utf8(line).map_err(|_| expected())?;
    let mut words = line.split_whitespace();
    if !words
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case("connect"))
    {
        return Err(expected());
    }
    let port = words.next().ok_or_else(expected)?;
    port.parse::<u32>()
        .map_err(|_| format!("bad port {port:?}: expected 0..={}", u32::MAX))
}

/// Copy `from` into `to` until EOF or an error; then pass the end on.
fn pump<R: Read, W: Write>(mut from: R, mut to: W, end: impl FnOnce(bool)) {
    let mut buf = vec![0u8; PUMP_BUF];
    let clean = loop {
        match from.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break false,
        }
    };
    let _ = to.flush();
    end(clean);
}

/// Join a Unix socket and a vsock stream until both directions end.
fn splice(shared: &Shared, uds: UnixStream, vs: VsockStream, what: &str) -> io::Result<()> {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    shared
        .conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, (uds.try_clone()?, vs.try_clone()?));
    uds.set_read_timeout(None)?;
    let (uds_r, vs_w, vs_end) = (uds.try_clone()?, vs.try_clone()?, vs.try_clone()?);
    let (uds_kill, vs_kill) = (uds.try_clone()?, vs.try_clone()?);
    let up = std::thread::Builder::new()
        .name(format!("up-{id}"))
        .spawn(move || {
            pump(uds_r, vs_w, |clean| {
                if clean {
                    let _ = vs_end.shutdown(Shutdown::Write);
                } else {
                    let _ = vs_end.shutdown(Shutdown::Both);
                    let _ = uds_kill.shutdown(Shutdown::Both);
                }
            })
        })?;
    pump(vs.try_clone()?, &uds, |clean| {
        if clean {
            let _ = uds.shutdown(Shutdown::Write);
        } else {
            let _ = uds.shutdown(Shutdown::Both);
            let _ = vs_kill.shutdown(Shutdown::Both);
        }
    });
    let _ = up.join();
    shared
        .conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    log::info!("{what}: closed");
    Ok(())
}

/// Which end a Unix-socket client connects from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Our driver, to the peer (CID 2).
    Driver,
    /// The sim device's host (CID 2), to our driver.
    SimHost,
}

/// One client of a Unix socket: handshake, connect, splice.
fn client(shared: &Shared, mut uds: UnixStream, side: Side) {
    let Some(_slot) = shared.take_slot() else {
        let _ = uds.write_all(b"ERR too many connections\n");
        log::warn!("client refused: {} connections open", shared.max_conns);
        // Let the client's handshake land before the close, so its write doesn't fail first.
        let _ = uds.shutdown(Shutdown::Write);
        let _ = uds.set_read_timeout(Some(Duration::from_millis(200)));
        let _ = uds.read(&mut [0u8; MAX_LINE]);
        return;
    };
    let port = match read_handshake(&mut uds, shared.handshake_timeout) {
        Ok(p) => p,
        Err(Handshake::Closed) => {
            log::info!("client closed during the handshake");
            return;
        }
        Err(Handshake::Bad(reason)) => {
            log::info!("client handshake refused: {reason}");
            let _ = uds.write_all(format!("ERR {reason}\n").as_bytes());
            let _ = uds.shutdown(Shutdown::Both);
            return;
        }
    };
    let (addr, connected) = match side {
        Side::Driver => {
            let addr = VsockAddr::new(VMADDR_CID_HOST, port);
            (addr, shared.driver.connect(addr))
        }
        Side::SimHost => {
            let addr = VsockAddr::new(shared.driver.local_cid(), port);
            let host = shared
                .sim_host
                .as_ref()
                .ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "not a sim device"));
            (addr, host.and_then(|h| h.connect(port)))
        }
    };
    let vs = match connected {
        Ok(s) => s,
        Err(e) => {
            log::info!("connect to {addr} failed: {e}");
            let _ = uds.write_all(format!("ERR connect to {addr} failed: {e}\n").as_bytes());
            let _ = uds.shutdown(Shutdown::Both);
            return;
        }
    };
    let local = vs.local_addr().map(|a| a.port).unwrap_or(0);
    if uds.write_all(format!("OK {local}\n").as_bytes()).is_err() {
        return;
    }
    log::info!("client connected to {addr} from local port {local}");
    if let Err(e) = splice(shared, uds, vs, &format!("{addr}")) {
        log::warn!("connection to {addr}: {e}");
    }
}

/// Take the peer's connection requests to any port P (`listener` is our listener on every
/// port) and forward each to `PATH_P` (`base` is PATH) if a program listens there; refuse it
/// with `RST` otherwise, as Firecracker's muxer does.
fn forward_loop(shared: Arc<Shared>, listener: VsockListener, base: PathBuf) {
    while !shared.stop.load(Ordering::SeqCst) {
        let (req, peer) = match listener.accept_request(Some(STOP_POLL)) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                continue
            }
            Err(e) => {
                log::warn!("accepting peer connections failed: {e}");
                std::thread::sleep(STOP_POLL);
                continue;
            }
        };
        let shared = shared.clone();
        let base = base.clone();
        let spawned = std::thread::Builder::new()
            .name("fwd".into())
            .spawn(move || forward(&shared, req, peer, &base));
        if let Err(e) = spawned {
            // The request, moved into the closure, was dropped: refused.
            log::warn!("cannot spawn a thread for {peer}: {e}");
        }
    }
}

/// One peer connection request: forward it to `PATH_<port>`, or refuse it.
fn forward(shared: &Shared, req: VsockRequest, peer: VsockAddr, base: &Path) {
    let port = match req.local_port() {
        Ok(p) => p,
        Err(e) => {
            log::warn!("{peer}: {e}");
            return req.refuse();
        }
    };
    let Some(_slot) = shared.take_slot() else {
        log::warn!("{peer} -> port {port}: refused, too many connections");
        return req.refuse();
    };
    let target = PathBuf::from(format!("{}_{port}", base.display()));
    let uds = match UnixStream::connect(&target) {
        Ok(uds) => uds,
        Err(e) => {
            log::info!(
                "{peer} -> port {port}: nobody listens on {}: {e}; refused",
                target.display()
            );
            return req.refuse();
        }
    };
    let vs = match req.accept() {
        Ok(vs) => vs,
        Err(e) => {
            log::warn!("{peer} -> port {port}: {e}");
            return;
        }
    };
    log::info!("{peer} -> port {port}: forwarded to {}", target.display());
    if let Err(e) = splice(shared, uds, vs, &format!("{peer}->{port}")) {
        log::warn!("{peer} -> port {port}: {e}");
    }
}

/// Bind `path`, replacing a stale socket file but never a live daemon's.
fn bind_uds(path: &Path) -> Result<UnixListener> {
    if std::fs::symlink_metadata(path).is_ok() {
        if UnixStream::connect(path).is_ok() {
            bail!(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by a running program", path.display())
            ));
        }
        // Not an io::Error in the chain: the device hints don't apply to a socket path.
        std::fs::remove_file(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot remove the stale socket {}: {e} (is it ours to replace?)",
                path.display()
            )
        })?;
    }
    // Bind (and listen) under a temporary name and rename: the socket appears only once it
    // accepts, so a client that waits for the file never meets ECONNREFUSED.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let cannot = |e: io::Error| {
        anyhow::anyhow!(
            "cannot bind the Unix socket {}: {e} (does the directory exist, and may we write to it?)",
            path.display()
        )
    };
    let l = UnixListener::bind(&tmp).map_err(cannot)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(cannot(e));
    }
    Ok(l)
}

/// Run `vdpa-vsock serve` until SIGTERM or SIGINT.
pub(crate) fn run(args: &ServeArgs, roots: &Roots) -> Result<()> {
    preflight(&args.device, roots)?;
    let (driver, sim_host) = if args.device == DeviceSpec::Sim {
        VsockDriver::open_sim(SimConfig::default(), DriverConfig::default())
            .map(|(driver, host)| (driver, Some(host)))
    } else {
        VsockDriver::open(&args.device).map(|driver| (driver, None))
    }
    .with_context(|| format!("opening device {}", args.device))?;
    // Listen on the vsock side first: a failure comes before any file is created.
    let mut declared = std::collections::BTreeSet::new();
    for &p in &args.listen_ports {
        if !declared.insert(p) {
            bail!(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("--listen-port {p} is given twice")
            ));
        }
    }
    let any_port = driver
        .listen_any_port()
        .context("listening on every vsock port")?;
    let (sig_r, sig_w) = UnixStream::pair().context("socketpair for signals")?;
    sig_r.set_nonblocking(true)?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::low_level::pipe::register(sig, sig_w.try_clone()?)
            .context("installing the signal handler")?;
    }
    if args.sim_host_uds.is_some() && args.device != DeviceSpec::Sim {
        bail!("--sim-host-uds needs --device sim");
    }
    // The sim-host socket first: once the main socket exists, everything is ready.
    let mut sockets = Vec::new();
    if let Some(p) = &args.sim_host_uds {
        let l = bind_uds(p)?;
        l.set_nonblocking(true)?;
        sockets.push((l, p.clone(), Side::SimHost));
    }
    let uds = match bind_uds(&args.uds) {
        Ok(l) => l,
        Err(e) => {
            if let Some(p) = &args.sim_host_uds {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
    };
    uds.set_nonblocking(true)?;
    sockets.push((uds, args.uds.clone(), Side::Driver));
    let shared = Arc::new(Shared {
        driver,
        sim_host,
        stop: AtomicBool::new(false),
        active: AtomicUsize::new(0),
        max_conns: args.max_conns as usize,
        next_id: AtomicU64::new(0),
        conns: Mutex::new(HashMap::new()),
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
    });
    let mut fwd: Vec<JoinHandle<()>> = Vec::new();
    {
        let sh = shared.clone();
        let base = args.uds.clone();
        fwd.push(
            std::thread::Builder::new()
                .name("listen-any".into())
                .spawn(move || forward_loop(sh, any_port, base))?,
        );
    }
    eprintln!(
        "serving {} on {} (local CID {}), forwarding peer connections to port P to {}_P",
        shared.driver.device_name(),
        args.uds.display(),
        shared.driver.local_cid(),
        args.uds.display()
    );

    let signal = loop {
        let mut fds: Vec<PollFd<'_>> = sockets
            .iter()
            .map(|(l, _, _)| PollFd::new(l.as_fd(), PollFlags::POLLIN))
            .collect();
        fds.push(PollFd::new(sig_r.as_fd(), PollFlags::POLLIN));
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => break Err(anyhow::Error::from(e).context("poll")),
        }
        let mut b = [0u8; 16];
        if let Ok(n) = (&sig_r).read(&mut b) {
            if n > 0 {
                break Ok(());
            }
        }
        for (l, _, side) in &sockets {
            accept_all(&shared, l, *side);
        }
    };

    // Shut down: no new clients, no socket files, every connection ended, the driver dropped.
    log::info!("shutting down");
    shared.stop.store(true, Ordering::SeqCst);
    for (l, path, _) in sockets {
        drop(l);
        let _ = std::fs::remove_file(&path);
    }
    for (u, v) in shared
        .conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
    {
        let _ = u.shutdown(Shutdown::Both);
        let _ = v.shutdown(Shutdown::Both);
    }
    for t in fwd {
        let _ = t.join();
    }
    // Client threads hold `shared` only while they run; give them a moment, then drop the
    // driver if we hold the last reference (the process ends either way).
    let deadline = Instant::now() + Duration::from_millis(300);
    let mut shared = shared;
    loop {
        match Arc::try_unwrap(shared) {
            Ok(s) => {
                drop(s);
                break;
            }
            Err(s) if Instant::now() < deadline => {
                shared = s;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => {
                log::info!("connections still winding down; exiting anyway");
                break;
            }
        }
    }
    eprintln!("stopped");
    signal
}

/// Accept every pending client of `l` and give each its thread.
fn accept_all(shared: &Arc<Shared>, l: &UnixListener, side: Side) {
    loop {
        match l.accept() {
            Ok((s, _)) => {
                let sh = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("client".into())
                    .spawn(move || {
                        let _ = s.set_nonblocking(false);
                        client(&sh, s, side)
                    });
                if let Err(e) = spawned {
                    log::warn!("cannot spawn a client thread: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: one client's trouble, not the daemon's end.
                log::warn!("accept failed: {e}");
                return;
            }
        }
    }
}
