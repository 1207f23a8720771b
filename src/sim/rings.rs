// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device half of the simulated device's rings: the driver's TX chains consumed and its RX
//! buffers filled through virtio-queue's device-side `Queue`, every chain parsed with
//! `VsockPacket` as a vhost-user device would, and the hostile test mode's bogus used entries.

use std::sync::atomic::Ordering;
use std::time::Instant;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Le32};
use vmm_sys_util::eventfd::EventFd;

use super::{Hostile, SimStats};
use crate::packet::{VsockPacket, PKT_HEADER_LEN, PKT_HEADER_SIZE, VMADDR_CID_HOST};
use crate::runtime::{RtEndpoint, TransportError};

/// Device-side state while the device runs.
pub(super) struct SimRings {
    pub(super) mem: GuestMemoryMmap<()>,
    pub(super) rx: Queue,
    pub(super) tx: Queue,
    /// The event queue and its used-buffer interrupt, when the driver set it up.
    evq: Option<(Queue, EventFd)>,
    call: [EventFd; 2],
    hostile: Option<Hostile>,
    /// The last `device_rx` ran out of RX buffers (it may still have packets to deliver).
    pub(super) rx_starved: bool,
    /// TX chains were returned and their interrupt not raised yet (`notify_tx`).
    tx_used: bool,
    /// RX chains were used by `device_tx` (an echo's reply) and their interrupt not raised
    /// yet: `device_rx` raises it with its own.
    rx_used: bool,
}

impl SimRings {
    /// The device half of `rx` and `tx` over `mem`; `call` are the used-buffer interrupts
    /// (rx, tx), `hostile` the one bogus thing to do on the first RX delivery.
    pub(super) fn new(
        mem: GuestMemoryMmap<()>,
        rx: Queue,
        tx: Queue,
        evq: Option<(Queue, EventFd)>,
        call: [EventFd; 2],
        hostile: Option<Hostile>,
    ) -> Self {
        SimRings {
            mem,
            rx,
            tx,
            evq,
            call,
            hostile,
            rx_starved: false,
            tx_used: false,
            rx_used: false,
        }
    }
}

/// Why [`SimRings::send_event`] could not deliver an event. No source: [`EventError::Write`]
/// holds its cause turned into text.
#[derive(Debug, thiserror::Error)]
pub(super) enum EventError {
    /// The driver has no event queue (or the device is not running).
    #[error("the driver set up no event queue")]
    NoQueue,
    /// Every event buffer is used: the driver has not posted one again.
    #[error("the driver has no event buffer posted")]
    NoBuffer,
    /// The driver's event buffer is read-only or shorter than an event.
    #[error("the driver's event buffer is not a writable 4-byte buffer")]
    BadBuffer,
    /// The event could not be written, or the chain returned.
    #[error("writing the event failed: {0}")]
    Write(String),
}

impl SimRings {
    /// Put event `id` (`struct virtio_vsock_event`, virtio 1.2 section 5.10.6.4) into the
    /// driver's next event buffer and interrupt, as QEMU's vhost-vsock does after a migration.
    pub(super) fn send_event(&mut self, id: u32) -> Result<(), EventError> {
        let (q, call) = self.evq.as_mut().ok_or(EventError::NoQueue)?;
        let chain = q
            .pop_descriptor_chain(&self.mem)
            .ok_or(EventError::NoBuffer)?;
        let head = chain.head_index();
        let desc = chain.clone().next().ok_or(EventError::BadBuffer)?;
        if !desc.is_write_only() || desc.len() < 4 {
            return Err(EventError::BadBuffer);
        }
        self.mem
            .write_obj(Le32::from(id), desc.addr())
            .map_err(|e| EventError::Write(e.to_string()))?;
        q.add_used(&self.mem, head, 4)
            .map_err(|e| EventError::Write(e.to_string()))?;
        if q.needs_notification(&self.mem).unwrap_or(true) {
            let _ = call.write(1);
        }
        Ok(())
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

impl SimRings {
    /// Consume the driver's TX chains into the host endpoint.
    pub(super) fn device_tx(
        &mut self,
        ep: &mut RtEndpoint,
        now: Instant,
        guest_cid: u64,
        max_payload: u32,
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
                        // An echo that keeps up is answered now, into an RX buffer taken for
                        // it: its bytes are copied once, from this buffer into that one.
                        let len = (hdr.len as usize).min(pkt.data_len());
                        let mut reply = None;
                        if self.hostile.is_none() && len == hdr.len as usize && ep.echo_ready(&hdr)
                        {
                            if let Some(mut chain) = self.rx.pop_descriptor_chain(&self.mem) {
                                let head = chain.head_index();
                                match VsockPacket::from_rx_virtq_chain(
                                    &self.mem,
                                    &mut chain,
                                    max_payload,
                                ) {
                                    Ok(p) => reply = Some((head, p)),
                                    // `device_rx` reports it and returns it, in its turn.
                                    Err(_) => self.rx.go_to_previous_position(),
                                }
                            }
                        }
                        let room = reply
                            .as_ref()
                            .map_or(0, |(_, p)| p.data_len().min(max_payload as usize));
                        // Otherwise straight from the driver's buffer into the host's queue:
                        // one copy here, one more into an RX buffer when it goes back.
                        let mut failed = None;
                        let mut echo_failed = None;
                        let echoed = ep.handle_packet_or_echo_with(
                            now,
                            &hdr,
                            len,
                            |rx| {
                                if let Some(q) = rx.as_heap() {
                                    q.push_with(len, |off, piece| {
                                        if let Err(e) = pkt.read_data_at(off, piece) {
                                            failed = Some(e);
                                        }
                                    });
                                    stats.payload_bytes_copied += len as u64;
                                }
                            },
                            room,
                            |h| {
                                if let Some((_, p)) = &reply {
                                    echo_failed = Self::copy_payload(p, &pkt, h.len as usize).err();
                                }
                                *h
                            },
                        );
                        let failure = failed
                            .map(|e| ("sim: reading a tx payload", e))
                            .or(echo_failed.map(|e| ("sim: echoing a tx payload", e)));
                        if let Some((what, source)) = failure {
                            return Err(TransportError::Packet { what, source });
                        }
                        match (echoed, reply) {
                            (Some(h), Some((head, mut p))) => {
                                p.set_header(&h);
                                drop(p);
                                self.rx
                                    .add_used(&self.mem, head, PKT_HEADER_LEN + h.len)
                                    .map_err(add_used_err("rx", head))?;
                                self.rx_used = true;
                                stats.rx_packets += 1;
                                stats.echoed_bytes += u64::from(h.len);
                                stats.payload_bytes_copied += u64::from(h.len);
                            }
                            // Not echoed after all: the buffer goes back for `device_rx`.
                            (None, Some(_)) => self.rx.go_to_previous_position(),
                            _ => {}
                        }
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
        // Notified by `notify_tx`, after the replies this may cause are delivered: one wake-up
        // of the driver for both, as a device that batches its interrupts gives.
        self.tx_used |= used_any;
        Ok(used_any)
    }

    /// Raise the TX used-buffer interrupt for the chains `device_tx` returned, if the driver
    /// asked for one.
    pub(super) fn notify_tx(&mut self) {
        if std::mem::take(&mut self.tx_used)
            && self.tx.needs_notification(&self.mem).unwrap_or(true)
        {
            let _ = self.call[1].write(1);
        }
    }

    /// Deliver the host endpoint's packets into the driver's RX buffers.
    pub(super) fn device_rx(
        &mut self,
        ep: &mut RtEndpoint,
        now: Instant,
        max_payload: u32,
        stats: &mut SimStats,
    ) -> Result<bool, TransportError> {
        let mut used_any = std::mem::take(&mut self.rx_used);
        let mut hostile_notify = false;
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
            // Straight from the host's queue into the driver's buffer: one copy.
            let mut failed = None;
            let sent = ep.poll_transmit_with(now, room, |h, q| {
                if let Some(q) = q.and_then(|q| q.as_heap()) {
                    q.take_with(h.len as usize, |off, piece| {
                        if let Err(e) = pkt.write_data_at(off, piece) {
                            failed = Some(e);
                        }
                    });
                    stats.payload_bytes_copied += u64::from(h.len);
                }
                *h
            });
            let Some(hdr) = sent else {
                // Nothing to send: give the chain back to the avail ring for later.
                self.rx.go_to_previous_position();
                self.rx_starved = false;
                break;
            };
            if let Some(source) = failed {
                return Err(TransportError::Packet {
                    what: "sim: writing an rx payload",
                    source,
                });
            }
            pkt.set_header(&hdr);
            let used_len = PKT_HEADER_LEN + hdr.len;
            let capacity = u32::try_from(PKT_HEADER_SIZE + pkt.data_len()).unwrap_or(u32::MAX);
            drop(pkt);
            match self.hostile.take() {
                None => self
                    .rx
                    .add_used(&self.mem, head, used_len)
                    .map_err(add_used_err("rx", head))?,
                Some(h) => {
                    self.misbehave(h, head, used_len, capacity)?;
                    // Its raw stores bypass `add_used`, so `needs_notification` would count
                    // nothing added and stay silent: a device that publishes used entries
                    // notifies, whatever it wrote in them.
                    hostile_notify = true;
                }
            }
            stats.rx_packets += 1;
            used_any = true;
        }
        if hostile_notify || (used_any && self.rx.needs_notification(&self.mem).unwrap_or(true)) {
            let _ = self.call[0].write(1);
        }
        Ok(used_any)
    }

    /// Copy the first `n` payload bytes of `src` into the payload of `dst` (fewer than `n` is an
    /// error: the caller made sure `dst` has room), piece by piece wherever either's buffers end.
    fn copy_payload<B: vm_memory::bitmap::BitmapSlice>(
        dst: &VsockPacket<'_, B>,
        src: &VsockPacket<'_, B>,
        n: usize,
    ) -> Result<(), crate::packet::Error> {
        let mut done = 0;
        let mut dst_pieces = dst.data_slices();
        let mut d = dst_pieces.next();
        let mut d_off = 0;
        for s in src.data_slices() {
            let mut s_off = 0;
            while s_off < s.len() && done < n {
                let Some(dp) = d else {
                    break;
                };
                if d_off == dp.len() {
                    d = dst_pieces.next();
                    d_off = 0;
                    continue;
                }
                let k = (s.len() - s_off).min(dp.len() - d_off).min(n - done);
                crate::copy::between_volatile(dp, d_off, s, s_off, k)
                    .map_err(crate::packet::Error::InvalidVolatileAccess)?;
                s_off += k;
                d_off += k;
                done += k;
            }
        }
        if done < n {
            return Err(crate::packet::Error::DescriptorLengthTooSmall {
                expected: n as u64,
                found: done as u64,
            });
        }
        Ok(())
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
