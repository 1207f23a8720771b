// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The host half of the simulated device: CID 2 as a runtime core whose transport is the device
//! half of the rings ([`SimTransport`]), the built-in services, and [`SimHost`], the handle
//! programs and tests use to reach it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::rings::SimRings;
use super::{lock, SimConfig, SimStats, DISCARD_PORT, ECHO_PORT, SEQPACKET_ECHO_PORT, SERVICE_BUF};
use crate::driver::{
    ConnectOpts, VsockAddr, VsockListener, VsockSeqPacket, VsockStream, DEFAULT_BACKLOG,
};
use crate::packet::{SocketType, VMADDR_CID_HOST};
use crate::proto::{self, ConnId, ConnState, Endpoint, ListenerId, ProtoError, HEAP_BUF_KEEP};
use crate::runtime::{Core, Transport, TransportError};
use crate::runtime::{RtEndpoint, RtStorage};

/// Receive/send rounds per service connection per pump.
const SERVICE_ROUNDS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Echo,
    SeqEcho,
    Discard,
}

struct ServiceConn {
    conn: ConnId,
    kind: Service,
    /// SEQPACKET echo: the message not yet sent back, and its EOR (a stream echo relays).
    pending: Vec<u8>,
    pending_eor: bool,
    /// In [`SimTransport::todo`].
    queued: bool,
}

/// What a service connection waits for after its turn.
enum Turn {
    /// An event: `recv` saw `WouldBlock`, or `send` took nothing (the endpoint will say
    /// `Readable` or `Writable`, or the connection ends).
    Idle,
    /// Nothing: it used up its rounds with work left, so it goes round again.
    Busy,
    /// It is closed and forgotten.
    Done,
}

/// The host side's transport: the device half of the rings, plus the built-in services.
struct SimTransport {
    rings: Arc<Mutex<Option<SimRings>>>,
    /// The config's `guest_cid` (changed by [`SimHost::set_guest_cid`]).
    guest_cid: Arc<AtomicU64>,
    max_payload: u32,
    /// The driver is asked not to kick (the device thread spins on the avail rings).
    polling: bool,
    waker: EventFd,
    listeners: Vec<(ListenerId, Service)>,
    services: HashMap<ConnId, ServiceConn>,
    /// The service connections that have something to do, each once: newly accepted, named by
    /// an event ([`Endpoint::poll_ready`]), or busy at the end of their last turn. Only these
    /// are visited, so a pump costs what the active connections need, not what the idle ones
    /// number.
    todo: VecDeque<ConnId>,
    /// The services' receive buffer (one whole SEQPACKET message).
    service_buf: Vec<u8>,
    stats: Arc<Mutex<SimStats>>,
}

impl SimTransport {
    /// Queue `c` for a turn, unless it is not a service connection or already queued.
    fn enqueue(&mut self, c: ConnId) {
        if let Some(s) = self.services.get_mut(&c) {
            if !s.queued {
                s.queued = true;
                self.todo.push_back(c);
            }
        }
    }

    fn run_services(&mut self, ep: &mut RtEndpoint, now: Instant) -> bool {
        for i in 0..self.listeners.len() {
            let (l, kind) = self.listeners[i];
            while let Some(conn) = ep.accept(l) {
                if kind == Service::Discard {
                    // The sink consumes payload as it arrives: nothing is copied or queued.
                    let _ = ep.set_sink(conn, true);
                }
                if kind == Service::Echo {
                    // What arrives while the echo keeps up goes straight back (`device_tx`).
                    let _ = ep.set_echo(conn, true);
                }
                // Data may already be buffered (no event for it): its first turn is now.
                self.services.insert(
                    conn,
                    ServiceConn {
                        conn,
                        kind,
                        pending: Vec::new(),
                        pending_eor: false,
                        queued: false,
                    },
                );
                self.enqueue(conn);
            }
        }
        while let Some(c) = ep.poll_ready() {
            self.enqueue(c);
        }
        let mut moved = false;
        let mut stats = lock(&self.stats);
        // One turn each for those queued now; a busy one goes to the back for the next pump.
        for _ in 0..self.todo.len() {
            let Some(c) = self.todo.pop_front() else {
                break;
            };
            let Some(s) = self.services.get_mut(&c) else {
                continue;
            };
            s.queued = false;
            match Self::turn(s, ep, now, &mut self.service_buf, &mut stats, &mut moved) {
                Turn::Idle => {}
                Turn::Busy => {
                    s.queued = true;
                    self.todo.push_back(c);
                }
                Turn::Done => {
                    self.services.remove(&c);
                }
            }
        }
        moved
    }

    /// An echo's turn: what arrived moves to the send queue as it is, the received queue
    /// itself when the echo keeps up (no copy), else with one copy ([`Endpoint::relay`]).
    fn relay_turn(
        s: &mut ServiceConn,
        ep: &mut RtEndpoint,
        now: Instant,
        stats: &mut SimStats,
        moved: &mut bool,
    ) -> Turn {
        for _ in 0..SERVICE_ROUNDS {
            match ep.relay(now, s.conn, usize::MAX) {
                Ok(None) => {
                    // EOF: close our side too.
                    ep.close(now, s.conn);
                    return Turn::Done;
                }
                // The send buffer is full (`Writable` brings us back), or nothing came yet.
                Ok(Some(0)) | Err(ProtoError::WouldBlock) => return Turn::Idle,
                Ok(Some(n)) => {
                    stats.echoed_bytes += n as u64;
                    *moved = true;
                }
                Err(_) => {
                    ep.abort(now, s.conn);
                    return Turn::Done;
                }
            }
        }
        Turn::Busy
    }

    /// Serve one connection for at most [`SERVICE_ROUNDS`] receive/send rounds (bounded, so one
    /// busy connection cannot hold the device thread).
    fn turn(
        s: &mut ServiceConn,
        ep: &mut RtEndpoint,
        now: Instant,
        buf: &mut [u8],
        stats: &mut SimStats,
        moved: &mut bool,
    ) -> Turn {
        if s.kind == Service::Echo {
            return Self::relay_turn(s, ep, now, stats, moved);
        }
        for _ in 0..SERVICE_ROUNDS {
            // Flush the message a SEQPACKET echo could not send last time before reading
            // more; until `send_msg` takes nothing (then the endpoint owes us `Writable`).
            while !s.pending.is_empty() {
                let r = ep
                    .send_msg(now, s.conn, &s.pending, s.pending_eor)
                    .map(|()| s.pending.len());
                match r {
                    Ok(0) | Err(ProtoError::WouldBlock) => return Turn::Idle,
                    Ok(n) => {
                        stats.echoed_bytes += n as u64;
                        s.pending.drain(..n);
                        if s.pending.is_empty() && s.pending.capacity() > HEAP_BUF_KEEP {
                            // As the endpoint's queues do: an idle echo holds no buffer.
                            s.pending = Vec::new();
                        }
                        *moved = true;
                    }
                    Err(_) => {
                        ep.abort(now, s.conn);
                        return Turn::Done;
                    }
                }
            }
            let r = match s.kind {
                Service::SeqEcho => ep.recv_msg(now, s.conn, buf).map(|(n, full, eor)| {
                    s.pending_eor = eor;
                    // recv_msg says (0, 0) both for an empty message and at the end of
                    // the stream; the connection's state tells them apart.
                    let ended = matches!(
                        ep.state(s.conn),
                        None | Some(ConnState::Closed | ConnState::Closing)
                            | Some(ConnState::PeerClosed {
                                no_more_rx: true,
                                ..
                            })
                    );
                    (n, full == 0 && !ended)
                }),
                // A sink connection (see the accept above) has nothing queued: this sees
                // end of stream, and bytes that came before it became a sink.
                Service::Discard => ep.discard(now, s.conn, usize::MAX).map(|n| (n, false)),
                // Relayed above: nothing to receive here.
                Service::Echo => return Turn::Idle,
            };
            match r {
                Ok((0, false)) => {
                    // EOF: close our side too.
                    ep.close(now, s.conn);
                    return Turn::Done;
                }
                Ok((n, _)) => {
                    *moved = true;
                    match s.kind {
                        Service::Discard => stats.discarded_bytes += n as u64,
                        Service::Echo | Service::SeqEcho => {
                            s.pending.extend_from_slice(&buf[..n]);
                            if s.kind == Service::SeqEcho && n == 0 {
                                // Empty message: send it directly.
                                let _ = ep.send_msg(now, s.conn, &[], s.pending_eor);
                            }
                        }
                    }
                }
                Err(ProtoError::WouldBlock) => return Turn::Idle,
                Err(_) => {
                    ep.close(now, s.conn);
                    return Turn::Done;
                }
            }
        }
        Turn::Busy
    }
}

impl Transport for SimTransport {
    fn pump(&mut self, ep: &mut RtEndpoint, now: Instant) -> Result<bool, TransportError> {
        let mut moved = self.run_services(ep, now);
        let rings = self.rings.clone();
        let mut guard = lock(&rings);
        let Some(r) = guard.as_mut() else {
            // Not activated (or reset): only the services run (and the core's timers).
            return Ok(moved);
        };
        let mut stats = *lock(&self.stats);
        moved |= r.device_tx(
            ep,
            now,
            self.guest_cid.load(Ordering::Acquire),
            self.max_payload,
            &mut stats,
        )?;
        drop(guard);
        *lock(&self.stats) = stats;
        moved |= self.run_services(ep, now);
        let mut guard = lock(&rings);
        if let Some(r) = guard.as_mut() {
            let mut stats = *lock(&self.stats);
            moved |= r.device_rx(ep, now, self.max_payload, &mut stats)?;
            r.notify_tx();
            *lock(&self.stats) = stats;
            if !self.polling {
                // Re-arm kicks; `true` means buffers arrived meanwhile: go round again.
                let more_tx = r.tx.enable_notification(&r.mem).unwrap_or(false);
                let more_rx = r.rx.enable_notification(&r.mem).unwrap_or(false);
                moved |= more_tx || (more_rx && r.rx_starved);
            }
        }
        Ok(moved)
    }

    fn wake(&self) {
        let _ = self.waker.write(1);
    }

    fn shutdown(&mut self) {
        *lock(&self.rings) = None;
    }

    fn set_polling(&mut self, polling: bool) {
        self.polling = polling;
        if let Some(r) = lock(&self.rings).as_mut() {
            // What is already available is picked up by the next pump.
            if polling {
                let _ = r.tx.disable_notification(&r.mem);
                let _ = r.rx.disable_notification(&r.mem);
            } else {
                let _ = r.tx.enable_notification(&r.mem);
                let _ = r.rx.enable_notification(&r.mem);
            }
        }
    }
}

/// The host side (CID 2) of a simulated device: listen, accept, connect, counters.
#[derive(Clone)]
pub struct SimHost {
    /// The host endpoint and its transport (the device thread pumps it).
    pub(super) core: Arc<Core>,
    stats: Arc<Mutex<SimStats>>,
    guest_cid: Arc<AtomicU64>,
    /// The device's config interrupt (a dup of the driver's [`VsockDevice::config_fd`]).
    config: Arc<EventFd>,
    /// The device half of the rings (also the transport's).
    rings: Arc<Mutex<Option<SimRings>>>,
    /// Set by [`SimHost::set_needs_reset`], cleared by the device's reset.
    pub(super) needs_reset: Arc<AtomicBool>,
    /// The device's removal eventfd (a dup of its [`VsockDevice::removal_fd`]).
    removal: Arc<EventFd>,
}

impl std::fmt::Debug for SimHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHost")
            .field("core", &self.core)
            .field("guest_cid", &self.guest_cid())
            .field("needs_reset", &self.needs_reset)
            .finish_non_exhaustive()
    }
}

/// The built-in services' listen backlog (see [`SimHost::start`]).
const SERVICE_BACKLOG: usize = 1 << 20;

impl SimHost {
    /// The host side of a new device with settings `cfg`: CID 2 with the built-in services
    /// listening, its transport on `rings` (empty until the device is activated). `waker` wakes
    /// the device thread; `config` is the device's config interrupt.
    pub(super) fn start(
        cfg: &SimConfig,
        rings: Arc<Mutex<Option<SimRings>>>,
        waker: EventFd,
        config: EventFd,
        removal: EventFd,
    ) -> SimHost {
        let mut host_cfg = cfg.host.clone();
        host_cfg.local_cid = VMADDR_CID_HOST;
        host_cfg.seqpacket = cfg.seqpacket;
        // What the offer allows (the driver accepts every socket-type bit it is offered).
        host_cfg.stream = cfg.stream || !cfg.no_implied_stream;
        let mut ep = Endpoint::with_storage(host_cfg, RtStorage::Heap);
        // The services visit only the connections that had an event (see `SimTransport::todo`).
        ep.track_ready();
        let mut listeners = Vec::new();
        for (port, ty, kind) in [
            (ECHO_PORT, SocketType::Stream, Service::Echo),
            (DISCARD_PORT, SocketType::Stream, Service::Discard),
            (SEQPACKET_ECHO_PORT, SocketType::SeqPacket, Service::SeqEcho),
        ] {
            if ty == SocketType::SeqPacket && !cfg.seqpacket {
                continue;
            }
            // The services accept every connection within the pump it arrived in, but one
            // pump may take a whole TX ring of REQUESTs many times over while the driver keeps
            // posting (10,000 connects at once): a backlog that never refuses, as a host
            // that keeps up would.
            if let Ok(l) = ep.listen(port, SERVICE_BACKLOG, ty) {
                listeners.push((l, kind));
            }
        }
        let stats = Arc::new(Mutex::new(SimStats::default()));
        let guest_cid = Arc::new(AtomicU64::new(cfg.guest_cid));
        let transport = SimTransport {
            rings: rings.clone(),
            guest_cid: guest_cid.clone(),
            max_payload: cfg.max_payload,
            polling: cfg.busy_poll,
            waker,
            listeners,
            services: HashMap::new(),
            todo: VecDeque::new(),
            service_buf: vec![0; SERVICE_BUF],
            stats: stats.clone(),
        };
        SimHost {
            // As for the device's eventfds: only an exhausted file table makes this fail.
            core: Core::new(ep, Box::new(transport), false)
                .unwrap_or_else(|e| panic!("sim host core: {e}")),
            stats,
            guest_cid,
            config: Arc::new(config),
            rings,
            needs_reset: Arc::default(),
            removal: Arc::new(removal),
        }
    }

    /// Listen for streams from the driver on host port `port`.
    pub fn listen(&self, port: u32) -> std::io::Result<VsockListener> {
        VsockListener::bind_on(&self.core, port, DEFAULT_BACKLOG, SocketType::Stream)
    }

    /// Listen for SEQPACKET connections from the driver on host port `port`.
    pub fn listen_seqpacket(&self, port: u32) -> std::io::Result<VsockListener> {
        VsockListener::bind_on(&self.core, port, DEFAULT_BACKLOG, SocketType::SeqPacket)
    }

    /// Connect from the host to the driver's `port`.
    pub fn connect(&self, port: u32) -> std::io::Result<VsockStream> {
        VsockStream::connect_on(
            &self.core,
            VsockAddr::new(self.guest_cid(), port),
            ConnectOpts::default(),
        )
    }

    /// Start connecting from the host to the driver's `port` and return at once (as
    /// [`VsockDriver::connect_nonblocking`](crate::driver::VsockDriver::connect_nonblocking)).
    pub fn connect_nonblocking(&self, port: u32) -> std::io::Result<VsockStream> {
        VsockStream::connect_on(
            &self.core,
            VsockAddr::new(self.guest_cid(), port),
            ConnectOpts {
                nonblocking: true,
                ..ConnectOpts::default()
            },
        )
    }

    /// Connect a SEQPACKET socket from the host to the driver's `port`.
    pub fn connect_seqpacket(&self, port: u32) -> std::io::Result<VsockSeqPacket> {
        VsockSeqPacket::connect_on(
            &self.core,
            VsockAddr::new(self.guest_cid(), port),
            ConnectOpts::default(),
        )
    }

    /// The config's `guest_cid` now.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid.load(Ordering::Acquire)
    }

    /// Change the config's `guest_cid`, as a migration would: the host's connections belonged to
    /// the old CID and end (as after a transport reset), then the config interrupt fires so the
    /// driver re-reads the CID.
    pub fn set_guest_cid(&self, cid: u64) -> std::io::Result<()> {
        {
            let mut st = self.core.lock();
            self.guest_cid.store(cid, Ordering::Release);
            st.ep.handle_transport_reset(Instant::now(), None);
            Core::route_events(&mut st);
        }
        self.config.write(1)
    }

    /// Send VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue, as QEMU's vhost-vsock does
    /// after a migration: the host's connections end, and the driver is expected to reset its
    /// own (listeners stay). Fails when the driver has no event queue or no event buffer posted.
    pub fn transport_reset(&self) -> std::io::Result<()> {
        let mut st = self.core.lock();
        st.ep.handle_transport_reset(Instant::now(), None);
        Core::route_events(&mut st);
        let mut rings = lock(&self.rings);
        let r = rings
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the device is not running"))?;
        r.send_event(crate::packet::VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
            .map_err(std::io::Error::other)
    }

    /// Make the device fail as one that needs a reset does (virtio 1.2 section 2.1.2): it stops
    /// using its rings, its host-side connections end, its status gains NEEDS_RESET and it
    /// raises the config interrupt. A reset by the driver clears it; the device then works
    /// again once brought up.
    pub fn set_needs_reset(&self) -> std::io::Result<()> {
        {
            let mut st = self.core.lock();
            self.needs_reset.store(true, Ordering::Release);
            *lock(&self.rings) = None;
            st.ep.handle_transport_reset(Instant::now(), None);
            Core::route_events(&mut st);
        }
        self.config.write(1)
    }

    /// Signal the device's removal, as the kernel's VFIO request interrupt does when a function
    /// is unbound or unplugged: the driver must end every call and let the device go.
    pub fn unplug(&self) -> std::io::Result<()> {
        self.removal.write(1)
    }

    /// The device's counters.
    pub fn stats(&self) -> SimStats {
        let mut s = *lock(&self.stats);
        // The discard service's connections are sinks: their bytes are counted on arrival.
        s.discarded_bytes += self.core.lock().ep.stats().bytes_sunk;
        s
    }

    /// The host endpoint's protocol counters (credit violations by the driver among them).
    pub fn proto_stats(&self) -> proto::Stats {
        self.core.lock().ep.stats()
    }
}
