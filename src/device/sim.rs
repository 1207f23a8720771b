// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The simulated virtio-vsock device (`--device sim`): the embedded default that needs no
//! hardware and no privileges.
//!
//! It runs in its own thread over the driver's DMA memory and behaves as a device must: it reads
//! the rings with rust-vmm's device-side `virtio_queue::Queue` and parses every chain with
//! [`VsockPacket::from_tx_virtq_chain`] / [`VsockPacket::from_rx_virtq_chain`], exactly like a
//! vhost-user device would. Behind it sits the host, CID 2, as a full protocol endpoint (the same
//! sans-IO core the driver uses), which makes it a strict peer: a driver that overruns the host's
//! credit is reset and counted, and packets for unknown connections get RST.
//!
//! Built-in host services:
//! - port [`ECHO_PORT`] (7): stream echo, every byte comes back;
//! - port [`SEQPACKET_ECHO_PORT`] (8): SEQPACKET echo, every message comes back whole;
//! - port [`DISCARD_PORT`] (9): stream sink, bytes are counted and dropped.
//!
//! Programs and tests reach the host side through [`SimHost`]: listen on a port and accept, or
//! connect to the driver. A test-only [`Hostile`] mode makes the device write bogus used entries.
//! [`SimHost::set_guest_cid`] changes the config's `guest_cid` at run time and raises the config
//! interrupt ([`VsockDevice::config_fd`]), as a migration to another CID would.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Le32};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceError, VsockDevice, RX_QUEUE, TX_QUEUE};
use crate::dma::{DmaOptions, DmaRegion, IovaBase};
use crate::driver::{VsockAddr, VsockListener, VsockSeqPacket, VsockStream};
use crate::packet::{
    SocketType, VsockPacket, PKT_HEADER_LEN, PKT_HEADER_SIZE, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_VSOCK_F_SEQPACKET, VMADDR_CID_HOST,
};
use crate::proto::{self, ConnId, ConnState, Endpoint, ListenerId, ProtoError};
use crate::runtime::{run_loop, Core, LoopFds, Transport, TransportError};
use crate::virtq::QueueLayout;

/// Host port of the built-in stream echo service.
pub const ECHO_PORT: u32 = 7;
/// Host port of the built-in SEQPACKET echo service.
pub const SEQPACKET_ECHO_PORT: u32 = 8;
/// Host port of the built-in discard (sink) service.
pub const DISCARD_PORT: u32 = 9;

/// Largest message the SEQPACKET echo returns whole (bigger ones come back truncated).
pub const SERVICE_BUF: usize = 4 << 20;

/// Receive/send rounds per service connection per pump.
const SERVICE_ROUNDS: usize = 64;

/// A bogus thing the hostile device does, once, on its first RX delivery (tests only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// A used element whose id is beyond the ring.
    BogusUsedId,
    /// A used length larger than the buffer the driver posted.
    LenBeyondBuffer,
    /// The same used element twice.
    DuplicateUsed,
    /// The used index jumps by more than the ring size.
    UsedIdxJump,
}

/// Settings of the simulated device.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The driver's CID (the device config's `guest_cid`).
    pub guest_cid: u64,
    /// Largest queue size offered.
    pub queue_max: u16,
    /// Largest payload the device puts in one RX packet.
    pub max_payload: u32,
    /// Spin instead of sleeping on kicks (pairs with the driver's busy-poll mode).
    pub busy_poll: bool,
    /// Offer VIRTIO_VSOCK_F_SEQPACKET.
    pub seqpacket: bool,
    /// Offer VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Settings of the host-side protocol endpoint (its CID is always 2).
    pub host: proto::Config,
    /// Misbehave on purpose (tests).
    pub hostile: Option<Hostile>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            guest_cid: 3,
            queue_max: 256,
            max_payload: 64 * 1024,
            busy_poll: false,
            seqpacket: true,
            event_idx: true,
            host: proto::Config::default(),
            hostile: None,
        }
    }
}

/// Counters of the simulated device and its host side.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SimStats {
    /// Packets the driver sent (TX chains consumed).
    pub tx_packets: u64,
    /// Packets delivered to the driver (RX chains used).
    pub rx_packets: u64,
    /// Driver misbehaviour: malformed chains, wrong source CID, wrong destination.
    pub protocol_violations: u64,
    /// Bytes the discard service dropped.
    pub discarded_bytes: u64,
    /// Bytes the echo services sent back.
    pub echoed_bytes: u64,
}

/// Device-side state while the device runs.
struct SimRings {
    mem: GuestMemoryMmap<()>,
    rx: Queue,
    tx: Queue,
    call: [EventFd; 2],
    hostile: Option<Hostile>,
    /// The last `device_rx` ran out of RX buffers (it may still have packets to deliver).
    rx_starved: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Echo,
    SeqEcho,
    Discard,
}

struct ServiceConn {
    conn: ConnId,
    kind: Service,
    pending: Vec<u8>,
    pending_eor: bool,
}

/// The host side's transport: the device half of the rings, plus the built-in services.
struct SimTransport {
    rings: Arc<Mutex<Option<SimRings>>>,
    /// The config's `guest_cid` (changed by [`SimHost::set_guest_cid`]).
    guest_cid: Arc<AtomicU64>,
    max_payload: u32,
    busy_poll: bool,
    waker: EventFd,
    listeners: Vec<(ListenerId, Service)>,
    services: Vec<ServiceConn>,
    /// Payload staging between the rings and the endpoint (one packet).
    scratch: Vec<u8>,
    /// The services' receive buffer (one whole SEQPACKET message).
    service_buf: Vec<u8>,
    stats: Arc<Mutex<SimStats>>,
}

impl SimTransport {
    fn run_services(&mut self, ep: &mut Endpoint, now: Instant) -> bool {
        let mut moved = false;
        for &(l, kind) in &self.listeners {
            while let Some(conn) = ep.accept(l) {
                self.services.push(ServiceConn {
                    conn,
                    kind,
                    pending: Vec::new(),
                    pending_eor: false,
                });
            }
        }
        let mut stats = lock(&self.stats);
        let buf = &mut self.service_buf;
        self.services.retain_mut(|s| {
            // Bounded, so one busy connection cannot hold the device thread.
            for _ in 0..SERVICE_ROUNDS {
                // Flush what an echo could not send last time before reading more.
                if !s.pending.is_empty() {
                    let r = match s.kind {
                        Service::SeqEcho => ep
                            .send_msg(now, s.conn, &s.pending, s.pending_eor)
                            .map(|()| s.pending.len()),
                        _ => ep.send(now, s.conn, &s.pending),
                    };
                    match r {
                        Ok(n) => {
                            stats.echoed_bytes += n as u64;
                            s.pending.drain(..n);
                            moved |= n > 0;
                            if !s.pending.is_empty() {
                                return true;
                            }
                        }
                        Err(ProtoError::WouldBlock) => return true,
                        Err(_) => {
                            ep.abort(now, s.conn);
                            return false;
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
                    _ => ep.recv(now, s.conn, buf).map(|n| (n, false)),
                };
                match r {
                    Ok((0, false)) => {
                        // EOF: close our side too.
                        ep.close(now, s.conn);
                        return false;
                    }
                    Ok((n, _)) => {
                        moved = true;
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
                    Err(ProtoError::WouldBlock) => return true,
                    Err(_) => {
                        ep.close(now, s.conn);
                        return false;
                    }
                }
            }
            true
        });
        moved
    }
}

/// An `add_used` failure on the device half of `queue`, as a transport error.
fn add_used_err(
    queue: &'static str,
    head: u16,
) -> impl FnOnce(virtio_queue::Error) -> TransportError {
    move |source| TransportError::DeviceSideQueue {
        queue,
        head,
        source,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimRings {
    /// Consume the driver's TX chains into the host endpoint.
    fn device_tx(
        &mut self,
        ep: &mut Endpoint,
        now: Instant,
        guest_cid: u64,
        max_payload: u32,
        scratch: &mut [u8],
        stats: &mut SimStats,
    ) -> Result<bool, TransportError> {
        let mut used_any = false;
        while let Some(mut chain) = self.tx.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(&self.mem, &mut chain, max_payload) {
                Ok(pkt) => {
                    let hdr = pkt.header();
                    if hdr.src_cid != guest_cid || hdr.dst_cid != VMADDR_CID_HOST {
                        log::warn!("sim: dropping packet with bad addressing: {hdr}");
                        stats.protocol_violations += 1;
                    } else {
                        let n =
                            pkt.read_data(&mut scratch[..hdr.len as usize])
                                .map_err(|source| TransportError::Packet {
                                    what: "sim: reading a tx payload",
                                    source,
                                })?;
                        ep.handle_packet(now, &hdr, &scratch[..n]);
                        stats.tx_packets += 1;
                    }
                }
                Err(e) => {
                    log::warn!("sim: malformed tx chain from the driver: {e}");
                    stats.protocol_violations += 1;
                }
            }
            self.tx
                .add_used(&self.mem, head, 0)
                .map_err(add_used_err("tx", head))?;
            used_any = true;
        }
        if used_any && self.tx.needs_notification(&self.mem).unwrap_or(true) {
            let _ = self.call[1].write(1);
        }
        Ok(used_any)
    }

    /// Deliver the host endpoint's packets into the driver's RX buffers.
    fn device_rx(
        &mut self,
        ep: &mut Endpoint,
        now: Instant,
        max_payload: u32,
        scratch: &mut [u8],
        stats: &mut SimStats,
    ) -> Result<bool, TransportError> {
        let mut used_any = false;
        self.rx_starved = true;
        while let Some(mut chain) = self.rx.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(&self.mem, &mut chain, max_payload)
            {
                Ok(p) => p,
                Err(e) => {
                    log::warn!("sim: malformed rx chain from the driver: {e}");
                    stats.protocol_violations += 1;
                    self.rx
                        .add_used(&self.mem, head, 0)
                        .map_err(add_used_err("rx", head))?;
                    used_any = true;
                    continue;
                }
            };
            let room = pkt.data_len().min(max_payload as usize);
            let Some(hdr) = ep.poll_transmit(now, &mut scratch[..room]) else {
                // Nothing to send: give the chain back to the avail ring for later.
                self.rx.go_to_previous_position();
                self.rx_starved = false;
                break;
            };
            pkt.set_header(&hdr);
            pkt.write_data(&scratch[..hdr.len as usize])
                .map_err(|source| TransportError::Packet {
                    what: "sim: writing an rx payload",
                    source,
                })?;
            let used_len = PKT_HEADER_LEN + hdr.len;
            let capacity = u32::try_from(PKT_HEADER_SIZE + pkt.data_len()).unwrap_or(u32::MAX);
            drop(pkt);
            match self.hostile.take() {
                None => self
                    .rx
                    .add_used(&self.mem, head, used_len)
                    .map_err(add_used_err("rx", head))?,
                Some(h) => self.misbehave(h, head, used_len, capacity)?,
            }
            stats.rx_packets += 1;
            used_any = true;
        }
        if used_any && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            let _ = self.call[0].write(1);
        }
        Ok(used_any)
    }

    /// Write one bogus used entry into the RX used ring (the hostile test mode).
    fn misbehave(
        &mut self,
        h: Hostile,
        head: u16,
        used_len: u32,
        capacity: u32,
    ) -> Result<(), TransportError> {
        log::warn!("sim: hostile mode: {h:?}");
        let size = self.rx.size();
        let used = GuestAddress(self.rx.used_ring());
        // Write `elems` after the device's used index, then publish them with one index store
        // of `next + step` (a correct device would use step == elems.len()).
        let write_raw =
            |q: &mut Queue, mem: &GuestMemoryMmap<()>, elems: &[(u32, u32)], step: u16| {
                let next = q.next_used();
                for (i, &(id, len)) in (0u16..).zip(elems) {
                    let slot = u64::from(next.wrapping_add(i) % size);
                    // struct virtq_used_elem { le32 id; le32 len; } (virtio 1.2 2.7.8)
                    let elem = GuestAddress(used.0 + 4 + 8 * slot);
                    mem.write_obj(Le32::from(id), elem)
                        .and_then(|()| mem.write_obj(Le32::from(len), GuestAddress(elem.0 + 4)))
                        .map_err(|source| TransportError::DeviceSideMemory {
                            what: "hostile mode: writing a used element",
                            addr: elem.0,
                            source,
                        })?;
                }
                let new_idx = next.wrapping_add(step);
                let idx_addr = GuestAddress(used.0 + 2);
                mem.store(new_idx, idx_addr, Ordering::Release)
                    .map_err(|source| TransportError::DeviceSideMemory {
                        what: "hostile mode: publishing the used index",
                        addr: idx_addr.0,
                        source,
                    })?;
                q.set_next_used(new_idx);
                Ok::<(), TransportError>(())
            };
        let head = u32::from(head);
        match h {
            Hostile::BogusUsedId => write_raw(
                &mut self.rx,
                &self.mem,
                &[(u32::from(size) + 3, used_len)],
                1,
            )?,
            Hostile::LenBeyondBuffer => {
                write_raw(&mut self.rx, &self.mem, &[(head, capacity + 4096)], 1)?
            }
            Hostile::DuplicateUsed => write_raw(
                &mut self.rx,
                &self.mem,
                &[(head, used_len), (head, used_len)],
                2,
            )?,
            Hostile::UsedIdxJump => {
                write_raw(&mut self.rx, &self.mem, &[(head, used_len)], size + 2)?
            }
        }
        Ok(())
    }
}

impl Transport for SimTransport {
    fn pump(&mut self, ep: &mut Endpoint, now: Instant) -> Result<bool, TransportError> {
        let mut moved = self.run_services(ep, now);
        let rings = self.rings.clone();
        let mut guard = lock(&rings);
        let Some(r) = guard.as_mut() else {
            // Not activated (or reset): only the services and timers run.
            if ep.poll_timeout().is_some_and(|t| t <= now) {
                ep.handle_timeout(now);
            }
            return Ok(moved);
        };
        let mut stats = *lock(&self.stats);
        moved |= r.device_tx(
            ep,
            now,
            self.guest_cid.load(Ordering::Acquire),
            self.max_payload,
            &mut self.scratch,
            &mut stats,
        )?;
        if ep.poll_timeout().is_some_and(|t| t <= now) {
            ep.handle_timeout(now);
        }
        drop(guard);
        *lock(&self.stats) = stats;
        moved |= self.run_services(ep, now);
        let mut guard = lock(&rings);
        if let Some(r) = guard.as_mut() {
            let mut stats = *lock(&self.stats);
            moved |= r.device_rx(ep, now, self.max_payload, &mut self.scratch, &mut stats)?;
            *lock(&self.stats) = stats;
            if !self.busy_poll {
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
}

/// The host side (CID 2) of a simulated device: listen, accept, connect, counters.
#[derive(Debug, Clone)]
pub struct SimHost {
    core: Arc<Core>,
    stats: Arc<Mutex<SimStats>>,
    guest_cid: Arc<AtomicU64>,
    /// The device's config interrupt (a dup of the driver's [`VsockDevice::config_fd`]).
    config: Arc<EventFd>,
}

impl SimHost {
    /// Listen for streams from the driver on host port `port`.
    pub fn listen(&self, port: u32) -> std::io::Result<VsockListener> {
        VsockListener::bind_on(&self.core, port, SocketType::Stream)
    }

    /// Listen for SEQPACKET connections from the driver on host port `port`.
    pub fn listen_seqpacket(&self, port: u32) -> std::io::Result<VsockListener> {
        VsockListener::bind_on(&self.core, port, SocketType::SeqPacket)
    }

    /// Connect from the host to the driver's `port`.
    pub fn connect(&self, port: u32) -> std::io::Result<VsockStream> {
        VsockStream::connect_on(&self.core, VsockAddr::new(self.guest_cid(), port), None)
    }

    /// Connect a SEQPACKET socket from the host to the driver's `port`.
    pub fn connect_seqpacket(&self, port: u32) -> std::io::Result<VsockSeqPacket> {
        VsockSeqPacket::connect_on(&self.core, VsockAddr::new(self.guest_cid(), port), None)
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

    /// The device's counters.
    pub fn stats(&self) -> SimStats {
        *lock(&self.stats)
    }

    /// The host endpoint's protocol counters (credit violations by the driver among them).
    pub fn proto_stats(&self) -> proto::Stats {
        self.core.lock().ep.stats()
    }
}

/// The simulated device. See the module docs.
pub struct SimDevice {
    cfg: SimConfig,
    negotiated: u64,
    layouts: [Option<QueueLayout>; 2],
    mem: Option<GuestMemoryMmap<()>>,
    kick: [EventFd; 2],
    call: [EventFd; 2],
    /// The config interrupt ([`SimHost::set_guest_cid`] signals it).
    config: EventFd,
    rings: Arc<Mutex<Option<SimRings>>>,
    host: SimHost,
    waker: EventFd,
    stop: Option<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDevice")
            .field("cfg", &self.cfg)
            .field("negotiated", &self.negotiated)
            .field("running", &self.thread.is_some())
            .finish_non_exhaustive()
    }
}

fn eventfd() -> EventFd {
    // An eventfd only fails when the process is out of file descriptors; nothing works then.
    EventFd::new(EFD_NONBLOCK).unwrap_or_else(|e| panic!("eventfd: {e}"))
}

impl SimDevice {
    /// A new simulated device (not started: the driver brings it up through [`VsockDevice`]).
    pub fn new(cfg: SimConfig) -> Self {
        let mut host_cfg = cfg.host.clone();
        host_cfg.local_cid = VMADDR_CID_HOST;
        host_cfg.seqpacket = cfg.seqpacket;
        let mut ep = Endpoint::new(host_cfg);
        let mut listeners = Vec::new();
        for (port, ty, kind) in [
            (ECHO_PORT, SocketType::Stream, Service::Echo),
            (DISCARD_PORT, SocketType::Stream, Service::Discard),
            (SEQPACKET_ECHO_PORT, SocketType::SeqPacket, Service::SeqEcho),
        ] {
            if ty == SocketType::SeqPacket && !cfg.seqpacket {
                continue;
            }
            if let Ok(l) = ep.listen(port, 1024, ty) {
                listeners.push((l, kind));
            }
        }
        let rings = Arc::new(Mutex::new(None));
        let stats = Arc::new(Mutex::new(SimStats::default()));
        let waker = eventfd();
        let guest_cid = Arc::new(AtomicU64::new(cfg.guest_cid));
        let config = eventfd();
        let transport = SimTransport {
            rings: rings.clone(),
            guest_cid: guest_cid.clone(),
            max_payload: cfg.max_payload,
            busy_poll: cfg.busy_poll,
            waker: waker
                .try_clone()
                .unwrap_or_else(|e| panic!("dup eventfd: {e}")),
            listeners,
            services: Vec::new(),
            scratch: vec![0; cfg.max_payload as usize],
            service_buf: vec![0; SERVICE_BUF],
            stats: stats.clone(),
        };
        let core = Core::new(ep, Box::new(transport), false);
        SimDevice {
            host: SimHost {
                core,
                stats,
                guest_cid,
                config: Arc::new(
                    config
                        .try_clone()
                        .unwrap_or_else(|e| panic!("dup eventfd: {e}")),
                ),
            },
            config,
            cfg,
            negotiated: 0,
            layouts: [None, None],
            mem: None,
            kick: [eventfd(), eventfd()],
            call: [eventfd(), eventfd()],
            rings,
            waker,
            stop: None,
            thread: None,
        }
    }

    /// The host side, for tests and the CLI.
    pub fn host(&self) -> SimHost {
        self.host.clone()
    }

    fn make_queue(&self, index: u16, layout: &QueueLayout) -> Result<Queue, DeviceError> {
        let mut q = Queue::new(self.cfg.queue_max)
            .map_err(|e| DeviceError::Failed(format!("queue {index}: {e}")))?;
        q.try_set_size(layout.size)
            .map_err(|_| DeviceError::BadQueueSize {
                size: layout.size,
                max: self.cfg.queue_max,
            })?;
        q.try_set_desc_table_address(layout.desc_table)
            .and_then(|()| q.try_set_avail_ring_address(layout.avail_ring))
            .and_then(|()| q.try_set_used_ring_address(layout.used_ring))
            .map_err(|e| DeviceError::Failed(format!("queue {index} addresses: {e}")))?;
        q.set_event_idx(self.negotiated & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        q.set_ready(true);
        Ok(q)
    }
}

impl VsockDevice for SimDevice {
    fn name(&self) -> String {
        "sim".into()
    }

    fn offered_features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1;
        if self.cfg.seqpacket {
            f |= 1 << VIRTIO_VSOCK_F_SEQPACKET;
        }
        if self.cfg.event_idx {
            f |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        f
    }

    fn negotiate(&mut self, features: u64) -> Result<u64, DeviceError> {
        let offered = self.offered_features();
        if features & !offered != 0 {
            return Err(DeviceError::Failed(format!(
                "driver accepted features {features:#x} beyond those offered {offered:#x}"
            )));
        }
        self.negotiated = features;
        Ok(features)
    }

    fn guest_cid(&self) -> Result<u64, DeviceError> {
        Ok(self.host.guest_cid())
    }

    fn num_queues(&self) -> u16 {
        2
    }

    fn max_queue_size(&self, _index: u16) -> u16 {
        self.cfg.queue_max
    }

    fn details(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "backend",
                "in-process simulated virtio-vsock (a device thread on virtio-queue's Queue)"
                    .into(),
            ),
            (
                "host",
                "CID 2: echo on port 7, SEQPACKET echo on 8, discard on 9".into(),
            ),
        ]
    }

    fn dma_options(&self) -> DmaOptions {
        DmaOptions {
            iova: IovaBase::Fixed(0x1_0000_0000),
            ..DmaOptions::default()
        }
    }

    fn map_dma(&mut self, dma: &DmaRegion) -> Result<(), DeviceError> {
        self.mem = Some(dma.memory().clone());
        Ok(())
    }

    fn setup_queue(&mut self, index: u16, layout: &QueueLayout) -> Result<(), DeviceError> {
        match index {
            RX_QUEUE | TX_QUEUE => {
                let max = self.cfg.queue_max;
                if layout.size == 0 || !layout.size.is_power_of_two() || layout.size > max {
                    return Err(DeviceError::BadQueueSize {
                        size: layout.size,
                        max,
                    });
                }
                self.layouts[usize::from(index)] = Some(*layout);
                Ok(())
            }
            _ => Err(DeviceError::NoSuchQueue { index, count: 2 }),
        }
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        let mem = self
            .mem
            .clone()
            .ok_or(DeviceError::NotReady("activate before map_dma"))?;
        let (Some(rxl), Some(txl)) = (self.layouts[0], self.layouts[1]) else {
            return Err(DeviceError::NotReady(
                "activate before both queues were set up",
            ));
        };
        let mut rx = self.make_queue(RX_QUEUE, &rxl)?;
        let mut tx = self.make_queue(TX_QUEUE, &txl)?;
        if self.cfg.busy_poll {
            // We spin on the avail rings: ask the driver not to kick.
            let _ = rx.disable_notification(&mem);
            let _ = tx.disable_notification(&mem);
        }
        let dup = |e: &EventFd| e.try_clone().map_err(|e| DeviceError::io("dup eventfd", e));
        *lock(&self.rings) = Some(SimRings {
            mem,
            rx,
            tx,
            call: [dup(&self.call[0])?, dup(&self.call[1])?],
            hostile: self.cfg.hostile,
            rx_starved: false,
        });
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| DeviceError::io("eventfd", e))?;
        let fds = LoopFds {
            waker: dup(&self.waker)?,
            stop: dup(&stop)?,
            signals: vec![dup(&self.kick[0])?, dup(&self.kick[1])?],
            config: None,
            max_sleep: Some(if self.cfg.busy_poll {
                Duration::ZERO
            } else {
                Duration::from_millis(100)
            }),
        };
        let core = self.host.core.clone();
        self.thread = Some(
            std::thread::Builder::new()
                .name("vsock-sim".into())
                .spawn(move || run_loop(core, fds))
                .map_err(|e| DeviceError::io("spawn sim thread", e))?,
        );
        self.stop = Some(stop);
        Ok(())
    }

    fn kick(&self, index: u16) -> Result<(), DeviceError> {
        let fd = self
            .kick
            .get(usize::from(index))
            .ok_or(DeviceError::NoSuchQueue { index, count: 2 })?;
        fd.write(1).map_err(|e| DeviceError::io("kick", e))
    }

    fn call_fd(&self, index: u16) -> Result<&EventFd, DeviceError> {
        self.call
            .get(usize::from(index))
            .ok_or(DeviceError::NoSuchQueue { index, count: 2 })
    }

    fn config_fd(&self) -> Option<&EventFd> {
        Some(&self.config)
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.write(1);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        *lock(&self.rings) = None;
        // Every host-side connection ends, as a guest's would on a transport reset.
        let mut st = self.host.core.lock();
        st.ep.handle_transport_reset(Instant::now(), None);
        Core::route_events(&mut st);
        Ok(())
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        let _ = self.reset();
    }
}
