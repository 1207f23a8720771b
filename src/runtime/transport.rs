//! The driver's transport: a device's rings, fed from and into DMA storage.
//!
//! Each [`Transport::pump`]:
//! 1. reaps TX completions: each returned descriptor chain drops its [`TxSeg`], which gives the
//!    payload's chunk back to the pool once nothing else holds it;
//! 2. turns every used RX buffer into a [`VsockPacket`] (the header read once into a private
//!    copy, bounded by the used length the device reported) and hands its payload, where it
//!    lies, to the protocol core: kept, the buffer joins its connection's receive queue;
//!    dropped, it goes straight back to the pool. The ring is then refilled from the pool;
//! 3. takes the event queue's events (queue 2, when the device has one): a TRANSPORT_RESET
//!    re-reads `guest_cid` and resets every connection, as Linux's `virtio_vsock_event_handle`
//!    does (listeners stay); the buffer is posted again;
//! 4. asks the protocol core for packets: each is a header in this token's header slot plus,
//!    for RW, one descriptor over the payload's chunk (no copy), and the device is kicked once
//!    for the batch if it wants a notification.
//!
//! (The protocol's timers are fired by the core after each pump, for every transport.)
//!
//! When the device breaks the rules or says NEEDS_RESET, [`Transport::recover`] resets it and
//! brings it up again on the same DMA region (features, rings, CID): every connection ends with
//! `ConnectionReset`, listeners stay, and the driver goes on. A device that was removed is not
//! brought back: [`Transport::check_device`] reports it and [`Transport::release`] drops it so
//! that the kernel can finish the removal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::core::{RtEndpoint, Transport};
use super::error::{ResetCause, TransportError};
use super::stats::DriverStats;
use super::storage::{read_le32, write_header, DmaStorage, RxBufHandle, TxSeg};
use crate::device::{status, DeviceError, VsockDevice, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::dma::{DmaError, DmaRegion};
use crate::packet::{
    VsockPacket, PKT_HEADER_LEN, PKT_HEADER_SIZE, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
};
use crate::virtq::{BufferDesc, QueueError, SplitQueue, UsedElem};

/// Bytes per TX header slot (a header is 44; slots stay cache-line aligned).
pub(crate) const TX_HDR_SLOT: usize = 64;

/// Event buffers kept posted on the event queue (Linux's `virtio_vsock` keeps 8, its
/// `event_list`).
pub(crate) const EVENT_BUFFERS: u16 = 8;

/// Bytes of one event (`struct virtio_vsock_event { le32 id; }`, virtio 1.2 section 5.10.6.4).
const EVENT_LEN: u32 = 4;

/// How many recoveries [`DriverTransport`] makes within [`RECOVERY_WINDOW`] before it gives up
/// on a device that keeps failing, unless the driver config says otherwise.
pub(crate) const DEFAULT_RECOVERY_LIMIT: u32 = 3;

/// How long a device being removed gets to take the RSTs of its connections.
const FAREWELL: Duration = Duration::from_millis(100);

/// The window [`DriverConfig::recovery_limit`](crate::driver::DriverConfig) counts in.
pub(crate) const RECOVERY_WINDOW: Duration = Duration::from_secs(60);

/// The event queue (queue 2) and the buffers the device writes events into, by token.
pub(crate) struct EventQueue {
    pub(crate) q: SplitQueue,
    pub(crate) bufs: Vec<GuestAddress>,
}

impl EventQueue {
    /// A queue of [`EVENT_BUFFERS`] (at most `max`) with one 4-byte buffer per descriptor, in
    /// `dma`; nothing is posted yet.
    pub(crate) fn new(dma: &DmaRegion, max: u16, event_idx: bool) -> Result<Self, EventQueueError> {
        let size = EVENT_BUFFERS.min(max);
        // A power of two no larger than `max` (a device's maximum need not be one).
        let size = if size == 0 { 0 } else { 1 << size.ilog2() };
        if size == 0 {
            return Err(EventQueueError::NoRoom { max });
        }
        let q = SplitQueue::new(dma, size, event_idx)?;
        let bufs = (0..size)
            .map(|_| dma.alloc(EVENT_LEN as usize, 8))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(EventQueue { q, bufs })
    }

    /// Post every buffer that is not on the ring (after bring-up or a reset: all of them).
    pub(crate) fn post_all(&mut self) -> Result<(), QueueError> {
        for (token, &addr) in self.bufs.iter().enumerate() {
            self.q.add(
                &[BufferDesc {
                    addr,
                    len: EVENT_LEN,
                    writable: true,
                }],
                token as u64,
            )?;
        }
        Ok(())
    }
}

/// Why the event queue could not be made. Causes: the cause is the source (the crate docs,
/// "Errors and their causes"); bring-up turns it into text for `DeviceError::Failed`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EventQueueError {
    /// The device takes no descriptor on it.
    #[error("the device's event queue takes {max} descriptors")]
    NoRoom {
        /// The device's maximum.
        max: u16,
    },
    /// The ring could not be made.
    #[error("event queue")]
    Queue(#[from] QueueError),
    /// The buffers could not be placed.
    #[error("event buffers")]
    Dma(#[from] DmaError),
}

/// The rings and buffers of one device, as the driver's transport.
pub(crate) struct DriverTransport {
    pub(crate) dev: Box<dyn VsockDevice>,
    pub(crate) dma: Arc<DmaRegion>,
    pub(crate) rx: SplitQueue,
    pub(crate) tx: SplitQueue,
    /// The event queue, when the device has one.
    pub(crate) evq: Option<EventQueue>,
    pub(crate) storage: DmaStorage,
    /// RX buffers on the ring, by pool index (the token).
    pub(crate) rx_posted: Vec<Option<RxBufHandle>>,
    pub(crate) rx_batch: Vec<UsedElem>,
    /// One header slot per TX token.
    pub(crate) tx_hdr: Vec<GuestAddress>,
    /// The payload each in-flight TX chain points at, by token.
    pub(crate) tx_inflight: Vec<Option<TxSeg>>,
    pub(crate) tx_free: Vec<usize>,
    /// Largest RW payload of one packet.
    pub(crate) max_tx_payload: usize,
    pub(crate) waker: EventFd,
    /// The device is asked not to interrupt (busy-poll, while someone spins).
    pub(crate) polling: bool,
    pub(crate) stats: DriverStats,
    /// The features asked for at bring-up, and those negotiated: a recovery asks for the same
    /// and must get the same.
    pub(crate) requested: u64,
    pub(crate) negotiated: u64,
    /// Recoveries allowed within [`RECOVERY_WINDOW`] (0: a device error is final).
    pub(crate) recovery_limit: u32,
    /// When the recent recoveries happened (those within [`RECOVERY_WINDOW`]).
    pub(crate) recoveries: Vec<Instant>,
    /// Why the last call reset every connection (for the core to attach to each).
    pub(crate) reset_cause: Option<ResetCause>,
}

/// What bring-up hands the transport: the device's rings, the storage behind them and the RX
/// buffers already posted.
pub(crate) struct DeviceRings {
    /// The DMA region every ring and buffer lives in.
    pub(crate) dma: Arc<DmaRegion>,
    /// The receive queue, full of pool buffers.
    pub(crate) rx: SplitQueue,
    /// The transmit queue, empty.
    pub(crate) tx: SplitQueue,
    /// The event queue, its buffers posted (when the device has one).
    pub(crate) evq: Option<EventQueue>,
    /// The pools (shared with the endpoint's storage).
    pub(crate) storage: DmaStorage,
    /// The RX buffers on the ring, by pool index.
    pub(crate) rx_posted: Vec<Option<RxBufHandle>>,
    /// One header slot per TX token.
    pub(crate) tx_hdr: Vec<GuestAddress>,
    /// Largest RW payload of one TX packet.
    pub(crate) max_tx_payload: usize,
    /// The features asked for, and those negotiated.
    pub(crate) requested: u64,
    pub(crate) negotiated: u64,
}

/// How the driver wants failures handled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecoveryPolicy {
    /// Recoveries allowed within [`RECOVERY_WINDOW`].
    pub(crate) limit: u32,
}

/// Post free buffers of `storage`'s RX pool on `rx` until the ring or the pool is empty,
/// recording each in `posted` (by pool index). Returns whether any was posted.
pub(crate) fn refill_rx(
    rx: &mut SplitQueue,
    storage: &DmaStorage,
    posted: &mut [Option<RxBufHandle>],
) -> Result<bool, QueueError> {
    let mut added = false;
    while rx.num_free() > 0 {
        let Some(buf) = storage.rx_pool.alloc() else {
            break;
        };
        let index = buf.index();
        rx.add(
            &[BufferDesc {
                addr: buf.addr(),
                len: storage.rx_pool.buf_size(),
                writable: true,
            }],
            u64::from(index),
        )?;
        posted[index as usize] = Some(buf);
        added = true;
    }
    Ok(added)
}

impl DriverTransport {
    /// The transport of `dev` over `rings`; `waker` wakes the loop thread that pumps it.
    pub(crate) fn new(
        dev: Box<dyn VsockDevice>,
        rings: DeviceRings,
        waker: EventFd,
        busy_poll: bool,
        policy: RecoveryPolicy,
    ) -> Self {
        let DeviceRings {
            dma,
            rx,
            tx,
            evq,
            storage,
            rx_posted,
            tx_hdr,
            max_tx_payload,
            requested,
            negotiated,
        } = rings;
        let slots = tx_hdr.len();
        DriverTransport {
            dev,
            dma,
            rx_batch: Vec::with_capacity(usize::from(rx.size())),
            rx,
            tx,
            evq,
            storage,
            rx_posted,
            tx_inflight: (0..slots).map(|_| None).collect(),
            tx_free: (0..slots).rev().collect(),
            tx_hdr,
            max_tx_payload,
            waker,
            polling: busy_poll,
            stats: DriverStats::default(),
            requested,
            negotiated,
            recovery_limit: policy.limit,
            recoveries: Vec::new(),
            reset_cause: None,
        }
    }

    /// The counters, with the pools' gauges.
    pub(crate) fn stats(&self) -> DriverStats {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.storage.counters;
        let on_ring = self.rx_posted.iter().filter(|b| b.is_some()).count();
        DriverStats {
            tx_payload_bytes_copied: c.tx_copied.load(Relaxed),
            rx_payload_bytes_copied: c.rx_copied.load(Relaxed),
            rx_payload_bytes_copied_out: c.rx_copied_out.load(Relaxed),
            rx_buffers: self.storage.rx_pool.capacity() as u64,
            rx_buffers_on_ring: on_ring as u64,
            rx_buffers_held: self.storage.rx_pool.held().saturating_sub(on_ring) as u64,
            tx_chunks: self.storage.tx_pool.capacity() as u64,
            tx_chunks_in_use: self.storage.tx_pool.in_use() as u64,
            ..self.stats
        }
    }

    fn reap_tx(&mut self, ep: &mut RtEndpoint) -> Result<bool, TransportError> {
        let mut moved = false;
        while let Some(u) = self
            .tx
            .pop_used()
            .map_err(queue_err("tx", "reaping used buffers"))?
        {
            let count = self.tx_inflight.len();
            let slot = usize::try_from(u.token).ok().filter(|&i| i < count).ok_or(
                TransportError::UnknownToken {
                    queue: "tx",
                    token: u.token,
                    count,
                },
            )?;
            // Dropping the segment releases the payload's chunk.
            self.tx_inflight[slot] = None;
            self.tx_free.push(slot);
            moved = true;
        }
        if moved && self.storage.tx_pool.take_exhausted() {
            // A writer found the pool empty: chunks came back, let it try again.
            ep.storage_freed();
        }
        Ok(moved)
    }

    fn receive(&mut self, ep: &mut RtEndpoint, now: Instant) -> Result<bool, TransportError> {
        // Take the whole batch first: the queue has checked each id against what is in flight.
        let mut batch = std::mem::take(&mut self.rx_batch);
        while let Some(u) = self
            .rx
            .pop_used()
            .map_err(queue_err("rx", "reaping used buffers"))?
        {
            batch.push(u);
        }
        let moved = !batch.is_empty();
        let mem = self.dma.memory();
        let capacity = self.storage.rx_pool.buf_size();
        for u in batch.drain(..) {
            let count = self.rx_posted.len();
            let buf = usize::try_from(u.token)
                .ok()
                .and_then(|i| self.rx_posted.get_mut(i))
                .and_then(Option::take)
                .ok_or(TransportError::UnknownToken {
                    queue: "rx",
                    token: u.token,
                    count,
                })?;
            match VsockPacket::<()>::from_used_rx_buffer(mem, buf.addr(), capacity, u.len) {
                Ok(pkt) => {
                    // The parser checked len against the used length; the payload follows the
                    // header in this buffer and stays there.
                    let hdr = pkt.header();
                    drop(pkt);
                    let len = hdr.len as usize;
                    ep.handle_packet_with(now, &hdr, len, |rx| {
                        if let Some(rx) = rx.as_dma() {
                            rx.push(buf, PKT_HEADER_SIZE, len);
                        }
                    });
                    self.stats.rx_packets += 1;
                }
                Err(e) => {
                    // Dropping `buf` returns it to the pool.
                    log::warn!("dropping malformed rx packet from the device: {e}");
                    self.stats.bad_rx_packets += 1;
                }
            }
        }
        self.rx_batch = batch;
        let refilled = refill_rx(&mut self.rx, &self.storage, &mut self.rx_posted)
            .map_err(queue_err("rx", "posting a buffer"))?;
        if refilled {
            kick_if_wanted(&*self.dev, &mut self.rx, RX_QUEUE, &mut self.stats.kicks)?;
        }
        Ok(moved)
    }

    fn transmit(&mut self, ep: &mut RtEndpoint, now: Instant) -> Result<bool, TransportError> {
        let mut sent = false;
        let mem = self.dma.memory();
        // An RW packet needs two descriptors (header, payload).
        while self.tx.num_free() >= 2 {
            let Some(slot) = self.tx_free.pop() else {
                break;
            };
            let Some((hdr, seg)) = ep.poll_transmit_with(now, self.max_tx_payload, |h, q| {
                let seg = q
                    .and_then(|q| q.as_dma())
                    .and_then(|q| q.take_segment(h.len as usize));
                (*h, seg)
            }) else {
                self.tx_free.push(slot);
                break;
            };
            // The token is the header slot's index.
            let token = slot as u64;
            let hdr_addr = self.tx_hdr[slot];
            write_header(mem, hdr_addr, &hdr.to_bytes())?;
            let head = BufferDesc {
                addr: hdr_addr,
                len: PKT_HEADER_LEN,
                writable: false,
            };
            let r = match &seg {
                Some(s) => self.tx.add(
                    &[
                        head,
                        BufferDesc {
                            addr: s.addr,
                            len: s.len,
                            writable: false,
                        },
                    ],
                    token,
                ),
                None if hdr.len > 0 => {
                    return Err(TransportError::MissingPayload { len: hdr.len });
                }
                None => self.tx.add(&[head], token),
            };
            r.map_err(queue_err("tx", "posting a packet"))?;
            self.tx_inflight[slot] = seg;
            self.stats.tx_packets += 1;
            sent = true;
        }
        if sent {
            kick_if_wanted(&*self.dev, &mut self.tx, TX_QUEUE, &mut self.stats.kicks)?;
        }
        Ok(sent)
    }
}

impl DriverTransport {
    /// Take the event queue's events and post their buffers again. Returns whether any came.
    fn events(&mut self, ep: &mut RtEndpoint, now: Instant) -> Result<bool, TransportError> {
        let Some(evq) = self.evq.as_mut() else {
            return Ok(false);
        };
        let mem = self.dma.memory();
        let mut moved = false;
        let mut reset = false;
        while let Some(u) = evq
            .q
            .pop_used()
            .map_err(queue_err("event", "reaping used buffers"))?
        {
            moved = true;
            let count = evq.bufs.len();
            let slot = usize::try_from(u.token).ok().filter(|&i| i < count).ok_or(
                TransportError::UnknownToken {
                    queue: "event",
                    token: u.token,
                    count,
                },
            )?;
            let addr = evq.bufs[slot];
            if u.len < EVENT_LEN {
                // Linux drops an event shorter than the struct; so do we (the buffer goes back).
                log::warn!(
                    "{}: dropping an event of {} bytes (expected {EVENT_LEN})",
                    self.dev.name(),
                    u.len
                );
                self.stats.bad_events += 1;
            } else {
                match read_le32(mem, addr)? {
                    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET => reset = true,
                    other => {
                        log::warn!("{}: ignoring unknown event id {other}", self.dev.name());
                        self.stats.bad_events += 1;
                    }
                }
            }
            evq.q
                .add(
                    &[BufferDesc {
                        addr,
                        len: EVENT_LEN,
                        writable: true,
                    }],
                    u.token,
                )
                .map_err(queue_err("event", "posting a buffer"))?;
        }
        if moved {
            kick_if_wanted(&*self.dev, &mut evq.q, EVENT_QUEUE, &mut self.stats.kicks)?;
        }
        if reset {
            self.stats.transport_resets += 1;
            let cid = self.read_cid(ep)?;
            log::warn!(
                "{}: TRANSPORT_RESET (guest_cid {cid}): every connection is reset",
                self.dev.name()
            );
            ep.handle_transport_reset(now, Some(cid));
            self.reset_cause = Some(ResetCause::TransportReset {
                device: self.dev.name(),
                cid,
            });
        }
        Ok(moved)
    }

    /// The device's `guest_cid`, checked.
    fn read_cid(&self, ep: &RtEndpoint) -> Result<u64, TransportError> {
        let name = self.dev.name();
        let cid = self
            .dev
            .guest_cid()
            .map_err(|source| TransportError::ConfigRead {
                device: name.clone(),
                source,
            })?;
        if !valid_guest_cid(cid) {
            return Err(TransportError::InvalidGuestCid {
                device: name,
                old: ep.local_cid(),
                new: cid,
            });
        }
        Ok(cid)
    }

    /// Take every buffer back from a device that was reset: nothing is in flight afterwards.
    fn reclaim(&mut self) {
        self.rx.reset();
        self.tx.reset();
        if let Some(evq) = self.evq.as_mut() {
            evq.q.reset();
        }
        self.rx_posted.iter_mut().for_each(|b| *b = None);
        self.tx_inflight.iter_mut().for_each(|s| *s = None);
        self.tx_free = (0..self.tx_hdr.len()).rev().collect();
    }

    /// Reset the device and bring it up again on the same memory and rings: features (the same
    /// as before), DMA mapping, queues, DRIVER_OK, then `guest_cid`.
    fn reinit(&mut self) -> Result<u64, DeviceError> {
        self.dev.reset()?;
        self.reclaim();
        self.dev.restart()?;
        let got = self.dev.negotiate(self.requested)?;
        if got != self.negotiated {
            return Err(DeviceError::Failed(format!(
                "after a reset the device negotiated features {got:#x}, not {:#x} as before",
                self.negotiated
            )));
        }
        self.dev.map_dma(&self.dma)?;
        self.dev.setup_queue(RX_QUEUE, &self.rx.layout())?;
        self.dev.setup_queue(TX_QUEUE, &self.tx.layout())?;
        let queue = |e: QueueError| DeviceError::Failed(format!("rings after a reset: {e}"));
        if let Some(evq) = self.evq.as_mut() {
            self.dev.setup_queue(EVENT_QUEUE, &evq.q.layout())?;
            evq.post_all().map_err(queue)?;
        }
        refill_rx(&mut self.rx, &self.storage, &mut self.rx_posted).map_err(queue)?;
        if self.polling {
            self.rx.disable_cb();
            self.tx.disable_cb();
        }
        self.dev.activate()?;
        if self.rx.kick_prepare().map_err(queue)? {
            self.dev.kick(RX_QUEUE)?;
        }
        if let Some(evq) = self.evq.as_mut() {
            if evq.q.kick_prepare().map_err(queue)? {
                self.dev.kick(EVENT_QUEUE)?;
            }
        }
        self.dev.guest_cid()
    }
}

/// What stands in for a device the driver let go of after it was removed: every call fails.
#[derive(Debug)]
struct ReleasedDevice {
    name: String,
}

impl ReleasedDevice {
    fn gone(&self) -> DeviceError {
        DeviceError::Removed {
            device: self.name.clone(),
            how: "the driver has let go of it".into(),
        }
    }
}

impl VsockDevice for ReleasedDevice {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn offered_features(&self) -> u64 {
        0
    }
    fn negotiate(&mut self, _features: u64) -> Result<u64, DeviceError> {
        Err(self.gone())
    }
    fn guest_cid(&self) -> Result<u64, DeviceError> {
        Err(self.gone())
    }
    fn num_queues(&self) -> u16 {
        0
    }
    fn max_queue_size(&self, _index: u16) -> u16 {
        0
    }
    fn dma_options(&self) -> crate::dma::DmaOptions {
        crate::dma::DmaOptions::default()
    }
    fn map_dma(&mut self, _dma: &DmaRegion) -> Result<(), DeviceError> {
        Err(self.gone())
    }
    fn setup_queue(
        &mut self,
        _index: u16,
        _layout: &crate::virtq::QueueLayout,
    ) -> Result<(), DeviceError> {
        Err(self.gone())
    }
    fn activate(&mut self) -> Result<(), DeviceError> {
        Err(self.gone())
    }
    fn kick(&self, _index: u16) -> Result<(), DeviceError> {
        Err(self.gone())
    }
    fn call_fd(&self, _index: u16) -> Result<&EventFd, DeviceError> {
        Err(self.gone())
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn check_present(&self) -> Result<(), DeviceError> {
        Err(self.gone())
    }
}

/// Whether `cid` may be a guest's CID: 0, 1 and 2 are the hypervisor, local and host, and
/// `u32::MAX` is `VMADDR_CID_ANY`; the upper 32 bits are reserved (virtio 1.2 section 5.10.4).
pub(crate) fn valid_guest_cid(cid: u64) -> bool {
    (3..u64::from(u32::MAX)).contains(&cid)
}

/// The name of queue `index` in errors.
fn queue_name(index: u16) -> &'static str {
    match index {
        RX_QUEUE => "rx",
        TX_QUEUE => "tx",
        _ => "event",
    }
}

/// Kick the device for queue `q` (index `index`) if it asked to be notified of what was just
/// added (EVENT_IDX), counting the kick.
fn kick_if_wanted(
    dev: &dyn VsockDevice,
    q: &mut SplitQueue,
    index: u16,
    kicks: &mut u64,
) -> Result<(), TransportError> {
    let queue = queue_name(index);
    if q.kick_prepare()
        .map_err(queue_err(queue, "preparing a notification"))?
    {
        dev.kick(index)
            .map_err(|source| TransportError::Kick { queue, source })?;
        *kicks += 1;
    }
    Ok(())
}

/// A queue error while doing `op` on `queue`, as a transport error.
fn queue_err(queue: &'static str, op: &'static str) -> impl FnOnce(QueueError) -> TransportError {
    move |source| TransportError::Queue { queue, op, source }
}

impl Transport for DriverTransport {
    fn pump(&mut self, ep: &mut RtEndpoint, now: Instant) -> Result<bool, TransportError> {
        let mut moved = self.reap_tx(ep)?;
        moved |= self.receive(ep, now)?;
        moved |= self.events(ep, now)?;
        moved |= self.transmit(ep, now)?;
        if !self.polling {
            // Re-arm interrupts; a `false` means used buffers slipped in meanwhile.
            let rx_quiet = self
                .rx
                .enable_cb()
                .map_err(queue_err("rx", "re-arming interrupts"))?;
            let tx_quiet = self
                .tx
                .enable_cb()
                .map_err(queue_err("tx", "re-arming interrupts"))?;
            moved |= !(rx_quiet && tx_quiet);
        }
        if let Some(evq) = self.evq.as_mut() {
            // The event queue always interrupts (busy-poll spins on rx and tx only).
            moved |= !evq
                .q
                .enable_cb()
                .map_err(queue_err("event", "re-arming interrupts"))?;
        }
        Ok(moved)
    }

    fn wake(&self) {
        let _ = self.waker.write(1);
    }

    fn config_changed(&mut self, ep: &mut RtEndpoint, now: Instant) -> Result<(), TransportError> {
        let name = self.dev.name();
        let device_status = self
            .dev
            .status()
            .map_err(|source| TransportError::ConfigRead {
                device: name.clone(),
                source,
            })?;
        if let Some(s) = device_status.filter(|s| s & status::NEEDS_RESET != 0) {
            return Err(TransportError::NeedsReset {
                device: name,
                status: s,
            });
        }
        let cid = self.read_cid(ep)?;
        let old = ep.local_cid();
        if cid == old {
            log::debug!("{name}: config interrupt, guest_cid still {cid}");
            return Ok(());
        }
        log::warn!("{name}: guest_cid changed from {old} to {cid}: every connection is reset");
        ep.handle_transport_reset(now, Some(cid));
        self.reset_cause = Some(ResetCause::CidChanged {
            device: name,
            old,
            new: cid,
        });
        Ok(())
    }

    fn shutdown(&mut self) {
        if let Err(e) = self.dev.reset() {
            log::warn!("{}: reset failed: {e}", self.dev.name());
        }
        // The device no longer owns any buffer: reclaim them (nothing is in flight now), and
        // give their memory back to the pools.
        self.reclaim();
    }

    fn recover(
        &mut self,
        ep: &mut RtEndpoint,
        now: Instant,
        e: TransportError,
    ) -> Result<(), TransportError> {
        if matches!(e, TransportError::Removed { .. }) || self.recovery_limit == 0 {
            return Err(e);
        }
        self.recoveries
            .retain(|&t| now.saturating_duration_since(t) < RECOVERY_WINDOW);
        if self.recoveries.len() >= self.recovery_limit as usize {
            log::error!(
                "{}: {} recoveries within {RECOVERY_WINDOW:?}: giving up",
                self.dev.name(),
                self.recoveries.len()
            );
            return Err(e);
        }
        let name = self.dev.name();
        log::warn!(
            "{name}: {}: resetting the device and bringing it up again",
            super::error::error_chain(&e)
        );
        // Every connection ends first: their queues hold TX memory the rings are about to forget.
        ep.handle_transport_reset(now, None);
        let cid = match self.reinit() {
            Ok(cid) => cid,
            Err(source) => {
                return Err(TransportError::Recovery {
                    device: name,
                    cause: Box::new(e),
                    source,
                })
            }
        };
        if !valid_guest_cid(cid) {
            return Err(TransportError::InvalidGuestCid {
                device: name,
                old: ep.local_cid(),
                new: cid,
            });
        }
        // No connection is left: this takes the CID the device has now.
        ep.handle_transport_reset(now, Some(cid));
        self.recoveries.push(now);
        self.stats.recoveries += 1;
        log::warn!("{name}: up again, guest_cid {cid}");
        self.reset_cause = Some(ResetCause::Recovered {
            device: name,
            cause: e,
        });
        Ok(())
    }

    fn check_device(&mut self, removal_signalled: bool) -> Result<(), TransportError> {
        let name = self.dev.name();
        if removal_signalled {
            return Err(TransportError::Removed {
                source: DeviceError::Removed {
                    device: name,
                    how: "the kernel asked for it back (unbind or unplug)".into(),
                },
            });
        }
        self.dev
            .check_present()
            .map_err(|source| TransportError::Removed { source })
    }

    fn farewell(&mut self, ep: &mut RtEndpoint, now: Instant) {
        let deadline = Instant::now() + FAREWELL;
        // Once, then until the device has returned every TX chain (it read the RSTs) or the
        // time is up; a device that is gone already returns nothing and we wait it out.
        while self.pump(ep, now).is_ok() && self.tx.in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn take_reset_cause(&mut self) -> Option<ResetCause> {
        self.reset_cause.take()
    }

    fn release(&mut self) {
        let name = self.dev.name();
        // Dropping the device closes its descriptors: a `vdpa dev del` or a VFIO unbind waiting
        // for them can finish.
        self.dev = Box::new(ReleasedDevice { name });
    }

    fn set_polling(&mut self, polling: bool) {
        self.polling = polling;
        if polling {
            self.rx.disable_cb();
            self.tx.disable_cb();
        } else {
            // What is already used is picked up by the caller's next pump.
            let _ = self.rx.enable_cb();
            let _ = self.tx.enable_cb();
        }
    }

    fn driver_stats(&self) -> Option<DriverStats> {
        Some(self.stats())
    }
}

impl std::fmt::Debug for DriverTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverTransport")
            .field("dev", &self.dev)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}
