//! Payload in DMA memory: the driver's [`Storage`] for the protocol core.
//!
//! This is what makes the data path one copy each way on the driver side:
//! - **TX.** `write` copies the caller's bytes once, into [`TX_CHUNK`]-byte chunks of DMA memory
//!   taken from a pool that all connections share (each connection is bounded by its
//!   `send_buffer` in the protocol core, the pool by the driver config). A packet's payload is a
//!   [`TxSeg`] of one chunk, and goes on the TX ring as its own descriptor after the header's;
//!   the chunk returns to the pool when the queue no longer holds it and the device has returned
//!   every descriptor that points into it (the segments hold a reference each).
//! - **RX.** The ring's buffers come from a pool larger than the ring. A used buffer's header is
//!   parsed once (by [`VsockPacket`](crate::packet::VsockPacket)); its payload stays where the
//!   device wrote it, queued on its connection as an [`RxBufHandle`] and copied once into the
//!   reader's buffer; the buffer returns to the pool when fully read, and the transport puts it
//!   back on the ring. Payloads of at most [`GOOD_COPY_LEN`] bytes (as Linux's
//!   `GOOD_COPY_LEN`) are copied into a small heap tail instead of holding a whole buffer, and a
//!   connection that already holds its share of the pool ([`RxPool::share`]) has further
//!   payloads copied out too, so a reader that never reads cannot starve the ring. Those copies
//!   are counted apart ([`CopyCounters`]).
//!
//! Chunks are [`TX_CHUNK`]-aligned and RX buffers never cross a [`HUGE_PAGE_SIZE`] boundary, so
//! no buffer straddles two huge pages (which need not be physically contiguous when the IOVA is
//! the physical address, as with VFIO no-IOMMU).
//!
//! The device is untrusted: payload bytes are only ever reached through volatile slices of the
//! DMA region, never as plain references, and every address comes from our own allocations.

use std::collections::VecDeque;
use std::sync::PoisonError;

// The pools are shared by every connection and touched by copies made with the core's lock let
// go: their locks and counters come from the shim, so the loom models check them too.
use super::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use super::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::dma::{DmaError, DmaRegion, HUGE_PAGE_SIZE};
use crate::proto::{HeapBuf, RxBuf, Storage, TxBuf};

/// Size (and alignment) of one TX chunk: the largest payload of one packet.
pub(crate) const TX_CHUNK: usize = 64 * 1024;

/// RX payloads up to this size are copied into the connection's heap tail and their buffer
/// goes back to the ring at once (Linux's `GOOD_COPY_LEN`).
pub(crate) const GOOD_COPY_LEN: usize = 128;

/// Capacity of a heap tail segment that small payloads are merged into: small enough for the
/// allocator's per-thread cache (a ping-pong of small messages allocates one per message), and
/// four payloads of the largest size merged.
const HEAP_TAIL: usize = 4 * GOOD_COPY_LEN;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data are free lists of plain indices: consistent after any panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Payload bytes copied by the driver, per direction (shared by every connection).
#[derive(Debug, Default)]
pub(crate) struct CopyCounters {
    /// Bytes copied from callers into TX chunks.
    pub(crate) tx_copied: AtomicU64,
    /// Bytes copied from RX buffers or heap tails into callers' buffers.
    pub(crate) rx_copied: AtomicU64,
    /// Bytes copied from RX buffers into heap tails (small payloads, and connections over their
    /// share of the pool); these bytes are copied again when read.
    pub(crate) rx_copied_out: AtomicU64,
}

impl CopyCounters {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Copy `src` into DMA memory at `addr`.
fn write_dma(mem: &GuestMemoryMmap<()>, addr: GuestAddress, src: &[u8]) -> Result<(), CopyError> {
    let err = |_| CopyError {
        addr: addr.0,
        len: src.len(),
    };
    crate::copy::to_volatile(&dma_slice(mem, addr, src.len())?, 0, src).map_err(err)
}

/// Copy DMA memory at `addr` into `dst`.
fn read_dma(
    mem: &GuestMemoryMmap<()>,
    addr: GuestAddress,
    dst: &mut [u8],
) -> Result<(), CopyError> {
    let len = dst.len();
    let err = |_| CopyError { addr: addr.0, len };
    crate::copy::from_volatile(&dma_slice(mem, addr, len)?, 0, dst).map_err(err)
}

/// A copy between DMA memory and a buffer failed: the range is not inside one region of the
/// DMA memory (our own allocations are, so this is a bug, not a device fault). No cause.
#[derive(Debug, thiserror::Error)]
#[error("DMA copy of {len} bytes at IOVA {addr:#x}: the range is not inside the DMA region")]
pub(crate) struct CopyError {
    pub(crate) addr: u64,
    pub(crate) len: usize,
}

fn dma_slice(
    mem: &GuestMemoryMmap<()>,
    addr: GuestAddress,
    len: usize,
) -> Result<VolatileSlice<'_, ()>, CopyError> {
    mem.get_slice(addr, len)
        .map_err(|_| CopyError { addr: addr.0, len })
}

// ----- TX -----

/// The shared pool of TX chunks.
#[derive(Debug)]
pub(crate) struct TxPool {
    mem: GuestMemoryMmap<()>,
    base: GuestAddress,
    chunks: usize,
    free: Mutex<Vec<u32>>,
    /// An allocation failed since the last [`TxPool::take_exhausted`]: writers may be waiting
    /// for chunks to come back.
    exhausted: AtomicBool,
    in_use: AtomicUsize,
}

impl TxPool {
    /// A pool of `bytes / TX_CHUNK` chunks (at least one) carved from `dma`.
    pub(crate) fn new(dma: &DmaRegion, bytes: usize) -> Result<Arc<TxPool>, DmaError> {
        let chunks = (bytes / TX_CHUNK).max(1);
        let base = dma.alloc(chunks * TX_CHUNK, TX_CHUNK)?;
        let count = u32::try_from(chunks).map_err(|_| DmaError::ZeroSize)?;
        Ok(Arc::new(TxPool {
            mem: dma.memory().clone(),
            base,
            chunks,
            // Popped from the back: the lowest chunks first, and a freed chunk is the next one
            // handed out (still in cache).
            free: Mutex::new((0..count).rev().collect()),
            exhausted: AtomicBool::new(false),
            in_use: AtomicUsize::new(0),
        }))
    }

    fn alloc(self: &Arc<Self>) -> Option<Arc<Chunk>> {
        let Some(index) = lock(&self.free).pop() else {
            self.exhausted.store(true, Ordering::Release);
            return None;
        };
        self.in_use.fetch_add(1, Ordering::Relaxed);
        Some(Arc::new(Chunk {
            pool: self.clone(),
            index,
        }))
    }

    /// Whether an allocation failed since the last call (and clear the flag).
    pub(crate) fn take_exhausted(&self) -> bool {
        self.exhausted.swap(false, Ordering::AcqRel)
    }

    /// Chunks handed out now.
    pub(crate) fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Chunks in the pool.
    pub(crate) fn capacity(&self) -> usize {
        self.chunks
    }
}

/// One TX chunk; back to its pool when the last reference goes.
#[derive(Debug)]
struct Chunk {
    pool: Arc<TxPool>,
    index: u32,
}

impl Chunk {
    fn addr(&self, offset: usize) -> GuestAddress {
        // index < chunks, and the pool's range lies inside the DMA region.
        GuestAddress(self.pool.base.0 + (self.index as usize * TX_CHUNK + offset) as u64)
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.pool.in_use.fetch_sub(1, Ordering::Relaxed);
        lock(&self.pool.free).push(self.index);
    }
}

/// The payload of one packet on the TX ring: `len` bytes at `addr`, inside one chunk that stays
/// allocated while this lives (until the device returns the descriptor).
#[derive(Debug)]
pub(crate) struct TxSeg {
    _chunk: Arc<Chunk>,
    _flight: InFlight,
    /// IOVA of the first byte.
    pub(crate) addr: GuestAddress,
    /// Bytes.
    pub(crate) len: u32,
}

/// One packet of a connection on the ring: counted in its queue's in-flight total until the
/// device returns the descriptor (what `flush` waits for).
#[derive(Debug)]
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> InFlight {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's send queue in DMA chunks.
#[derive(Debug)]
pub(crate) struct DmaTx {
    pool: Arc<TxPool>,
    counters: Arc<CopyCounters>,
    /// Packets of this queue on the ring, not yet returned by the device: made with the first
    /// one (an idle connection holds no counter: 10,000 of them would hold 320 KiB).
    in_flight: Option<Arc<AtomicUsize>>,
    /// (chunk, first unsent byte, end of the written bytes); only the last is written to.
    chunks: VecDeque<(Arc<Chunk>, usize, usize)>,
    len: usize,
}

impl DmaTx {
    /// Free bytes at the back of the last chunk.
    fn tail_room(&self) -> usize {
        self.chunks.back().map_or(0, |&(_, _, end)| TX_CHUNK - end)
    }

    /// Packets taken from this queue that the device has not returned yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
            .as_ref()
            .map_or(0, |n| n.load(Ordering::Acquire))
    }

    /// Take the first `n` bytes (at most [`TxBuf::contiguous`]) as one segment for the ring.
    pub(crate) fn take_segment(&mut self, n: usize) -> Option<TxSeg> {
        let (chunk, start, end) = self.chunks.front_mut()?;
        if n == 0 || n > *end - *start {
            return None;
        }
        let seg = TxSeg {
            _chunk: chunk.clone(),
            _flight: InFlight::new(self.in_flight.get_or_insert_with(Arc::default)),
            addr: chunk.addr(*start),
            len: u32::try_from(n).ok()?,
        };
        *start += n;
        self.len -= n;
        // Sent up to what was written: the queue lets go (in-flight segments still hold the
        // chunk), so an idle connection holds no chunk and the pool cannot be starved by them.
        if *start == *end {
            self.chunks.pop_front();
        }
        Some(seg)
    }
}

impl DmaTx {
    /// Zero-copy append: `f` gets up to `room` bytes of free DMA memory at the back of the
    /// queue, as slices in order (fewer when the pool is short), writes into them and returns
    /// how many bytes (from the first slice on) it filled; those join the queue. Returns that
    /// count, or `f` back, uncalled, when the pool has no memory at all.
    pub(crate) fn fill_with<F>(&mut self, room: usize, f: F) -> Result<usize, F>
    where
        F: FnOnce(&[VolatileSlice<'_, ()>]) -> usize,
    {
        // Chunks enough for `room` (as many as the pool gives).
        let mut have = self.tail_room();
        let mut added = 0;
        while have < room {
            let Some(c) = self.pool.alloc() else {
                break;
            };
            self.chunks.push_back((c, 0, 0));
            added += 1;
            have += TX_CHUNK;
        }
        let room = room.min(have);
        if room == 0 {
            return Err(f);
        }
        let mut slices = Vec::new();
        let mut left = room;
        for (chunk, _, end) in self.chunks.iter().filter(|&&(_, _, end)| end < TX_CHUNK) {
            if left == 0 {
                break;
            }
            let n = (TX_CHUNK - end).min(left);
            match dma_slice(&self.pool.mem, chunk.addr(*end), n) {
                Ok(s) => slices.push(s),
                Err(e) => {
                    log::error!("TX chunk out of the DMA region: {e}");
                    break;
                }
            }
            left -= n;
        }
        let offered: usize = slices.iter().map(|s| s.len()).sum();
        let filled = f(&slices).min(offered);
        drop(slices);
        // Commit in order.
        let mut left = filled;
        for (_, _, end) in self
            .chunks
            .iter_mut()
            .filter(|&&mut (_, _, end)| end < TX_CHUNK)
        {
            if left == 0 {
                break;
            }
            let n = (TX_CHUNK - *end).min(left);
            *end += n;
            left -= n;
        }
        self.len += filled;
        // Give back the chunks taken for this call that stayed empty.
        for _ in 0..added {
            match self.chunks.back() {
                Some(&(_, 0, 0)) => {
                    self.chunks.pop_back();
                }
                _ => break,
            }
        }
        Ok(filled)
    }
}

/// DMA memory set aside at the back of one connection's send queue, to be filled with no lock
/// held and then committed ([`DmaTx::reserve`], [`DmaTx::commit`]). The device never sees it
/// before the commit (only committed bytes go on the ring); the chunks stay allocated while
/// this lives, even if the connection is reset meanwhile. Dropped uncommitted, its unused
/// chunks go back to the pool.
#[derive(Debug)]
pub(crate) struct TxReservation {
    pool: Arc<TxPool>,
    counters: Arc<CopyCounters>,
    /// (chunk, offset, bytes) in stream order.
    parts: Vec<(Arc<Chunk>, usize, usize)>,
    /// Bytes written into `parts` so far, from the first on.
    filled: usize,
}

impl TxReservation {
    /// Bytes reserved.
    pub(crate) fn len(&self) -> usize {
        self.parts.iter().map(|&(_, _, n)| n).sum()
    }

    /// Copy `data` (at most [`TxReservation::len`] bytes of it) into the reserved memory: the
    /// one copy of a write. Returns the count.
    pub(crate) fn fill(&mut self, mut data: &[u8]) -> usize {
        let mut done = 0;
        let mut skip = self.filled;
        for (chunk, offset, n) in &self.parts {
            if data.is_empty() {
                break;
            }
            if skip >= *n {
                skip -= n;
                continue;
            }
            let k = (n - skip).min(data.len());
            if let Err(e) = write_dma(&self.pool.mem, chunk.addr(offset + skip), &data[..k]) {
                // Our own chunk outside our own region: a bug, not a device fault.
                log::error!("TX chunk copy failed: {e}");
                break;
            }
            skip = 0;
            done += k;
            data = &data[k..];
        }
        self.filled += done;
        CopyCounters::add(&self.counters.tx_copied, done);
        done
    }
}

impl DmaTx {
    /// Set aside up to `room` bytes of DMA memory at the back of the queue (the rest of the
    /// last chunk, then fresh chunks, as many as the pool gives); `None` when it gives none.
    /// One reservation at a time per queue: its writer holds the connection's write lock.
    pub(crate) fn reserve(&mut self, room: usize) -> Option<TxReservation> {
        let mut parts = Vec::new();
        let mut left = room;
        if let Some((chunk, _, end)) = self.chunks.back() {
            if *end < TX_CHUNK && left > 0 {
                let n = (TX_CHUNK - end).min(left);
                parts.push((chunk.clone(), *end, n));
                left -= n;
            }
        }
        while left > 0 {
            let Some(c) = self.pool.alloc() else {
                break;
            };
            let n = TX_CHUNK.min(left);
            parts.push((c, 0, n));
            left -= n;
        }
        (!parts.is_empty()).then(|| TxReservation {
            pool: self.pool.clone(),
            counters: self.counters.clone(),
            parts,
            filled: 0,
        })
    }

    /// Queue the first `n` bytes written into `r` (at most what was filled); returns the count.
    /// The sender may have taken every byte queued before (and let go of the last chunk) while
    /// `r` was being filled: a part joins the back chunk where it continues it, else it is
    /// queued as a piece of its own.
    pub(crate) fn commit(&mut self, r: TxReservation, n: usize) -> usize {
        let n = n.min(r.filled);
        let mut left = n;
        for (chunk, offset, len) in r.parts {
            if left == 0 {
                break;
            }
            let k = len.min(left);
            match self.chunks.back_mut() {
                Some((back, _, end)) if Arc::ptr_eq(back, &chunk) && *end == offset => {
                    *end += k;
                }
                _ => self.chunks.push_back((chunk, offset, offset + k)),
            }
            left -= k;
        }
        self.len += n;
        n
    }
}

impl TxBuf for DmaTx {
    fn len(&self) -> usize {
        self.len
    }

    fn contiguous(&self) -> usize {
        self.chunks
            .front()
            .map_or(0, |&(_, start, end)| end - start)
    }

    fn try_reserve(&mut self, n: usize) -> bool {
        let mut room = self.tail_room();
        let mut added = Vec::new();
        while room < n {
            match self.pool.alloc() {
                Some(c) => {
                    added.push(c);
                    room += TX_CHUNK;
                }
                // Dropping `added` gives the chunks back.
                None => return false,
            }
        }
        self.chunks.extend(added.into_iter().map(|c| (c, 0, 0)));
        true
    }

    fn append(&mut self, mut data: &[u8]) -> usize {
        let mut done = 0;
        while !data.is_empty() {
            if self.tail_room() == 0 {
                match self.pool.alloc() {
                    Some(c) => self.chunks.push_back((c, 0, 0)),
                    None => break,
                }
            }
            // A reserved (empty) chunk may sit after a partly filled one: fill in order.
            let Some(i) = self.chunks.iter().position(|&(_, _, end)| end < TX_CHUNK) else {
                break;
            };
            let (chunk, _, end) = &mut self.chunks[i];
            let n = (TX_CHUNK - *end).min(data.len());
            if let Err(e) = write_dma(&self.pool.mem, chunk.addr(*end), &data[..n]) {
                // Our own chunk is outside our own region: a bug, not a device fault.
                log::error!("TX chunk copy failed: {e}");
                break;
            }
            *end += n;
            self.len += n;
            done += n;
            data = &data[n..];
        }
        CopyCounters::add(&self.counters.tx_copied, done);
        done
    }

    fn clear(&mut self) {
        self.chunks.clear();
        self.len = 0;
    }
}

// ----- RX -----

/// The pool of RX buffers: more than the ring holds, so the ring stays full while readers hold
/// buffers.
#[derive(Debug)]
pub(crate) struct RxPool {
    mem: GuestMemoryMmap<()>,
    bufs: Vec<GuestAddress>,
    buf_size: u32,
    free: Mutex<Vec<u32>>,
    held: AtomicUsize,
    share: usize,
    /// Handles per buffer out of the free list (a read that copies part of a buffer with no
    /// lock held shares it with the queue that keeps the rest).
    refs: Box<[AtomicU32]>,
}

impl RxPool {
    /// `count` buffers of `buf_size` bytes (header included), none crossing a huge-page boundary.
    pub(crate) fn new(
        dma: &DmaRegion,
        count: usize,
        buf_size: u32,
        ring_size: usize,
    ) -> Result<Arc<RxPool>, DmaError> {
        let size = buf_size as usize;
        let mut bufs = Vec::with_capacity(count);
        for _ in 0..count {
            bufs.push(dma.alloc_within(size, 64, Some(HUGE_PAGE_SIZE))?);
        }
        let n = u32::try_from(count).map_err(|_| DmaError::ZeroSize)?;
        // The buffers beyond the ring are the slack readers may hold; one connection may hold
        // an eighth of the pool (at least two buffers) before its payloads are copied out.
        let share = (count / 8).max(2).max(count.saturating_sub(ring_size) / 4);
        Ok(Arc::new(RxPool {
            mem: dma.memory().clone(),
            bufs,
            buf_size,
            free: Mutex::new((0..n).rev().collect()),
            held: AtomicUsize::new(0),
            share,
            refs: (0..count).map(|_| AtomicU32::new(0)).collect(),
        }))
    }

    /// A free buffer for the ring: its handle (the token is [`RxBufHandle::index`]).
    pub(crate) fn alloc(self: &Arc<Self>) -> Option<RxBufHandle> {
        let index = lock(&self.free).pop()?;
        self.held.fetch_add(1, Ordering::Relaxed);
        self.refs[index as usize].store(1, Ordering::Relaxed);
        Some(RxBufHandle {
            pool: self.clone(),
            index,
        })
    }

    /// The IOVA of buffer `index`, if it is one of ours.
    #[cfg(test)]
    fn addr(&self, index: u32) -> Option<GuestAddress> {
        self.bufs.get(index as usize).copied()
    }

    /// Bytes per buffer, header included.
    pub(crate) fn buf_size(&self) -> u32 {
        self.buf_size
    }

    /// Buffers in the pool.
    pub(crate) fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// Buffers out of the free list (on the ring or held by connections).
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// How many buffers one connection may hold before its payloads are copied out.
    #[cfg(test)]
    fn share(&self) -> usize {
        self.share
    }
}

/// One RX buffer out of the free list (on the ring, or holding received payload); back to the
/// pool when dropped.
#[derive(Debug)]
pub(crate) struct RxBufHandle {
    pool: Arc<RxPool>,
    index: u32,
}

impl RxBufHandle {
    /// Its index in the pool (the ring token).
    pub(crate) fn index(&self) -> u32 {
        self.index
    }

    /// Its IOVA.
    pub(crate) fn addr(&self) -> GuestAddress {
        // The index came from the pool's own free list.
        self.pool.bufs[self.index as usize]
    }

    /// Another handle to the same buffer: it goes back to the pool when the last one drops.
    fn share(&self) -> RxBufHandle {
        self.pool.refs[self.index as usize].fetch_add(1, Ordering::Relaxed);
        RxBufHandle {
            pool: self.pool.clone(),
            index: self.index,
        }
    }
}

impl Drop for RxBufHandle {
    fn drop(&mut self) {
        // The last handle gives the buffer back (AcqRel: every copy out of it through another
        // handle happens before the device may write it again).
        if self.pool.refs[self.index as usize].fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        self.pool.held.fetch_sub(1, Ordering::Relaxed);
        lock(&self.pool.free).push(self.index);
    }
}

#[derive(Debug)]
enum RxSeg {
    /// `len` bytes at `offset` of a DMA buffer, where the device wrote them.
    Dma {
        buf: RxBufHandle,
        offset: usize,
        len: usize,
    },
    /// Bytes copied out of DMA memory, from `start`.
    Heap { data: Vec<u8>, start: usize },
}

impl RxSeg {
    fn len(&self) -> usize {
        match self {
            RxSeg::Dma { len, .. } => *len,
            RxSeg::Heap { data, start } => data.len() - start,
        }
    }
}

/// A connection's receive queue: payload where the device wrote it, or copied out.
#[derive(Debug)]
pub(crate) struct DmaRx {
    pool: Arc<RxPool>,
    counters: Arc<CopyCounters>,
    segs: VecDeque<RxSeg>,
    len: usize,
    /// DMA buffers among `segs`.
    held: usize,
}

impl DmaRx {
    /// Queue `len` payload bytes at `offset` of `buf` (the transport checked they lie inside
    /// the used length the device reported).
    pub(crate) fn push(&mut self, buf: RxBufHandle, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        if len > GOOD_COPY_LEN && self.held < self.pool.share {
            self.segs.push_back(RxSeg::Dma { buf, offset, len });
            self.held += 1;
            self.len += len;
            return;
        }
        // Small, or this connection holds its share: copy out and give the buffer back.
        let addr = GuestAddress(buf.addr().0 + offset as u64);
        let tail = match self.segs.back_mut() {
            Some(RxSeg::Heap { data, .. }) if data.capacity() - data.len() >= len => data,
            _ => {
                self.segs.push_back(RxSeg::Heap {
                    data: Vec::with_capacity(len.max(HEAP_TAIL)),
                    start: 0,
                });
                match self.segs.back_mut() {
                    Some(RxSeg::Heap { data, .. }) => data,
                    _ => return,
                }
            }
        };
        let at = tail.len();
        tail.resize(at + len, 0);
        match read_dma(&self.pool.mem, addr, &mut tail[at..]) {
            Ok(()) => {
                self.len += len;
                CopyCounters::add(&self.counters.rx_copied_out, len);
            }
            Err(e) => {
                tail.truncate(at);
                log::error!("RX copy-out failed: {e}");
            }
        }
        drop(buf);
    }

    /// Zero-copy read: `f` gets the queued payload as slices in order (DMA memory where the
    /// device wrote it, or heap tails) and returns how many bytes (from the first slice on) it
    /// consumed; those leave the queue (their buffers return to the pool). Returns that count.
    pub(crate) fn with_slices(
        &mut self,
        f: impl FnOnce(&[VolatileSlice<'_, ()>]) -> usize,
    ) -> usize {
        let mem = &self.pool.mem;
        let mut slices = Vec::with_capacity(self.segs.len());
        for seg in self.segs.iter_mut() {
            match seg {
                RxSeg::Dma { buf, offset, len } => {
                    let addr = GuestAddress(buf.addr().0 + *offset as u64);
                    match dma_slice(mem, addr, *len) {
                        Ok(s) => slices.push(s),
                        Err(e) => {
                            log::error!("RX buffer out of the DMA region: {e}");
                            break;
                        }
                    }
                }
                RxSeg::Heap { data, start } => {
                    slices.push(VolatileSlice::from(&mut data[*start..]))
                }
            }
        }
        let offered: usize = slices.iter().map(|s| s.len()).sum();
        let n = f(&slices).min(offered);
        drop(slices);
        self.discard(n);
        n
    }

    /// Segments queued (tests).
    #[cfg(test)]
    fn segments(&self) -> usize {
        self.segs.len()
    }
}

/// Received payload taken off a connection's queue, to be copied out with no lock held
/// ([`DmaRx::lease`]); its buffers go back to the pool when it is dropped.
#[derive(Debug)]
pub(crate) struct RxLease {
    pool: Arc<RxPool>,
    counters: Arc<CopyCounters>,
    segs: Vec<RxSeg>,
}

impl RxLease {
    /// Copy every leased byte into the front of `buf` (which holds at least as many: the
    /// lease was made for it): the one copy of a read. Returns the count.
    pub(crate) fn copy_to(&self, buf: &mut [u8]) -> usize {
        let done = copy_segments(&self.pool.mem, &self.segs, buf);
        CopyCounters::add(&self.counters.rx_copied, done);
        done
    }
}

/// Copy the bytes of `segs`, in order, into the front of `buf` (as many as fit); returns the
/// count. What `read` does without consuming: a lease's copy and `peek`.
fn copy_segments<'a>(
    mem: &GuestMemoryMmap<()>,
    segs: impl IntoIterator<Item = &'a RxSeg>,
    mut buf: &mut [u8],
) -> usize {
    let mut done = 0;
    for seg in segs {
        if buf.is_empty() {
            break;
        }
        let n = seg.len().min(buf.len());
        let (dst, rest) = std::mem::take(&mut buf).split_at_mut(n);
        match seg {
            RxSeg::Dma { buf: b, offset, .. } => {
                let addr = GuestAddress(b.addr().0 + *offset as u64);
                if let Err(e) = read_dma(mem, addr, dst) {
                    log::error!("RX copy failed: {e}");
                    dst.fill(0);
                }
            }
            RxSeg::Heap { data, start } => {
                crate::copy::copy_bytes(dst, &data[*start..*start + n]);
            }
        }
        done += n;
        buf = rest;
    }
    done
}

impl DmaRx {
    /// Take up to `max` bytes off the front of the queue, whole segments where they fit (the
    /// last one split), for [`RxLease::copy_to`].
    pub(crate) fn lease(&mut self, max: usize) -> RxLease {
        let mut segs = Vec::new();
        let mut left = max;
        while left > 0 {
            let Some(front) = self.segs.front_mut() else {
                break;
            };
            let n = front.len();
            if n <= left {
                if let Some(seg) = self.segs.pop_front() {
                    if matches!(seg, RxSeg::Dma { .. }) {
                        self.held -= 1;
                    }
                    segs.push(seg);
                }
                self.len -= n;
                left -= n;
                continue;
            }
            // Split: the heap part is copied now (it is small), a DMA buffer is shared by
            // reading its first `left` bytes here and leaving the rest queued.
            match front {
                RxSeg::Dma { buf, offset, len } => {
                    let part = RxSeg::Dma {
                        buf: buf.share(),
                        offset: *offset,
                        len: left,
                    };
                    *offset += left;
                    *len -= left;
                    segs.push(part);
                }
                RxSeg::Heap { data, start } => {
                    segs.push(RxSeg::Heap {
                        data: data[*start..*start + left].to_vec(),
                        start: 0,
                    });
                    *start += left;
                }
            }
            self.len -= left;
            left = 0;
        }
        RxLease {
            pool: self.pool.clone(),
            counters: self.counters.clone(),
            segs,
        }
    }
}

impl RxBuf for DmaRx {
    fn len(&self) -> usize {
        self.len
    }

    fn read(&mut self, mut buf: &mut [u8]) {
        let mut copied = 0;
        while !buf.is_empty() {
            let Some(front) = self.segs.front_mut() else {
                break;
            };
            let n = front.len().min(buf.len());
            let (dst, rest) = std::mem::take(&mut buf).split_at_mut(n);
            match front {
                RxSeg::Dma {
                    buf: b,
                    offset,
                    len,
                } => {
                    let addr = GuestAddress(b.addr().0 + *offset as u64);
                    if let Err(e) = read_dma(&self.pool.mem, addr, dst) {
                        log::error!("RX copy failed: {e}");
                        dst.fill(0);
                    }
                    *offset += n;
                    *len -= n;
                }
                RxSeg::Heap { data, start } => {
                    crate::copy::copy_bytes(dst, &data[*start..*start + n]);
                    *start += n;
                }
            }
            copied += n;
            buf = rest;
            self.pop_empty_front();
        }
        self.len -= copied;
        CopyCounters::add(&self.counters.rx_copied, copied);
    }

    fn peek(&self, buf: &mut [u8]) {
        copy_segments(&self.pool.mem, &self.segs, buf);
    }

    fn discard(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.segs.front_mut() else {
                break;
            };
            let k = front.len().min(n);
            match front {
                RxSeg::Dma { offset, len, .. } => {
                    *offset += k;
                    *len -= k;
                }
                RxSeg::Heap { start, .. } => *start += k,
            }
            n -= k;
            self.len -= k;
            self.pop_empty_front();
        }
    }

    fn clear(&mut self) {
        self.segs.clear();
        self.len = 0;
        self.held = 0;
    }
}

impl DmaRx {
    fn pop_empty_front(&mut self) {
        if self.segs.front().is_some_and(|s| s.len() == 0) {
            if let Some(RxSeg::Dma { .. }) = self.segs.pop_front() {
                self.held -= 1;
            }
        }
    }
}

/// The driver's storage: both pools and the copy counters.
#[derive(Debug, Clone)]
pub(crate) struct DmaStorage {
    pub(crate) tx_pool: Arc<TxPool>,
    pub(crate) rx_pool: Arc<RxPool>,
    pub(crate) counters: Arc<CopyCounters>,
}

impl Storage for DmaStorage {
    type Tx = DmaTx;
    type Rx = DmaRx;

    fn new_tx(&mut self) -> DmaTx {
        DmaTx {
            pool: self.tx_pool.clone(),
            counters: self.counters.clone(),
            in_flight: None,
            chunks: VecDeque::new(),
            len: 0,
        }
    }

    fn new_rx(&mut self) -> DmaRx {
        DmaRx {
            pool: self.rx_pool.clone(),
            counters: self.counters.clone(),
            segs: VecDeque::new(),
            len: 0,
            held: 0,
        }
    }
}

/// The runtime's storage: payload in DMA memory (a driver's core) or on the heap (the simulated
/// device's host side, which has no DMA memory of its own). One type, so one core and one set of
/// socket types serve both; each transport reaches its own kind with `as_dma` / `as_heap`.
#[derive(Debug, Clone)]
pub(crate) enum RtStorage {
    /// Payload in the driver's DMA pools.
    Dma(DmaStorage),
    /// Payload in `VecDeque`s.
    Heap,
}

/// A send queue of [`RtStorage`].
#[derive(Debug)]
pub(crate) enum RtTx {
    /// In DMA chunks.
    Dma(DmaTx),
    /// On the heap.
    Heap(HeapBuf),
}

/// A receive queue of [`RtStorage`].
#[derive(Debug)]
pub(crate) enum RtRx {
    /// Where the device wrote it (or copied out of it).
    Dma(DmaRx),
    /// On the heap.
    Heap(HeapBuf),
}

impl RtTx {
    /// The DMA queue (a driver's connection).
    pub(crate) fn as_dma(&mut self) -> Option<&mut DmaTx> {
        match self {
            RtTx::Dma(q) => Some(q),
            RtTx::Heap(_) => None,
        }
    }

    /// The heap queue (the sim host's connection).
    pub(crate) fn as_heap(&mut self) -> Option<&mut HeapBuf> {
        match self {
            RtTx::Heap(q) => Some(q),
            RtTx::Dma(_) => None,
        }
    }
}

impl RtTx {
    /// Zero-copy append of up to `room` bytes (see [`DmaTx::fill_with`]); the heap queue
    /// offers zeroed room at its back.
    pub(crate) fn fill_with<F>(&mut self, room: usize, f: F) -> Result<usize, F>
    where
        F: FnOnce(&[VolatileSlice<'_, ()>]) -> usize,
    {
        match self {
            RtTx::Dma(q) => q.fill_with(room, f),
            RtTx::Heap(q) => Ok(q.fill_with(room, |pieces| {
                let slices: Vec<VolatileSlice<'_, ()>> =
                    pieces.into_iter().map(VolatileSlice::from).collect();
                f(&slices)
            })),
        }
    }
}

impl RtRx {
    /// Zero-copy read of the queued payload (see [`DmaRx::with_slices`]).
    pub(crate) fn with_slices(
        &mut self,
        f: impl FnOnce(&[VolatileSlice<'_, ()>]) -> usize,
    ) -> usize {
        match self {
            RtRx::Dma(q) => q.with_slices(f),
            RtRx::Heap(q) => q.take_in_place(|pieces| {
                let slices: Vec<VolatileSlice<'_, ()>> =
                    pieces.into_iter().map(VolatileSlice::from).collect();
                f(&slices)
            }),
        }
    }

    /// The DMA queue (a driver's connection).
    pub(crate) fn as_dma(&mut self) -> Option<&mut DmaRx> {
        match self {
            RtRx::Dma(q) => Some(q),
            RtRx::Heap(_) => None,
        }
    }

    /// The heap queue (the sim host's connection).
    pub(crate) fn as_heap(&mut self) -> Option<&mut HeapBuf> {
        match self {
            RtRx::Heap(q) => Some(q),
            RtRx::Dma(_) => None,
        }
    }
}

impl TxBuf for RtTx {
    fn len(&self) -> usize {
        match self {
            RtTx::Dma(q) => q.len(),
            RtTx::Heap(q) => TxBuf::len(q),
        }
    }
    fn contiguous(&self) -> usize {
        match self {
            RtTx::Dma(q) => q.contiguous(),
            RtTx::Heap(q) => q.contiguous(),
        }
    }
    fn try_reserve(&mut self, n: usize) -> bool {
        match self {
            RtTx::Dma(q) => q.try_reserve(n),
            RtTx::Heap(q) => q.try_reserve(n),
        }
    }
    fn append(&mut self, data: &[u8]) -> usize {
        match self {
            RtTx::Dma(q) => q.append(data),
            RtTx::Heap(q) => q.append(data),
        }
    }
    fn clear(&mut self) {
        match self {
            RtTx::Dma(q) => q.clear(),
            RtTx::Heap(q) => TxBuf::clear(q),
        }
    }
}

impl RxBuf for RtRx {
    fn len(&self) -> usize {
        match self {
            RtRx::Dma(q) => q.len(),
            RtRx::Heap(q) => RxBuf::len(q),
        }
    }
    fn read(&mut self, buf: &mut [u8]) {
        match self {
            RtRx::Dma(q) => q.read(buf),
            RtRx::Heap(q) => q.read(buf),
        }
    }
    fn peek(&self, buf: &mut [u8]) {
        match self {
            RtRx::Dma(q) => q.peek(buf),
            RtRx::Heap(q) => q.peek(buf),
        }
    }
    fn discard(&mut self, n: usize) {
        match self {
            RtRx::Dma(q) => q.discard(n),
            RtRx::Heap(q) => q.discard(n),
        }
    }
    fn clear(&mut self) {
        match self {
            RtRx::Dma(q) => q.clear(),
            RtRx::Heap(q) => RxBuf::clear(q),
        }
    }
}

impl Storage for RtStorage {
    type Tx = RtTx;
    type Rx = RtRx;
    fn new_tx(&mut self) -> RtTx {
        match self {
            RtStorage::Dma(s) => RtTx::Dma(s.new_tx()),
            RtStorage::Heap => RtTx::Heap(HeapBuf::default()),
        }
    }
    fn new_rx(&mut self) -> RtRx {
        match self {
            RtStorage::Dma(s) => RtRx::Dma(s.new_rx()),
            RtStorage::Heap => RtRx::Heap(HeapBuf::default()),
        }
    }
    /// The heap queues (the sim host's) relay; the DMA ones do not (nothing echoes in DMA
    /// memory: a driver's payload goes to its callers).
    fn relay(rx: &mut RtRx, tx: &mut RtTx, n: usize) -> bool {
        match (rx, tx) {
            (RtRx::Heap(rx), RtTx::Heap(tx)) => {
                rx.relay_into(tx, n);
                true
            }
            _ => false,
        }
    }
}

/// Read 4 little-endian bytes at `addr` of our own DMA memory (an event buffer).
pub(crate) fn read_le32(mem: &GuestMemoryMmap<()>, addr: GuestAddress) -> Result<u32, CopyError> {
    let mut b = [0u8; 4];
    mem.read_slice(&mut b, addr).map_err(|_| CopyError {
        addr: addr.0,
        len: b.len(),
    })?;
    Ok(u32::from_le_bytes(b))
}

/// Write `bytes` (a header) into DMA memory at `addr`.
pub(crate) fn write_header(
    mem: &GuestMemoryMmap<()>,
    addr: GuestAddress,
    bytes: &[u8],
) -> Result<(), CopyError> {
    mem.write_slice(bytes, addr).map_err(|_| CopyError {
        addr: addr.0,
        len: bytes.len(),
    })
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // Byte patterns: wrapping to u8 is the point.
mod tests {
    use super::*;
    use crate::dma::{DmaOptions, IovaBase};

    fn region(size: usize) -> DmaRegion {
        DmaRegion::new(&DmaOptions {
            size,
            iova: IovaBase::Fixed(0x10_0000),
            hugetlb: false,
            lock: false,
        })
        .unwrap()
    }

    fn storage(dma: &DmaRegion, tx_chunks: usize, rx_bufs: usize) -> DmaStorage {
        DmaStorage {
            tx_pool: TxPool::new(dma, tx_chunks * TX_CHUNK).unwrap(),
            rx_pool: RxPool::new(dma, rx_bufs, 64 * 1024 + 44, rx_bufs / 2).unwrap(),
            counters: Arc::default(),
        }
    }

    fn read_seg(dma: &DmaRegion, seg: &TxSeg) -> Vec<u8> {
        let mut v = vec![0; seg.len as usize];
        read_dma(dma.memory(), seg.addr, &mut v).unwrap();
        v
    }

    #[test]
    fn tx_bytes_come_out_in_order_in_segments_of_one_chunk() {
        let dma = region(8 << 20);
        let mut st = storage(&dma, 4, 4);
        let mut tx = st.new_tx();
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(tx.append(&data), data.len());
        assert_eq!(st.tx_pool.in_use(), 3);
        let mut out = Vec::new();
        while !tx.is_empty() {
            let n = tx.contiguous().min(40_000);
            assert!(n > 0 && n <= TX_CHUNK);
            let seg = tx.take_segment(n).unwrap();
            out.extend(read_seg(&dma, &seg));
        }
        assert_eq!(out, data);
        assert_eq!(
            st.counters.tx_copied.load(Ordering::Relaxed),
            data.len() as u64
        );
        // The segments are gone, and the queue holds nothing: every chunk is back.
        assert_eq!(st.tx_pool.in_use(), 0);
    }

    #[test]
    fn tx_chunk_stays_allocated_while_a_segment_is_in_flight() {
        let dma = region(8 << 20);
        let mut st = storage(&dma, 2, 4);
        let mut tx = st.new_tx();
        tx.append(b"hello");
        let seg = tx.take_segment(5).unwrap();
        assert!(tx.is_empty());
        assert_eq!(
            st.tx_pool.in_use(),
            1,
            "the in-flight segment holds its chunk"
        );
        assert_eq!(read_seg(&dma, &seg), b"hello");
        drop(seg);
        assert_eq!(st.tx_pool.in_use(), 0);
    }

    #[test]
    fn tx_pool_exhaustion_is_partial_and_reported() {
        let dma = region(8 << 20);
        let mut st = storage(&dma, 1, 4);
        let mut a = st.new_tx();
        let mut b = st.new_tx();
        let big = vec![7u8; TX_CHUNK + 10];
        assert_eq!(a.append(&big), TX_CHUNK, "one chunk only");
        assert!(st.tx_pool.take_exhausted());
        assert_eq!(b.append(b"x"), 0);
        assert!(!b.try_reserve(1));
        let seg = a.take_segment(TX_CHUNK).unwrap();
        assert_eq!(st.tx_pool.in_use(), 1);
        drop(seg);
        assert!(b.try_reserve(1));
        assert_eq!(b.append(b"x"), 1);
    }

    #[test]
    fn tx_reserve_then_append_fills_in_order() {
        let dma = region(8 << 20);
        let mut st = storage(&dma, 4, 4);
        let mut tx = st.new_tx();
        tx.append(&[1; 100]);
        assert!(tx.try_reserve(TX_CHUNK));
        let msg: Vec<u8> = (0..TX_CHUNK).map(|i| i as u8).collect();
        assert_eq!(tx.append(&msg), TX_CHUNK);
        let first = tx.take_segment(tx.contiguous()).unwrap();
        assert_eq!(first.len as usize, TX_CHUNK);
        let second = tx.take_segment(tx.contiguous()).unwrap();
        assert_eq!(second.len, 100);
        let mut out = read_seg(&dma, &first);
        out.extend(read_seg(&dma, &second));
        assert_eq!(&out[..100], &[1; 100]);
        assert_eq!(&out[100..], &msg[..]);
    }

    #[test]
    fn rx_payload_is_read_in_place_once_and_the_buffer_returns() {
        let dma = region(16 << 20);
        let mut st = storage(&dma, 1, 8);
        let mut rx = st.new_rx();
        let buf = st.rx_pool.alloc().unwrap();
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        write_dma(dma.memory(), GuestAddress(buf.addr().0 + 44), &payload).unwrap();
        rx.push(buf, 44, payload.len());
        assert_eq!(st.rx_pool.held(), 1, "the connection holds the buffer");
        let mut out = vec![0; 600];
        rx.read(&mut out);
        assert_eq!(&out[..], &payload[..600]);
        assert_eq!(st.rx_pool.held(), 1);
        let mut rest = vec![0; 400];
        rx.read(&mut rest);
        assert_eq!(&rest[..], &payload[600..]);
        assert_eq!(st.rx_pool.held(), 0, "fully read: back in the pool");
        assert_eq!(st.counters.rx_copied.load(Ordering::Relaxed), 1000);
        assert_eq!(st.counters.rx_copied_out.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn rx_peek_copies_across_segments_and_keeps_everything() {
        let dma = region(16 << 20);
        let mut st = storage(&dma, 1, 8);
        let mut rx = st.new_rx();
        let big: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let small = [0xabu8; 10];
        for (i, part) in [&big[..], &small[..], &big[..]].iter().enumerate() {
            let buf = st.rx_pool.alloc().unwrap();
            write_dma(dma.memory(), GuestAddress(buf.addr().0 + 44), part).unwrap();
            rx.push(buf, 44, part.len());
            assert_eq!(rx.len(), [1000, 1010, 2010][i]);
        }
        let mut want = big.clone();
        want.extend_from_slice(&small);
        want.extend_from_slice(&big);
        let mut out = vec![0; 2010];
        rx.peek(&mut out);
        assert_eq!(out, want, "a DMA segment, a heap tail, a DMA segment");
        assert_eq!(rx.len(), 2010, "nothing consumed");
        rx.discard(5);
        let mut out = vec![0; 1200];
        rx.peek(&mut out);
        assert_eq!(&out[..], &want[5..1205]);
        let mut read = vec![0; 2005];
        rx.read(&mut read);
        assert_eq!(&read[..], &want[5..], "the reader still gets every byte");
    }

    #[test]
    fn tx_reservation_filled_unlocked_then_committed_in_order() {
        let dma = region(16 << 20);
        let mut st = storage(&dma, 4, 1);
        let mut tx = st.new_tx();
        assert_eq!(tx.append(&[1u8; 100]), 100);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut r = tx.reserve(data.len()).expect("chunks free");
        assert_eq!(
            r.len(),
            data.len(),
            "the tail of the first chunk, then a second"
        );
        assert_eq!(tx.len(), 100, "nothing queued before the commit");
        // The sender takes everything queued meanwhile (and lets go of the first chunk).
        let seg = tx.take_segment(100).unwrap();
        assert_eq!(read_seg(&dma, &seg), vec![1u8; 100]);
        assert_eq!(r.fill(&data[..60_000]), 60_000);
        assert_eq!(r.fill(&data[60_000..]), 40_000);
        assert_eq!(tx.commit(r, data.len()), data.len());
        assert_eq!(tx.len(), data.len());
        let mut out = Vec::new();
        while tx.len() > 0 {
            let n = tx.contiguous();
            out.extend(read_seg(&dma, &tx.take_segment(n).unwrap()));
        }
        assert_eq!(out, data);
        assert_eq!(st.counters.tx_copied.load(Ordering::Relaxed), 100 + 100_000);
        drop(seg);
        assert_eq!(st.tx_pool.in_use(), 0, "every chunk back once sent");
    }

    #[test]
    fn tx_reservation_dropped_or_partly_committed_gives_chunks_back() {
        let dma = region(16 << 20);
        let mut st = storage(&dma, 4, 1);
        let mut tx = st.new_tx();
        let r = tx.reserve(3 * TX_CHUNK).unwrap();
        assert_eq!(st.tx_pool.in_use(), 3);
        drop(r);
        assert_eq!(
            st.tx_pool.in_use(),
            0,
            "an abandoned reservation (a reset) frees all"
        );
        let mut r = tx.reserve(3 * TX_CHUNK).unwrap();
        assert_eq!(r.fill(&[9u8; 10]), 10);
        assert_eq!(
            tx.commit(r, 3 * TX_CHUNK),
            10,
            "only what was filled is queued"
        );
        assert_eq!(st.tx_pool.in_use(), 1);
        assert!(tx
            .reserve(4 * TX_CHUNK)
            .is_some_and(|r| r.len() == 4 * TX_CHUNK - 10));
    }

    #[test]
    fn rx_lease_takes_whole_segments_and_shares_a_split_buffer() {
        let dma = region(16 << 20);
        let mut st = storage(&dma, 1, 8);
        let mut rx = st.new_rx();
        let big: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        for _ in 0..2 {
            let buf = st.rx_pool.alloc().unwrap();
            write_dma(dma.memory(), GuestAddress(buf.addr().0 + 44), &big).unwrap();
            rx.push(buf, 44, big.len());
        }
        assert_eq!(st.rx_pool.held(), 2);
        let lease = rx.lease(1500);
        assert_eq!(rx.len(), 500);
        let mut out = vec![0u8; 1500];
        assert_eq!(lease.copy_to(&mut out), 1500);
        assert_eq!(&out[..1000], &big[..]);
        assert_eq!(&out[1000..], &big[..500]);
        drop(lease);
        assert_eq!(
            st.rx_pool.held(),
            1,
            "the split buffer stays: the queue holds its rest"
        );
        let mut rest = vec![0u8; 500];
        rx.read(&mut rest);
        assert_eq!(&rest[..], &big[500..]);
        assert_eq!(st.rx_pool.held(), 0, "the last handle gave it back");
        // The other order: the queue lets go first, the lease keeps the buffer.
        let buf = st.rx_pool.alloc().unwrap();
        rx.push(buf, 44, big.len());
        let lease = rx.lease(10);
        rx.clear();
        assert_eq!(st.rx_pool.held(), 1);
        drop(lease);
        assert_eq!(st.rx_pool.held(), 0);
    }

    #[test]
    fn rx_small_payloads_are_merged_and_release_their_buffers() {
        let dma = region(16 << 20);
        let mut st = storage(&dma, 1, 8);
        let mut rx = st.new_rx();
        for i in 0..10u8 {
            let buf = st.rx_pool.alloc().unwrap();
            write_dma(dma.memory(), GuestAddress(buf.addr().0 + 44), &[i; 64]).unwrap();
            rx.push(buf, 44, 64);
            assert_eq!(st.rx_pool.held(), 0);
        }
        assert_eq!(
            rx.segments(),
            (10 * 64usize).div_ceil(HEAP_TAIL),
            "merged into heap tails"
        );
        let mut out = vec![0; 640];
        rx.read(&mut out);
        for i in 0..10u8 {
            assert!(out[usize::from(i) * 64..][..64].iter().all(|&b| b == i));
        }
    }

    #[test]
    fn rx_connection_over_its_share_is_copied_out() {
        let dma = region(16 << 20);
        let mut st = storage(&dma, 1, 16);
        let share = st.rx_pool.share();
        let mut rx = st.new_rx();
        for _ in 0..share + 3 {
            let buf = st.rx_pool.alloc().unwrap();
            rx.push(buf, 44, 1000);
        }
        assert_eq!(st.rx_pool.held(), share, "only its share stays held");
        rx.discard(rx.len());
        assert_eq!(st.rx_pool.held(), 0);
        assert!(rx.is_empty());
    }

    #[test]
    fn rx_buffers_never_cross_a_huge_page() {
        let dma = region(8 << 20);
        let pool = RxPool::new(&dma, 100, 64 * 1024 + 44, 50).unwrap();
        for i in 0..100 {
            let a = pool.addr(i).unwrap().0;
            let end = a + u64::from(pool.buf_size()) - 1;
            assert_eq!(a / HUGE_PAGE_SIZE as u64, end / HUGE_PAGE_SIZE as u64);
        }
    }
}
