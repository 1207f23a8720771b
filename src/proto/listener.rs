//! Listeners and their accept queues: `listen`, `unlisten`, `accept`, and the `REQUEST` a
//! listener takes in.

use std::collections::BTreeSet;
use std::time::Instant;

use super::conn::{Answer, Conn, Shutdowns, State};
use super::credit::BufferSize;
use super::storage::Storage;
use super::{ConnId, Endpoint, Event, ListenerId, ProtoError};
use crate::packet::{Header, ShutdownFlags, SocketType, VMADDR_PORT_ANY};

/// A listening port.
#[derive(Debug)]
pub(super) struct Listener {
    port: u32,
    pub(super) ty: SocketType,
    pub(super) backlog: usize,
    /// The receive buffer settings each connection it takes in starts with.
    pub(super) buffer: BufferSize,
    /// Hold each `REQUEST` unanswered until [`Endpoint::answer`] (the any-port listener).
    hold: bool,
    /// Established connections not yet accepted, oldest first (`ConnId`s only grow, so their
    /// order is the order of arrival); a set, so that one leaving early costs O(log n).
    pub(super) queue: BTreeSet<ConnId>,
}

impl<S: Storage> Endpoint<S> {
    /// What `listen` and `listen_any_port` both refuse: a socket type not negotiated, and a
    /// backlog of 0.
    fn check_listen(&self, backlog: usize, ty: SocketType) -> Result<(), ProtoError> {
        self.check_type(ty)?;
        if backlog == 0 {
            return Err(ProtoError::InvalidInput(
                "listen backlog must be at least 1",
            ));
        }
        Ok(())
    }

    /// Listen on `port` for connections of type `ty`; at most `backlog` (≥ 1) established
    /// connections wait for `accept`, further `REQUEST`s get `RST`.
    ///
    /// On [`VMADDR_PORT_ANY`] a free port is picked, as Linux's `__vsock_bind` does: one no
    /// connection or listener uses, from the ephemeral range (Linux walks the ports above
    /// 1023 from a random start; we walk [`Config::ephemeral_ports`](super::Config) with the
    /// cursor `connect` uses). [`Endpoint::listener_port`] tells which.
    pub fn listen(
        &mut self,
        port: u32,
        backlog: usize,
        ty: SocketType,
    ) -> Result<ListenerId, ProtoError> {
        self.check_listen(backlog, ty)?;
        let port = if port == VMADDR_PORT_ANY {
            self.alloc_ephemeral()?
        } else {
            port
        };
        if self.listener_ports.contains_key(&port) || self.bound_refs.contains_key(&port) {
            return Err(ProtoError::AddrInUse { port });
        }
        let id = ListenerId(self.next_listener);
        self.next_listener += 1;
        self.listeners.insert(
            id,
            Listener {
                port,
                ty,
                backlog,
                buffer: self.default_buffer(),
                hold: false,
                queue: BTreeSet::new(),
            },
        );
        self.listener_ports.insert(port, id);
        self.sync_free_port(port);
        Ok(id)
    }

    /// Listen on every port that has no listener of its own and no connection made by
    /// `connect` (Firecracker's muxer takes a guest connection to any port): at most one such
    /// listener at a time. Unlike [`Endpoint::listen`], a `REQUEST` it takes is *held*: the
    /// connection waits in the accept queue and, once accepted, stays unanswered (nothing goes
    /// on the wire) until [`Endpoint::answer`] sends `RESPONSE` or `RST`, so that the owner
    /// can first find out whether it can serve the port. [`Endpoint::local_port`] tells which
    /// port was asked for; [`Endpoint::listener_port`] answers `VMADDR_PORT_ANY`.
    pub fn listen_any_port(
        &mut self,
        backlog: usize,
        ty: SocketType,
    ) -> Result<ListenerId, ProtoError> {
        self.check_listen(backlog, ty)?;
        if self.any_listener.is_some() {
            return Err(ProtoError::InvalidInput(
                "there is already a listener on every port (listen_any_port)",
            ));
        }
        let id = ListenerId(self.next_listener);
        self.next_listener += 1;
        self.listeners.insert(
            id,
            Listener {
                port: VMADDR_PORT_ANY,
                ty,
                backlog,
                buffer: self.default_buffer(),
                hold: true,
                queue: BTreeSet::new(),
            },
        );
        self.any_listener = Some(id);
        Ok(id)
    }

    /// Answer a `REQUEST` held by the any-port listener ([`Endpoint::listen_any_port`]):
    /// `accept` queues `RESPONSE` (and whatever was written meanwhile), otherwise `RST` goes out
    /// and the connection is released ([`Event::Closed`]), as if the port had no listener.
    pub fn answer(&mut self, now: Instant, c: ConnId, accept: bool) -> Result<(), ProtoError> {
        let conn = self
            .conns
            .get_mut(&c)
            .ok_or(ProtoError::UnknownConnection)?;
        if !conn.state().held() {
            return Err(ProtoError::InvalidInput(
                "answer: the connection is not a held REQUEST (listen_any_port)",
            ));
        }
        if accept {
            conn.unhold();
            self.schedule(c);
        } else {
            self.abort(now, c);
        }
        Ok(())
    }

    /// Whether `c` is a `REQUEST` held unanswered (see [`Endpoint::answer`]).
    pub fn is_held(&self, c: ConnId) -> bool {
        self.conns.get(&c).is_some_and(|conn| conn.state().held())
    }

    /// The port `l` listens on (the one picked for [`VMADDR_PORT_ANY`]); `None` after
    /// [`Endpoint::unlisten`].
    pub fn listener_port(&self, l: ListenerId) -> Option<u32> {
        self.listeners.get(&l).map(|listener| listener.port)
    }

    /// Stop listening; connections not yet accepted get `RST` and are dropped.
    pub fn unlisten(&mut self, now: Instant, l: ListenerId) {
        let _ = now;
        let Some(listener) = self.listeners.remove(&l) else {
            return;
        };
        if self.any_listener == Some(l) {
            self.any_listener = None;
        } else {
            self.listener_ports.remove(&listener.port);
            self.sync_free_port(listener.port);
        }
        for id in listener.queue {
            if let Some(conn) = self.conns.get_mut(&id) {
                conn.listener = None;
            }
            self.queue_rst(id);
            self.release(id, false);
        }
    }

    /// Connections waiting in `l`'s accept queue (0 for an unknown listener).
    pub fn pending_accepts(&self, l: ListenerId) -> usize {
        self.listeners
            .get(&l)
            .map_or(0, |listener| listener.queue.len())
    }

    /// The next established connection waiting on `l`. Data may already be buffered on it
    /// (no [`Event::Readable`] is sent for connections not yet accepted): try `recv` at once.
    pub fn accept(&mut self, l: ListenerId) -> Option<ConnId> {
        let id = self.listeners.get_mut(&l)?.queue.pop_first()?;
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.listener = None;
        }
        Some(id)
    }

    pub(super) fn accept_request(&mut self, l: ListenerId, hdr: &Header, ty: SocketType) {
        let id = self.new_conn_id();
        // The child inherits the listener's buffer settings (Linux's `__vsock_create`).
        let buffer = self
            .listeners
            .get(&l)
            .map_or_else(|| self.default_buffer(), |listener| listener.buffer);
        let hold = self.listeners.get(&l).is_some_and(|listener| listener.hold);
        let mut conn = Conn::new(
            &mut self.storage,
            id,
            ty,
            hdr.dst_port,
            hdr.src_cid,
            hdr.src_port,
            State::Established {
                answer: if hold { Answer::Held } else { Answer::Owed },
                shut: Shutdowns::default(),
                sent: ShutdownFlags::default(),
            },
            buffer,
        );
        conn.credit.on_handshake(hdr.buf_alloc, hdr.fwd_cnt);
        conn.listener = Some(l);
        self.insert_conn(conn);
        if let Some(listener) = self.listeners.get_mut(&l) {
            listener.queue.insert(id);
        }
        self.events.push(Event::Incoming(l));
        self.schedule(id);
    }
}
