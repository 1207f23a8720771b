// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Bulk byte copies that stay fast whatever the buffers' addresses.
//!
//! glibc (2.36, x86-64) copies blocks of 4 KiB and more with `rep movsb`. On AMD EPYC (FSRM) that
//! instruction runs about 20x slower when the destination sits 1 to 63 bytes above the source
//! modulo 4 KiB (4K aliasing): a 64 KiB copy measured 12 Gbit/s instead of 280. Our buffers make
//! that likely, not rare: a page-aligned user buffer copied into a `VecDeque` that the allocator
//! placed 16 bytes into a page hits it on every write, and the bench's one-way throughput over
//! `sim` read 7 to 11 Gbit/s instead of 20 to 25. Copies below the `rep movsb` threshold use
//! vector loops, which do not care, so the copies here go in [`CHUNK`]-byte pieces when the
//! distance is in that window, and in one piece otherwise ([`piece_len`] is the rule).
//! `vdpa-vsock bench --buffer-offset N` shows the effect.
//!
//! Used by every copy of payload bytes: into and out of the protocol buffers, and between
//! buffers and DMA memory.

use std::collections::VecDeque;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{VolatileMemoryError, VolatileSlice};

/// Piece size when the addresses alias: below every `rep movsb` threshold glibc picks (2 KiB at
/// the least).
pub(crate) const CHUNK: usize = 1024;

/// Whether a forward copy from `src` to `dst` falls in the slow window: `dst` 1..=63 bytes above
/// `src` modulo 4 KiB.
fn aliases(dst: *const u8, src: *const u8) -> bool {
    let gap = (dst as usize).wrapping_sub(src as usize) & 4095;
    (1..64).contains(&gap)
}

/// The piece size for copying `n` bytes from `src` to `dst`: all at once (`n`, at least 1), or
/// [`CHUNK`] when the addresses alias. For copies that cannot use [`copy_bytes`], such as those
/// into and out of DMA memory.
pub(crate) fn piece_len(n: usize, dst: *const u8, src: *const u8) -> usize {
    if n > CHUNK && aliases(dst, src) {
        CHUNK
    } else {
        n.max(1)
    }
}

/// `dst.copy_from_slice(src)`, in pieces when the addresses alias (see the module docs).
///
/// # Panics
/// If the lengths differ, like `copy_from_slice`.
pub(crate) fn copy_bytes(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_bytes: length mismatch");
    let piece = piece_len(src.len(), dst.as_ptr(), src.as_ptr());
    for (d, s) in dst.chunks_mut(piece).zip(src.chunks(piece)) {
        d.copy_from_slice(s);
    }
}

/// Copy `dst.len()` bytes from `src` at byte `offset` into `dst` (memory another agent may
/// write, such as a device's buffer, is only read through the volatile slice), in pieces when
/// the addresses alias.
pub(crate) fn from_volatile<B: BitmapSlice>(
    src: &VolatileSlice<'_, B>,
    offset: usize,
    dst: &mut [u8],
) -> Result<(), VolatileMemoryError> {
    let src = src.subslice(offset, dst.len())?;
    let piece = piece_len(dst.len(), dst.as_ptr(), src.ptr_guard().as_ptr());
    for (i, part) in dst.chunks_mut(piece).enumerate() {
        src.subslice(i * piece, part.len())?.copy_to(part);
    }
    Ok(())
}

/// Copy `src` into `dst` at byte `offset` (through the volatile slice), in pieces when the
/// addresses alias.
pub(crate) fn to_volatile<B: BitmapSlice>(
    dst: &VolatileSlice<'_, B>,
    offset: usize,
    src: &[u8],
) -> Result<(), VolatileMemoryError> {
    let dst = dst.subslice(offset, src.len())?;
    let piece = piece_len(src.len(), dst.ptr_guard().as_ptr(), src.as_ptr());
    for (i, part) in src.chunks(piece).enumerate() {
        dst.subslice(i * piece, part.len())?.copy_from(part);
    }
    Ok(())
}

/// Copy `n` bytes from `src` at `src_offset` to `dst` at `dst_offset`, both memory another agent
/// may touch (a device's view of the driver's buffers), in pieces when the addresses alias.
pub(crate) fn between_volatile<B: BitmapSlice, C: BitmapSlice>(
    dst: &VolatileSlice<'_, B>,
    dst_offset: usize,
    src: &VolatileSlice<'_, C>,
    src_offset: usize,
    n: usize,
) -> Result<(), VolatileMemoryError> {
    let dst = dst.subslice(dst_offset, n)?;
    let src = src.subslice(src_offset, n)?;
    let piece = piece_len(n, dst.ptr_guard().as_ptr(), src.ptr_guard().as_ptr());
    let mut done = 0;
    while done < n {
        let k = piece.min(n - done);
        src.subslice(done, k)?
            .copy_to_volatile_slice(dst.subslice(done, k)?);
        done += k;
    }
    Ok(())
}

/// Append `src` to `q`. Always in pieces: where the deque will put the bytes is not known before
/// they are there, and a piece costs no more than one large copy (the vector loop is as fast as
/// `rep movsb` on cached data).
pub(crate) fn extend_deque(q: &mut VecDeque<u8>, src: &[u8]) {
    q.reserve(src.len());
    for piece in src.chunks(CHUNK) {
        q.extend(piece);
    }
}

/// Move the first `out.len()` bytes of `q` into `out` (the caller checked `q` holds that many).
pub(crate) fn take_front(q: &mut VecDeque<u8>, out: &mut [u8]) {
    let n = out.len();
    let (a, b) = q.as_slices();
    let from_a = a.len().min(n);
    copy_bytes(&mut out[..from_a], &a[..from_a]);
    copy_bytes(&mut out[from_a..], &b[..n - from_a]);
    q.drain(..n);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| {
                (i % 251).to_le_bytes()[0]
                    .wrapping_mul(31)
                    .wrapping_add(seed)
            })
            .collect()
    }

    #[test]
    fn aliasing_window_is_1_to_63_bytes_above_modulo_4k() {
        // Only the address matters: a pointer without provenance (never dereferenced).
        let base = std::ptr::without_provenance::<u8>(0x10_0000);
        let at = |off: usize| base.wrapping_add(off);
        assert!(!aliases(at(0), at(0)));
        assert!(aliases(at(1), at(0)));
        assert!(aliases(at(16), at(0)));
        assert!(aliases(at(63), at(0)));
        assert!(!aliases(at(64), at(0)));
        assert!(aliases(at(4096 + 16), at(0)), "modulo 4 KiB");
        assert!(aliases(at(8), at(4096 * 3 - 8)), "wraps across pages");
        assert!(!aliases(at(0), at(16)), "dst below src is fine");
    }

    /// Every distance class and length (empty, below, at and above a piece, not a multiple):
    /// the bytes arrive intact.
    #[test]
    fn copy_bytes_is_exact_at_every_distance() {
        let src_all = pattern(3 * 4096 + 200, 7);
        let mut dst_all = vec![0u8; 3 * 4096 + 200];
        let src_base = src_all.as_ptr().align_offset(4096);
        let dst_base = dst_all.as_ptr().align_offset(4096);
        for gap in [0usize, 1, 16, 44, 63, 64, 2048, 4095] {
            for len in [
                0usize,
                1,
                CHUNK - 1,
                CHUNK,
                CHUNK + 1,
                2 * CHUNK + 17,
                4096 + 100,
            ] {
                let s = &src_all[src_base..src_base + len];
                dst_all.fill(0);
                let d = &mut dst_all[dst_base + gap..dst_base + gap + len];
                assert_eq!(aliases(d.as_ptr(), s.as_ptr()), (1..64).contains(&gap));
                copy_bytes(d, s);
                assert_eq!(d, s, "gap {gap} len {len}");
                assert!(dst_all[..dst_base + gap].iter().all(|&b| b == 0));
                assert!(dst_all[dst_base + gap + len..].iter().all(|&b| b == 0));
            }
        }
    }

    #[test]
    #[should_panic(expected = "length mismatch")]
    fn copy_bytes_refuses_different_lengths() {
        copy_bytes(&mut [0u8; 3], &[1u8; 4]);
    }

    /// Through wrap-around of the ring: what goes in comes out, in order.
    #[test]
    fn volatile_copies_are_exact_at_every_offset_and_distance() {
        let src = pattern(3 * CHUNK + 77, 9);
        let mut mem = vec![0u8; 8192 + 3 * CHUNK + 200];
        for distance in [0usize, 1, 16, 63, 64, 4095] {
            for offset in [0usize, 1, 100] {
                mem.fill(0);
                let slice = VolatileSlice::from(&mut mem[distance..]);
                to_volatile(&slice, offset, &src).unwrap();
                let mut back = vec![0u8; src.len()];
                from_volatile(&slice, offset, &mut back).unwrap();
                assert_eq!(back, src, "distance {distance}, offset {offset}");
                assert!(mem[..distance + offset].iter().all(|&b| b == 0));
            }
        }
        let slice = VolatileSlice::from(&mut mem[..10]);
        assert!(to_volatile(&slice, 5, &[1; 6]).is_err(), "past the end");
        assert!(
            from_volatile(&slice, 11, &mut [0; 0]).is_err(),
            "offset past the end"
        );
    }

    #[test]
    fn deque_round_trip_across_the_wrap() {
        let mut q = VecDeque::with_capacity(8 * 1024);
        let mut expect = VecDeque::new();
        let mut seed = 0u8;
        for round in 0..50usize {
            let chunk = pattern(1 + (round * 977) % (3 * CHUNK), seed);
            seed = seed.wrapping_add(1);
            extend_deque(&mut q, &chunk);
            expect.extend(&chunk);
            let take = (round * 1303) % (q.len() + 1);
            let mut out = vec![0u8; take];
            take_front(&mut q, &mut out);
            let want: Vec<u8> = expect.drain(..take).collect();
            assert_eq!(out, want, "round {round}");
            assert_eq!(q, expect);
        }
    }
}
