//! The network side: a received packet (`handle_packet`), an expired deadline
//! (`handle_timeout`), a transport reset (`handle_transport_reset`), and what each does to the
//! connection it names.

use std::time::Instant;

use super::conn::{Answer, CloseError, Shutdowns, State};
use super::credit::CreditViolation;
use super::storage::{HeapStorage, RxBuf, Storage};
use super::{ConnId, Endpoint, Event, ProtoError, MAX_PENDING_UNKNOWN_RST};
use crate::packet::{Header, Op, SeqFlags, ShutdownFlags, SocketType};

fn op_name(h: &Header) -> String {
    match Op::try_from(h.op) {
        Ok(op) => op.to_string(),
        Err(_) => format!("op {}", h.op),
    }
}

impl Endpoint<HeapStorage> {
    /// Process one received packet whose payload (`hdr.len` bytes) is `payload`.
    pub fn handle_packet(&mut self, now: Instant, hdr: &Header, payload: &[u8]) {
        self.handle_packet_with(now, hdr, payload.len(), |rx| rx.push(payload));
    }
}

impl<S: Storage> Endpoint<S> {
    /// Process one received packet whose payload is `payload_len` bytes. When the payload is
    /// to be kept for the reader, `keep` is called once with the connection's receive queue and
    /// must append exactly `payload_len` bytes to it; otherwise (the packet is dropped, or the
    /// data discarded because nobody will read it) `keep` is not called.
    pub fn handle_packet_with(
        &mut self,
        now: Instant,
        hdr: &Header,
        payload_len: usize,
        keep: impl FnOnce(&mut S::Rx),
    ) {
        let _ = self.handle_packet_or_echo_with(now, hdr, payload_len, keep, 0, |_| ());
    }

    /// [`Endpoint::handle_packet_with`] for an echo ([`Endpoint::set_echo`]) that has a reply
    /// buffer of `echo_room` payload bytes at hand: when the packet's whole payload can go
    /// straight back (see [`Endpoint::echo_ready`]; checked here with its credit fields
    /// applied), it is accounted as received, read, written and sent, `keep` is not called,
    /// and `echo` gets the reply's header and returns what this returns: the caller copies
    /// the `hdr.len` bytes from the request's buffer into the reply's, once, and sends it
    /// before anything [`Endpoint::poll_transmit_with`] gives next. Otherwise this is
    /// `handle_packet_with` and returns `None`.
    pub fn handle_packet_or_echo_with<R>(
        &mut self,
        now: Instant,
        hdr: &Header,
        payload_len: usize,
        keep: impl FnOnce(&mut S::Rx),
        echo_room: usize,
        echo: impl FnOnce(&Header) -> R,
    ) -> Option<R> {
        let _ = now;
        self.stats.packets_in += 1;
        // What Linux 6.12 does (`virtio_transport_recv_pkt`), and where we differ:
        // - an unknown `type` is answered with `RST` (`virtio_transport_reset_no_sock`) before
        //   any socket is looked up;
        // - a packet no socket takes (unknown connection, a type that is not the socket's, an
        //   op a listener does not take) is answered with `RST`;
        // - `RST` is never answered with `RST`.
        // Linux's guest transport has no `dst_cid` filter: it finds a connected socket by the
        // peer address and the local *port* only, a listener bound to `VMADDR_CID_ANY` takes any
        // `dst_cid`, and only a packet no socket takes gets `RST`. We never deliver a packet
        // that is not addressed to our CID (the device config's `guest_cid` is the one truth)
        // and answer it as Linux answers a packet no socket takes.
        if hdr.dst_cid != self.config.local_cid {
            self.stats.dropped_wrong_cid += 1;
            self.queue_unknown_rst(hdr);
            return None;
        }
        let Ok(ty) = SocketType::try_from(hdr.type_) else {
            self.stats.dropped_invalid += 1;
            self.queue_unknown_rst(hdr);
            return None;
        };
        if payload_len != hdr.len as usize || (hdr.op != Op::Rw as u16 && hdr.len != 0) {
            // A header that disagrees with its own buffer: malformed, not addressed to anyone.
            self.stats.dropped_invalid += 1;
            return None;
        }
        if (ty == SocketType::SeqPacket && !self.config.seqpacket)
            || (ty == SocketType::Stream && !self.config.stream)
        {
            // No socket of this type can exist, so none takes it.
            self.stats.dropped_invalid += 1;
            self.queue_unknown_rst(hdr);
            return None;
        }
        let key = (hdr.dst_port, hdr.src_cid, hdr.src_port);
        let id = self.keys.get(&key).copied();
        let Ok(op) = Op::try_from(hdr.op) else {
            self.stats.dropped_invalid += 1;
            match id {
                // Linux: no socket, or a listener, answers a packet it cannot take with RST;
                // an established connection ignores an unknown op (and INVALID, 0, is
                // ignored everywhere but at a listener).
                None => self.queue_unknown_rst(hdr),
                Some(id) if hdr.op != 0 => self.connecting_got(id, hdr.op),
                Some(_) => {}
            }
            return None;
        };
        let Some(id) = id else {
            self.handle_unknown(hdr, op, ty);
            return None;
        };
        let conn = self.conns.get_mut(&id)?;
        if conn.ty != ty {
            // Linux answers with `RST` (`virtio_transport_reset_no_sock`) and leaves the
            // socket alone.
            self.stats.dropped_invalid += 1;
            self.queue_unknown_rst(hdr);
            return None;
        }
        if op == Op::Rst {
            self.on_peer_rst(id);
            return None;
        }
        conn.credit.update_peer(hdr.buf_alloc, hdr.fwd_cnt);
        match (conn.connecting(), op) {
            (true, Op::Response) => {
                conn.credit.on_handshake(hdr.buf_alloc, hdr.fwd_cnt);
                let established = State::Established {
                    answer: Answer::Done,
                    shut: Shutdowns::default(),
                    sent: ShutdownFlags::default(),
                };
                self.set_state(id, established);
                self.events.push(Event::Connected(id));
            }
            (true, _) => {
                self.stats.dropped_invalid += 1;
                self.connecting_got(id, hdr.op);
            }
            (_, Op::Rw) => {
                let echoed = self.on_rw(id, hdr, keep, echo_room, echo);
                self.schedule(id);
                return echoed;
            }
            (_, Op::Shutdown) => self.on_peer_shutdown(id, hdr.flags),
            (_, Op::CreditUpdate) => self.stats.credit_updates_in += 1,
            (_, Op::CreditRequest) => {
                self.stats.credit_requests_in += 1;
                conn.pending.credit_update = true;
                conn.pending.credit_reply = true;
            }
            (_, Op::Request | Op::Response) => self.stats.dropped_invalid += 1,
            (_, Op::Rst) => unreachable!("handled above"),
        }
        self.schedule(id);
        None
    }

    /// Fire expired timers (connect and close deadlines). Calling it again is harmless.
    /// Only the expired timers are touched, earliest first (ties in `ConnId` order).
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(id) = self.timers.first_expired(now) {
            match self.conns.get(&id).map(|conn| conn.state()) {
                Some(State::Connecting { .. }) => {
                    self.stats.connect_timeouts += 1;
                    self.queue_rst(id);
                    self.end(id, Some(CloseError::TimedOut));
                    self.events
                        .push(Event::ConnectFailed(id, ProtoError::TimedOut));
                }
                Some(State::Closing { .. }) => {
                    self.stats.close_timeouts += 1;
                    self.queue_rst(id);
                    self.release(id, true);
                }
                _ => {
                    // Unreachable: only those states hold a deadline, and the index follows
                    // the states (a released connection's left with it).
                    debug_assert!(false, "{id}: a timer without a deadline");
                    self.timers.discard_first();
                }
            }
        }
    }

    /// The transport was reset (event queue `TRANSPORT_RESET`) or our CID changed: every
    /// connection is reset without sending anything; listeners stay.
    pub fn handle_transport_reset(&mut self, now: Instant, new_cid: Option<u64>) {
        let _ = now;
        if let Some(cid) = new_cid {
            self.config.local_cid = cid;
        }
        self.control.clear();
        self.unknown_rst.clear();
        let mut ids: Vec<ConnId> = self.conns.keys().copied().collect();
        ids.sort();
        for id in ids {
            let Some(conn) = self.conns.get(&id) else {
                continue;
            };
            if !conn.on_wire() {
                continue;
            }
            match (conn.state(), conn.listener) {
                (_, Some(_)) => self.release(id, false),
                (State::Closing { .. }, _) => self.release(id, true),
                (State::Connecting { .. }, _) => {
                    self.end(id, Some(CloseError::Reset));
                    self.events
                        .push(Event::ConnectFailed(id, ProtoError::ConnectionReset));
                }
                _ => {
                    self.end(id, Some(CloseError::Reset));
                    self.events.push(Event::Reset(id));
                }
            }
        }
    }

    /// A connecting `id` got `op`, neither RESPONSE nor RST: if it is still connecting, reset
    /// it and fail the connect with a protocol error (Linux's `virtio_transport_recv_connecting`:
    /// RST, `EPROTO`).
    fn connecting_got(&mut self, id: ConnId, op: u16) {
        if !self.conns.get(&id).is_some_and(|conn| conn.connecting()) {
            return;
        }
        self.queue_rst(id);
        let e = CloseError::Protocol { op };
        self.end(id, Some(e));
        self.events.push(Event::ConnectFailed(id, e.into()));
    }

    /// A packet for no connection: `REQUEST` to a listener, or `RST` (never for an `RST`).
    fn handle_unknown(&mut self, hdr: &Header, op: Op, ty: SocketType) {
        if op == Op::Request {
            let any = self
                .any_listener
                .filter(|_| !self.bound_refs.contains_key(&hdr.dst_port));
            if let Some(l) = self.listener_ports.get(&hdr.dst_port).copied().or(any) {
                let listener = &self.listeners[&l];
                if listener.ty != ty {
                    log::debug!("{} for {} listener: refused", ty, listener.ty);
                } else if listener.queue.len() >= listener.backlog {
                    self.stats.backlog_full += 1;
                } else if self.check_room().is_err() {
                    self.stats.table_full += 1;
                } else {
                    self.accept_request(l, hdr, ty);
                    return;
                }
            }
        } else {
            log::trace!("{} for unknown connection {}", op_name(hdr), hdr);
        }
        self.queue_unknown_rst(hdr);
    }

    /// Answer `hdr`, which no connection takes, with `RST` as Linux's
    /// `virtio_transport_reset_no_sock` does: ports swapped, `type` copied, never for an `RST`.
    /// The source is our CID, not the packet's `dst_cid` as in Linux: a device drops a packet
    /// whose `src_cid` is not the guest's (vhost-vsock and the sim do), so an `RST` from another
    /// CID would never reach the peer.
    fn queue_unknown_rst(&mut self, hdr: &Header) {
        if hdr.op == Op::Rst as u16 {
            return;
        }
        if self.unknown_rst.len() >= MAX_PENDING_UNKNOWN_RST {
            self.stats.rst_dropped += 1;
            return;
        }
        self.stats.rst_unknown += 1;
        self.unknown_rst.push_back(Header {
            src_cid: self.config.local_cid,
            dst_cid: hdr.src_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: hdr.type_,
            op: Op::Rst as u16,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    fn on_peer_rst(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get(&id) else {
            return;
        };
        // The peer finished sending before it reset: reads end with EOF, not the error.
        let graceful = conn.peer_shutdown().send;
        match (conn.state(), conn.listener) {
            (_, Some(_)) => self.release(id, false),
            (State::Closing { .. }, _) => self.release(id, true),
            (State::Connecting { .. }, _) => {
                self.end(id, Some(CloseError::Refused));
                self.events
                    .push(Event::ConnectFailed(id, ProtoError::ConnectionRefused));
            }
            _ => {
                self.end(id, (!graceful).then_some(CloseError::Reset));
                self.events.push(Event::Reset(id));
            }
        }
    }

    fn on_rw<R>(
        &mut self,
        id: ConnId,
        hdr: &Header,
        keep: impl FnOnce(&mut S::Rx),
        echo_room: usize,
        echo: impl FnOnce(&Header) -> R,
    ) -> Option<R> {
        let conn = self.conns.get_mut(&id)?;
        if let Err(CreditViolation { len, free }) = conn.credit.on_rx(hdr.len) {
            log::warn!("{id}: peer sent {len} bytes with only {free} bytes of credit: resetting");
            self.stats.credit_violations += 1;
            self.reset_conn(id);
            return None;
        }
        self.stats.bytes_in += u64::from(hdr.len);
        let discard = conn.rx_done() || conn.closing();
        if discard {
            // Nobody will read it: consume at once so credit keeps flowing.
            self.stats.rx_discarded += u64::from(hdr.len);
            Self::consumed(conn, hdr.len as usize);
            return None;
        }
        let len = hdr.len as usize;
        if conn.sink {
            // Consumed on arrival: no copy, no queue, credit flows on.
            self.stats.bytes_sunk += u64::from(hdr.len);
            Self::consumed(conn, len);
            return None;
        }
        if len > 0
            && len <= echo_room
            && conn.can_echo(len, self.config.max_payload, self.config.send_buffer)
        {
            // Received, read and written at once: the reply carries the credit it freed.
            Self::consumed(conn, len);
            let reply = conn.echo_header(self.config.local_cid, hdr.len);
            self.stats.bytes_echoed += u64::from(hdr.len);
            let reply = self.count_out(reply);
            return Some(echo(&reply));
        }
        if len > 0 {
            let before = conn.rx.len();
            keep(&mut conn.rx);
            let kept = conn.rx.len() - before;
            if kept != len {
                log::error!("{id}: handle_packet_with's keep added {kept} bytes, expected {len}");
                debug_assert_eq!(kept, len, "keep added the wrong byte count");
            }
        }
        let mut readable = len > 0;
        if conn.ty == SocketType::SeqPacket {
            let msgs = conn.msgs_mut();
            msgs.rx_partial += len;
            let flags = SeqFlags::from_bits(hdr.flags);
            readable = flags.eom;
            if flags.eom {
                msgs.rx.push_back((msgs.rx_partial, flags.eor));
                msgs.rx_partial = 0;
            }
        }
        if readable && !conn.readable_notified && conn.listener.is_none() {
            conn.readable_notified = true;
            self.events.push(Event::Readable(id));
        }
        None
    }

    /// Reset a connection on our initiative (a protocol violation, [`Endpoint::reset`]).
    pub(super) fn reset_conn(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get(&id) else {
            return;
        };
        let (closing, listener) = (conn.closing(), conn.listener);
        self.queue_rst(id);
        match (closing, listener) {
            (_, Some(_)) => self.release(id, false),
            (true, _) => self.release(id, true),
            _ => {
                self.end(id, Some(CloseError::Reset));
                self.events.push(Event::Reset(id));
            }
        }
    }

    fn on_peer_shutdown(&mut self, id: ConnId, flags: u32) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let f = ShutdownFlags::from_bits(flags);
        let all = conn.shut_peer(f);
        if all.receive {
            // The peer will not read: drop what we had queued.
            conn.clear_tx();
        }
        let (closing, listener) = (conn.closing(), conn.listener);
        // Linux's `virtio_transport_recv_connected`: with data still unread the RST waits for
        // our close (the peer, lingering, learns that we hold everything only then). The same
        // for a connection still waiting to be accepted (Linux's child socket takes the packet
        // as any connected socket does).
        let unread = conn.rx.len() > 0 && !closing;
        if all.receive && all.send && !unread {
            // Both directions closed by the peer: answer RST and forget (as Linux does).
            self.queue_rst(id);
            match (closing, listener) {
                // Not accepted yet: the user can still accept it and read until EOF.
                (_, Some(_)) => self.end(id, None),
                (true, _) => {
                    self.release(id, true);
                    return;
                }
                _ => self.end(id, None),
            }
        }
        if listener.is_none() && !closing && (f.receive || f.send) {
            self.events.push(Event::PeerShutdown(id, all));
        }
    }
}
