//! Where a connection's payload bytes live.
//!
//! The protocol core does the accounting (credit, what goes out next, message boundaries,
//! shutdown and reset ordering) and never copies a payload byte itself: each connection holds a
//! send queue ([`TxBuf`]) and a receive queue ([`RxBuf`]) of a [`Storage`] the owner of the
//! endpoint chooses. The driver's runtime keeps payload in DMA memory (written once by `send`,
//! read once by `recv`, and put on the rings where it lies); [`HeapStorage`] keeps it in
//! `VecDeque`s, for peers that have no DMA memory of their own (the simulated device's host
//! side, tests, fuzzing).
//!
//! The core calls these methods, and only these: [`TxBuf::append`] / [`TxBuf::try_reserve`] from
//! `send` and `send_msg`, [`RxBuf::read`] / [`RxBuf::discard`] from `recv` and `recv_msg`,
//! [`RxBuf::peek`] from `peek`, and
//! `clear` when nobody will read or send the bytes any more. Bytes enter an [`RxBuf`] and leave a
//! [`TxBuf`] through the owner's own code, in the callbacks of
//! [`Endpoint::handle_packet_with`](super::Endpoint::handle_packet_with) and
//! [`Endpoint::poll_transmit_with`](super::Endpoint::poll_transmit_with), which name exactly how
//! many bytes to move; the core checks afterwards that `len()` moved by that much.

use std::collections::VecDeque;

/// A connection's send queue: bytes the user wrote that have not been put on the wire.
pub trait TxBuf {
    /// Bytes queued.
    fn len(&self) -> usize;
    /// Whether nothing is queued.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The most bytes from the front that lie in one contiguous piece of storage: one packet's
    /// payload never spans two pieces (so it is one descriptor on the ring). At least 1 when
    /// anything is queued.
    fn contiguous(&self) -> usize;
    /// Make sure `n` more bytes can be appended in full (all-or-nothing SEQPACKET messages).
    /// `false`: not now (storage exhausted); nothing changed.
    fn try_reserve(&mut self, n: usize) -> bool;
    /// Copy as much of `data` as storage allows to the back; returns the count (0 when storage
    /// is exhausted).
    fn append(&mut self, data: &[u8]) -> usize;
    /// Drop everything queued (the peer will not read it).
    fn clear(&mut self);
}

/// A connection's receive queue: payload received and not yet read.
pub trait RxBuf {
    /// Bytes queued.
    fn len(&self) -> usize;
    /// Whether nothing is queued.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copy the first `buf.len()` bytes into `buf` and drop them (the core never asks for more
    /// than `len()`).
    fn read(&mut self, buf: &mut [u8]);
    /// Copy the first `buf.len()` bytes into `buf` and keep them (`MSG_PEEK`; the core never
    /// asks for more than `len()`).
    fn peek(&self, buf: &mut [u8]);
    /// Drop the first `n` bytes unread (the core never asks for more than `len()`).
    fn discard(&mut self, n: usize);
    /// Drop everything (nobody will read it).
    fn clear(&mut self);
}

/// Makes the queues of each new connection.
pub trait Storage {
    /// The send queue type.
    type Tx: TxBuf;
    /// The receive queue type.
    type Rx: RxBuf;
    /// A new, empty send queue.
    fn new_tx(&mut self) -> Self::Tx;
    /// A new, empty receive queue.
    fn new_rx(&mut self) -> Self::Rx;
    /// Move the first `n` bytes of `rx` (at most its length) to the back of `tx`, an echo's
    /// way ([`Endpoint::relay`](super::Endpoint::relay)): with no copy where the storage can
    /// hand its memory over. Returns whether it did; `false` (the default) means this storage
    /// cannot, and nothing moved.
    fn relay(rx: &mut Self::Rx, tx: &mut Self::Tx, n: usize) -> bool {
        let _ = (rx, tx, n);
        false
    }
}

/// Payload in heap memory: a `VecDeque<u8>` per queue.
#[derive(Debug, Default, Clone, Copy)]
pub struct HeapStorage;

impl Storage for HeapStorage {
    type Tx = HeapBuf;
    type Rx = HeapBuf;
    fn new_tx(&mut self) -> HeapBuf {
        HeapBuf::default()
    }
    fn new_rx(&mut self) -> HeapBuf {
        HeapBuf::default()
    }
    fn relay(rx: &mut HeapBuf, tx: &mut HeapBuf, n: usize) -> bool {
        rx.relay_into(tx, n);
        true
    }
}

/// The most capacity a [`HeapBuf`] keeps once it is empty: above it, the memory goes back to
/// the allocator when the last byte leaves. An idle connection then holds no payload memory
/// (10,000 connections that each once queued 64 KiB would otherwise keep 640 MiB per
/// direction), while small messages (a ping-pong's) keep reusing one small buffer.
pub const HEAP_BUF_KEEP: usize = 4096;

/// One heap queue of bytes (both directions use the same type). Its capacity is given back
/// when it empties ([`HEAP_BUF_KEEP`]).
#[derive(Debug, Default)]
pub struct HeapBuf(VecDeque<u8>);

impl HeapBuf {
    /// After bytes left: an empty queue above [`HEAP_BUF_KEEP`] frees its memory.
    fn drained(&mut self) {
        if self.0.is_empty() && self.0.capacity() > HEAP_BUF_KEEP {
            self.0 = VecDeque::new();
        }
    }

    /// Bytes the queue can hold before it allocates again.
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Move the first `n` bytes (at most [`HeapBuf::len`]) to the back of `to`. All of them into
    /// an empty queue: the memory changes hands, nothing is copied (an echo that keeps up);
    /// otherwise they are copied once.
    pub fn relay_into(&mut self, to: &mut HeapBuf, n: usize) {
        let n = n.min(self.0.len());
        if n == self.0.len() && to.0.is_empty() {
            std::mem::swap(&mut self.0, &mut to.0);
        } else {
            let (a, b) = self.0.as_slices();
            let first = n.min(a.len());
            crate::copy::extend_deque(&mut to.0, &a[..first]);
            crate::copy::extend_deque(&mut to.0, &b[..n - first]);
            self.0.drain(..n);
        }
        self.drained();
    }

    /// Append `data` (the receive side's way in).
    pub fn push(&mut self, data: &[u8]) {
        crate::copy::extend_deque(&mut self.0, data);
    }

    /// Move the first `out.len()` bytes into `out` (the send side's way out).
    ///
    /// # Panics
    /// If fewer bytes are queued.
    pub fn take_into(&mut self, out: &mut [u8]) {
        assert!(
            out.len() <= self.0.len(),
            "HeapBuf::take_into: not enough bytes"
        );
        crate::copy::take_front(&mut self.0, out);
        self.drained();
    }

    /// The queued bytes, in order, as (at most) two slices.
    pub fn as_slices(&self) -> (&[u8], &[u8]) {
        self.0.as_slices()
    }

    /// Append `len` bytes that `fill` writes in place: it gets (offset into the new bytes,
    /// piece) once, or twice where the deque wraps. For copying straight from memory the
    /// caller cannot borrow as a slice (a device's buffers).
    pub fn push_with(&mut self, len: usize, mut fill: impl FnMut(usize, &mut [u8])) {
        let old = self.0.len();
        self.0.resize(old + len, 0);
        let (a, b) = self.0.as_mut_slices();
        if old >= a.len() {
            fill(0, &mut b[old - a.len()..]);
        } else {
            fill(0, &mut a[old..]);
            let done = a.len() - old;
            if done < len {
                fill(done, &mut b[..len - done]);
            }
        }
    }

    /// Zero-copy append: `f` gets up to `room` zeroed bytes at the back (one or two pieces,
    /// in order), fills them and returns how many bytes (from the first piece on) to keep.
    pub fn fill_with(&mut self, room: usize, f: impl FnOnce(Vec<&mut [u8]>) -> usize) -> usize {
        let old = self.0.len();
        self.0.resize(old + room, 0);
        let (a, b) = self.0.as_mut_slices();
        let pieces = if old >= a.len() {
            vec![&mut b[old - a.len()..]]
        } else {
            let n = room.min(b.len());
            vec![&mut a[old..], &mut b[..n]]
        };
        let pieces: Vec<&mut [u8]> = pieces.into_iter().filter(|p| !p.is_empty()).collect();
        let kept = f(pieces).min(room);
        self.0.truncate(old + kept);
        self.drained();
        kept
    }

    /// Zero-copy read: `f` gets the queued bytes (one or two pieces, in order) and returns how
    /// many (from the first piece on) it consumed; those are dropped. Returns that count.
    pub fn take_in_place(&mut self, f: impl FnOnce(Vec<&mut [u8]>) -> usize) -> usize {
        let len = self.0.len();
        let (a, b) = self.0.as_mut_slices();
        let pieces: Vec<&mut [u8]> = [a, b].into_iter().filter(|p| !p.is_empty()).collect();
        let n = f(pieces).min(len);
        self.0.drain(..n);
        self.drained();
        n
    }

    /// Hand the first `n` bytes to `f` (once, or twice where the deque wraps, with their offset)
    /// and drop them: the send side's way out to memory the caller cannot borrow as a slice.
    ///
    /// # Panics
    /// If fewer than `n` bytes are queued.
    pub fn take_with(&mut self, n: usize, mut f: impl FnMut(usize, &[u8])) {
        assert!(n <= self.0.len(), "HeapBuf::take_with: not enough bytes");
        let (a, b) = self.0.as_slices();
        let from_a = a.len().min(n);
        if from_a > 0 {
            f(0, &a[..from_a]);
        }
        if n > from_a {
            f(from_a, &b[..n - from_a]);
        }
        self.0.drain(..n);
        self.drained();
    }
}

impl TxBuf for HeapBuf {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn contiguous(&self) -> usize {
        self.0.len()
    }
    fn try_reserve(&mut self, n: usize) -> bool {
        self.0.reserve(n);
        true
    }
    fn append(&mut self, data: &[u8]) -> usize {
        self.push(data);
        data.len()
    }
    fn clear(&mut self) {
        self.0.clear();
        self.drained();
    }
}

impl RxBuf for HeapBuf {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn read(&mut self, buf: &mut [u8]) {
        self.take_into(buf);
    }
    fn peek(&self, buf: &mut [u8]) {
        let (a, b) = self.0.as_slices();
        let n = buf.len().min(a.len());
        buf[..n].copy_from_slice(&a[..n]);
        let m = (buf.len() - n).min(b.len());
        buf[n..n + m].copy_from_slice(&b[..m]);
    }
    fn discard(&mut self, n: usize) {
        self.0.drain(..n.min(self.0.len()));
        self.drained();
    }
    fn clear(&mut self) {
        self.0.clear();
        self.drained();
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // Byte patterns: wrapping to u8 is the point.
mod tests {
    use super::*;

    #[test]
    fn relay_hands_a_whole_queue_over_and_copies_a_part_in_order() {
        let mut rx = HeapBuf::default();
        rx.push(&[1, 2, 3, 4, 5]);
        let mut tx = HeapBuf::default();
        // All into an empty queue: the memory changes hands.
        let before = rx.as_slices().0.as_ptr();
        HeapStorage::relay(&mut rx, &mut tx, 5);
        assert!(rx.is_empty());
        assert_eq!(
            tx.as_slices().0.as_ptr(),
            before,
            "the same memory, not a copy"
        );
        assert_eq!(tx.as_slices(), (&[1, 2, 3, 4, 5][..], &[][..]));
        // A part, behind what is queued: copied, in order, wherever the deque wraps.
        rx.push(&[6, 7, 8]);
        HeapStorage::relay(&mut rx, &mut tx, 2);
        let (a, b) = tx.as_slices();
        assert_eq!([a, b].concat(), [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(rx.as_slices(), (&[8][..], &[][..]));
    }

    #[test]
    fn a_heap_queue_gives_its_memory_back_when_it_empties_and_keeps_a_small_one() {
        let big = vec![7u8; 64 * 1024];
        // Every way bytes leave: read, discard, take_with, take_in_place, clear.
        let drains: [fn(&mut HeapBuf); 5] = [
            |q| {
                let mut out = vec![0; q.len()];
                RxBuf::read(q, &mut out);
            },
            |q| RxBuf::discard(q, q.len()),
            |q| q.take_with(q.len(), |_, _| {}),
            |q| {
                q.take_in_place(|p| p.iter().map(|p| p.len()).sum());
            },
            |q| RxBuf::clear(q),
        ];
        for (i, drain) in drains.iter().enumerate() {
            let mut q = HeapBuf::default();
            q.push(&big);
            assert!(q.capacity() >= big.len(), "drain {i}");
            drain(&mut q);
            assert!(q.is_empty(), "drain {i}");
            assert_eq!(
                q.capacity(),
                0,
                "drain {i}: an empty big queue frees its memory"
            );
        }
        // Part of it read: the rest stays where it is.
        let mut q = HeapBuf::default();
        q.push(&big);
        RxBuf::discard(&mut q, 1000);
        assert!(q.capacity() >= big.len() - 1000);
        // A small queue keeps its buffer (no allocation per message in a ping-pong).
        let mut q = HeapBuf::default();
        q.push(&[1; 64]);
        let cap = q.capacity();
        RxBuf::discard(&mut q, 64);
        assert!(cap > 0 && cap <= HEAP_BUF_KEEP);
        assert_eq!(q.capacity(), cap);
    }

    #[test]
    fn heap_push_with_and_take_with_keep_order_across_the_wrap() {
        let mut q = HeapBuf::default();
        // Move the deque's head so that later pushes wrap.
        q.push(&[0; 10]);
        RxBuf::discard(&mut q, 10);
        let mut want = Vec::new();
        for round in 0..50u8 {
            let len = 1 + usize::from(round) * 7;
            q.push_with(len, |off, piece| {
                for (i, b) in piece.iter_mut().enumerate() {
                    *b = round.wrapping_add((off + i) as u8);
                }
            });
            want.extend((0..len).map(|i| round.wrapping_add(i as u8)));
            let n = len / 2;
            let mut got = Vec::new();
            q.take_with(n, |off, piece| {
                assert_eq!(off, got.len());
                got.extend_from_slice(piece);
            });
            assert_eq!(got, want.drain(..n).collect::<Vec<_>>());
        }
        assert_eq!(q.len(), want.len());
    }
}
