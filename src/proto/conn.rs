//! One connection: its state, buffers, credit and the packets it owes the peer.

use std::collections::VecDeque;
use std::fmt;
use std::time::Instant;

use super::credit::{BufferSize, Credit};
use super::storage::{RxBuf, Storage, TxBuf};
use super::{ConnId, ListenerId, ProtoError};
use crate::packet::{Header, Op, SeqFlags, ShutdownFlags, SocketType};

/// The state of a connection, named after the protocol's phases (virtio 1.2 5.10.6.4 to 5.10.6.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// We sent (or queued) a `REQUEST` and wait for the `RESPONSE`.
    Connecting,
    /// Established; data flows both ways (subject to our own shutdown).
    Connected,
    /// The peer sent `SHUTDOWN` with some of its flags.
    PeerClosed {
        /// The peer will send no more data (`VIRTIO_VSOCK_SHUTDOWN_F_SEND`).
        no_more_rx: bool,
        /// The peer will receive no more data (`VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE`).
        no_more_tx: bool,
    },
    /// The user called `close`: we drain the send buffer, send `SHUTDOWN` with both flags and
    /// wait for the peer's `RST` (or `SHUTDOWN`) up to the close timeout.
    Closing,
    /// Nothing more goes on the wire for this connection (reset, refused, timed out, or shut
    /// down by both sides). The `ConnId` stays valid (buffered data can still be read) until
    /// the user calls `close` or `abort`.
    Closed,
}

impl fmt::Display for ConnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnState::Connecting => f.write_str("connecting (REQUEST sent)"),
            ConnState::Connected => f.write_str("connected"),
            ConnState::PeerClosed {
                no_more_rx,
                no_more_tx,
            } => write!(
                f,
                "peer closed (no more rx: {no_more_rx}, no more tx: {no_more_tx})"
            ),
            ConnState::Closing => f.write_str("closing (SHUTDOWN sent, lingering)"),
            ConnState::Closed => f.write_str("closed"),
        }
    }
}

/// Why a connection is [`State::Closed`]: the error `send` and `recv` answer with. Each is one
/// of [`ProtoError`]'s, kept in four bytes instead of its 24.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseError {
    /// [`ProtoError::ConnectionRefused`].
    Refused,
    /// [`ProtoError::ConnectionReset`].
    Reset,
    /// [`ProtoError::TimedOut`].
    TimedOut,
    /// [`ProtoError::Protocol`].
    Protocol {
        /// The op the peer answered our `REQUEST` with.
        op: u16,
    },
}

impl From<CloseError> for ProtoError {
    fn from(e: CloseError) -> Self {
        match e {
            CloseError::Refused => ProtoError::ConnectionRefused,
            CloseError::Reset => ProtoError::ConnectionReset,
            CloseError::TimedOut => ProtoError::TimedOut,
            CloseError::Protocol { op } => ProtoError::Protocol { op },
        }
    }
}

/// Where an accepted connection's `RESPONSE` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The peer's `REQUEST` came in through [`super::Endpoint::listen_any_port`]: nothing goes
    /// on the wire until [`super::Endpoint::answer`].
    Held,
    /// `RESPONSE` is owed: it goes out before anything else.
    Owed,
    /// `RESPONSE` went out, or we connected (the peer sent it).
    Done,
}

/// The `SHUTDOWN` flags of both sides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Shutdowns {
    /// What the user shut down (`shutdown`).
    pub(crate) local: ShutdownFlags,
    /// What the peer shut down (accumulated over its `SHUTDOWN` packets).
    pub(crate) peer: ShutdownFlags,
}

/// Both directions shut.
const BOTH: ShutdownFlags = ShutdownFlags {
    receive: true,
    send: true,
};

/// A connection's state, with what is meaningful in it and nowhere else (as smoltcp's
/// `tcp::State` and quinn-proto's `State`). The public [`ConnState`] is a view of it
/// ([`State::public`]). A connection changes state only through
/// [`Endpoint::set_state`](super::Endpoint::set_state), which keeps the tables (key, ports,
/// deadline index) in step; the methods of [`Conn`] change only the data of the state it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    /// We owe (`request_owed`) or sent `REQUEST` and wait for `RESPONSE` until `deadline`
    /// (`None`: a timeout beyond what an [`Instant`] can hold, that is never).
    Connecting {
        deadline: Option<Instant>,
        request_owed: bool,
    },
    /// Established: data flows both ways as far as `shut` lets it. `sent` is the flags of the
    /// last `SHUTDOWN` we sent. The public state is `PeerClosed` once the peer shut down
    /// anything.
    Established {
        answer: Answer,
        shut: Shutdowns,
        sent: ShutdownFlags,
    },
    /// The user called `close` (we shut down both ways): the send buffer drains, `SHUTDOWN`
    /// goes out and we linger for the peer's `RST` or `SHUTDOWN` until `deadline`. A
    /// `RESPONSE` owed when the user closed still goes first (`response_owed`).
    Closing {
        deadline: Option<Instant>,
        peer: ShutdownFlags,
        sent: ShutdownFlags,
        response_owed: bool,
    },
    /// Off the wire: nothing more goes out, no packet comes in (the key and the port are
    /// freed). `error` is why, if it ended in one; `shut` what both sides had shut down (a read
    /// after the end says EOF or the error by them). `held`: a `REQUEST` held unanswered
    /// ([`Answer::Held`]) that ended before the answer; [`super::Endpoint::answer`] still takes
    /// it.
    Closed {
        error: Option<CloseError>,
        shut: Shutdowns,
        held: bool,
    },
}

impl State {
    /// The public view.
    pub(crate) fn public(&self) -> ConnState {
        match self {
            State::Connecting { .. } => ConnState::Connecting,
            State::Established { shut, .. } if shut.peer == ShutdownFlags::default() => {
                ConnState::Connected
            }
            State::Established { shut, .. } => ConnState::PeerClosed {
                no_more_rx: shut.peer.send,
                no_more_tx: shut.peer.receive,
            },
            State::Closing { .. } => ConnState::Closing,
            State::Closed { .. } => ConnState::Closed,
        }
    }

    /// The deadline armed in this state (connect or close timeout).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self {
            State::Connecting { deadline, .. } | State::Closing { deadline, .. } => *deadline,
            State::Established { .. } | State::Closed { .. } => None,
        }
    }

    /// Still on the wire: registered in the endpoint's key table, its local port in use.
    pub(crate) fn on_wire(&self) -> bool {
        !matches!(self, State::Closed { .. })
    }

    /// Both sides' `SHUTDOWN` flags (none while connecting; ours are both once closing).
    pub(crate) fn shutdowns(&self) -> Shutdowns {
        match *self {
            State::Connecting { .. } => Shutdowns::default(),
            State::Established { shut, .. } | State::Closed { shut, .. } => shut,
            State::Closing { peer, .. } => Shutdowns { local: BOTH, peer },
        }
    }

    /// Why the connection ended, if it ended in an error.
    pub(crate) fn error(&self) -> Option<CloseError> {
        match self {
            State::Closed { error, .. } => *error,
            _ => None,
        }
    }

    /// A `REQUEST` held unanswered (see [`Answer::Held`]).
    pub(crate) fn held(&self) -> bool {
        matches!(
            self,
            State::Established {
                answer: Answer::Held,
                ..
            } | State::Closed { held: true, .. }
        )
    }

    /// `Closed` with `error`, keeping what this state knows that `Closed` still needs.
    pub(crate) fn closed(&self, error: Option<CloseError>) -> State {
        State::Closed {
            error,
            shut: self.shutdowns(),
            held: self.held(),
        }
    }

    /// The transitions there are: a connect ends one way or the other, an established
    /// connection is closed by the user or ends; `Closed` ends only in the release of the
    /// connection, and so does `Closing`, but for one that the user closed while it still
    /// waited to be accepted (its handle came from [`super::Endpoint::connections`]): the
    /// peer's `SHUTDOWN` both ways leaves it `Closed` in the accept queue, as any connection
    /// waiting there.
    pub(crate) fn may_become(&self, next: &State) -> bool {
        matches!(
            (self, next),
            (
                State::Connecting { .. },
                State::Established {
                    answer: Answer::Done,
                    ..
                } | State::Closed { .. }
            ) | (
                State::Established { .. },
                State::Closing { .. } | State::Closed { .. }
            ) | (State::Closing { .. }, State::Closed { .. })
        )
    }
}

/// Control packets a connection owes the peer whatever its state (the handshake's live in
/// [`State`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Pending {
    pub(crate) credit_update: bool,
    /// The peer sent CREDIT_REQUEST: answer with an explicit CREDIT_UPDATE even if other
    /// packets carry our fwd_cnt first (Linux does; vhost-device-vsock 0.3.0 resumes reading
    /// its host socket only on an explicit CREDIT_UPDATE).
    pub(crate) credit_reply: bool,
}

/// A SEQPACKET connection's message boundaries, in a box of their own that only a connection
/// that carried a message allocates: a stream (or an idle seqpacket connection) pays one
/// pointer for them.
#[derive(Debug, Default)]
pub(crate) struct Messages {
    /// Messages in `tx`, as (bytes not yet sent, EOR).
    pub(crate) tx: VecDeque<(usize, bool)>,
    /// Complete messages in `rx`, as (length, EOR).
    pub(crate) rx: VecDeque<(usize, bool)>,
    /// Bytes of the message being reassembled (after the complete ones).
    pub(crate) rx_partial: usize,
}

/// A connection's full state (its payload lives in `S`'s queues).
///
/// What is not in [`State`] holds in every state: the addresses, the credit, the buffers and
/// these flags, each orthogonal to the state:
/// - `bound`: how the connection was made (by `connect`), fixed for its life; it says which
///   port table to free when it leaves the wire, whatever state it leaves from;
/// - `listener`: who holds the handle, the listener's accept queue or the user. A connection
///   waits there through any state (the peer may shut it down before the accept; Linux's
///   child socket is a socket in any state too);
/// - `readable_notified`, `writable_wanted`: the edges of the `Readable` and `Writable` events,
///   armed and re-armed by the user's calls in any state;
/// - `sink`: how the user reads, in any state;
/// - `queued`: membership of the endpoint's transmit round robin, a scheduling fact.
pub(crate) struct Conn<S: Storage> {
    pub(crate) id: ConnId,
    pub(crate) ty: SocketType,
    pub(crate) local_port: u32,
    pub(crate) peer_cid: u64,
    pub(crate) peer_port: u32,
    /// Changed only through [`Conn::transition`] and the methods that update the data of the
    /// state it is in.
    state: State,
    /// Created by `connect` (its local port is bound, as a Linux `connect` binds one).
    pub(crate) bound: bool,
    /// Waiting in this listener's accept queue (not yet visible to the user).
    pub(crate) listener: Option<ListenerId>,
    pub(crate) credit: Credit,
    /// The receive buffer settings (`SO_VM_SOCKETS_BUFFER_*`); `credit.buf_alloc` follows
    /// their size.
    pub(crate) buffer: BufferSize,
    /// Bytes written and not yet sent.
    pub(crate) tx: S::Tx,
    /// Bytes received and not yet read.
    pub(crate) rx: S::Rx,
    /// SEQPACKET: the message boundaries, once there were any.
    msgs: Option<Box<Messages>>,
    pub(crate) pending: Pending,
    /// A `Readable` event went out and the user has not called `recv` since.
    pub(crate) readable_notified: bool,
    /// Payload is consumed as it arrives (see [`Endpoint::set_sink`](super::Endpoint::set_sink)).
    pub(crate) sink: bool,
    /// Its owner echoes what arrives: a packet may be answered at once with the same bytes
    /// (see [`Endpoint::set_echo`](super::Endpoint::set_echo)).
    pub(crate) echo: bool,
    /// A `send` found the buffer full; emit `Writable` when space frees.
    pub(crate) writable_wanted: bool,
    /// In the endpoint's transmit round-robin queue.
    pub(crate) queued: bool,
}

impl<S: Storage> fmt::Debug for Conn<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("ty", &self.ty)
            .field("local_port", &self.local_port)
            .field("peer", &(self.peer_cid, self.peer_port))
            .field("state", &self.state)
            .field("credit", &self.credit)
            .field("tx_len", &self.tx.len())
            .field("rx_len", &self.rx.len())
            .finish_non_exhaustive()
    }
}

impl<S: Storage> Conn<S> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        storage: &mut S,
        id: ConnId,
        ty: SocketType,
        local_port: u32,
        peer_cid: u64,
        peer_port: u32,
        state: State,
        buffer: BufferSize,
    ) -> Self {
        Conn {
            id,
            ty,
            local_port,
            peer_cid,
            peer_port,
            state,
            bound: false,
            listener: None,
            credit: Credit::new(buffer.buf_alloc()),
            buffer,
            tx: storage.new_tx(),
            rx: storage.new_rx(),
            msgs: None,
            pending: Pending::default(),
            readable_notified: false,
            sink: false,
            echo: false,
            writable_wanted: false,
            queued: false,
        }
    }

    /// The state.
    pub(crate) fn state(&self) -> &State {
        &self.state
    }

    /// Enter `next` and return the state left. Only
    /// [`Endpoint::set_state`](super::Endpoint::set_state) calls it (it keeps the endpoint's
    /// tables in step); a transition [`State::may_become`] does not allow is a bug.
    pub(super) fn transition(&mut self, next: State) -> State {
        debug_assert!(
            self.state.may_become(&next),
            "{}: no transition from {:?} to {next:?}",
            self.id,
            self.state
        );
        log::trace!("{}: {} -> {}", self.id, self.state.public(), next.public());
        std::mem::replace(&mut self.state, next)
    }

    /// Waiting for the `RESPONSE` to our `REQUEST`.
    pub(crate) fn connecting(&self) -> bool {
        matches!(self.state, State::Connecting { .. })
    }

    /// Closed by the user and lingering.
    pub(crate) fn closing(&self) -> bool {
        matches!(self.state, State::Closing { .. })
    }

    /// Still on the wire (see [`State::on_wire`]).
    pub(crate) fn on_wire(&self) -> bool {
        self.state.on_wire()
    }

    /// What the user shut down.
    pub(crate) fn local_shutdown(&self) -> ShutdownFlags {
        self.state.shutdowns().local
    }

    /// What the peer shut down.
    pub(crate) fn peer_shutdown(&self) -> ShutdownFlags {
        self.state.shutdowns().peer
    }

    /// The user shuts down `how` too (Connecting has nothing to shut down, Closing has shut
    /// down both ways already).
    pub(crate) fn shut_local(&mut self, how: ShutdownFlags) {
        if let State::Established { shut, .. } | State::Closed { shut, .. } = &mut self.state {
            shut.local.receive |= how.receive;
            shut.local.send |= how.send;
        }
    }

    /// The peer's `SHUTDOWN` with flags `f`, accumulated; returns all the peer has shut down.
    pub(crate) fn shut_peer(&mut self, f: ShutdownFlags) -> ShutdownFlags {
        match &mut self.state {
            State::Established {
                shut: Shutdowns { peer, .. },
                ..
            }
            | State::Closing { peer, .. } => {
                peer.receive |= f.receive;
                peer.send |= f.send;
                *peer
            }
            State::Connecting { .. } | State::Closed { .. } => self.peer_shutdown(),
        }
    }

    /// The owner's answer to a held `REQUEST` came (accepted): `RESPONSE` is owed, if it is
    /// still on the wire. Returns whether the connection was held.
    pub(crate) fn unhold(&mut self) -> bool {
        match &mut self.state {
            State::Established { answer, .. } if *answer == Answer::Held => {
                *answer = Answer::Owed;
                true
            }
            State::Closed { held, .. } if *held => {
                *held = false;
                true
            }
            _ => false,
        }
    }

    /// The message boundaries, if there ever were any.
    pub(crate) fn msgs(&self) -> Option<&Messages> {
        self.msgs.as_deref()
    }

    /// The message boundaries, if there ever were any, to change.
    pub(crate) fn msgs_opt_mut(&mut self) -> Option<&mut Messages> {
        self.msgs.as_deref_mut()
    }

    /// The message boundaries, allocated on first use.
    pub(crate) fn msgs_mut(&mut self) -> &mut Messages {
        self.msgs.get_or_insert_with(Box::default)
    }

    /// The SEQPACKET receive side's unread bytes that belong to no complete message yet.
    pub(crate) fn rx_partial(&self) -> usize {
        self.msgs().map_or(0, |m| m.rx_partial)
    }

    /// Drop the queued send bytes and their message boundaries (nobody will read them).
    pub(crate) fn clear_tx(&mut self) {
        self.tx.clear();
        if let Some(m) = &mut self.msgs {
            m.tx.clear();
        }
    }

    /// Data may still go out (established, not shut down for sending by either side).
    pub(crate) fn tx_open(&self) -> bool {
        matches!(
            self.state,
            State::Established { .. } | State::Closing { .. }
        ) && !self.peer_shutdown().receive
    }

    /// The peer will send nothing more that we will keep.
    pub(crate) fn rx_done(&self) -> bool {
        let shut = self.state.shutdowns();
        shut.peer.send || shut.local.receive
    }

    /// Bytes the user may still queue with `send`.
    pub(crate) fn tx_space(&self, send_buffer: usize) -> usize {
        send_buffer.saturating_sub(self.tx.len())
    }

    /// Whether `len` arriving bytes can be echoed straight back in one packet: an echo stream
    /// with nothing buffered either way (nothing of its own goes out ahead of the reply), open
    /// for data both ways, owing no handshake packet, and with the peer's credit, the send
    /// buffer and `max_payload` all covering `len`.
    pub(crate) fn can_echo(&self, len: usize, max_payload: u32, send_buffer: usize) -> bool {
        self.echo
            && self.ty == SocketType::Stream
            && self.listener.is_none()
            && self.on_wire()
            && !self.state.held()
            && self.rx.is_empty()
            && self.tx.is_empty()
            && self.tx_open()
            && !self.rx_done()
            && self.handshake_due().is_none()
            && len <= max_payload as usize
            && len <= self.credit.peer_credit() as usize
            && len <= self.tx_space(send_buffer)
    }

    /// The header of an echo's reply of `len` bytes (`can_echo` said yes, and the `len`
    /// bytes that arrived are consumed): sent as if written and transmitted at once.
    pub(crate) fn echo_header(&mut self, local_cid: u64, len: u32) -> Header {
        self.credit.on_tx(len);
        self.header(local_cid, Op::Rw, len, 0)
    }

    /// The front of the SEQPACKET send queue: (bytes not yet sent, EOR).
    fn tx_front(&self) -> Option<(usize, bool)> {
        self.msgs().and_then(|m| m.tx.front().copied())
    }

    /// Can an RW packet go out now (given a non-empty payload buffer)?
    fn data_ready(&self) -> bool {
        if !self.tx_open() {
            return false;
        }
        match self.ty {
            SocketType::Stream => !self.tx.is_empty() && self.credit.peer_credit() > 0,
            SocketType::SeqPacket => match self.tx_front() {
                Some((0, _)) => true,
                Some(_) => self.credit.peer_credit() > 0,
                None => false,
            },
        }
    }

    /// Data waits but the peer gave us no credit, and we have not asked yet.
    fn credit_request_due(&self) -> bool {
        self.tx_open()
            && !self.tx.is_empty()
            && self.credit.peer_credit() == 0
            && !self.credit.credit_request_sent
    }

    /// The `SHUTDOWN` flags to send now, if any: `RECEIVE` at once, `SEND` once the send
    /// buffer has drained (so it follows all data).
    fn shutdown_due(&self) -> Option<ShutdownFlags> {
        let sent = match self.state {
            State::Established { sent, .. } | State::Closing { sent, .. } => sent,
            State::Connecting { .. } | State::Closed { .. } => return None,
        };
        let mut want = self.local_shutdown();
        if !self.tx.is_empty() && self.tx_open() {
            want.send = false;
        }
        let bits = ShutdownFlags {
            receive: want.receive || sent.receive,
            send: want.send || sent.send,
        };
        (bits != sent).then_some(bits)
    }

    /// The handshake packet owed, if any: our `REQUEST` or our `RESPONSE`.
    fn handshake_due(&self) -> Option<Op> {
        match self.state {
            State::Connecting {
                request_owed: true, ..
            } => Some(Op::Request),
            State::Established {
                answer: Answer::Owed,
                ..
            }
            | State::Closing {
                response_owed: true,
                ..
            } => Some(Op::Response),
            _ => None,
        }
    }

    /// Does this connection have a packet to send?
    pub(crate) fn wants_transmit(&self) -> bool {
        if !self.on_wire() || self.state.held() {
            return false;
        }
        self.handshake_due().is_some()
            || self.pending.credit_update
            || self.pending.credit_reply
            || self.data_ready()
            || self.credit_request_due()
            || self.shutdown_due().is_some()
    }

    fn header(&mut self, local_cid: u64, op: Op, len: u32, flags: u32) -> Header {
        let (buf_alloc, fwd_cnt) = self.credit.on_header_sent();
        // Any packet carries our fwd_cnt: it satisfies a pending credit update.
        self.pending.credit_update = false;
        Header {
            src_cid: local_cid,
            dst_cid: self.peer_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: self.ty as u16,
            op: op as u16,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// The `RST` header for this connection (carries our credit like any packet).
    pub(crate) fn rst_header(&mut self, local_cid: u64) -> Header {
        self.header(local_cid, Op::Rst, 0, 0)
    }

    /// Produce the next packet; an RW packet's payload is the first `header.len` bytes of
    /// `self.tx` (at most `room`, never more than one contiguous piece), which the caller moves
    /// out. Order: handshake, data, credit request, shutdown, then a bare credit update.
    pub(crate) fn next_packet(
        &mut self,
        local_cid: u64,
        max_payload: u32,
        room: usize,
    ) -> Option<Header> {
        if !self.on_wire() || self.state.held() {
            return None;
        }
        if let Some(op) = self.handshake_due() {
            match &mut self.state {
                State::Connecting { request_owed, .. } => *request_owed = false,
                State::Established { answer, .. } => *answer = Answer::Done,
                State::Closing { response_owed, .. } => *response_owed = false,
                State::Closed { .. } => {}
            }
            return Some(self.header(local_cid, op, 0, 0));
        }
        let empty_msg = matches!(self.tx_front(), Some((0, _)));
        if self.data_ready() && (room > 0 || empty_msg) {
            let room = u32::try_from(room.min(self.tx.contiguous())).unwrap_or(u32::MAX);
            let limit = self.credit.peer_credit().min(max_payload).min(room) as usize;
            let (n, flags) = match self.ty {
                SocketType::Stream => (self.tx.len().min(limit), 0),
                SocketType::SeqPacket => {
                    let msgs = self.msgs_mut();
                    let front = msgs.tx.front_mut()?;
                    let n = front.0.min(limit);
                    front.0 -= n;
                    let flags = if front.0 == 0 {
                        let eor = front.1;
                        msgs.tx.pop_front();
                        SeqFlags { eom: true, eor }.bits()
                    } else {
                        0
                    };
                    (n, flags)
                }
            };
            // n <= limit, which came from a u32.
            let n32 = u32::try_from(n).unwrap_or(u32::MAX);
            self.credit.on_tx(n32);
            return Some(self.header(local_cid, Op::Rw, n32, flags));
        }
        if self.credit_request_due() {
            self.credit.credit_request_sent = true;
            return Some(self.header(local_cid, Op::CreditRequest, 0, 0));
        }
        if let Some(bits) = self.shutdown_due() {
            if let State::Established { sent, .. } | State::Closing { sent, .. } = &mut self.state {
                *sent = bits;
            }
            return Some(self.header(local_cid, Op::Shutdown, 0, bits.bits()));
        }
        if self.pending.credit_update || self.pending.credit_reply {
            self.pending.credit_reply = false;
            return Some(self.header(local_cid, Op::CreditUpdate, 0, 0));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::Conn;
    use crate::proto::{HeapStorage, Storage};
    use crate::runtime::RtStorage;

    /// Every connection is one entry of the endpoint's table, so its size is most of what an
    /// idle connection costs (tests/idle_memory.rs): a field that grows it shows here. With
    /// the flags the states replaced and the SEQPACKET queues inline: 304 (heap) and 368
    /// (runtime) bytes; the engine's own share (all but the two payload queues) 240.
    #[test]
    fn a_connection_stays_small() {
        use std::mem::size_of;
        let heap = size_of::<Conn<HeapStorage>>();
        let runtime = size_of::<Conn<RtStorage>>();
        let queues =
            size_of::<<RtStorage as Storage>::Tx>() + size_of::<<RtStorage as Storage>::Rx>();
        assert!(heap <= 208, "Conn<HeapStorage> is {heap} bytes");
        assert!(runtime <= 272, "Conn<RtStorage> is {runtime} bytes");
        assert!(
            runtime - queues <= 144,
            "Conn<RtStorage> is {runtime} bytes, {} without its payload queues",
            runtime - queues
        );
    }
}
