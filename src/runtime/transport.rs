// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The driver's transport: the rings and buffers of one device, joined to the protocol core.
//!
//! Each [`Transport::pump`]:
//! 1. reaps TX completions (the buffers return to the free pool);
//! 2. turns every used RX buffer into a [`VsockPacket`] (bounded by the used length the device
//!    reported), feeds header and payload to the protocol core and reposts the buffer;
//! 3. fires due timers;
//! 4. asks the protocol core for packets to send and builds each in a free TX buffer through the
//!    same `VsockPacket` type's setters, then kicks the device if it wants a notification.
//!
//! A config interrupt ([`VsockDevice::config_fd`]) makes the loop call
//! [`Transport::config_changed`], which re-reads `guest_cid`; a new CID resets every connection
//! (as the event queue's TRANSPORT_RESET does) and becomes ours.

use std::sync::Arc;
use std::time::Instant;

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::core::Transport;
use super::error::TransportError;
use crate::device::{VsockDevice, RX_QUEUE, TX_QUEUE};
use crate::dma::DmaRegion;
use crate::packet::{Error as PacketError, VsockPacket, PKT_HEADER_LEN, PKT_HEADER_SIZE};
use crate::proto::Endpoint;
use crate::virtq::{BufferDesc, QueueError, SplitQueue};

/// Counters of the driver's data path.
#[derive(Debug, Default, Clone, Copy)]
pub struct DriverStats {
    /// RX buffers the device returned that failed validation (dropped).
    pub bad_rx_packets: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Device notifications sent.
    pub kicks: u64,
}

/// The rings and buffers of one device, as the driver's transport.
pub(crate) struct DriverTransport {
    dev: Box<dyn VsockDevice>,
    dma: Arc<DmaRegion>,
    rx: SplitQueue,
    tx: SplitQueue,
    rx_buf: Vec<GuestAddress>,
    tx_buf: Vec<GuestAddress>,
    tx_free: Vec<u64>,
    rx_batch: Vec<crate::virtq::UsedElem>,
    /// Payload staging between DMA buffers and the protocol core (one packet).
    scratch: Vec<u8>,
    rx_buf_size: u32,
    tx_buf_size: u32,
    waker: EventFd,
    busy_poll: bool,
    stats: DriverStats,
}

/// What bring-up hands the transport: the device's rings and the buffers on them.
pub(crate) struct DeviceRings {
    /// The DMA region every ring and buffer lives in.
    pub(crate) dma: Arc<DmaRegion>,
    /// The receive queue, every RX buffer posted on it.
    pub(crate) rx: SplitQueue,
    /// The transmit queue, empty.
    pub(crate) tx: SplitQueue,
    /// The RX buffer behind each token.
    pub(crate) rx_buf: Vec<GuestAddress>,
    /// The TX buffer behind each token (all free).
    pub(crate) tx_buf: Vec<GuestAddress>,
    /// Bytes per RX buffer, header included.
    pub(crate) rx_buf_size: u32,
    /// Bytes per TX buffer, header included.
    pub(crate) tx_buf_size: u32,
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
            rx_buf,
            tx_buf,
            rx_buf_size,
            tx_buf_size,
        } = rings;
        let tx_free = (0..tx_buf.len() as u64).collect();
        DriverTransport {
            dev,
            dma,
            rx_batch: Vec::with_capacity(rx_buf.len()),
            rx,
            tx,
            rx_buf,
            tx_buf,
            tx_free,
            scratch: vec![0; rx_buf_size.max(tx_buf_size) as usize],
            rx_buf_size,
            tx_buf_size,
            waker,
            busy_poll,
            stats: DriverStats::default(),
        }
    }

    fn reap_tx(&mut self) -> Result<bool, TransportError> {
        let mut moved = false;
        while let Some(u) = self
            .tx
            .pop_used()
            .map_err(queue_err("tx", "reaping used buffers"))?
        {
            self.tx_free.push(u.token);
            moved = true;
        }
        Ok(moved)
    }

    fn receive(&mut self, ep: &mut Endpoint, now: Instant) -> Result<bool, TransportError> {
        // Take the whole batch first, so a device that reports one buffer twice is caught
        // before the buffer is reposted under the same id.
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
        for u in batch.drain(..) {
            let addr = token_addr("rx", &self.rx_buf, u.token)?;
            match VsockPacket::<()>::from_used_rx_buffer(mem, addr, self.rx_buf_size, u.len) {
                Ok(pkt) => {
                    // One volatile copy out of DMA memory: the device is untrusted and could
                    // still write there, so no plain `&[u8]` may alias it.
                    let hdr = pkt.header();
                    let payload = &mut self.scratch[..hdr.len as usize];
                    match pkt.read_data(payload) {
                        Ok(n) => {
                            ep.handle_packet(now, &hdr, &payload[..n]);
                            self.stats.rx_packets += 1;
                        }
                        Err(e) => {
                            log::warn!("rx payload unreadable: {e}");
                            self.stats.bad_rx_packets += 1;
                        }
                    }
                }
                Err(e) => {
                    log::warn!("dropping malformed rx packet from the device: {e}");
                    self.stats.bad_rx_packets += 1;
                }
            }
            self.rx
                .add(
                    &[BufferDesc {
                        addr,
                        len: self.rx_buf_size,
                        writable: true,
                    }],
                    u.token,
                )
                .map_err(queue_err("rx", "reposting a buffer"))?;
        }
        self.rx_batch = batch;
        if moved
            && self
                .rx
                .kick_prepare()
                .map_err(queue_err("rx", "deciding whether to kick"))?
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

    fn transmit(&mut self, ep: &mut Endpoint, now: Instant) -> Result<bool, TransportError> {
        let mut sent = false;
        let room = (self.tx_buf_size as usize) - PKT_HEADER_SIZE;
        while let Some(token) = self.tx_free.pop() {
            let addr = token_addr("tx", &self.tx_buf, token)?;
            let Some(hdr) = ep.poll_transmit(now, &mut self.scratch[..room]) else {
                self.tx_free.push(token);
                break;
            };
            let mut pkt =
                VsockPacket::<()>::from_tx_buffer(self.dma.memory(), addr, self.tx_buf_size)
                    .map_err(packet_err("tx buffer: laying out a packet"))?;
            pkt.set_header(&hdr);
            pkt.write_data(&self.scratch[..hdr.len as usize])
                .map_err(packet_err("tx buffer: writing the payload"))?;
            self.tx
                .add(
                    &[BufferDesc {
                        addr,
                        len: PKT_HEADER_LEN + hdr.len,
                        writable: false,
                    }],
                    token,
                )
                .map_err(queue_err("tx", "posting a packet"))?;
            self.stats.tx_packets += 1;
            sent = true;
        }
        if sent
            && self
                .tx
                .kick_prepare()
                .map_err(queue_err("tx", "deciding whether to kick"))?
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

/// The buffer behind a token `queue` returned (tokens are indexes we handed to it ourselves).
fn token_addr(
    queue: &'static str,
    bufs: &[GuestAddress],
    token: u64,
) -> Result<GuestAddress, TransportError> {
    usize::try_from(token)
        .ok()
        .and_then(|i| bufs.get(i).copied())
        .ok_or(TransportError::UnknownToken {
            queue,
            token,
            count: bufs.len(),
        })
}

/// A queue error while doing `op` on `queue`, as a transport error.
fn queue_err(queue: &'static str, op: &'static str) -> impl FnOnce(QueueError) -> TransportError {
    move |source| TransportError::Queue { queue, op, source }
}

/// A packet error while doing `what`, as a transport error.
fn packet_err(what: &'static str) -> impl FnOnce(PacketError) -> TransportError {
    move |source| TransportError::Packet { what, source }
}

impl Transport for DriverTransport {
    fn pump(&mut self, ep: &mut Endpoint, now: Instant) -> Result<bool, TransportError> {
        let mut moved = self.reap_tx()?;
        moved |= self.receive(ep, now)?;
        if ep.poll_timeout().is_some_and(|t| t <= now) {
            ep.handle_timeout(now);
        }
        moved |= self.transmit(ep, now)?;
        if !self.busy_poll {
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

    fn config_changed(&mut self, ep: &mut Endpoint, now: Instant) -> Result<(), TransportError> {
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
        // The device no longer owns any buffer: reclaim them (nothing is in flight now).
        self.rx.reset();
        self.tx.reset();
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
