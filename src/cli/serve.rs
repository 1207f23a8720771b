//! `vdpa-vsock serve`: the transport exposed over Unix sockets with Firecracker's hybrid-vsock
//! protocol.
//!
//! Read Firecracker's `docs/vsock.md` and `src/vmm/src/devices/virtio/vsock/unix/muxer.rs`
//! first: this is its hybrid vsock, with our driver on the vsock side.
//!
//! - A client connects to `--uds PATH` and sends `CONNECT <port>\n`, parsed as Firecracker does
//!   (split on whitespace, the keyword in any case, words after the port ignored); the daemon
//!   connects a vsock stream to the peer (CID 2) on that port and answers `OK <local_port>\n`;
//!   from then on bytes flow both ways (bytes sent right after the line are kept). A bad
//!   handshake (not `CONNECT <port>`, a line over [`MAX_LINE`] bytes, a bad port, silence for
//!   `--handshake-timeout` seconds) is answered with `ERR <reason>\n` and a close.
//! - A connection the peer opens to *any* port P of ours is forwarded to the Unix socket
//!   `PATH_P` if a program listens there, and refused with `RST` (no `RESPONSE`) if not, as
//!   Firecracker's muxer does (`--listen-port` is kept for compatibility; every port is
//!   forwarded). A `PATH_P` whose listen backlog is full counts as nobody listening (the
//!   connect is non-blocking, so the daemon never waits for a slow program).
//! - Differences from Firecracker, and why: a bad handshake gets `ERR <reason>` before the
//!   close (Firecracker closes silently; a reason helps and a Firecracker client ignores it);
//!   `OK` carries our vsock port (Firecracker's host-side port number; both are a number the
//!   client may ignore); the peer is always CID 2, the device's other end (Firecracker's
//!   muxer is the device, so it has no choice either); a connection limit (`--max-conns`) is
//!   answered with `ERR too many connections` (Firecracker drops the client).
//! - **One event-loop thread serves every client** (the driver's own loop thread and, with
//!   `sim`, the simulated device's thread beside it; the count does not grow with clients):
//!   one epoll set holds the Unix listeners, every client's Unix socket (non-blocking,
//!   edge-triggered), the signal pipe and the driver's [`VsockPoller`] descriptor, through
//!   which every vsock socket reports its readiness (no descriptor per vsock socket, so
//!   10,000 clients need about 10,000 descriptors; the soft `RLIMIT_NOFILE` is raised to the
//!   hard one at startup). Handshake timeouts are timers of the loop. Vsock connects are
//!   non-blocking. Each direction of a connection holds at most [`PUMP_BUF`] bytes that the
//!   other side has not taken yet, and nothing once it has (an idle client costs no buffer);
//!   while they wait, that direction reads nothing more (backpressure reaches the sender);
//!   each connection moves at most [`TURN_CHUNKS`] reads per direction per turn, so a busy
//!   one cannot starve the others.
//! - A write half closed on one side is shut down on the other, once what was read before
//!   it has been written; a connection ends when both directions have, or at the first
//!   error of either side (then both sides are shut down both ways). At most `--max-conns`
//!   connections (handshaking or open, both directions) at a time; one over the limit is
//!   answered `ERR too many connections`. By default the limit is what the descriptor limit
//!   holds (one descriptor per connection, after those open at startup and a small reserve):
//!   the driver has no limit of its own, as Linux has none but memory, and a client the
//!   descriptors could not hold would otherwise wait in the listen backlog for an `accept`
//!   that keeps failing with `EMFILE` instead of hearing `ERR`.
//! - With `--device sim`, `--sim-host-uds PATH2` exposes the other end too: a client of PATH2
//!   speaks the same handshake and is connected *from the sim host* (CID 2) to our port, which
//!   is how a peer-initiated connection is tried (and tested) without hardware.
//! - SIGTERM or SIGINT: stop accepting, remove PATH, drop the driver (it closes every vsock
//!   connection, drains for at most half a second, then resets what is left), exit 0 (the
//!   clients' Unix sockets close with the process), within a second.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use vdpa_vsock::device::DeviceSpec;
use vdpa_vsock::driver::{
    DriverConfig, Interest, Readiness, VsockAddr, VsockDriver, VsockListener, VsockPoller,
    VsockRequest, VsockStream,
};
use vdpa_vsock::packet::VMADDR_CID_HOST;
use vdpa_vsock::sim::{SimConfig, SimHost};

use super::{preflight, Roots};

/// Longest handshake line accepted, newline included.
pub(crate) const MAX_LINE: usize = 64;
/// Most bytes one direction of a connection holds that the other side has not taken (also
/// the size of one read).
pub(crate) const PUMP_BUF: usize = 64 * 1024;
/// Reads per direction of one connection per turn of the loop; a connection with more to do
/// goes round again after the others had their turn.
pub(crate) const TURN_CHUNKS: usize = 16;
/// A waiting buffer bigger than this is freed once its bytes have been taken (smaller ones
/// are kept for the next read).
const KEEP_CAPACITY: usize = 4096;
/// Descriptors the default `--max-conns` leaves free beyond those open at startup: for clients
/// accepted only to be refused (each lingers [`REFUSE_LINGER`]) and the odd file.
const FD_RESERVE: usize = 64;
/// `--max-conns` by default when the descriptor limit cannot be read.
const FALLBACK_MAX_CONNS: usize = 1024;
/// How long a client refused for the connection limit may still send its handshake before
/// the close (so that its write does not fail before it reads the `ERR`).
const REFUSE_LINGER: Duration = Duration::from_millis(200);
/// How long the driver drains on shutdown (SIGTERM, SIGINT) before it resets what is left:
/// half of the second the whole shutdown is promised in, the rest for ending every connection
/// and the teardown. With the driver's default (1 s) the drain alone could take the whole
/// second: 10,000 connections closing on a loaded machine exited in 1.1 s.
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(500);
/// When `accept` fails (no descriptor left), the next try.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Epoll events taken per wait.
const EPOLL_EVENTS: usize = 1024;

/// Epoll tokens: the signal pipe, the poller, the Unix listeners, then one per client.
const TOKEN_SIGNAL: u64 = 0;
const TOKEN_POLLER: u64 = 1;
const TOKEN_LISTENER: u64 = 2;
const TOKEN_CLIENT: u64 = 16;
/// Poller tokens: the vsock listener on every port, then one per connection.
const VTOKEN_ANY_PORT: u64 = 0;
const VTOKEN_CONN: u64 = 1;

/// Options of `vdpa-vsock serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Device spec (see `connect --help`).
    #[arg(long, default_value = "sim")]
    device: DeviceSpec,
    /// Unix socket to serve clients on; peer connections to port P go to PATH_P.
    #[arg(long, value_name = "PATH")]
    uds: PathBuf,
    /// Most connections at a time (handshaking or open, both directions). Default: as many
    /// as the descriptor limit holds. Each connection costs serve one descriptor (its Unix
    /// socket; the vsock side has none), so the default is the soft RLIMIT_NOFILE (raised to
    /// the hard limit at startup) minus the descriptors open once serve is ready, minus 64
    /// kept for clients being refused; 1024 if the limit cannot be read. The driver itself
    /// sets no limit (as Linux, whose only limit is memory).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_conns: Option<u32>,
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

/// Which end a Unix-socket client connects from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// Our driver, to the peer (CID 2).
    Driver,
    /// The sim device's host (CID 2), to our driver.
    SimHost,
}

/// One direction of a connection.
#[derive(Debug, Default)]
struct Dir {
    /// Bytes read and not yet taken by the other side (at most [`PUMP_BUF`]); from `off` on.
    pending: Vec<u8>,
    off: usize,
    /// The source reached its end.
    eof: bool,
    /// The end was passed on (the other side's write half shut down).
    shut: bool,
}

impl Dir {
    fn with(pending: Vec<u8>) -> Dir {
        Dir {
            pending,
            ..Dir::default()
        }
    }

    fn waiting(&self) -> bool {
        self.off < self.pending.len()
    }

    fn taken(&mut self, n: usize) {
        self.off += n;
        if self.off == self.pending.len() {
            self.off = 0;
            if self.pending.capacity() > KEEP_CAPACITY {
                self.pending = Vec::new();
            } else {
                self.pending.clear();
            }
        }
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Move bytes `from` -> `to` until one side would block, the source ends (then `shut` passes
/// the end on, once what waits is written), or [`TURN_CHUNKS`] reads are done (returns
/// `true`: more to do). `readable`/`writable` are the edge-triggered "may try" flags of the
/// two sides, cleared on `WouldBlock`.
fn move_bytes(
    mut from: impl Read,
    mut to: impl Write,
    readable: &mut bool,
    writable: &mut bool,
    d: &mut Dir,
    scratch: &mut [u8],
    shut: &dyn Fn() -> io::Result<()>,
) -> io::Result<bool> {
    let mut reads = 0;
    loop {
        if d.waiting() {
            if !*writable {
                return Ok(false);
            }
            match to.write(&d.pending[d.off..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => d.taken(n),
                Err(e) if would_block(&e) => {
                    *writable = false;
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        if d.eof {
            if !d.shut {
                d.shut = true;
                shut()?;
            }
            return Ok(false);
        }
        if !*readable {
            return Ok(false);
        }
        if reads == TURN_CHUNKS {
            return Ok(true);
        }
        reads += 1;
        match from.read(scratch) {
            Ok(0) => d.eof = true,
            Ok(n) => {
                // Straight on when the other side takes it; what it does not take waits (and
                // nothing more is read meanwhile).
                let mut took = 0;
                if *writable {
                    match to.write(&scratch[..n]) {
                        Ok(k) => took = k,
                        Err(e) if would_block(&e) => *writable = false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                d.pending.extend_from_slice(&scratch[took..n]);
            }
            Err(e) if would_block(&e) => {
                *readable = false;
                return Ok(false);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// An open connection's vsock side and its two directions.
#[derive(Debug)]
struct Pipe {
    vs: VsockStream,
    /// Client -> vsock.
    up: Dir,
    /// Vsock -> client.
    down: Dir,
}

/// Where a client is.
#[derive(Debug)]
enum State {
    /// Reading the `CONNECT <port>` line.
    Handshake {
        side: Side,
        line: Vec<u8>,
    },
    /// The vsock connect is under way; `early` are the bytes that followed the line.
    Connecting {
        vs: VsockStream,
        addr: VsockAddr,
        early: Vec<u8>,
    },
    Open(Pipe),
    /// Over the connection limit: `ERR` sent; what the client still sends is read and
    /// dropped until it closes or [`REFUSE_LINGER`] passes.
    Refused,
}

/// One client (of a Unix socket, or forwarded to `PATH_P`).
#[derive(Debug)]
struct Conn {
    uds: UnixStream,
    /// Edge-triggered "may try" flags: set by an event, cleared by `WouldBlock`.
    uds_r: bool,
    uds_w: bool,
    vs_r: bool,
    vs_w: bool,
    state: State,
    /// Holds one of the `--max-conns` slots.
    slot: bool,
    /// In [`Server::again`].
    again: bool,
    /// For the log.
    what: String,
}

/// What a turn decided.
enum Next {
    Keep,
    End,
}

/// How a handshake read went.
enum Line {
    Wait,
    Closed,
    Bad(String),
    Done(Side, u32, Vec<u8>),
}

/// The event loop and everything it serves.
struct Server {
    epoll: Epoll,
    poller: VsockPoller,
    /// The vsock listener on every port (peer-initiated connections).
    any_port: VsockListener,
    listeners: Vec<(UnixListener, PathBuf, Side)>,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    /// Slots taken under `--max-conns`.
    slots: usize,
    max_conns: usize,
    handshake_timeout: Duration,
    /// Handshake deadlines, in order (the timeout is the same for all): (deadline, client).
    handshakes: VecDeque<(Instant, u64)>,
    /// Refused clients' last moment, in order.
    refusals: VecDeque<(Instant, u64)>,
    accept_retry: Option<Instant>,
    /// Clients with work left after their turn: they go round again at once.
    again: Vec<u64>,
    scratch: Vec<u8>,
    /// PATH: peer connections to port P go to PATH_P.
    base: PathBuf,
    driver: VsockDriver,
    /// The host side of the device, when it is `sim`.
    sim_host: Option<SimHost>,
}

impl Server {
    /// Accept every pending client of listener `i`.
    fn accept_all(&mut self, i: usize) {
        loop {
            let Some((l, _, side)) = self.listeners.get(i) else {
                return;
            };
            let side = *side;
            match l.accept() {
                Ok((s, _)) => self.admit(s, side),
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: one client's trouble, not the daemon's end. The
                    // listener is edge-triggered: try again soon rather than at the next
                    // client.
                    log::warn!("accept failed: {e}");
                    self.accept_retry = Some(Instant::now() + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    /// Add `s` to the epoll set as client `id`.
    fn watch(&self, s: &UnixStream, id: u64) -> io::Result<()> {
        s.set_nonblocking(true)?;
        let flags = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
        self.epoll
            .add(s, EpollEvent::new(flags, TOKEN_CLIENT + id))
            .map_err(io::Error::from)
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// A new client of a Unix listener: its handshake starts, or it is refused (limit).
    fn admit(&mut self, s: UnixStream, side: Side) {
        let id = self.new_id();
        if let Err(e) = self.watch(&s, id) {
            log::warn!("client dropped: {e}");
            return;
        }
        let now = Instant::now();
        let state = if self.slots >= self.max_conns {
            let _ = (&s).write_all(b"ERR too many connections\n");
            log::warn!("client refused: {} connections open", self.max_conns);
            let _ = s.shutdown(Shutdown::Write);
            self.refusals.push_back((now + REFUSE_LINGER, id));
            State::Refused
        } else {
            self.slots += 1;
            self.handshakes
                .push_back((now + self.handshake_timeout, id));
            State::Handshake {
                side,
                line: Vec::with_capacity(MAX_LINE),
            }
        };
        let slot = matches!(state, State::Handshake { .. });
        self.conns.insert(
            id,
            Conn {
                uds: s,
                uds_r: false,
                uds_w: false,
                vs_r: false,
                vs_w: false,
                state,
                slot,
                again: false,
                what: "client".into(),
            },
        );
    }

    /// Take the peer's connection requests to any port P and forward each to `PATH_P` if a
    /// program listens there; refuse it with `RST` otherwise, as Firecracker's muxer does.
    fn take_requests(&mut self) {
        loop {
            match self.any_port.accept_request(None) {
                Ok((req, peer)) => self.forward(req, peer),
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("accepting peer connections failed: {e}");
                    return;
                }
            }
        }
    }

    /// One peer connection request: forward it to `PATH_<port>`, or refuse it.
    fn forward(&mut self, req: VsockRequest, peer: VsockAddr) {
        let port = match req.local_port() {
            Ok(p) => p,
            Err(e) => {
                log::warn!("{peer}: {e}");
                return req.refuse();
            }
        };
        if self.slots >= self.max_conns {
            log::warn!("{peer} -> port {port}: refused, too many connections");
            return req.refuse();
        }
        let target = PathBuf::from(format!("{}_{port}", self.base.display()));
        let uds = match connect_nonblocking(&target) {
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
        let id = self.new_id();
        let watched = self.watch(&uds, id).and_then(|()| {
            vs.set_nonblocking(true)?;
            self.poller
                .register(&vs, VTOKEN_CONN + id, Interest::BOTH.edge())
        });
        if let Err(e) = watched {
            log::warn!("{peer} -> port {port}: {e}");
            let _ = vs.shutdown(Shutdown::Both);
            return;
        }
        log::info!("{peer} -> port {port}: forwarded to {}", target.display());
        self.slots += 1;
        self.conns.insert(
            id,
            Conn {
                uds,
                uds_r: true,
                uds_w: true,
                vs_r: true,
                vs_w: true,
                state: State::Open(Pipe {
                    vs,
                    up: Dir::default(),
                    down: Dir::default(),
                }),
                slot: true,
                again: false,
                what: format!("{peer}->{port}"),
            },
        );
        self.turn(id);
    }

    /// Give client `id` its turn: whatever its state allows now.
    fn turn(&mut self, id: u64) {
        let Some(mut c) = self.conns.remove(&id) else {
            return;
        };
        c.again = false;
        match self.step(id, &mut c) {
            Next::Keep => {
                self.conns.insert(id, c);
            }
            Next::End => {
                if c.slot {
                    self.slots -= 1;
                }
            }
        }
    }

    fn step(&mut self, id: u64, c: &mut Conn) -> Next {
        loop {
            match &mut c.state {
                State::Handshake { .. } => match read_line(c) {
                    Line::Wait => return Next::Keep,
                    Line::Closed => {
                        log::info!("client closed during the handshake");
                        return Next::End;
                    }
                    Line::Bad(reason) => {
                        log::info!("client handshake refused: {reason}");
                        refuse(c, &reason);
                        return Next::End;
                    }
                    Line::Done(side, port, early) => {
                        if let Next::End = self.connect(id, c, side, port, early) {
                            return Next::End;
                        }
                    }
                },
                State::Connecting { vs, addr, early } => {
                    let addr = *addr;
                    let failed = match vs.take_error() {
                        Ok(Some(e)) | Err(e) => Some(e),
                        Ok(None) => None,
                    };
                    if let Some(e) = failed {
                        log::info!("connect to {addr} failed: {e}");
                        refuse(c, &format!("connect to {addr} failed: {e}"));
                        return Next::End;
                    }
                    if !c.vs_w {
                        return Next::Keep; // still connecting
                    }
                    let local = vs.local_addr().map(|a| a.port).unwrap_or(0);
                    log::info!("client connected to {addr} from local port {local}");
                    let early = std::mem::take(early);
                    let State::Connecting { vs, .. } =
                        std::mem::replace(&mut c.state, State::Refused)
                    else {
                        unreachable!("matched above")
                    };
                    c.state = State::Open(Pipe {
                        vs,
                        up: Dir::with(early),
                        down: Dir::with(format!("OK {local}\n").into_bytes()),
                    });
                    c.what = format!("{addr}");
                    // Try both sides once: what came before now is no new edge.
                    c.uds_r = true;
                    c.uds_w = true;
                    c.vs_r = true;
                }
                State::Open(p) => {
                    let vs = &p.vs;
                    let uds = &c.uds;
                    let moved = move_bytes(
                        uds,
                        vs,
                        &mut c.uds_r,
                        &mut c.vs_w,
                        &mut p.up,
                        &mut self.scratch,
                        &|| vs.shutdown(Shutdown::Write),
                    )
                    .and_then(|up| {
                        let down = move_bytes(
                            vs,
                            uds,
                            &mut c.vs_r,
                            &mut c.uds_w,
                            &mut p.down,
                            &mut self.scratch,
                            &|| uds.shutdown(Shutdown::Write),
                        )?;
                        Ok(up || down)
                    });
                    return match moved {
                        Err(e) => {
                            log::info!("{}: {e}", c.what);
                            let _ = c.uds.shutdown(Shutdown::Both);
                            let _ = p.vs.shutdown(Shutdown::Both);
                            Next::End
                        }
                        Ok(_) if p.up.shut && p.down.shut => {
                            log::info!("{}: closed", c.what);
                            Next::End
                        }
                        Ok(more) => {
                            if more && !c.again {
                                c.again = true;
                                self.again.push(id);
                            }
                            Next::Keep
                        }
                    };
                }
                State::Refused => {
                    let mut b = [0u8; MAX_LINE];
                    while c.uds_r {
                        match (&c.uds).read(&mut b) {
                            Ok(0) => return Next::End,
                            Ok(_) => {}
                            Err(e) if would_block(&e) => c.uds_r = false,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => return Next::End,
                        }
                    }
                    return Next::Keep;
                }
            }
        }
    }

    /// Start the vsock connect a handshake asked for.
    fn connect(&mut self, id: u64, c: &mut Conn, side: Side, port: u32, early: Vec<u8>) -> Next {
        let (addr, connected) = match side {
            Side::Driver => {
                let addr = VsockAddr::new(VMADDR_CID_HOST, port);
                (addr, self.driver.connect_nonblocking(addr))
            }
            Side::SimHost => {
                let addr = VsockAddr::new(self.driver.local_cid(), port);
                let host = self
                    .sim_host
                    .as_ref()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "not a sim device"));
                (addr, host.and_then(|h| h.connect_nonblocking(port)))
            }
        };
        let registered = connected.and_then(|vs| {
            self.poller
                .register(&vs, VTOKEN_CONN + id, Interest::BOTH.edge())
                .map(|()| vs)
        });
        match registered {
            Ok(vs) => {
                c.state = State::Connecting { vs, addr, early };
                Next::Keep
            }
            Err(e) => {
                log::info!("connect to {addr} failed: {e}");
                refuse(c, &format!("connect to {addr} failed: {e}"));
                Next::End
            }
        }
    }

    /// A vsock event for client `id`.
    fn vsock_event(&mut self, id: u64, r: Readiness) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.vs_r |= r.readable || r.read_closed || r.hangup || r.error;
            c.vs_w |= r.writable || r.hangup || r.error;
            self.turn(id);
        }
    }

    /// A Unix-socket event for client `id`.
    fn uds_event(&mut self, id: u64, f: EpollFlags) {
        if let Some(c) = self.conns.get_mut(&id) {
            let end = EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR;
            c.uds_r |= f.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | end);
            c.uds_w |= f.intersects(EpollFlags::EPOLLOUT | end);
            self.turn(id);
        }
    }

    /// Handshake timeouts, refusals' lingers and the accept retry that are due by `now`.
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.handshakes.front() {
            if at > now {
                break;
            }
            self.handshakes.pop_front();
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if matches!(c.state, State::Handshake { .. }) {
                let reason = format!(
                    "handshake timed out after {}s",
                    self.handshake_timeout.as_secs()
                );
                log::info!("client handshake refused: {reason}");
                refuse(c, &reason);
                self.conns.remove(&id);
                self.slots -= 1;
            }
        }
        while let Some(&(at, id)) = self.refusals.front() {
            if at > now {
                break;
            }
            self.refusals.pop_front();
            self.conns.remove(&id);
        }
        if self.accept_retry.is_some_and(|at| at <= now) {
            self.accept_retry = None;
            for i in 0..self.listeners.len() {
                self.accept_all(i);
            }
        }
    }

    /// How long the loop may sleep: until the next timer, or not at all with work left.
    fn timeout(&self) -> EpollTimeout {
        if !self.again.is_empty() {
            return EpollTimeout::ZERO;
        }
        let next = [
            self.handshakes.front().map(|&(at, _)| at),
            self.refusals.front().map(|&(at, _)| at),
            self.accept_retry,
        ]
        .into_iter()
        .flatten()
        .min();
        match next {
            None => EpollTimeout::NONE,
            Some(at) => {
                // Rounded up to the next millisecond, so the loop does not wake just before.
                let left =
                    at.saturating_duration_since(Instant::now()) + Duration::from_micros(999);
                EpollTimeout::try_from(left.min(Duration::from_secs(3600)))
                    .unwrap_or(EpollTimeout::MAX)
            }
        }
    }

    /// Serve until a signal arrives on `sig`.
    fn serve(&mut self, sig: &UnixStream) -> Result<()> {
        let mut events = vec![EpollEvent::empty(); EPOLL_EVENTS];
        let mut vsock = Vec::new();
        loop {
            let n = match self.epoll.wait(&mut events, self.timeout()) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => return Err(anyhow::Error::from(e).context("epoll_wait")),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_SIGNAL => {
                        let mut b = [0u8; 16];
                        if matches!(Read::read(&mut &*sig, &mut b), Ok(n) if n > 0) {
                            return Ok(());
                        }
                    }
                    TOKEN_POLLER => {} // drained below, every round
                    t if t < TOKEN_CLIENT => {
                        self.accept_all(usize::try_from(t - TOKEN_LISTENER).unwrap_or(usize::MAX))
                    }
                    t => self.uds_event(t - TOKEN_CLIENT, ev.events()),
                }
            }
            vsock.clear();
            self.poller.events(&mut vsock);
            for &(token, r) in &vsock {
                if token == VTOKEN_ANY_PORT {
                    self.take_requests();
                } else {
                    self.vsock_event(token - VTOKEN_CONN, r);
                }
            }
            for id in std::mem::take(&mut self.again) {
                self.turn(id);
            }
            self.expire(Instant::now());
        }
    }
}

/// Read what there is of the handshake line (at most to [`MAX_LINE`] bytes, so that what
/// follows the line stays small: it is kept, and sent once connected).
fn read_line(c: &mut Conn) -> Line {
    let State::Handshake { side, line } = &mut c.state else {
        return Line::Wait;
    };
    let mut buf = [0u8; MAX_LINE];
    while c.uds_r {
        let room = MAX_LINE - line.len();
        match (&c.uds).read(&mut buf[..room]) {
            Ok(0) => return Line::Closed,
            Ok(n) => {
                if let Some(i) = buf[..n].iter().position(|&b| b == b'\n') {
                    line.extend_from_slice(&buf[..i]);
                    return match parse_connect(line) {
                        Ok(port) => Line::Done(*side, port, buf[i + 1..n].to_vec()),
                        Err(reason) => Line::Bad(reason),
                    };
                }
                line.extend_from_slice(&buf[..n]);
                if line.len() >= MAX_LINE {
                    return Line::Bad(format!("handshake line too long (max {MAX_LINE} bytes)"));
                }
            }
            Err(e) if would_block(&e) => c.uds_r = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Line::Closed,
        }
    }
    Line::Wait
}

/// Answer `ERR <reason>` and shut the client down (it is dropped next).
fn refuse(c: &Conn, reason: &str) {
    let _ = (&c.uds).write_all(format!("ERR {reason}\n").as_bytes());
    let _ = c.uds.shutdown(Shutdown::Both);
}

/// Connect to the Unix socket `path` without waiting: a listener whose backlog is full fails
/// (`EAGAIN`) as one that is not there does.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit (each client holds a descriptor); returns
/// the limit in force.
fn raise_nofile_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => {
            log::warn!("getrlimit(RLIMIT_NOFILE): {e}");
            return None;
        }
    };
    if soft >= hard {
        return Some(soft);
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            log::info!("RLIMIT_NOFILE soft limit raised from {soft} to {hard}");
            Some(hard)
        }
        Err(e) => {
            log::warn!("cannot raise RLIMIT_NOFILE from {soft} to {hard}: {e}");
            Some(soft)
        }
    }
}

/// The default `--max-conns`: what a descriptor limit of `nofile` holds, one descriptor per
/// connection, with `open` descriptors taken and [`FD_RESERVE`] kept free (at least 1);
/// [`FALLBACK_MAX_CONNS`] when the limit is unknown.
fn default_max_conns(nofile: Option<u64>, open: usize) -> usize {
    match nofile {
        None => FALLBACK_MAX_CONNS,
        Some(limit) => usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .saturating_sub(open)
            .saturating_sub(FD_RESERVE)
            .max(1),
    }
}

/// Descriptors this process has open now (`/proc/self/fd`, less the one reading it).
fn open_descriptors() -> Option<usize> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count();
    Some(n.saturating_sub(1))
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
    let nofile = raise_nofile_limit();
    let config = DriverConfig {
        drain_timeout: SHUTDOWN_DRAIN,
        ..DriverConfig::default()
    };
    let (driver, sim_host) = if args.device == DeviceSpec::Sim {
        VsockDriver::open_sim(SimConfig::default(), config)
            .map(|(driver, host)| (driver, Some(host)))
    } else {
        VsockDriver::open_with(&args.device, config).map(|driver| (driver, None))
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
    any_port.set_nonblocking(true)?;
    let poller = driver.poller().context("making the vsock poller")?;
    poller
        .register(&any_port, VTOKEN_ANY_PORT, Interest::READABLE.edge())
        .context("registering the vsock listener")?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
    epoll
        .add(
            poller.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_POLLER),
        )
        .context("epoll: the vsock poller")?;
    let (sig_r, sig_w) = UnixStream::pair().context("socketpair for signals")?;
    sig_r.set_nonblocking(true)?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::low_level::pipe::register(sig, sig_w.try_clone()?)
            .context("installing the signal handler")?;
    }
    epoll
        .add(
            sig_r.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_SIGNAL),
        )
        .context("epoll: the signal pipe")?;
    if args.sim_host_uds.is_some() && args.device != DeviceSpec::Sim {
        bail!("--sim-host-uds needs --device sim");
    }
    // The sim-host socket first: once the main socket exists, everything is ready.
    let mut sockets = Vec::new();
    if let Some(p) = &args.sim_host_uds {
        let l = bind_uds(p)?;
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
    sockets.push((uds, args.uds.clone(), Side::Driver));
    for (i, (l, _, _)) in sockets.iter().enumerate() {
        l.set_nonblocking(true)?;
        epoll
            .add(
                l,
                EpollEvent::new(
                    EpollFlags::EPOLLIN | EpollFlags::EPOLLET,
                    TOKEN_LISTENER + i as u64,
                ),
            )
            .context("epoll: a Unix listener")?;
    }
    let max_conns = match args.max_conns {
        Some(n) => n as usize,
        // Counted now that the driver, the listeners and the loop's own descriptors are open.
        None => default_max_conns(nofile, open_descriptors().unwrap_or(0)),
    };
    eprintln!(
        "serving {} on {} (local CID {}), forwarding peer connections to port P to {}_P; \
         one event-loop thread, descriptor limit {}, at most {max_conns} connections",
        driver.device_name(),
        args.uds.display(),
        driver.local_cid(),
        args.uds.display(),
        nofile.map_or_else(|| "unknown".to_string(), |n| n.to_string()),
    );
    let mut server = Server {
        epoll,
        poller,
        any_port,
        listeners: sockets,
        conns: HashMap::new(),
        next_id: 0,
        slots: 0,
        max_conns,
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        handshakes: VecDeque::new(),
        refusals: VecDeque::new(),
        accept_retry: None,
        again: Vec::new(),
        scratch: vec![0; PUMP_BUF],
        base: args.uds.clone(),
        driver,
        sim_host,
    };
    let signal = server.serve(&sig_r);

    // Shut down: no new clients, no socket files, every connection ended, the driver dropped.
    log::info!("shutting down");
    let Server {
        listeners,
        conns,
        poller,
        any_port,
        driver,
        sim_host,
        ..
    } = server;
    for (l, path, _) in listeners {
        drop(l);
        let _ = std::fs::remove_file(&path);
    }
    drop(any_port);
    drop(poller);
    // The driver's drop closes every vsock connection in one pass under one lock, as `close`
    // does (SHUTDOWN, then at most SHUTDOWN_DRAIN for the peers to finish), resets what is
    // left, then the device.
    drop(driver);
    drop(sim_host);
    // What is left of each connection is its Unix socket and the handle of a vsock stream the
    // driver has already ended: the process exits next, and the kernel closes those
    // descriptors (clients see end of file) faster than 10,000 shutdowns and closes of ours,
    // each a system call and a turn of the ended core's lock. Done one by one, that alone took
    // most of the promised second on a loaded machine.
    std::mem::forget(conns);
    eprintln!("stopped");
    signal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_connection_limit_is_what_the_descriptor_limit_holds() {
        // 20,000 descriptors, 40 open at startup: one each for the rest, less the reserve.
        assert_eq!(
            default_max_conns(Some(20_000), 40),
            20_000 - 40 - FD_RESERVE
        );
        // Linux's default soft limit, raised to nothing more.
        assert_eq!(default_max_conns(Some(1024), 30), 1024 - 30 - FD_RESERVE);
        // No limit at all: as many as the address space counts.
        assert_eq!(
            default_max_conns(Some(u64::MAX), 40),
            usize::MAX - 40 - FD_RESERVE
        );
        // A limit the startup already used up still admits one (and `accept` tells the rest).
        assert_eq!(default_max_conns(Some(50), 40), 1);
        assert_eq!(default_max_conns(None, 40), FALLBACK_MAX_CONNS);
    }
}
