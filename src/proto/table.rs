//! The connection table: a connection enters it, changes state (`set_state`, the one place),
//! leaves the wire (its key and port freed) or is released; and the round robin of connections
//! that may have packets to send.

use std::collections::HashMap;
use std::hash::Hash;

use super::conn::{self, CloseError, Conn, State};
use super::ports::{refcount_add, refcount_sub};
use super::storage::Storage;
use super::{ConnId, Endpoint, Event, Key};

/// Tables this small keep their capacity whatever they hold.
const SHRINK_ABOVE: usize = 64;

/// After an entry left `map`: a table grown for many entries (10,000 connections once) that
/// now holds under a quarter of its capacity gives the rest back, down to twice what it holds.
/// Each shrink rehashes what is left, which took at least as many removals to get there, so
/// the cost per removal stays O(1).
pub(crate) fn shrink_sparse<K: Eq + Hash, V>(map: &mut HashMap<K, V>) {
    let cap = map.capacity();
    if cap > SHRINK_ABOVE && map.len() < cap / 4 {
        map.shrink_to((map.len() * 2).max(SHRINK_ABOVE));
    }
}

impl<S: Storage> Endpoint<S> {
    pub(super) fn new_conn_id(&mut self) -> ConnId {
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        id
    }

    pub(super) fn insert_conn(&mut self, conn: Conn<S>) {
        let id = conn.id;
        debug_assert!(conn.on_wire(), "{id}: a new connection is on the wire");
        self.keys
            .insert((conn.local_port, conn.peer_cid, conn.peer_port), id);
        refcount_add(&mut self.port_refs, conn.local_port);
        if conn.bound {
            refcount_add(&mut self.bound_refs, conn.local_port);
        }
        self.sync_free_port(conn.local_port);
        self.timers.update(id, None, conn.state().deadline());
        self.conns.insert(id, conn);
    }

    /// Move connection `id` to state `next`: the one place a connection changes state (see
    /// [`State::may_become`]). The deadline index follows the state's deadline; a connection
    /// leaving the wire (`Closed`) frees its key and its port, and drops what it owed the peer
    /// and what it had queued to send.
    pub(super) fn set_state(&mut self, id: ConnId, next: State) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let old = conn.transition(next);
        self.timers
            .update(id, old.deadline(), conn.state().deadline());
        if old.on_wire() && !conn.on_wire() {
            conn.pending = conn::Pending::default();
            conn.clear_tx();
            let (key, bound) = ((conn.local_port, conn.peer_cid, conn.peer_port), conn.bound);
            self.leave_wire(key, bound);
        }
    }

    /// End connection `id`: `Closed`, with `error` if it ended in one (the `ConnId` stays until
    /// close/abort).
    pub(super) fn end(&mut self, id: ConnId, error: Option<CloseError>) {
        if let Some(conn) = self.conns.get(&id) {
            let next = conn.state().closed(error);
            self.set_state(id, next);
        }
    }

    /// A connection left the wire: free its key and its port.
    fn leave_wire(&mut self, key: Key, bound: bool) {
        let port = key.0;
        self.keys.remove(&key);
        shrink_sparse(&mut self.keys);
        refcount_sub(&mut self.port_refs, port);
        shrink_sparse(&mut self.port_refs);
        if bound {
            refcount_sub(&mut self.bound_refs, port);
            shrink_sparse(&mut self.bound_refs);
        }
        self.sync_free_port(port);
    }

    /// Queue an `RST` for a connection still on the wire (before it leaves it).
    pub(super) fn queue_rst(&mut self, id: ConnId) {
        let local_cid = self.config.local_cid;
        if let Some(conn) = self.conns.get_mut(&id).filter(|c| c.on_wire()) {
            let h = conn.rst_header(local_cid);
            self.control.push_back(h);
        }
    }

    /// Forget the connection (off the wire if it was on it); `notify` emits [`Event::Closed`].
    pub(super) fn release(&mut self, id: ConnId, notify: bool) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        shrink_sparse(&mut self.conns);
        log::trace!("{id}: {} -> released", conn.state().public());
        self.timers.update(id, conn.state().deadline(), None);
        if conn.on_wire() {
            let key = (conn.local_port, conn.peer_cid, conn.peer_port);
            self.leave_wire(key, conn.bound);
        }
        if let Some(l) = conn.listener {
            if let Some(listener) = self.listeners.get_mut(&l) {
                listener.queue.remove(&id);
            }
        }
        if notify && conn.listener.is_none() {
            self.events.push(Event::Closed(id));
        }
    }

    pub(super) fn schedule(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.get_mut(&id) {
            if !conn.queued && conn.wants_transmit() {
                conn.queued = true;
                self.ready.push_back(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_that_empties_gives_its_memory_back_in_steps() {
        let mut map: HashMap<u32, [u8; 64]> = HashMap::new();
        for i in 0..10_000 {
            map.insert(i, [0; 64]);
        }
        let grown = map.capacity();
        assert!(grown >= 10_000);
        for i in 0..10_000 {
            map.remove(&i);
            shrink_sparse(&mut map);
            // Never below twice what it holds, never left above four times it (beyond the
            // floor).
            let (len, cap) = (map.len(), map.capacity());
            assert!(cap >= len, "{len} in {cap}");
            assert!(cap <= (4 * len + 3).max(4 * SHRINK_ABOVE), "{len} in {cap}");
        }
        assert!(map.capacity() <= 2 * SHRINK_ABOVE, "{}", map.capacity());
        // A small table is left alone.
        let mut small: HashMap<u32, u32> = (0..10).map(|i| (i, i)).collect();
        let cap = small.capacity();
        small.clear();
        shrink_sparse(&mut small);
        assert_eq!(small.capacity(), cap);
    }
}
