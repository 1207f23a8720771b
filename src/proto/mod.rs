//! The sans-IO vsock protocol engine (virtio 1.2 section 5.10.6).
//!
//! # Protocol primer
//!
//! Read virtio 1.2 section 5.10.6 first. A vsock connection is named by
//! `(local port, peer CID, peer port)`. Every packet carries a 44-byte header (see
//! [`Header`]): addresses, `len` (payload bytes, only non-zero for `RW`), the socket `type`
//! (stream or seqpacket), the `op`, `flags`, and the sender's credit (`buf_alloc`, `fwd_cnt`).
//!
//! - **Handshake**: the client sends `REQUEST`; the server answers `RESPONSE` (accepted) or `RST`
//!   (refused: nobody listening, or the backlog is full).
//! - **Data**: `RW` packets. A sender may only have `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`
//!   bytes in flight (see [`credit`]). A receiver tells the sender about freed space with
//!   `CREDIT_UPDATE` (unsolicited, or in answer to a `CREDIT_REQUEST`); every other packet carries
//!   the same information. A peer that sends beyond its credit is reset.
//! - **Close**: `SHUTDOWN` with `RECEIVE`/`SEND` flags is a half close; once a side has seen both
//!   flags from its peer it answers `RST` and forgets the connection (as Linux does). `RST` ends a
//!   connection at once. A packet for an unknown connection (or not addressed to our CID, or
//!   of an unknown type) is answered with `RST`, except an `RST` itself.
//! - **Seqpacket**: `RW` packets carry `EOM` on the last packet of each message (and `EOR` when
//!   the message ends a record); the receiver reassembles messages.
//! - The event queue's `TRANSPORT_RESET` (or a CID change) kills every connection.
//!
//! # Model
//!
//! Like quinn-proto and smoltcp, [`Endpoint`] does no I/O and reads no clock: time comes in as
//! an [`Instant`]. The call order, after every input:
//!
//! 1. inputs: [`Endpoint::handle_packet`] for each received packet, [`Endpoint::handle_timeout`]
//!    when [`Endpoint::poll_timeout`]'s deadline passed, [`Endpoint::handle_transport_reset`],
//!    and the user calls (`connect`, `send`, `recv`, `close`, ...);
//! 2. [`Endpoint::poll_transmit`] until it returns `None`, putting each packet on the TX queue;
//! 3. [`Endpoint::poll_event`] until it returns `None` (and [`Endpoint::poll_ready`], the
//!    connections those events name, for an owner that asked for it with
//!    [`Endpoint::track_ready`]);
//! 4. [`Endpoint::poll_timeout`] to arm the next wake-up.
//!
//! ```
//! use std::time::Instant;
//! use vdpa_vsock::packet::{SocketType, VMADDR_CID_HOST};
//! use vdpa_vsock::proto::{Config, Endpoint, Event};
//!
//! /// The wire: move packets both ways until both sides are quiet.
//! fn wire(now: Instant, a: &mut Endpoint, b: &mut Endpoint) {
//!     let mut buf = vec![0u8; 64 * 1024];
//!     loop {
//!         let mut moved = false;
//!         while let Some(h) = a.poll_transmit(now, &mut buf) {
//!             b.handle_packet(now, &h, &buf[..h.len as usize]);
//!             moved = true;
//!         }
//!         while let Some(h) = b.poll_transmit(now, &mut buf) {
//!             a.handle_packet(now, &h, &buf[..h.len as usize]);
//!             moved = true;
//!         }
//!         if !moved {
//!             return;
//!         }
//!     }
//! }
//!
//! let now = Instant::now();
//! let mut guest = Endpoint::new(Config { local_cid: 3, ..Config::default() });
//! let mut host = Endpoint::new(Config { local_cid: VMADDR_CID_HOST, ..Config::default() });
//! let l = host.listen(1234, 8, SocketType::Stream).unwrap();
//! let c = guest.connect(now, VMADDR_CID_HOST, 1234, None, SocketType::Stream).unwrap();
//! wire(now, &mut guest, &mut host);
//! assert_eq!(guest.poll_event(), Some(Event::Connected(c)));
//! assert_eq!(host.poll_event(), Some(Event::Incoming(l)));
//! let s = host.accept(l).unwrap();
//!
//! guest.send(now, c, b"hello").unwrap();
//! wire(now, &mut guest, &mut host);
//! assert_eq!(host.poll_event(), Some(Event::Readable(s)));
//! let mut data = [0u8; 16];
//! assert_eq!(host.recv(now, s, &mut data), Ok(5));
//! assert_eq!(&data[..5], b"hello");
//! ```
//!
//! A [`ConnId`] stays valid until the user calls [`Endpoint::close`] (released when the linger
//! ends) or [`Endpoint::abort`] (released at once); either ends with [`Event::Closed`]. A
//! connection that was reset, refused or timed out stays in [`ConnState::Closed`] until then.
//!
//! Facts (not code) come from Linux `net/vmw_vsock/virtio_transport_common.c` and Firecracker's
//! `devices/virtio/vsock/csm/connection.rs`.
#![forbid(unsafe_code)]

// This file: the public types, `Endpoint` and its user side (connect, send, recv, close, ...);
// the rest of the engine, one concern a file:
mod conn; // one connection: its states (with their data), buffers, credit, the packets it owes
pub mod credit;
mod input; // the network side: handle_packet, handle_timeout, handle_transport_reset
mod invariants; // check_invariants and peer_credit, for tests and fuzzing
mod listener; // listeners and their accept queues: listen, unlisten, accept
mod output; // poll_transmit, poll_timeout, poll_event, poll_ready and the event queue
mod ports; // port refcounts, bound ports, the free ephemeral runs
pub mod storage;
mod table; // the connection table: insert, set_state (every transition), release, the round robin
mod timers; // the deadline index

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

pub use conn::ConnState;
use conn::{CloseError, Conn, State};
pub use credit::{BufferOption, BufferSize};
use listener::Listener;
use output::Events;
pub use storage::{HeapBuf, HeapStorage, RxBuf, Storage, TxBuf, HEAP_BUF_KEEP};
pub(crate) use table::shrink_sparse;
use timers::Timers;

use crate::packet::{cid_fits, Header, Op, ShutdownFlags, SocketType};

/// Default receive buffer per connection (`buf_alloc`), as Linux's default 256 KiB.
pub const DEFAULT_BUF_ALLOC: u32 = 256 * 1024;
/// Default largest RW payload per packet, as Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`.
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 * 1024;
/// Default send buffer per connection.
pub const DEFAULT_SEND_BUFFER: usize = 256 * 1024;
/// Default connect timeout (Linux's `VSOCK_DEFAULT_CONNECT_TIMEOUT` is 2 s).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default linger after `close` before we give up and send `RST` (Linux's
/// `VSOCK_CLOSE_TIMEOUT` is 8 s).
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(8);
/// Default ephemeral port range: the IANA dynamic range. Linux picks a random start above
/// 1023; we walk the range with a cursor from its start instead (no randomness in a sans-IO
/// core), which also delays reuse of a recently closed port.
pub const DEFAULT_EPHEMERAL_PORTS: RangeInclusive<u32> = 49152..=65535;
/// At most this many `RST`s for unknown connections wait to be sent; more are dropped (and
/// counted in [`Stats::rst_dropped`]) so a flood cannot grow memory.
pub const MAX_PENDING_UNKNOWN_RST: usize = 256;

/// Endpoint configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Our CID (the device config's `guest_cid`).
    pub local_cid: u64,
    /// The default receive buffer per connection, advertised as `buf_alloc`; each connection
    /// and listener may change its own ([`Endpoint::set_buffer`], [`BufferSize`]).
    pub buf_alloc: u32,
    /// Largest RW payload per packet (at least 1).
    pub max_payload: u32,
    /// Per-connection send buffer, in bytes.
    pub send_buffer: usize,
    /// How long a `connect` waits for `RESPONSE`.
    pub connect_timeout: Duration,
    /// How long `close` lingers for the peer's `RST`/`SHUTDOWN` before sending `RST`.
    pub close_timeout: Duration,
    /// `VIRTIO_VSOCK_F_SEQPACKET` was negotiated: seqpacket sockets are allowed.
    pub seqpacket: bool,
    /// Stream sockets are allowed: `VIRTIO_VSOCK_F_STREAM` was negotiated, or
    /// `VIRTIO_VSOCK_F_NO_IMPLIED_STREAM` was not (see [`crate::packet::stream_negotiated`]).
    /// Default `true`.
    pub stream: bool,
    /// Ports `connect` picks from when no local port is given.
    pub ephemeral_ports: RangeInclusive<u32>,
    /// The first ephemeral port tried (then the next ones, wrapping); `None` or a port outside
    /// `ephemeral_ports` starts at its beginning. Drivers randomise it, as Linux does, so that a
    /// process reopening a device does not reuse the ports a previous one left half-closed.
    pub ephemeral_first: Option<u32>,
    /// Most connections in the table at once (including closed ones not yet released); more
    /// `connect`s fail with [`ProtoError::TooManyConnections`] and more `REQUEST`s get `RST`.
    /// The default, `usize::MAX`, is no limit but memory, as in Linux; every per-operation cost
    /// of the endpoint is independent of the number of connections (O(1) or O(log n)).
    pub max_connections: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            local_cid: 3,
            buf_alloc: DEFAULT_BUF_ALLOC,
            max_payload: DEFAULT_MAX_PAYLOAD,
            send_buffer: DEFAULT_SEND_BUFFER,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            close_timeout: DEFAULT_CLOSE_TIMEOUT,
            seqpacket: false,
            stream: true,
            ephemeral_ports: DEFAULT_EPHEMERAL_PORTS,
            ephemeral_first: None,
            max_connections: usize::MAX,
        }
    }
}

/// A connection handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

/// A listener handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(u64);

impl fmt::Display for ListenerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "listener#{}", self.0)
    }
}

/// Something the user should know about.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Our `connect` got its `RESPONSE`.
    Connected(ConnId),
    /// Our `connect` failed: `ConnectionRefused` (peer `RST`), `TimedOut`, or `ConnectionReset`
    /// (transport reset).
    ConnectFailed(ConnId, ProtoError),
    /// A listener has a connection to `accept`.
    Incoming(ListenerId),
    /// Data (or a complete seqpacket message) arrived.
    Readable(ConnId),
    /// Send buffer space freed after a `send` found it full.
    Writable(ConnId),
    /// The peer sent `SHUTDOWN`; the flags are everything it has shut down so far.
    PeerShutdown(ConnId, ShutdownFlags),
    /// The connection was reset (peer `RST`, credit violation, transport reset).
    Reset(ConnId),
    /// The `ConnId` was released after `close` or `abort`.
    Closed(ConnId),
}

/// Protocol errors. No variant has a cause.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// The peer answered our `REQUEST` with `RST`.
    #[error("connection refused: the peer answered REQUEST with RST")]
    ConnectionRefused,
    /// The connection was reset.
    #[error("connection reset by peer or transport")]
    ConnectionReset,
    /// No `RESPONSE` within the connect timeout.
    #[error("connect timed out waiting for RESPONSE")]
    TimedOut,
    /// The local port is taken.
    #[error("local port {port} is already in use")]
    AddrInUse {
        /// The port.
        port: u32,
    },
    /// Every port in the ephemeral range is taken.
    #[error("no free ephemeral port in {start}..={end}")]
    PortsExhausted {
        /// First port of the range.
        start: u32,
        /// Last port of the range.
        end: u32,
    },
    /// The connection is not established (yet).
    #[error("connection is not established")]
    NotConnected,
    /// Sending after our `SHUTDOWN` send, the peer's `SHUTDOWN` receive, or `close`.
    #[error("broken pipe: sending side is shut down")]
    BrokenPipe,
    /// Nothing to read or no room to write now.
    #[error("operation would block")]
    WouldBlock,
    /// A bad argument.
    #[error("invalid input: {0}")]
    InvalidInput(&'static str),
    /// A seqpacket message larger than the send buffer or the peer's `buf_alloc`.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    MessageTooLarge {
        /// Message length.
        len: usize,
        /// Largest message allowed.
        max: usize,
    },
    /// The `ConnId` is not (or no longer) known.
    #[error("unknown connection")]
    UnknownConnection,
    /// A CID that does not fit in 32 bits (see [`crate::packet::cid_fits`]).
    #[error(
        "CID {cid} does not fit in 32 bits: expected at most 4294967295 (VMADDR_CID_ANY), \
         as in struct sockaddr_vm"
    )]
    InvalidCid {
        /// The CID asked for.
        cid: u64,
    },
    /// The peer answered our `REQUEST` with something else than `RESPONSE` or `RST` (Linux's
    /// `EPROTO`); the connection was reset.
    #[error("protocol error: the peer answered REQUEST with op {op}")]
    Protocol {
        /// The op it sent.
        op: u16,
    },
    /// The connection table is full.
    #[error("too many connections: the limit is {max}")]
    TooManyConnections {
        /// The limit ([`Config::max_connections`]).
        max: usize,
    },
}

/// What a connection is ready for ([`Endpoint::readiness`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Data (a stream's bytes, or a whole seqpacket message) waits to be read.
    pub readable: bool,
    /// Reads will end: the peer sent `SHUTDOWN` with `SEND`, we shut down receiving, or the
    /// connection closed (reads drain what is buffered, then return 0 or the error).
    pub read_closed: bool,
    /// A send would queue at least one byte now.
    pub writable: bool,
    /// Nothing more can go either way (closed, reset, or shut down both ways).
    pub hangup: bool,
    /// The connection ended in an error (reset, refused, timed out).
    pub error: bool,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets given to `handle_packet`.
    pub packets_in: u64,
    /// Packets returned by `poll_transmit`.
    pub packets_out: u64,
    /// RW payload bytes accepted.
    pub bytes_in: u64,
    /// RW payload bytes sent.
    pub bytes_out: u64,
    /// `RST`s sent, all causes.
    pub rst_sent: u64,
    /// `RST`s sent in answer to packets no connection or listener takes: an unknown
    /// connection or port, a `dst_cid` that is not ours, an unknown or mismatched `type`, an
    /// unknown op outside a connection (as Linux's `virtio_transport_reset_no_sock`).
    pub rst_unknown: u64,
    /// `RST`s for unknown connections dropped because [`MAX_PENDING_UNKNOWN_RST`] were queued.
    pub rst_dropped: u64,
    /// Connections reset because the peer sent beyond our advertised credit.
    pub credit_violations: u64,
    /// Packets not delivered because their `dst_cid` is not ours; each is answered with `RST`
    /// (unless it is one), counted in [`Stats::rst_unknown`].
    pub dropped_wrong_cid: u64,
    /// Packets not delivered: unknown op or type, a type the connection does not have (or
    /// seqpacket not negotiated), `len` not matching the payload, or an op that makes no sense
    /// in the connection's state. Those with an unknown or mismatched type, or an unknown op
    /// for no connection, are answered with `RST` too (counted in [`Stats::rst_unknown`]);
    /// a malformed `len` and a bad op on a live connection only here.
    pub dropped_invalid: u64,
    /// `REQUEST`s refused because the listener's backlog was full.
    pub backlog_full: u64,
    /// `REQUEST`s refused because the connection table was full.
    pub table_full: u64,
    /// Connects that timed out.
    pub connect_timeouts: u64,
    /// Closes that ended with our `RST` after the linger.
    pub close_timeouts: u64,
    /// RW payload bytes discarded because nobody will read them (after our `RECEIVE`
    /// shutdown, the peer's `SEND` shutdown, or `close`).
    pub rx_discarded: u64,
    /// RW payload bytes consumed on arrival by sink connections ([`Endpoint::set_sink`]).
    pub bytes_sunk: u64,
    /// RW payload bytes echoed straight back on arrival
    /// ([`Endpoint::handle_packet_or_echo_with`]): counted in `bytes_in` and `bytes_out`.
    pub bytes_echoed: u64,
    /// `CREDIT_UPDATE`s received.
    pub credit_updates_in: u64,
    /// `CREDIT_REQUEST`s received.
    pub credit_requests_in: u64,
}

/// `(local port, peer CID, peer port)`.
type Key = (u32, u64, u32);

/// The protocol engine for one vsock device (one local CID). Payload bytes live in the queues
/// of `S` ([`storage`]); the engine only counts them.
pub struct Endpoint<S: Storage = HeapStorage> {
    config: Config,
    storage: S,
    conns: HashMap<ConnId, Conn<S>>,
    keys: HashMap<Key, ConnId>,
    listeners: HashMap<ListenerId, Listener>,
    listener_ports: HashMap<u32, ListenerId>,
    /// The listener on every other port ([`Endpoint::listen_any_port`]).
    any_listener: Option<ListenerId>,
    /// Live connections per local port.
    port_refs: HashMap<u32, u32>,
    /// Live `connect`-created connections per local port (bound ports).
    bound_refs: HashMap<u32, u32>,
    next_conn: u64,
    next_listener: u64,
    next_ephemeral: u32,
    /// The ephemeral ports no connection and no listener uses, as runs `start -> end`
    /// (inclusive, disjoint, never adjacent), so that `alloc_ephemeral` finds the next free
    /// port in O(log n) however many are taken. [`Endpoint::sync_free_port`] keeps it in step
    /// with `port_refs` and `listener_ports`.
    free_ports: BTreeMap<u32, u32>,
    /// Connections that may have packets to send, round robin.
    ready: VecDeque<ConnId>,
    /// Every connection's deadline, ordered: the index of the deadlines in the states.
    timers: Timers,
    /// `RST`s for our own connections taken off the wire, sent first.
    control: VecDeque<Header>,
    /// `RST`s answering packets for unknown connections (bounded).
    unknown_rst: VecDeque<Header>,
    events: Events,
    stats: Stats,
}

impl<S: Storage> fmt::Debug for Endpoint<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("config", &self.config)
            .field("connections", &self.conns.len())
            .field("listeners", &self.listeners.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Endpoint<HeapStorage> {
    /// A new endpoint whose payload lives on the heap. `max_payload` is raised to 1 if zero.
    pub fn new(config: Config) -> Self {
        Endpoint::with_storage(config, HeapStorage)
    }
}

impl<S: Storage> Endpoint<S> {
    /// A new endpoint whose connections keep their payload in `storage`'s queues.
    /// `max_payload` is raised to 1 if zero.
    pub fn with_storage(mut config: Config, storage: S) -> Self {
        config.max_payload = config.max_payload.max(1);
        let next_ephemeral = config
            .ephemeral_first
            .filter(|p| config.ephemeral_ports.contains(p))
            .unwrap_or(*config.ephemeral_ports.start());
        let (start, end) = (
            *config.ephemeral_ports.start(),
            *config.ephemeral_ports.end(),
        );
        let free_ports = if start <= end {
            BTreeMap::from([(start, end)])
        } else {
            BTreeMap::new()
        };
        Endpoint {
            config,
            storage,
            conns: HashMap::new(),
            keys: HashMap::new(),
            listeners: HashMap::new(),
            listener_ports: HashMap::new(),
            any_listener: None,
            port_refs: HashMap::new(),
            bound_refs: HashMap::new(),
            next_conn: 0,
            next_listener: 0,
            next_ephemeral,
            free_ports,
            ready: VecDeque::new(),
            timers: Timers::default(),
            control: VecDeque::new(),
            unknown_rst: VecDeque::new(),
            events: Events::default(),
            stats: Stats::default(),
        }
    }

    /// Our CID.
    pub fn local_cid(&self) -> u64 {
        self.config.local_cid
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    // ----- user side -----

    /// Open a connection: queues a `REQUEST` and arms the connect timeout. Without
    /// `local_port`, an ephemeral port is picked that no connection or listener uses. A
    /// `peer_cid` that does not fit in 32 bits is refused at once with
    /// [`ProtoError::InvalidCid`] (Linux's `svm_cid` is 32 bits wide).
    pub fn connect(
        &mut self,
        now: Instant,
        peer_cid: u64,
        peer_port: u32,
        local_port: Option<u32>,
        ty: SocketType,
    ) -> Result<ConnId, ProtoError> {
        let timeout = self.config.connect_timeout;
        self.connect_with_timeout(now, peer_cid, peer_port, local_port, ty, timeout)
    }

    /// [`Endpoint::connect`] with a connect timeout of its own instead of
    /// [`Config::connect_timeout`] (as `SO_VM_SOCKETS_CONNECT_TIMEOUT`, of any length).
    pub fn connect_with_timeout(
        &mut self,
        now: Instant,
        peer_cid: u64,
        peer_port: u32,
        local_port: Option<u32>,
        ty: SocketType,
        timeout: Duration,
    ) -> Result<ConnId, ProtoError> {
        if !cid_fits(peer_cid) {
            return Err(ProtoError::InvalidCid { cid: peer_cid });
        }
        self.check_type(ty)?;
        self.check_room()?;
        let port = match local_port {
            Some(p) => {
                if self.listener_ports.contains_key(&p)
                    || self.bound_refs.contains_key(&p)
                    || self.keys.contains_key(&(p, peer_cid, peer_port))
                {
                    return Err(ProtoError::AddrInUse { port: p });
                }
                p
            }
            None => self.alloc_ephemeral()?,
        };
        let id = self.new_conn_id();
        let buffer = self.default_buffer();
        let mut conn = Conn::new(
            &mut self.storage,
            id,
            ty,
            port,
            peer_cid,
            peer_port,
            State::Connecting {
                deadline: now.checked_add(timeout),
                request_owed: true,
            },
            buffer,
        );
        conn.bound = true;
        self.insert_conn(conn);
        self.schedule(id);
        Ok(id)
    }

    /// Copy as much of `data` as fits into the send buffer (stream sockets). `Ok(0)` means the
    /// buffer is full: wait for [`Event::Writable`].
    pub fn send(&mut self, now: Instant, c: ConnId, data: &[u8]) -> Result<usize, ProtoError> {
        // Storage may take less than the room (exhausted): then space frees as sent packets
        // complete.
        self.send_with(now, c, data.len(), |tx, room| {
            tx.append(&data[..room]);
        })
    }

    /// The connection `c`, which a call for socket type `ty` is about to use (`misuse` says why
    /// another type is refused).
    fn conn_of_type(
        &mut self,
        c: ConnId,
        ty: SocketType,
        misuse: &'static str,
    ) -> Result<&mut Conn<S>, ProtoError> {
        let conn = self
            .conns
            .get_mut(&c)
            .ok_or(ProtoError::UnknownConnection)?;
        if conn.ty != ty {
            return Err(ProtoError::InvalidInput(misuse));
        }
        Ok(conn)
    }

    /// The connection `c` for a receive call of socket type `ty` (`misuse` says why another type
    /// is refused); re-arms its `Readable` event. A connection still connecting has nothing to read.
    fn conn_to_read(
        &mut self,
        c: ConnId,
        ty: SocketType,
        misuse: &'static str,
    ) -> Result<&mut Conn<S>, ProtoError> {
        let conn = self.conn_of_type(c, ty, misuse)?;
        conn.readable_notified = false;
        if conn.connecting() {
            return Err(ProtoError::NotConnected);
        }
        Ok(conn)
    }

    /// Read buffered stream data (an empty `buf` reads nothing). `Ok(0)` is end of stream (the peer shut down sending, or we
    /// shut down receiving) once the buffer is empty; `Err(WouldBlock)` when empty otherwise.
    pub fn recv(&mut self, now: Instant, c: ConnId, buf: &mut [u8]) -> Result<usize, ProtoError> {
        self.recv_stream(now, c, "recv on a seqpacket socket; use recv_msg", |rx| {
            let n = rx.len().min(buf.len());
            rx.read(&mut buf[..n]);
        })
        .map(|r| r.map_or(0, |((), n)| n))
    }

    /// Copy buffered stream data into `buf` and keep it (`MSG_PEEK`): the same results as
    /// [`Endpoint::recv`], and nothing consumed or credited.
    pub fn peek(&mut self, c: ConnId, buf: &mut [u8]) -> Result<usize, ProtoError> {
        let conn = self.conn_of_type(c, SocketType::Stream, "peek on a seqpacket socket")?;
        if conn.connecting() {
            return Err(ProtoError::NotConnected);
        }
        if conn.rx.is_empty() {
            return Self::rx_end(conn).map(|()| 0);
        }
        let n = conn.rx.len().min(buf.len());
        conn.rx.peek(&mut buf[..n]);
        Ok(n)
    }

    /// Queue stream data in place: `fill` gets the send queue and the room (at most `max`
    /// bytes, within the send buffer) and appends up to that many bytes its own way (the
    /// zero-copy path: the caller writes straight into the queue's storage); returns how many
    /// it appended. `Ok(0)` with `max > 0` means no room: wait for [`Event::Writable`].
    pub fn send_with(
        &mut self,
        now: Instant,
        c: ConnId,
        max: usize,
        fill: impl FnOnce(&mut S::Tx, usize),
    ) -> Result<usize, ProtoError> {
        let _ = now;
        let room = self.send_room(c, max)?;
        if room == 0 {
            return Ok(0);
        }
        let Some(conn) = self.conns.get_mut(&c) else {
            return Err(ProtoError::UnknownConnection);
        };
        let before = conn.tx.len();
        fill(&mut conn.tx, room);
        let added = conn.tx.len().saturating_sub(before);
        if added > room {
            // The owner broke the contract; the send buffer's bound no longer holds.
            log::error!("{c}: send_with's fill added {added} bytes, room was {room}");
            debug_assert!(added <= room, "fill added more than the room");
        }
        if added == 0 {
            conn.writable_wanted = true;
            return Ok(0);
        }
        self.schedule(c);
        Ok(added)
    }

    /// Room for stream data now, at most `max`: for an owner that fills its send storage in
    /// two steps, setting memory aside here, filling it with no lock held, and queueing it with
    /// [`Endpoint::send_with`]. `Ok(0)` with `max > 0` means no room: [`Event::Writable`] is
    /// armed, as after a `send` that found the buffer full.
    pub fn send_room(&mut self, c: ConnId, max: usize) -> Result<usize, ProtoError> {
        let send_buffer = self.config.send_buffer;
        let conn = self.conn_of_type(
            c,
            SocketType::Stream,
            "send on a seqpacket socket; use send_msg",
        )?;
        Self::check_sendable(conn)?;
        let room = conn.tx_space(send_buffer).min(max);
        if room == 0 {
            conn.writable_wanted = max > 0;
        }
        Ok(room)
    }

    /// Connection `c`'s send queue, for the owner to set storage aside in (see
    /// [`Endpoint::send_room`]). The owner must not change its `len()`: bytes join it only
    /// through [`Endpoint::send`] and [`Endpoint::send_with`], which account for them.
    pub fn send_queue(&mut self, c: ConnId) -> Option<&mut S::Tx> {
        self.conns.get_mut(&c).map(|conn| &mut conn.tx)
    }

    /// Read stream data in place: when data is buffered, `take` gets the receive queue and
    /// removes what it consumed its own way (the zero-copy path); returns `Some` of its result
    /// and the bytes it consumed. `Ok(None)` at end of stream; `Err(WouldBlock)` when nothing
    /// is buffered yet.
    pub fn recv_with<R>(
        &mut self,
        now: Instant,
        c: ConnId,
        take: impl FnOnce(&mut S::Rx) -> R,
    ) -> Result<Option<(R, usize)>, ProtoError> {
        self.recv_stream(now, c, "recv on a seqpacket socket; use recv_msg", take)
    }

    /// Consume up to `max` buffered stream bytes without reading them (a sink's way to read):
    /// the same results as [`Endpoint::recv`] into a buffer of `max` bytes, and no byte copied.
    pub fn discard(&mut self, now: Instant, c: ConnId, max: usize) -> Result<usize, ProtoError> {
        self.recv_stream(
            now,
            c,
            "discard on a seqpacket socket; use recv_msg",
            |rx| {
                rx.discard(rx.len().min(max));
            },
        )
        .map(|r| r.map_or(0, |((), n)| n))
    }

    /// Echo: move up to `max` buffered stream bytes of `c` from its receive queue to its send
    /// queue, as [`Endpoint::recv`] then [`Endpoint::send`] would (credited as read, queued as
    /// written, within the send buffer), with no copy where the storage can hand the memory
    /// over ([`Storage::relay`]; the heap storage moves a whole queue). `Ok(Some(n))`: `n`
    /// bytes moved, 0 when the send buffer is full ([`Event::Writable`] is then armed);
    /// `Ok(None)` at end of stream; `Err(WouldBlock)` when nothing is buffered yet;
    /// `Err(InvalidInput)` for a storage that cannot relay (nothing moved).
    pub fn relay(
        &mut self,
        now: Instant,
        c: ConnId,
        max: usize,
    ) -> Result<Option<usize>, ProtoError> {
        let _ = now;
        let misuse = "relay on a seqpacket socket";
        let room = self.send_room(c, max)?;
        let conn = self.conn_to_read(c, SocketType::Stream, misuse)?;
        if conn.rx.is_empty() {
            return Self::rx_end(conn).map(|()| None);
        }
        let n = conn.rx.len().min(room);
        if n == 0 {
            return Ok(Some(0));
        }
        if !S::relay(&mut conn.rx, &mut conn.tx, n) {
            return Err(ProtoError::InvalidInput("this storage cannot relay"));
        }
        Self::consumed(conn, n);
        self.schedule(c);
        Ok(Some(n))
    }

    /// Make stream `c` a sink (`on`): payload is consumed the moment it arrives, never
    /// queued nor copied, and credited to the peer as if read (counted in
    /// [`Stats::bytes_sunk`]); what is already queued is consumed now. End of stream still
    /// shows (`recv`/`discard` return 0). A discard service (the sim's) needs nothing more.
    pub fn set_sink(&mut self, c: ConnId, on: bool) -> Result<(), ProtoError> {
        let conn =
            self.conn_to_read(c, SocketType::Stream, "a seqpacket socket cannot be a sink")?;
        conn.sink = on;
        let n = conn.rx.len();
        if on && n > 0 {
            conn.rx.discard(n);
            Self::consumed(conn, n);
            self.stats.bytes_sunk += n as u64;
            self.schedule(c);
        }
        Ok(())
    }

    /// Make stream `c` an echo (`on`): whatever arrives is sent back. Its owner still moves
    /// what is buffered ([`Endpoint::relay`]); what changes is that a packet arriving while
    /// nothing is buffered either way may be answered at once, its bytes going from the
    /// request's buffer into the reply's with one copy and never through the queues
    /// ([`Endpoint::handle_packet_or_echo_with`]; the sim's echo service).
    pub fn set_echo(&mut self, c: ConnId, on: bool) -> Result<(), ProtoError> {
        let conn = self.conn_to_read(c, SocketType::Stream, "a seqpacket socket cannot echo")?;
        conn.echo = on;
        Ok(())
    }

    /// Whether a packet with header `hdr` is RW payload for an echo ([`Endpoint::set_echo`])
    /// that could be answered at once (nothing buffered either way, credit and room for all of
    /// it): worth finding a buffer for the reply before
    /// [`Endpoint::handle_packet_or_echo_with`]. A cheap look, not a promise: that call checks
    /// again with the packet's credit fields applied.
    pub fn echo_ready(&self, hdr: &Header) -> bool {
        if hdr.op != Op::Rw as u16 || hdr.len == 0 || hdr.dst_cid != self.config.local_cid {
            return false;
        }
        self.keys
            .get(&(hdr.dst_port, hdr.src_cid, hdr.src_port))
            .and_then(|id| self.conns.get(id))
            .is_some_and(|c| {
                c.can_echo(
                    hdr.len as usize,
                    self.config.max_payload,
                    self.config.send_buffer,
                )
            })
    }

    /// The one way stream data leaves the receive queue (`recv`, `recv_with`, `discard`): when
    /// data is buffered, `take` removes what it consumes, which is credited to the peer;
    /// `Ok(None)` at end of stream, `Err(WouldBlock)` when nothing is buffered yet. `misuse`
    /// says why a seqpacket socket is refused.
    fn recv_stream<R>(
        &mut self,
        now: Instant,
        c: ConnId,
        misuse: &'static str,
        take: impl FnOnce(&mut S::Rx) -> R,
    ) -> Result<Option<(R, usize)>, ProtoError> {
        let _ = now;
        let conn = self.conn_to_read(c, SocketType::Stream, misuse)?;
        if conn.rx.is_empty() {
            return Self::rx_end(conn).map(|()| None);
        }
        let before = conn.rx.len();
        let r = take(&mut conn.rx);
        let n = before.saturating_sub(conn.rx.len());
        if n > 0 {
            Self::consumed(conn, n);
            self.schedule(c);
        }
        Ok(Some((r, n)))
    }

    /// Queue one seqpacket message (split into packets of at most `max_payload`, the last one
    /// flagged `EOM`, and `EOR` if `eor`). All or nothing: `Err(WouldBlock)` if the send buffer
    /// lacks room.
    pub fn send_msg(
        &mut self,
        now: Instant,
        c: ConnId,
        msg: &[u8],
        eor: bool,
    ) -> Result<(), ProtoError> {
        let _ = now;
        let send_buffer = self.config.send_buffer;
        let conn = self.conn_of_type(
            c,
            SocketType::SeqPacket,
            "send_msg on a stream socket; use send",
        )?;
        Self::check_sendable(conn)?;
        let max = send_buffer.min(conn.credit.peer_buf_alloc as usize);
        if msg.len() > max {
            return Err(ProtoError::MessageTooLarge {
                len: msg.len(),
                max,
            });
        }
        if conn.tx_space(send_buffer) < msg.len() || !conn.tx.try_reserve(msg.len()) {
            conn.writable_wanted = true;
            return Err(ProtoError::WouldBlock);
        }
        let n = conn.tx.append(msg);
        debug_assert_eq!(n, msg.len(), "the storage took less than it reserved");
        conn.msgs_mut().tx.push_back((msg.len(), eor));
        self.schedule(c);
        Ok(())
    }

    /// Receive one seqpacket message into `buf`: returns (bytes copied, full message length,
    /// EOR). A longer message is truncated, the rest discarded (like `MSG_TRUNC`). At end of
    /// stream returns `Ok((0, 0, false))` (as Linux's `recvmsg` returns 0; a zero-length
    /// message looks the same).
    pub fn recv_msg(
        &mut self,
        now: Instant,
        c: ConnId,
        buf: &mut [u8],
    ) -> Result<(usize, usize, bool), ProtoError> {
        let _ = now;
        let conn = self.conn_to_read(
            c,
            SocketType::SeqPacket,
            "recv_msg on a stream socket; use recv",
        )?;
        if let Some((len, eor)) = conn.msgs_opt_mut().and_then(|m| m.rx.pop_front()) {
            let copied = len.min(buf.len());
            conn.rx.read(&mut buf[..copied]);
            conn.rx.discard(len - copied);
            Self::consumed(conn, len);
            self.schedule(c);
            return Ok((copied, len, eor));
        }
        Self::rx_end(conn).map(|()| (0, 0, false))
    }

    /// Shut down one or both directions: `SHUTDOWN` goes out (with `SEND` after the send
    /// buffer drains). Data received after our `RECEIVE` shutdown is discarded.
    ///
    /// A connection that was established and has since closed (the peer shut down both ways,
    /// or it was reset) takes it too, with nothing sent: Linux's `vsock_shutdown` refuses
    /// only a socket that never connected (`ENOTCONN`), so a program that shuts down its
    /// write half after the peer went (hyper does, on every connection a client closes
    /// first) sees no error. A connect that failed (refused, timed out) answers its error.
    pub fn shutdown(
        &mut self,
        now: Instant,
        c: ConnId,
        how: ShutdownFlags,
    ) -> Result<(), ProtoError> {
        let _ = now;
        let conn = self
            .conns
            .get_mut(&c)
            .ok_or(ProtoError::UnknownConnection)?;
        match conn.state() {
            State::Connecting { .. } => return Err(ProtoError::NotConnected),
            State::Closed {
                error: Some(e @ (CloseError::Refused | CloseError::TimedOut)),
                ..
            } => return Err((*e).into()),
            State::Closed { .. } | State::Established { .. } | State::Closing { .. } => {}
        }
        conn.shut_local(how);
        if how.receive {
            Self::drop_unread(conn);
        }
        self.schedule(c);
        Ok(())
    }

    /// Graceful close: send what is buffered, then `SHUTDOWN` (both flags), and wait for the
    /// peer's `RST` or `SHUTDOWN` up to [`Config::close_timeout`], then `RST`. Unread data is
    /// discarded. [`Event::Closed`] reports the release of `c`.
    pub fn close(&mut self, now: Instant, c: ConnId) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        if conn.state().held() {
            // Never answered: refuse it, as Linux refuses a REQUEST nobody accepts.
            self.abort(now, c);
            return;
        }
        match *conn.state() {
            State::Closing { .. } => {}
            State::Closed { .. } => self.release(c, true),
            State::Connecting { .. } => {
                self.queue_rst(c);
                self.release(c, true);
            }
            State::Established { answer, shut, sent } => {
                Self::drop_unread(conn);
                if shut.peer.receive {
                    conn.clear_tx();
                }
                // A close timeout beyond what an Instant holds lingers for ever (as a connect
                // timeout that long waits for ever).
                let closing = State::Closing {
                    deadline: now.checked_add(self.config.close_timeout),
                    peer: shut.peer,
                    sent,
                    response_owed: answer == conn::Answer::Owed,
                };
                self.set_state(c, closing);
                self.schedule(c);
            }
        }
    }

    /// Immediate close: `RST` (if still on the wire) and release; [`Event::Closed`] follows.
    pub fn abort(&mut self, now: Instant, c: ConnId) {
        let _ = now;
        if self.conns.contains_key(&c) {
            self.queue_rst(c);
            self.release(c, true);
        }
    }

    /// Reset `c` now from our side: RST to the peer, both queues dropped, the connection
    /// `Closed` with `ConnectionReset` (as after the peer's RST: the `ConnId` stays until
    /// [`Endpoint::close`]); an [`Event::Reset`] follows. A connection not yet accepted, or
    /// already closed by the user and lingering, is released instead.
    pub fn reset(&mut self, now: Instant, c: ConnId) {
        let _ = now;
        if self.conns.get(&c).is_some_and(|conn| conn.on_wire()) {
            // As when we reset one for a protocol violation: a connection still in a
            // listener's queue, or one the user already closed, is released.
            self.reset_conn(c);
            if let Some(conn) = self.conns.get_mut(&c) {
                Self::drop_unread(conn);
            }
        }
    }

    /// The connection's state, or `None` if `c` is unknown or released.
    pub fn state(&self, c: ConnId) -> Option<ConnState> {
        self.conns.get(&c).map(|conn| conn.state().public())
    }

    /// Bytes buffered for reading (for seqpacket, of all complete and partial messages).
    pub fn readable_bytes(&self, c: ConnId) -> usize {
        self.conns.get(&c).map_or(0, |conn| conn.rx.len())
    }

    /// Room in the send buffer, or 0 if the connection cannot send.
    pub fn writable_bytes(&self, c: ConnId) -> usize {
        match self.conns.get(&c) {
            Some(conn) if Self::check_sendable(conn).is_ok() => {
                conn.tx_space(self.config.send_buffer)
            }
            _ => 0,
        }
    }

    /// What connection `c` is ready for, as a socket's `poll(2)` mask would say (Linux's
    /// `vsock_poll`): the runtime shows it on the socket's readiness descriptor. An unknown or
    /// released `c` is hung up.
    pub fn readiness(&self, c: ConnId) -> Readiness {
        let Some(conn) = self.conns.get(&c) else {
            return Readiness {
                hangup: true,
                read_closed: true,
                ..Readiness::default()
            };
        };
        let connecting = conn.connecting();
        let closed = !conn.on_wire();
        let readable = !connecting
            && match conn.ty {
                SocketType::Stream => !conn.rx.is_empty(),
                SocketType::SeqPacket => conn.msgs().is_some_and(|m| !m.rx.is_empty()),
            };
        // For seqpacket, room for one byte does not promise room for a whole message; it is
        // what Linux's poll reports too (free space > 0).
        // A send that found no room or no storage waits for `Writable`: until it comes the
        // connection is not writable, even with room in its send buffer (the shared TX pool
        // may be exhausted), so that the event is an edge a poller sees.
        let writable = Self::check_sendable(conn).is_ok()
            && conn.tx_space(self.config.send_buffer) > 0
            && !conn.writable_wanted;
        let (local, peer) = (conn.local_shutdown(), conn.peer_shutdown());
        let both_shut = local.send && local.receive;
        Readiness {
            readable,
            read_closed: !connecting && (conn.rx_done() || closed),
            writable,
            hangup: closed || both_shut || (local.send && peer.send) || conn.closing(),
            error: conn.state().error().is_some(),
        }
    }

    /// Connection `c`'s receive buffer settings (`getsockopt(SO_VM_SOCKETS_BUFFER_*)`), or
    /// `None` if `c` is unknown or released.
    pub fn buffer(&self, c: ConnId) -> Option<BufferSize> {
        self.conns.get(&c).map(|conn| conn.buffer)
    }

    /// Change one of connection `c`'s receive buffer settings (`setsockopt`), with Linux's
    /// clamps ([`BufferSize`]); returns the settings now in force. Any state will do (a
    /// connection still connecting, or closed, keeps the value). On a live connection the
    /// new size is advertised at once when that changes the `buf_alloc` we advertise (a
    /// `CREDIT_UPDATE` goes out, as Linux's `virtio_transport_notify_buffer_size` sends one);
    /// a smaller size takes effect as the reader consumes what the peer was already granted,
    /// so the peer is never given less room than it was promised (see [`credit`]).
    pub fn set_buffer(
        &mut self,
        c: ConnId,
        opt: BufferOption,
        val: u64,
    ) -> Result<BufferSize, ProtoError> {
        let conn = self
            .conns
            .get_mut(&c)
            .ok_or(ProtoError::UnknownConnection)?;
        conn.buffer.set(opt, val);
        let buffer = conn.buffer;
        if conn.credit.set_buf_alloc(buffer.buf_alloc()) && conn.on_wire() {
            conn.pending.credit_update = true;
            self.schedule(c);
        }
        Ok(buffer)
    }

    /// Listener `l`'s receive buffer settings, which each connection it takes in starts
    /// with, or `None` if `l` is unknown.
    pub fn listener_buffer(&self, l: ListenerId) -> Option<BufferSize> {
        self.listeners.get(&l).map(|listener| listener.buffer)
    }

    /// Change one of listener `l`'s receive buffer settings (as [`Endpoint::set_buffer`]):
    /// connections it takes in from now on start with them (Linux's `__vsock_create` copies
    /// the listener's into each child); those already in its accept queue keep theirs.
    pub fn set_listener_buffer(
        &mut self,
        l: ListenerId,
        opt: BufferOption,
        val: u64,
    ) -> Result<BufferSize, ProtoError> {
        let listener = self
            .listeners
            .get_mut(&l)
            .ok_or(ProtoError::InvalidInput("unknown listener"))?;
        listener.buffer.set(opt, val);
        Ok(listener.buffer)
    }

    /// The peer's `(CID, port)`.
    pub fn peer_addr(&self, c: ConnId) -> Option<(u64, u32)> {
        self.conns
            .get(&c)
            .map(|conn| (conn.peer_cid, conn.peer_port))
    }

    /// Our port for this connection.
    pub fn local_port(&self, c: ConnId) -> Option<u32> {
        self.conns.get(&c).map(|conn| conn.local_port)
    }

    /// How many connections are not yet released (any state, closing ones included).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Every connection not yet released (any state), in no particular order.
    pub fn connections(&self) -> Vec<ConnId> {
        self.conns.keys().copied().collect()
    }

    /// Every listener.
    pub fn listener_ids(&self) -> Vec<ListenerId> {
        self.listeners.keys().copied().collect()
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    // ----- internals -----

    fn check_type(&self, ty: SocketType) -> Result<(), ProtoError> {
        if ty == SocketType::SeqPacket && !self.config.seqpacket {
            return Err(ProtoError::InvalidInput(
                "seqpacket sockets need VIRTIO_VSOCK_F_SEQPACKET (Config::seqpacket)",
            ));
        }
        if ty == SocketType::Stream && !self.config.stream {
            return Err(ProtoError::InvalidInput(
                "stream sockets need VIRTIO_VSOCK_F_STREAM: the device negotiated \
                 VIRTIO_VSOCK_F_NO_IMPLIED_STREAM without it (Config::stream)",
            ));
        }
        Ok(())
    }

    /// The receive buffer settings a new connection or listener starts with.
    fn default_buffer(&self) -> BufferSize {
        BufferSize::with_default_size(self.config.buf_alloc)
    }

    fn check_room(&self) -> Result<(), ProtoError> {
        if self.conns.len() >= self.config.max_connections {
            return Err(ProtoError::TooManyConnections {
                max: self.config.max_connections,
            });
        }
        Ok(())
    }

    fn check_sendable(conn: &Conn<S>) -> Result<(), ProtoError> {
        match conn.state() {
            State::Connecting { .. } => Err(ProtoError::NotConnected),
            State::Closed { error, .. } => Err(error.map_or(ProtoError::BrokenPipe, Into::into)),
            State::Closing { .. } => Err(ProtoError::BrokenPipe),
            State::Established { shut, .. } if shut.local.send || shut.peer.receive => {
                Err(ProtoError::BrokenPipe)
            }
            State::Established { .. } => Ok(()),
        }
    }

    /// The answer to a read on an empty buffer.
    fn rx_end(conn: &Conn<S>) -> Result<(), ProtoError> {
        if conn.rx_done() || conn.closing() {
            return Ok(());
        }
        if let State::Closed { error, .. } = conn.state() {
            return error.map_or(Ok(()), |e| Err(e.into()));
        }
        Err(ProtoError::WouldBlock)
    }

    /// The reader consumed `n` bytes: advance `fwd_cnt`, maybe owe a credit update.
    /// Drop what `conn` holds unread, bytes and SEQPACKET message boundaries alike (they must
    /// go together: a boundary left behind would make the next `recv_msg` hand out a message
    /// whose bytes are gone), crediting the peer as if read.
    fn drop_unread(conn: &mut Conn<S>) {
        let n = conn.rx.len();
        conn.rx.clear();
        if let Some(m) = conn.msgs_opt_mut() {
            m.rx.clear();
            m.rx_partial = 0;
        }
        Self::consumed(conn, n);
    }

    fn consumed(conn: &mut Conn<S>, n: usize) {
        // n never exceeds buffered bytes, which never exceed buf_alloc (a u32).
        conn.credit
            .on_consumed(u32::try_from(n).unwrap_or(u32::MAX));
        // rx_partial: the head of a SEQPACKET message still arriving (0 for streams).
        let unreadable = u32::try_from(conn.rx_partial()).unwrap_or(u32::MAX);
        if conn.on_wire() && conn.credit.need_credit_update(unreadable) {
            conn.pending.credit_update = true;
        }
    }
}
