//! The outputs: the packets to send (`poll_transmit`), the next deadline (`poll_timeout`), and
//! the events for the user (`poll_event`, `poll_ready`).

use std::collections::VecDeque;
use std::time::Instant;

use super::storage::{HeapStorage, Storage, TxBuf};
use super::{ConnId, Endpoint, Event};
use crate::packet::{Header, Op};

/// A queue that emptied keeps at most this many entries' room: a burst (10,000 connections
/// established at once) gives back the rest, while the steady trickle of a busy endpoint
/// reuses its room without reallocating. Shrinking an empty queue costs one reallocation,
/// and it took more than this many entries to grow that big: O(1) per entry.
const QUEUE_KEEP: usize = 1024;

/// `q` is empty: give back what a burst grew it to beyond [`QUEUE_KEEP`].
fn shrink_drained<T>(q: &mut VecDeque<T>) {
    if q.is_empty() && q.capacity() > QUEUE_KEEP {
        q.shrink_to(QUEUE_KEEP);
    }
}

/// The events for the user and, when asked for ([`Endpoint::track_ready`]), the connections
/// they name, for a second consumer that only wants to know which connections to look at.
#[derive(Debug, Default)]
pub(super) struct Events {
    queue: VecDeque<Event>,
    /// `Some` once [`Endpoint::track_ready`] was called.
    ready: Option<VecDeque<ConnId>>,
}

impl Events {
    pub(super) fn push(&mut self, ev: Event) {
        if let Some(ready) = &mut self.ready {
            match ev {
                Event::Connected(c)
                | Event::ConnectFailed(c, _)
                | Event::Readable(c)
                | Event::Writable(c)
                | Event::PeerShutdown(c, _)
                | Event::Reset(c)
                | Event::Closed(c) => ready.push_back(c),
                Event::Incoming(_) => {}
            }
        }
        self.queue.push_back(ev);
    }
}

impl Endpoint<HeapStorage> {
    /// The next packet to send, with up to `payload.len()` bytes of RW data copied into
    /// `payload` (`header.len` is the count). Control packets have `len` 0. Call until `None`.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, payload: &mut [u8]) -> Option<Header> {
        self.poll_transmit_with(now, payload.len(), |h, tx| {
            if let Some(tx) = tx {
                tx.take_into(&mut payload[..h.len as usize]);
            }
            *h
        })
    }
}

impl<S: Storage> Endpoint<S> {
    /// The next packet to send, handed to `emit`, whose result is returned; `None` when there
    /// is nothing to send. An RW packet carries at most `room` bytes, and `emit` gets the
    /// connection's send queue (`Some`) when `header.len > 0`: it must move exactly the first
    /// `header.len` bytes out of it (onto the wire). Control packets have `len` 0. Call until
    /// `None`.
    pub fn poll_transmit_with<R>(
        &mut self,
        now: Instant,
        room: usize,
        emit: impl FnOnce(&Header, Option<&mut S::Tx>) -> R,
    ) -> Option<R> {
        let _ = now;
        if let Some(h) = self
            .control
            .pop_front()
            .or_else(|| self.unknown_rst.pop_front())
        {
            let h = self.count_out(h);
            return Some(emit(&h, None));
        }
        let mut budget = self.ready.len();
        while budget > 0 {
            budget -= 1;
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            let Some(h) = conn.next_packet(self.config.local_cid, self.config.max_payload, room)
            else {
                conn.queued = conn.wants_transmit();
                if conn.queued {
                    // Only blocked by an empty payload buffer: keep its turn.
                    self.ready.push_back(id);
                }
                continue;
            };
            let r = if h.len > 0 {
                let before = conn.tx.len();
                let r = emit(&h, Some(&mut conn.tx));
                let taken = before - conn.tx.len();
                if taken != h.len as usize {
                    // The owner broke the contract; the accounting would drift from the bytes.
                    log::error!(
                        "{id}: poll_transmit_with's emit moved {taken} bytes, expected {}",
                        h.len
                    );
                    debug_assert_eq!(taken, h.len as usize, "emit moved the wrong byte count");
                }
                r
            } else {
                emit(&h, None)
            };
            // After the payload left: a full buffer has room only now (checked before, a
            // buffer that one packet empties would never say Writable).
            if conn.writable_wanted
                && h.len > 0
                && conn.tx_space(self.config.send_buffer) > 0
                && conn.tx_open()
            {
                conn.writable_wanted = false;
                self.events.push(Event::Writable(id));
            }
            if conn.wants_transmit() {
                self.ready.push_back(id);
            } else {
                conn.queued = false;
            }
            self.count_out(h);
            return Some(r);
        }
        // Nothing (more) to send: the queues are drained.
        shrink_drained(&mut self.control);
        shrink_drained(&mut self.ready);
        None
    }

    /// Storage space came back (packets the device had completed) after an append found the
    /// storage exhausted: every connection waiting to write with room in its send buffer gets
    /// [`Event::Writable`]. One whose buffer is full waits for room, not storage: it keeps its
    /// claim, and `poll_transmit` says `Writable` when a packet frees room (taking the claim
    /// here would leave it with neither). O(number of connections); the owner calls it only
    /// when an append had failed.
    pub fn storage_freed(&mut self) {
        let send_buffer = self.config.send_buffer;
        for conn in self.conns.values_mut() {
            if conn.writable_wanted
                && conn.tx_space(send_buffer) > 0
                && Self::check_sendable(conn).is_ok()
            {
                conn.writable_wanted = false;
                self.events.push(Event::Writable(conn.id));
            }
        }
    }

    /// When `handle_timeout` should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// The next event for the user.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        let ev = self.events.queue.pop_front();
        if ev.is_none() {
            shrink_drained(&mut self.events.queue);
        }
        ev
    }

    /// From now on, also queue the connection of every event (all but [`Event::Incoming`]) for
    /// [`Endpoint::poll_ready`]: for an owner that serves many connections and wants to visit
    /// only those with something to do, while another consumer (the runtime's waiters) drains
    /// [`Endpoint::poll_event`]. Whoever calls it must drain `poll_ready`: the queue only grows.
    pub fn track_ready(&mut self) {
        self.events.ready.get_or_insert_with(VecDeque::new);
    }

    /// The next connection that had an event since it was last returned, in event order (one
    /// connection may come more than once; a released one comes with its [`Event::Closed`]).
    /// `None` when there is none, or [`Endpoint::track_ready`] was never called. Events are
    /// edge-triggered: a connection that a call found idle (`recv` saw `WouldBlock`, `send`
    /// took nothing) comes again only when that changes.
    #[must_use]
    pub fn poll_ready(&mut self) -> Option<ConnId> {
        let ready = self.events.ready.as_mut()?;
        let c = ready.pop_front();
        if c.is_none() {
            shrink_drained(ready);
        }
        c
    }

    pub(super) fn count_out(&mut self, h: Header) -> Header {
        self.stats.packets_out += 1;
        self.stats.bytes_out += u64::from(h.len);
        if h.op == Op::Rst as u16 {
            self.stats.rst_sent += 1;
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drained_queue_gives_back_what_a_burst_grew_it_to() {
        let mut q: VecDeque<u64> = (0..10_000).collect();
        shrink_drained(&mut q);
        assert!(
            q.capacity() >= 10_000,
            "a queue still in use keeps its room"
        );
        q.clear();
        shrink_drained(&mut q);
        assert!(
            (QUEUE_KEEP..2 * QUEUE_KEEP).contains(&q.capacity()),
            "{}",
            q.capacity()
        );
        // A small queue keeps its room: no reallocation per drain.
        let mut small: VecDeque<u64> = (0..100).collect();
        let cap = small.capacity();
        small.clear();
        shrink_drained(&mut small);
        assert_eq!(small.capacity(), cap);
    }
}
