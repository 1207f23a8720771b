//! Checks for tests and fuzzing: the endpoint's internal invariants, and the credit as we see it.

use super::conn::{Conn, State};
use super::storage::{RxBuf, Storage, TxBuf};
use super::{ConnId, Endpoint};
use crate::packet::SocketType;

impl<S: Storage> Endpoint<S> {
    /// Check internal invariants (for tests and fuzzing): per connection, bytes buffered for
    /// reading never exceed the receive window (`buf_alloc`, or more while a shrink drains)
    /// and match the credit counters; the send buffer never
    /// exceeds `send_buffer`; the tables agree with each other.
    pub fn check_invariants(&self) -> Result<(), String> {
        for conn in self.conns.values() {
            let id = conn.id;
            let buffered = conn.credit.rx_buffered() as usize;
            if buffered > conn.credit.window() as usize {
                return Err(format!(
                    "{id}: {buffered} bytes buffered > the receive window"
                ));
            }
            if conn.credit.buf_alloc != conn.buffer.buf_alloc() {
                return Err(format!("{id}: buf_alloc is not the buffer size set"));
            }
            if buffered != conn.rx.len() {
                return Err(format!(
                    "{id}: credit says {buffered} buffered, rx buffer holds {}",
                    conn.rx.len()
                ));
            }
            if conn.tx.len() > self.config.send_buffer {
                return Err(format!("{id}: send buffer over its limit"));
            }
            match (conn.ty, conn.msgs()) {
                (SocketType::SeqPacket, Some(m)) => {
                    let msgs: usize = m.rx.iter().map(|m| m.0).sum();
                    if msgs + m.rx_partial != conn.rx.len() {
                        return Err(format!("{id}: seqpacket rx bookkeeping"));
                    }
                    let pending: usize = m.tx.iter().map(|m| m.0).sum();
                    if pending != conn.tx.len() {
                        return Err(format!("{id}: seqpacket tx bookkeeping"));
                    }
                }
                (SocketType::SeqPacket, None) => {
                    if !conn.rx.is_empty() || !conn.tx.is_empty() {
                        return Err(format!("{id}: seqpacket bytes without messages"));
                    }
                }
                (SocketType::Stream, Some(_)) => {
                    return Err(format!("{id}: a stream with message boundaries"));
                }
                (SocketType::Stream, None) => {}
            }
            let key = (conn.local_port, conn.peer_cid, conn.peer_port);
            if conn.on_wire() != (self.keys.get(&key) == Some(&id)) {
                return Err(format!(
                    "{id}: key table disagrees with the state ({})",
                    conn.state().public()
                ));
            }
            if conn
                .state()
                .deadline()
                .is_some_and(|at| !self.timers.contains(at, id))
            {
                return Err(format!("{id}: deadline missing from the timer index"));
            }
            self.check_state(conn)?;
        }
        for (&l, listener) in &self.listeners {
            for id in &listener.queue {
                if self.conns.get(id).and_then(|c| c.listener) != Some(l) {
                    return Err(format!("{id}: in {l}'s accept queue, not waiting on it"));
                }
            }
        }
        if self.keys.len() > self.conns.len() {
            return Err("more keys than connections".into());
        }
        let mut prev_end: Option<u32> = None;
        for (&s, &e) in &self.free_ports {
            if s > e || prev_end.is_some_and(|p| p.checked_add(1).is_none_or(|n| n >= s)) {
                return Err(format!("free port runs overlap or touch at {s}..={e}"));
            }
            prev_end = Some(e);
        }
        let in_free = |p: u32| {
            self.free_ports
                .range(..=p)
                .next_back()
                .is_some_and(|(_, &e)| e >= p)
        };
        for &p in self.port_refs.keys().chain(self.listener_ports.keys()) {
            if in_free(p) {
                return Err(format!("port {p} is in use and free"));
            }
        }
        let armed = self
            .conns
            .values()
            .filter(|c| c.state().deadline().is_some())
            .count();
        if self.timers.len() != armed {
            return Err(format!(
                "timer index holds {} entries, {armed} connections have a deadline",
                self.timers.len()
            ));
        }
        Ok(())
    }

    /// What each state promises of the rest of the connection.
    fn check_state(&self, conn: &Conn<S>) -> Result<(), String> {
        let id = conn.id;
        match conn.state() {
            State::Connecting { .. } => {
                if conn.listener.is_some() || !conn.bound {
                    return Err(format!("{id}: connecting, and not made by connect"));
                }
                if !conn.rx.is_empty() || !conn.tx.is_empty() {
                    return Err(format!("{id}: connecting, with data queued"));
                }
            }
            State::Established { .. } => {}
            State::Closing { .. } => {
                if !conn.rx.is_empty() {
                    return Err(format!("{id}: closing, with unread data kept"));
                }
            }
            State::Closed { .. } => {
                if !conn.tx.is_empty() || conn.msgs().is_some_and(|m| !m.tx.is_empty()) {
                    return Err(format!("{id}: closed, with data queued to send"));
                }
                if conn.pending.credit_update || conn.pending.credit_reply {
                    return Err(format!("{id}: closed, and owes the peer a packet"));
                }
                if conn.wants_transmit() {
                    return Err(format!("{id}: closed, and wants to transmit"));
                }
            }
        }
        if let Some(l) = conn.listener {
            let queued = self
                .listeners
                .get(&l)
                .is_some_and(|listener| listener.queue.contains(&id));
            if !queued {
                return Err(format!("{id}: waits on {l}, missing from its accept queue"));
            }
        }
        Ok(())
    }

    /// The peer's credit as we see it, and bytes in flight (for tests and fuzzing).
    pub fn peer_credit(&self, c: ConnId) -> Option<(u32, u32)> {
        self.conns
            .get(&c)
            .map(|conn| (conn.credit.peer_credit(), conn.credit.in_flight()))
    }
}
