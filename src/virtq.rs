// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The driver half of a split virtqueue (virtio 1.2 section 2.7).
//!
//! Read virtio 1.2 sections 2.7.1-2.7.14 first. A split virtqueue is three areas in DMA memory:
//!
//! - the **descriptor table** (`size` × 16-byte [`RawDescriptor`]s, written by us),
//! - the **available ring** (`flags`, `idx`, `ring[size]`, `used_event`; written by us),
//! - the **used ring** (`flags`, `idx`, `ring[size]` of [`VirtqUsedElem`], `avail_event`;
//!   written by the device).
//!
//! The driver posts a chain of buffers with [`SplitQueue::add`], decides with
//! [`SplitQueue::kick_prepare`] whether the device needs a notification, and collects finished
//! chains with [`SplitQueue::pop_used`]. [`SplitQueue::disable_cb`] / [`SplitQueue::enable_cb`]
//! suppress and re-arm used-buffer notifications (interrupts).
//!
//! The device is **untrusted**. Everything it writes (used `idx`, element `id` and `len`) is
//! validated against state that only the driver can see: the free list and the per-chain
//! bookkeeping live in ordinary process memory (like Linux's `desc_extra`/`desc_state`) and are
//! never re-read from the shared rings. Any violation marks the queue broken (like Linux's
//! `vq->broken`): the call that found it and every later call return [`QueueError::Broken`] until
//! [`SplitQueue::reset`], which is meant to follow a device reset.
//!
//! Memory ordering follows Linux's `drivers/virtio/virtio_ring.c` (`virtio_wmb`, `virtio_rmb`,
//! `virtio_mb`), each expressed as a [`fence`] with a comment naming the spec requirement; the
//! `idx` fields are accessed with vm-memory's atomic `load`/`store`.
//!
//! ```
//! use vdpa_vsock::dma::{DmaOptions, DmaRegion};
//! use vdpa_vsock::virtq::{BufferDesc, SplitQueue};
//!
//! let dma = DmaRegion::new(&DmaOptions::default()).unwrap();
//! let mut q = SplitQueue::new(&dma, 256, true).unwrap();
//! let buf = dma.alloc(4096, 8).unwrap();
//! let head = q.add(&[BufferDesc { addr: buf, len: 4096, writable: true }], 7).unwrap();
//! assert_eq!(q.in_flight(), 1);
//! if q.kick_prepare().unwrap() {
//!     // write the queue index to the device's notify register / kick eventfd
//! }
//! assert!(q.pop_used().unwrap().is_none()); // the device has not answered yet
//! # let _ = head;
//! ```

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, Le16,
};

use crate::dma::{DmaError, DmaRegion};

/// Largest queue size allowed for split virtqueues (virtio 1.2 section 2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Alignment we give each ring area (the spec needs 16/2/4; a page keeps them apart).
const RING_ALIGN: usize = 4096;
/// Bytes per descriptor table entry.
const DESC_SIZE: u64 = 16;
/// Bytes of `flags` + `idx` at the start of the avail and used rings.
const RING_HEADER: u64 = 4;
/// Bytes per avail ring entry.
const AVAIL_ELEM_SIZE: u64 = 2;
/// Bytes per used ring element.
const USED_ELEM_SIZE: u64 = 8;

/// Narrows a ring flag (virtio-bindings exports them as u32) to its u16 wire width; a value
/// that does not fit fails the build.
const fn wire_flag(flag: u32) -> u16 {
    let [lo, hi, rest @ ..] = flag.to_le_bytes();
    assert!(matches!(rest, [0, 0]), "ring flag does not fit in u16");
    u16::from_le_bytes([lo, hi])
}

const DESC_F_NEXT: u16 = wire_flag(VRING_DESC_F_NEXT);
const DESC_F_WRITE: u16 = wire_flag(VRING_DESC_F_WRITE);
const AVAIL_F_NO_INTERRUPT: u16 = wire_flag(VRING_AVAIL_F_NO_INTERRUPT);
const USED_F_NO_NOTIFY: u16 = wire_flag(VRING_USED_F_NO_NOTIFY);

/// Errors from [`SplitQueue`]. Causes: the cause is the source (the crate docs, "Errors and
/// their causes").
#[derive(thiserror::Error, Debug)]
pub enum QueueError {
    /// The device violated the protocol; the queue stays unusable until [`SplitQueue::reset`].
    #[error("virtqueue broken: {reason}")]
    Broken {
        /// What the device did, expected vs found.
        reason: String,
    },
    /// Not enough free descriptors for the chain.
    #[error("virtqueue full: chain needs {needed} descriptors, {free} free")]
    Full {
        /// Descriptors the chain needs.
        needed: usize,
        /// Descriptors currently free.
        free: u16,
    },
    /// Queue size is not a power of two in `1..=32768`.
    #[error("queue size must be a power of two in 1..={MAX_QUEUE_SIZE}, found {0}")]
    InvalidSize(u16),
    /// [`SplitQueue::add`] was given no buffers.
    #[error("descriptor chain must have at least one buffer, found none")]
    EmptyChain,
    /// A device-readable buffer follows a device-writable one (virtio 1.2 section 2.7.4.2).
    #[error(
        "device-readable buffers must precede device-writable ones, \
         found readable buffer {index} after a writable one"
    )]
    WritableBeforeReadable {
        /// Index (in the slice passed to `add`) of the offending readable buffer.
        index: usize,
    },
    /// A buffer is not inside the queue's DMA memory.
    #[error("buffer [{addr:#x}, +{len:#x}) is not inside the DMA region")]
    BufferOutOfRange {
        /// IOVA of the buffer.
        addr: u64,
        /// Length of the buffer.
        len: u32,
    },
    /// Allocating the rings failed.
    #[error("cannot allocate the rings")]
    Dma(#[from] DmaError),
    /// Accessing ring memory failed (the rings lie inside the DMA region, so this means the
    /// region and the layout disagree).
    #[error("ring memory access failed")]
    Memory(#[source] GuestMemoryError),
}

/// Where the three ring areas are (IOVAs), for programming the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    /// Number of descriptors.
    pub size: u16,
    /// IOVA of the descriptor table.
    pub desc_table: GuestAddress,
    /// IOVA of the available (driver) ring.
    pub avail_ring: GuestAddress,
    /// IOVA of the used (device) ring.
    pub used_ring: GuestAddress,
}

/// One buffer of a chain passed to [`SplitQueue::add`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferDesc {
    /// IOVA of the buffer.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`) if true, device-readable otherwise.
    pub writable: bool,
}

/// A validated used element returned by [`SplitQueue::pop_used`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor id of the chain.
    pub id: u16,
    /// Bytes the device wrote into the chain's writable buffers (checked against their total).
    pub len: u32,
    /// The token passed to [`SplitQueue::add`].
    pub token: u64,
}

/// Driver-private bookkeeping for one in-flight chain, indexed by head id.
#[derive(Debug, Clone, Copy)]
struct ChainState {
    token: u64,
    /// Number of descriptors in the chain.
    num_descs: u16,
    /// Last descriptor of the chain (so freeing does not walk the list twice).
    tail: u16,
    /// Sum of the writable buffers' lengths: the most the device may report as used.
    writable_len: u64,
}

/// The driver half of a split virtqueue. See the [module docs](self).
#[derive(Debug)]
pub struct SplitQueue {
    mem: GuestMemoryMmap<()>,
    layout: QueueLayout,
    event_idx: bool,
    /// Free descriptor list and chain links: `next[i]` is the descriptor after `i`.
    next: Vec<u16>,
    /// Per head id: the chain it starts, if in flight.
    chains: Vec<Option<ChainState>>,
    free_head: u16,
    num_free: u16,
    num_chains: u16,
    /// Our copy of `avail->idx` (the device never writes it, we never read it back).
    avail_idx: Wrapping<u16>,
    /// Chains added since the last `kick_prepare` (saturating; see `kick_prepare`).
    num_added: u32,
    /// Next used ring slot we will consume.
    last_used: Wrapping<u16>,
    /// Our copy of `avail->flags`.
    avail_flags: u16,
    /// Whether used-buffer notifications are wanted (`enable_cb` called more recently than
    /// `disable_cb`).
    cb_enabled: bool,
    broken: Option<String>,
}

impl SplitQueue {
    /// Allocates and zeroes the rings of a `size`-entry queue in `dma`.
    ///
    /// `event_idx` must match whether `VIRTIO_F_EVENT_IDX` was negotiated.
    pub fn new(dma: &DmaRegion, size: u16, event_idx: bool) -> Result<Self, QueueError> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(QueueError::InvalidSize(size));
        }
        let n = usize::from(size);
        let desc_table = dma.alloc(16 * n, RING_ALIGN)?;
        // flags, idx, ring[size], used_event
        let avail_ring = dma.alloc(6 + 2 * n, RING_ALIGN)?;
        // flags, idx, ring[size], avail_event
        let used_ring = dma.alloc(6 + 8 * n, RING_ALIGN)?;
        let mut q = SplitQueue {
            mem: dma.memory().clone(),
            layout: QueueLayout {
                size,
                desc_table,
                avail_ring,
                used_ring,
            },
            event_idx,
            next: Vec::new(),
            chains: Vec::new(),
            free_head: 0,
            num_free: 0,
            num_chains: 0,
            avail_idx: Wrapping(0),
            num_added: 0,
            last_used: Wrapping(0),
            avail_flags: 0,
            cb_enabled: true,
            broken: None,
        };
        q.reinit()?;
        Ok(q)
    }

    /// Ring addresses, for programming the device.
    pub fn layout(&self) -> QueueLayout {
        self.layout
    }

    /// Number of descriptors.
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// Descriptors not part of an in-flight chain.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains posted and not yet returned by [`pop_used`](Self::pop_used).
    pub fn in_flight(&self) -> u16 {
        self.num_chains
    }

    /// Whether `VIRTIO_F_EVENT_IDX` is in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Why the queue is broken, if it is.
    pub fn is_broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Adds one chain: device-readable buffers first, then device-writable ones (virtio 1.2
    /// section 2.7.13). Writes the descriptors and the avail ring entry, then publishes
    /// `avail->idx` with release ordering. Returns the head descriptor id; `token` comes back
    /// with the chain's used element.
    pub fn add(&mut self, bufs: &[BufferDesc], token: u64) -> Result<u16, QueueError> {
        self.check_broken()?;
        let Some(last) = bufs.len().checked_sub(1) else {
            return Err(QueueError::EmptyChain);
        };
        let mut seen_writable = false;
        let mut writable_len = 0u64;
        for (index, buf) in bufs.iter().enumerate() {
            if buf.writable {
                seen_writable = true;
                writable_len += u64::from(buf.len);
            } else if seen_writable {
                return Err(QueueError::WritableBeforeReadable { index });
            }
            if !self.buffer_in_range(buf) {
                return Err(QueueError::BufferOutOfRange {
                    addr: buf.addr.0,
                    len: buf.len,
                });
            }
        }
        let needed = u16::try_from(bufs.len())
            .ok()
            .filter(|&n| n <= self.num_free)
            .ok_or(QueueError::Full {
                needed: bufs.len(),
                free: self.num_free,
            })?;

        // Write the descriptors, following our private free list (never the shared table).
        let head = self.free_head;
        let mut id = head;
        for (i, buf) in bufs.iter().enumerate() {
            let next = self.next[usize::from(id)];
            let mut flags = 0;
            if buf.writable {
                flags |= DESC_F_WRITE;
            }
            if i != last {
                flags |= DESC_F_NEXT;
            }
            let desc =
                Descriptor::new(buf.addr.0, buf.len, flags, if i != last { next } else { 0 });
            self.write(RawDescriptor::from(desc), self.desc_addr(id))?;
            if i != last {
                id = next;
            }
        }
        let tail = id;

        let slot = self.avail_idx.0 & (self.size() - 1);
        self.write(Le16::from(head), self.avail_entry_addr(slot))?;

        // virtio_wmb (virtio 1.2 section 2.7.13.3.1): the descriptors and the ring entry must be
        // visible to the device before the idx update that makes them available.
        fence(Ordering::Release);
        self.avail_idx += Wrapping(1);
        self.store_u16(self.avail_idx.0, self.layout.avail_ring.0 + 2)?;

        self.free_head = self.next[usize::from(tail)];
        self.num_free -= needed;
        self.num_chains += 1;
        self.num_added = self.num_added.saturating_add(1);
        self.chains[usize::from(head)] = Some(ChainState {
            token,
            num_descs: needed,
            tail,
            writable_len,
        });
        Ok(head)
    }

    /// Whether the device must be notified about the chains added since the last call
    /// (virtio 1.2 section 2.7.13.4): `VRING_USED_F_NO_NOTIFY` without `EVENT_IDX`, the
    /// `vring_need_event` test against `avail_event` with it. Returns `false` if nothing was added.
    pub fn kick_prepare(&mut self) -> Result<bool, QueueError> {
        self.check_broken()?;
        if self.num_added == 0 {
            return Ok(false);
        }
        // virtio_mb (virtio 1.2 section 2.7.13.4): our avail->idx store must be globally visible
        // before we read the device's suppression field, or both sides may decide the other is
        // awake (store->load ordering needs a full fence, not acquire/release).
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        let added = self.num_added;
        self.num_added = 0;
        if self.event_idx {
            // More than 65535 additions without a kick make `old` ambiguous: kick to be safe.
            let Ok(added) = u16::try_from(added) else {
                return Ok(true);
            };
            let old = new - Wrapping(added);
            let event = Wrapping(self.load_u16(self.avail_event_addr())?);
            // vring_need_event: the device asked to be kicked once avail idx passes `event`.
            Ok((new - event - Wrapping(1)) < (new - old))
        } else {
            let flags = self.load_u16(self.layout.used_ring.0)?;
            Ok(flags & USED_F_NO_NOTIFY == 0)
        }
    }

    /// Pops one used element, after validating it: `used->idx` may not move more than `size`
    /// (nor more than the number of chains in flight) past the last element seen; the id must
    /// be the head of an in-flight chain; `len` may not exceed that chain's writable bytes.
    /// Frees the chain's descriptors. Returns `Ok(None)` when no element is pending.
    pub fn pop_used(&mut self) -> Result<Option<UsedElem>, QueueError> {
        self.check_broken()?;
        let used_idx = Wrapping(self.load_u16(self.layout.used_ring.0 + 2)?);
        if used_idx == self.last_used {
            return Ok(None);
        }
        let pending = (used_idx - self.last_used).0;
        if pending > self.size() {
            return Err(self.mark_broken(format!(
                "used idx moved from {} to {}: expected at most {} (queue size) new entries, \
                 found {pending}",
                self.last_used,
                used_idx,
                self.size()
            )));
        }
        if pending > self.num_chains {
            return Err(self.mark_broken(format!(
                "used idx moved from {} to {}: expected at most {} new entries (chains in \
                 flight), found {pending}",
                self.last_used, used_idx, self.num_chains
            )));
        }
        // virtio_rmb (virtio 1.2 section 2.7.14): read used->idx before the element it covers,
        // so we never see a stale element. Together with the load above this is an acquire.
        fence(Ordering::Acquire);
        let slot = self.last_used.0 & (self.size() - 1);
        let elem: VirtqUsedElem = self.read(self.used_elem_addr(slot))?;
        // VirtqUsedElem's accessors are test-only in virtio-queue; decode its wire layout
        // (le32 id, le32 len) from the bytes we just copied.
        let (raw_id, len) = match *elem.as_slice() {
            [i0, i1, i2, i3, l0, l1, l2, l3] => (
                u32::from_le_bytes([i0, i1, i2, i3]),
                u32::from_le_bytes([l0, l1, l2, l3]),
            ),
            _ => return Err(self.mark_broken("used element is not 8 bytes".to_string())),
        };
        let id = match u16::try_from(raw_id) {
            Ok(id) if id < self.size() => id,
            _ => {
                return Err(self.mark_broken(format!(
                    "used element {slot}: expected a descriptor id below the queue size {}, \
                     found {raw_id}",
                    self.size()
                )))
            }
        };
        let Some(chain) = self.chains[usize::from(id)] else {
            return Err(self.mark_broken(format!(
                "used element {slot}: expected the head of an in-flight chain, found id {id} \
                 (not posted, not a head, or already returned)"
            )));
        };
        if u64::from(len) > chain.writable_len {
            return Err(self.mark_broken(format!(
                "used element {slot} (id {id}): expected len at most {} (writable bytes \
                 posted), found {len}",
                chain.writable_len
            )));
        }

        // Return the chain to the free list (driver-private links only).
        self.chains[usize::from(id)] = None;
        self.next[usize::from(chain.tail)] = self.free_head;
        self.free_head = id;
        self.num_free += chain.num_descs;
        self.num_chains -= 1;
        self.last_used += Wrapping(1);

        if self.event_idx && self.cb_enabled {
            // Ask for a notification when the device passes the element after this one. The
            // SeqCst fence in `enable_cb` is not needed here: a late update only delays an
            // interrupt we are not waiting for while we poll.
            self.store_u16(self.last_used.0, self.used_event_addr())?;
        }
        Ok(Some(UsedElem {
            id,
            len,
            token: chain.token,
        }))
    }

    /// Asks the device not to send used-buffer notifications: sets `VRING_AVAIL_F_NO_INTERRUPT`
    /// or, with `EVENT_IDX`, stops moving `used_event`. Best effort (virtio 1.2 section
    /// 2.7.10): notifications may still arrive.
    pub fn disable_cb(&mut self) {
        if !self.cb_enabled {
            return;
        }
        self.cb_enabled = false;
        if !self.event_idx {
            self.avail_flags |= AVAIL_F_NO_INTERRUPT;
            if let Err(e) = self.store_u16(self.avail_flags, self.layout.avail_ring.0) {
                log::error!("cannot write avail flags: {e}");
            }
        }
    }

    /// Re-arms used-buffer notifications (`used_event = last_used` with `EVENT_IDX`, clears
    /// `VRING_AVAIL_F_NO_INTERRUPT` without). Returns `Ok(false)` if used elements are already
    /// pending, in which case no notification may come for them and the caller must poll
    /// again (like Linux's `virtqueue_enable_cb`).
    pub fn enable_cb(&mut self) -> Result<bool, QueueError> {
        self.check_broken()?;
        self.cb_enabled = true;
        if self.event_idx {
            self.store_u16(self.last_used.0, self.used_event_addr())?;
        } else {
            self.avail_flags &= !AVAIL_F_NO_INTERRUPT;
            self.store_u16(self.avail_flags, self.layout.avail_ring.0)?;
        }
        // virtio_mb (virtio 1.2 section 2.7.10): the re-arming store must be visible before we
        // re-read used->idx; otherwise the device can miss it and skip the notification while
        // we miss the element it just added.
        fence(Ordering::SeqCst);
        let used_idx = self.load_u16(self.layout.used_ring.0 + 2)?;
        Ok(used_idx == self.last_used.0)
    }

    /// Forgets every in-flight chain after a device reset and returns their tokens (in head id
    /// order); zeroes the rings and clears the broken state. The device must not be using the
    /// rings any more.
    pub fn reset(&mut self) -> Vec<u64> {
        let tokens = self.chains.iter().flatten().map(|c| c.token).collect();
        if let Err(e) = self.reinit() {
            self.broken = Some(format!("cannot rezero the rings after reset: {e}"));
        }
        tokens
    }

    /// Zeroes the ring memory and resets every piece of driver state.
    fn reinit(&mut self) -> Result<(), QueueError> {
        let n = usize::from(self.size());
        self.next = (1..=self.size()).map(|i| i & (self.size() - 1)).collect();
        self.chains = vec![None; n];
        self.free_head = 0;
        self.num_free = self.size();
        self.num_chains = 0;
        self.avail_idx = Wrapping(0);
        self.num_added = 0;
        self.last_used = Wrapping(0);
        self.avail_flags = 0;
        self.cb_enabled = true;
        self.broken = None;
        let zero = |mem: &GuestMemoryMmap<()>, addr: GuestAddress, len: usize| {
            mem.write_slice(&vec![0u8; len], addr)
                .map_err(QueueError::Memory)
        };
        zero(&self.mem, self.layout.desc_table, 16 * n)?;
        zero(&self.mem, self.layout.avail_ring, 6 + 2 * n)?;
        zero(&self.mem, self.layout.used_ring, 6 + 8 * n)
    }

    fn check_broken(&self) -> Result<(), QueueError> {
        match &self.broken {
            Some(reason) => Err(QueueError::Broken {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn mark_broken(&mut self, reason: String) -> QueueError {
        log::error!("virtqueue broken: {reason}");
        self.broken = Some(reason.clone());
        QueueError::Broken { reason }
    }

    fn buffer_in_range(&self, buf: &BufferDesc) -> bool {
        let len = u64::from(buf.len);
        let Some(end) = buf.addr.0.checked_add(len) else {
            return false;
        };
        // One region: in range iff both ends are (a zero-length buffer only needs its start).
        self.mem.address_in_range(buf.addr)
            && (len == 0 || self.mem.address_in_range(GuestAddress(end - 1)))
    }

    fn desc_addr(&self, id: u16) -> GuestAddress {
        GuestAddress(self.layout.desc_table.0 + DESC_SIZE * u64::from(id))
    }

    fn avail_entry_addr(&self, slot: u16) -> GuestAddress {
        GuestAddress(self.layout.avail_ring.0 + RING_HEADER + AVAIL_ELEM_SIZE * u64::from(slot))
    }

    fn used_event_addr(&self) -> u64 {
        self.layout.avail_ring.0 + RING_HEADER + AVAIL_ELEM_SIZE * u64::from(self.size())
    }

    fn used_elem_addr(&self, slot: u16) -> GuestAddress {
        GuestAddress(self.layout.used_ring.0 + RING_HEADER + USED_ELEM_SIZE * u64::from(slot))
    }

    fn avail_event_addr(&self) -> u64 {
        self.layout.used_ring.0 + RING_HEADER + USED_ELEM_SIZE * u64::from(self.size())
    }

    fn write<T: ByteValued>(&self, val: T, addr: GuestAddress) -> Result<(), QueueError> {
        self.mem.write_obj(val, addr).map_err(QueueError::Memory)
    }

    fn read<T: ByteValued>(&self, addr: GuestAddress) -> Result<T, QueueError> {
        self.mem.read_obj(addr).map_err(QueueError::Memory)
    }

    /// Relaxed atomic little-endian u16 store (the callers place the fences).
    fn store_u16(&self, val: u16, addr: u64) -> Result<(), QueueError> {
        self.mem
            .store(val.to_le(), GuestAddress(addr), Ordering::Relaxed)
            .map_err(QueueError::Memory)
    }

    /// Relaxed atomic little-endian u16 load (the callers place the fences).
    fn load_u16(&self, addr: u64) -> Result<u16, QueueError> {
        self.mem
            .load::<u16>(GuestAddress(addr), Ordering::Relaxed)
            .map(u16::from_le)
            .map_err(QueueError::Memory)
    }
}

#[cfg(test)]
mod tests;
