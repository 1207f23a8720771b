//! The connection table: a connection enters it, leaves the wire (its key and port freed),
//! fails or is released; and the round robin of connections that may have packets to send.

use super::conn::{self, Conn};
use super::ports::{refcount_add, refcount_sub};
use super::storage::{Storage, TxBuf};
use super::{ConnId, ConnState, Endpoint, Event, ProtoError};

impl<S: Storage> Endpoint<S> {
    pub(super) fn new_conn_id(&mut self) -> ConnId {
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        id
    }

    pub(super) fn insert_conn(&mut self, mut conn: Conn<S>) {
        let id = conn.id;
        conn.in_table = true;
        self.keys
            .insert((conn.local_port, conn.peer_cid, conn.peer_port), id);
        refcount_add(&mut self.port_refs, conn.local_port);
        if conn.bound {
            refcount_add(&mut self.bound_refs, conn.local_port);
        }
        self.sync_free_port(conn.local_port);
        self.conns.insert(id, conn);
    }

    /// Take the connection off the wire: free its key and port.
    pub(super) fn unlink(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if !conn.in_table {
            return;
        }
        conn.in_table = false;
        self.timers.set(conn, None);
        conn.pending = conn::Pending::default();
        let (port, bound) = (conn.local_port, conn.bound);
        self.keys.remove(&(port, conn.peer_cid, conn.peer_port));
        refcount_sub(&mut self.port_refs, port);
        if bound {
            refcount_sub(&mut self.bound_refs, port);
        }
        self.sync_free_port(port);
    }

    /// Queue an `RST` for a connection still on the wire, then unlink it.
    pub(super) fn send_rst_and_unlink(&mut self, id: ConnId) {
        let local_cid = self.config.local_cid;
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.in_table {
            let h = conn.rst_header(local_cid);
            self.control.push_back(h);
        }
        self.unlink(id);
    }

    /// Mark the connection `Closed` with an error (the `ConnId` stays until close/abort).
    pub(super) fn fail(&mut self, id: ConnId, err: ProtoError) {
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.state = ConnState::Closed;
            conn.error = Some(err);
            conn.tx.clear();
            conn.tx_msgs.clear();
        }
    }

    /// Forget the connection; `notify` emits [`Event::Closed`].
    pub(super) fn release(&mut self, id: ConnId, notify: bool) {
        self.unlink(id);
        if let Some(mut conn) = self.conns.remove(&id) {
            self.timers.set(&mut conn, None);
            if let Some(l) = conn.listener {
                if let Some(listener) = self.listeners.get_mut(&l) {
                    listener.queue.remove(&id);
                }
            }
            if notify && conn.listener.is_none() {
                self.events.push(Event::Closed(id));
            }
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
