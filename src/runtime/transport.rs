//! The driver's transport: a device's rings, fed from and into DMA storage.
//!
//! Each [`Transport::pump`]:
//! 1. reaps TX completions: each returned descriptor chain drops its [`TxSeg`], which gives the
//!    payload's chunk back to the pool once nothing else holds it;
//! 2. turns every used RX buffer into a [`VsockPacket`] (the header read once into a private
//!    copy, bounded by the used length the device reported) and hands its payload, where it
//!    lies, to the protocol core: kept, the buffer joins its connection's receive queue;
//!    dropped, it goes straight back to the pool. The ring is then refilled from the pool;
//! 3. fires due timers;
//! 4. asks the protocol core for packets: each is a header in this token's header slot plus,
//!    for RW, one descriptor over the payload's chunk (no copy), and the device is kicked once
//!    for the batch if it wants a notification.

use std::sync::Arc;
use std::time::Instant;

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::core::{RtEndpoint, Transport};
use super::error::TransportError;
use super::stats::DriverStats;
use super::storage::{write_header, DmaStorage, RxBufHandle, TxSeg};
use crate::device::{VsockDevice, RX_QUEUE, TX_QUEUE};
use crate::dma::DmaRegion;
use crate::packet::{VsockPacket, PKT_HEADER_LEN, PKT_HEADER_SIZE};
use crate::virtq::{BufferDesc, QueueError, SplitQueue, UsedElem};

/// Bytes per TX header slot (a header is 44; slots stay cache-line aligned).
pub(crate) const TX_HDR_SLOT: usize = 64;

/// The rings and buffers of one device, as the driver's transport.
pub(crate) struct DriverTransport {
    pub(crate) dev: Box<dyn VsockDevice>,
    pub(crate) dma: Arc<DmaRegion>,
    pub(crate) rx: SplitQueue,
    pub(crate) tx: SplitQueue,
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
    /// The pools (shared with the endpoint's storage).
    pub(crate) storage: DmaStorage,
    /// The RX buffers on the ring, by pool index.
    pub(crate) rx_posted: Vec<Option<RxBufHandle>>,
    /// One header slot per TX token.
    pub(crate) tx_hdr: Vec<GuestAddress>,
    /// Largest RW payload of one TX packet.
    pub(crate) max_tx_payload: usize,
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
    ) -> Self {
        let DeviceRings {
            dma,
            rx,
            tx,
            storage,
            rx_posted,
            tx_hdr,
            max_tx_payload,
        } = rings;
        let slots = tx_hdr.len();
        DriverTransport {
            dev,
            dma,
            rx_batch: Vec::with_capacity(usize::from(rx.size())),
            rx,
            tx,
            storage,
            rx_posted,
            tx_inflight: (0..slots).map(|_| None).collect(),
            tx_free: (0..slots).rev().collect(),
            tx_hdr,
            max_tx_payload,
            waker,
            polling: busy_poll,
            stats: DriverStats::default(),
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
        if refilled
            && self
                .rx
                .kick_prepare()
                .map_err(queue_err("rx", "preparing a notification"))?
        {
            self.dev
                .kick(RX_QUEUE)
                .map_err(|source| TransportError::Kick {
                    queue: "rx",
                    source,
                })?;
            self.stats.kicks += 1;
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
        if sent
            && self
                .tx
                .kick_prepare()
                .map_err(queue_err("tx", "preparing a notification"))?
        {
            self.dev
                .kick(TX_QUEUE)
                .map_err(|source| TransportError::Kick {
                    queue: "tx",
                    source,
                })?;
            self.stats.kicks += 1;
        }
        Ok(sent)
    }
}

/// Whether `cid` may be a guest's CID: 0, 1 and 2 are the hypervisor, local and host, and
/// `u32::MAX` is `VMADDR_CID_ANY`; the upper 32 bits are reserved (virtio 1.2 section 5.10.4).
pub(crate) fn valid_guest_cid(cid: u64) -> bool {
    (3..u64::from(u32::MAX)).contains(&cid)
}

/// A queue error while doing `op` on `queue`, as a transport error.
fn queue_err(queue: &'static str, op: &'static str) -> impl FnOnce(QueueError) -> TransportError {
    move |source| TransportError::Queue { queue, op, source }
}

impl Transport for DriverTransport {
    fn pump(&mut self, ep: &mut RtEndpoint, now: Instant) -> Result<bool, TransportError> {
        let mut moved = self.reap_tx(ep)?;
        moved |= self.receive(ep, now)?;
        if ep.poll_timeout().is_some_and(|t| t <= now) {
            ep.handle_timeout(now);
        }
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
        Ok(moved)
    }

    fn wake(&self) {
        let _ = self.waker.write(1);
    }

    fn config_changed(&mut self, ep: &mut RtEndpoint, now: Instant) -> Result<(), TransportError> {
        let name = self.dev.name();
        let cid = self
            .dev
            .guest_cid()
            .map_err(|source| TransportError::ConfigRead {
                device: name.clone(),
                source,
            })?;
        let old = ep.local_cid();
        if cid == old {
            log::debug!("{name}: config interrupt, guest_cid still {cid}");
            return Ok(());
        }
        if !valid_guest_cid(cid) {
            return Err(TransportError::InvalidGuestCid {
                device: name,
                old,
                new: cid,
            });
        }
        log::warn!("{name}: guest_cid changed from {old} to {cid}: every connection is reset");
        ep.handle_transport_reset(now, Some(cid));
        Ok(())
    }

    fn shutdown(&mut self) {
        if let Err(e) = self.dev.reset() {
            log::warn!("{}: reset failed: {e}", self.dev.name());
        }
        // The device no longer owns any buffer: reclaim them (nothing is in flight now), and
        // give their memory back to the pools.
        self.rx.reset();
        self.tx.reset();
        self.rx_posted.iter_mut().for_each(|b| *b = None);
        self.tx_inflight.iter_mut().for_each(|s| *s = None);
        self.tx_free = (0..self.tx_hdr.len()).rev().collect();
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
