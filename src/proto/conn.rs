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

/// Control packets a connection owes the peer.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Pending {
    pub(crate) request: bool,
    pub(crate) response: bool,
    pub(crate) credit_update: bool,
    /// The peer sent CREDIT_REQUEST: answer with an explicit CREDIT_UPDATE even if other
    /// packets carry our fwd_cnt first (Linux does; vhost-device-vsock 0.3.0 resumes reading
    /// its host socket only on an explicit CREDIT_UPDATE).
    pub(crate) credit_reply: bool,
}

/// A connection's full state (its payload lives in `S`'s queues).
pub(crate) struct Conn<S: Storage> {
    pub(crate) id: ConnId,
    pub(crate) ty: SocketType,
    pub(crate) local_port: u32,
    pub(crate) peer_cid: u64,
    pub(crate) peer_port: u32,
    pub(crate) state: ConnState,
    /// Created by `connect` (its local port is bound, as a Linux `connect` binds one).
    pub(crate) bound: bool,
    /// Waiting in this listener's accept queue (not yet visible to the user).
    pub(crate) listener: Option<ListenerId>,
    /// Registered in the endpoint's key table (still on the wire).
    pub(crate) in_table: bool,
    pub(crate) credit: Credit,
    /// The receive buffer settings (`SO_VM_SOCKETS_BUFFER_*`); `credit.buf_alloc` follows
    /// their size.
    pub(crate) buffer: BufferSize,
    /// Bytes written and not yet sent.
    pub(crate) tx: S::Tx,
    /// SEQPACKET: messages in `tx`, as (bytes not yet sent, EOR).
    pub(crate) tx_msgs: VecDeque<(usize, bool)>,
    /// Bytes received and not yet read.
    pub(crate) rx: S::Rx,
    /// SEQPACKET: complete messages in `rx`, as (length, EOR).
    pub(crate) rx_msgs: VecDeque<(usize, bool)>,
    /// SEQPACKET: bytes of the message being reassembled (after the complete ones).
    pub(crate) rx_partial: usize,
    /// What the user shut down (`shutdown`, `close`).
    pub(crate) local_shutdown: ShutdownFlags,
    /// The flag bits of the last `SHUTDOWN` we sent.
    pub(crate) shutdown_sent: u32,
    /// What the peer shut down (accumulated over its `SHUTDOWN` packets).
    pub(crate) peer_shutdown: ShutdownFlags,
    pub(crate) pending: Pending,
    /// Connect or close deadline.
    pub(crate) deadline: Option<Instant>,
    /// Why the connection ended, for `send`/`recv` after `Closed`.
    pub(crate) error: Option<ProtoError>,
    /// A `Readable` event went out and the user has not called `recv` since.
    pub(crate) readable_notified: bool,
    /// Payload is consumed as it arrives (see [`Endpoint::set_sink`](super::Endpoint::set_sink)).
    pub(crate) sink: bool,
    /// A `send` found the buffer full; emit `Writable` when space frees.
    pub(crate) writable_wanted: bool,
    /// In the endpoint's transmit round-robin queue.
    pub(crate) queued: bool,
    /// The peer's `REQUEST` came in through [`super::Endpoint::listen_any_port`] and is not
    /// answered yet: nothing goes on the wire until [`super::Endpoint::answer`].
    pub(crate) held: bool,
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
        state: ConnState,
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
            in_table: false,
            credit: Credit::new(buffer.buf_alloc()),
            buffer,
            tx: storage.new_tx(),
            tx_msgs: VecDeque::new(),
            rx: storage.new_rx(),
            rx_msgs: VecDeque::new(),
            rx_partial: 0,
            local_shutdown: ShutdownFlags::default(),
            shutdown_sent: 0,
            peer_shutdown: ShutdownFlags::default(),
            pending: Pending::default(),
            deadline: None,
            error: None,
            readable_notified: false,
            sink: false,
            writable_wanted: false,
            queued: false,
            held: false,
        }
    }

    /// Data may still go out (established, not shut down for sending by either side).
    pub(crate) fn tx_open(&self) -> bool {
        matches!(
            self.state,
            ConnState::Connected | ConnState::PeerClosed { .. } | ConnState::Closing
        ) && !self.peer_shutdown.receive
    }

    /// The peer will send nothing more that we will keep.
    pub(crate) fn rx_done(&self) -> bool {
        self.peer_shutdown.send || self.local_shutdown.receive
    }

    /// Recompute `PeerClosed` after the peer's flags changed.
    pub(crate) fn refresh_peer_state(&mut self) {
        if matches!(
            self.state,
            ConnState::Connected | ConnState::PeerClosed { .. }
        ) && (self.peer_shutdown.send || self.peer_shutdown.receive)
        {
            self.state = ConnState::PeerClosed {
                no_more_rx: self.peer_shutdown.send,
                no_more_tx: self.peer_shutdown.receive,
            };
        }
    }

    /// Bytes the user may still queue with `send`.
    pub(crate) fn tx_space(&self, send_buffer: usize) -> usize {
        send_buffer.saturating_sub(self.tx.len())
    }

    /// Can an RW packet go out now (given a non-empty payload buffer)?
    fn data_ready(&self) -> bool {
        if !self.tx_open() {
            return false;
        }
        match self.ty {
            SocketType::Stream => !self.tx.is_empty() && self.credit.peer_credit() > 0,
            SocketType::SeqPacket => match self.tx_msgs.front() {
                Some(&(0, _)) => true,
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
    fn shutdown_due(&self) -> Option<u32> {
        if !matches!(
            self.state,
            ConnState::Connected | ConnState::PeerClosed { .. } | ConnState::Closing
        ) {
            return None;
        }
        let mut want = self.local_shutdown;
        if !self.tx.is_empty() && self.tx_open() {
            want.send = false;
        }
        let bits = want.bits() | self.shutdown_sent;
        (bits != self.shutdown_sent).then_some(bits)
    }

    /// Does this connection have a packet to send?
    pub(crate) fn wants_transmit(&self) -> bool {
        if !self.in_table || self.held {
            return false;
        }
        self.pending.request
            || self.pending.response
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
        if !self.in_table || self.held {
            return None;
        }
        if self.pending.request {
            self.pending.request = false;
            return Some(self.header(local_cid, Op::Request, 0, 0));
        }
        if self.pending.response {
            self.pending.response = false;
            return Some(self.header(local_cid, Op::Response, 0, 0));
        }
        let empty_msg = matches!(self.tx_msgs.front(), Some(&(0, _)));
        if self.data_ready() && (room > 0 || empty_msg) {
            let room = u32::try_from(room.min(self.tx.contiguous())).unwrap_or(u32::MAX);
            let limit = self.credit.peer_credit().min(max_payload).min(room) as usize;
            let (n, flags) = match self.ty {
                SocketType::Stream => (self.tx.len().min(limit), 0),
                SocketType::SeqPacket => {
                    let front = self.tx_msgs.front_mut()?;
                    let n = front.0.min(limit);
                    front.0 -= n;
                    let flags = if front.0 == 0 {
                        let eor = front.1;
                        self.tx_msgs.pop_front();
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
            self.shutdown_sent = bits;
            return Some(self.header(local_cid, Op::Shutdown, 0, bits));
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
    use crate::proto::HeapStorage;
    use crate::runtime::RtStorage;

    /// Every connection is one entry of the endpoint's table, so its size is most of what an
    /// idle connection costs (tests/idle_memory.rs): a field that grows it shows here.
    /// Before the states carried their data: 304 (heap) and 368 (runtime) bytes.
    #[test]
    fn a_connection_stays_small() {
        let heap = std::mem::size_of::<Conn<HeapStorage>>();
        let runtime = std::mem::size_of::<Conn<RtStorage>>();
        assert!(heap <= 304, "Conn<HeapStorage> is {heap} bytes");
        assert!(runtime <= 368, "Conn<RtStorage> is {runtime} bytes");
    }
}
