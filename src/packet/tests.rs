// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Unit tests of the packet parser, grouped by constructor: accepted layouts first, then every
//! error path, then the header accessors. Chains are built with virtio-queue's `MockSplitQueue`;
//! the queue itself lives at address 0, buffers from 0x1000 up.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures: flag constants, header size and region sizes all fit"
)]

use super::*;

use proptest::prelude::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

type Mem = GuestMemoryMmap<()>;
type Chain<'m> = DescriptorChain<&'m Mem>;
/// A chain as `(addr, len, flags)` descriptors.
type Shape = &'static [(u64, u32, u16)];

/// Device-readable (TX) descriptor flags.
const R: u16 = 0;
/// Device-writable (RX) descriptor flags.
const W: u16 = VRING_DESC_F_WRITE as u16;
const MAX: u32 = 64 * 1024;
const HDR: u32 = PKT_HEADER_SIZE as u32;
/// Size of each region of the multi-region memories.
const REGION: u64 = 0x1_0000;
/// Start of the region that ends just below `u64::MAX` (vm-memory refuses `start + size` overflow).
const HIGH: u64 = u64::MAX - REGION;

/// One 1 MiB region.
fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// Two adjacent regions: a buffer crossing `REGION` spans two host mappings.
fn fragmented_mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION as usize),
        (GuestAddress(REGION), REGION as usize),
    ])
    .unwrap()
}

/// The queue's region at 0 plus one ending just below `u64::MAX`.
fn high_mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION as usize),
        (GuestAddress(HIGH), REGION as usize),
    ])
    .unwrap()
}

/// Build a chain of `(addr, len, flags)` descriptors (NEXT flags are set by the mock).
#[track_caller]
fn chain<'m>(mem: &'m Mem, descs: &[(u64, u32, u16)]) -> Chain<'m> {
    let vq = MockSplitQueue::new(mem, 16);
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)))
        .collect();
    vq.build_desc_chain(&raw).unwrap();
    pop(mem, &vq)
}

/// The first available chain of the mock queue, borrowing only the memory.
#[track_caller]
fn pop<'m>(mem: &'m Mem, vq: &MockSplitQueue<'m, Mem>) -> Chain<'m> {
    let mut queue: Queue = vq.create_queue().unwrap();
    queue.pop_descriptor_chain(mem).unwrap()
}

/// A one-descriptor chain whose head claims a next descriptor at an index outside the queue.
#[track_caller]
fn dangling_chain(mem: &Mem, addr: u64, len: u32, flags: u16) -> Chain<'_> {
    let vq = MockSplitQueue::new(mem, 16);
    let desc = SplitDescriptor::new(addr, len, flags | VRING_DESC_F_NEXT as u16, 20);
    vq.add_desc_chains(&[RawDescriptor::from(desc)], 0).unwrap();
    pop(mem, &vq)
}

/// The header template: every field distinct, so a mixed-up offset shows.
fn hdr(len: u32) -> Header {
    Header {
        src_cid: 0x0102_0304_0506_0708,
        dst_cid: 2,
        src_port: 1024,
        dst_port: 0xdead_beef,
        len,
        type_: SocketType::Stream as u16,
        op: Op::Rw as u16,
        flags: 0x0a0b_0c0d,
        buf_alloc: 0x4_0000,
        fwd_cnt: 77,
    }
}

/// Write `bytes` over the `(addr, n)` fragments in order.
#[track_caller]
fn write_frags(mem: &Mem, bytes: &[u8], frags: &[(u64, usize)]) {
    let mut done = 0;
    for &(addr, n) in frags {
        mem.write_slice(&bytes[done..done + n], GuestAddress(addr))
            .unwrap();
        done += n;
    }
    assert_eq!(done, bytes.len(), "fragments must cover the bytes");
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 1) as u8).collect()
}

#[track_caller]
fn data_of<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Vec<u8> {
    let mut buf = vec![0u8; pkt.data_len()];
    assert_eq!(pkt.read_data(&mut buf).unwrap(), buf.len());
    buf
}

#[track_caller]
fn header_mem<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Header {
    let mut raw = [0u8; PKT_HEADER_SIZE];
    pkt.read_header_bytes(&mut raw).unwrap();
    Header::from_bytes(&raw)
}

/// Does every slice of the packet lie inside one region of `mem`?
fn slices_in_memory<B: BitmapSlice>(mem: &Mem, pkt: &VsockPacket<'_, B>) -> bool {
    pkt.header_slices().chain(pkt.data_slices()).all(|s| {
        let start = s.ptr_guard().as_ptr() as usize;
        let end = start + s.len();
        mem.iter().any(|r| {
            let host = r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            start >= host && end <= host + r.len() as usize
        })
    })
}

fn tx<'m>(mem: &'m Mem, c: &mut Chain<'m>) -> Result<VsockPacket<'m, ()>> {
    VsockPacket::from_tx_virtq_chain(mem, c, MAX)
}

fn rx<'m>(mem: &'m Mem, c: &mut Chain<'m>) -> Result<VsockPacket<'m, ()>> {
    VsockPacket::from_rx_virtq_chain(mem, c, MAX)
}

// ---------------------------------------------------------------------------------------------
// TX: accepted layouts
// ---------------------------------------------------------------------------------------------

#[test]
fn tx_header_only() {
    let mem = mem();
    mem.write_slice(&hdr(0).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let pkt = tx(&mem, &mut chain(&mem, &[(0x1000, HDR, R)])).unwrap();
    assert_eq!(pkt.header(), hdr(0));
    assert!(pkt.data_slice().is_none());
    assert_eq!(pkt.data_slices().count(), 0);
    assert_eq!(pkt.data_len(), 0);
    assert_eq!(pkt.header_slices().count(), 1);
    assert_eq!(pkt.header_slice().len(), PKT_HEADER_SIZE);
}

#[test]
fn tx_header_only_ignores_what_follows() {
    // As 0.12: a len-0 packet ignores any following descriptor, even a write-only one.
    let mem = mem();
    mem.write_slice(&hdr(0).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let mut c = chain(&mem, &[(0x1000, 100, R), (0xFFFF_0000, 8, W)]);
    let pkt = tx(&mem, &mut c).unwrap();
    assert!(pkt.is_empty());
    assert_eq!(pkt.data_len(), 0);
}

#[test]
fn tx_header_and_data_in_one_desc() {
    let mem = mem();
    let data = payload(100);
    mem.write_slice(&hdr(100).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    mem.write_slice(&data, GuestAddress(0x1000 + 44)).unwrap();
    // The descriptor may be longer than header + len; the payload is exactly len bytes.
    let pkt = tx(&mem, &mut chain(&mem, &[(0x1000, HDR + 200, R)])).unwrap();
    assert_eq!(pkt.len(), 100);
    let ds = pkt.data_slice().unwrap();
    assert_eq!(ds.len(), 100);
    assert_eq!(ds.ptr_guard().as_ptr(), unsafe_free_ptr(&mem, 0x1000 + 44));
    assert_eq!(data_of(&pkt), data);
}

/// The host pointer of guest address `addr` (to compare slice positions).
fn unsafe_free_ptr(mem: &Mem, addr: u64) -> *const u8 {
    mem.get_host_address(GuestAddress(addr)).unwrap() as *const u8
}

#[test]
fn tx_header_and_data_in_two_descs() {
    let mem = mem();
    let data = payload(300);
    mem.write_slice(&hdr(300).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    mem.write_slice(&data, GuestAddress(0x8000)).unwrap();
    let pkt = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, R), (0x8000, 4096, R)]),
    )
    .unwrap();
    assert_eq!(pkt.header(), hdr(300));
    assert_eq!(pkt.data_slice().unwrap().len(), 300);
    assert_eq!(data_of(&pkt), data);
}

#[test]
fn tx_head_padding_is_skipped_when_head_has_next() {
    // The 0.12 rule: header fully in a head that has a next descriptor => payload starts at the
    // next descriptor, the head's remaining bytes are padding.
    let mem = mem();
    let data = payload(10);
    mem.write_slice(&hdr(10).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    mem.write_slice(&[0xEE; 56], GuestAddress(0x1000 + 44))
        .unwrap();
    mem.write_slice(&data, GuestAddress(0x8000)).unwrap();
    let pkt = tx(&mem, &mut chain(&mem, &[(0x1000, 100, R), (0x8000, 10, R)])).unwrap();
    assert_eq!(data_of(&pkt), data);
}

#[test]
fn tx_header_split_over_two_descs() {
    let mem = mem();
    let data = payload(50);
    write_frags(&mem, &hdr(50).to_bytes(), &[(0x1000, 20), (0x2000, 24)]);
    mem.write_slice(&data, GuestAddress(0x3000)).unwrap();
    let mut c = chain(&mem, &[(0x1000, 20, R), (0x2000, 24, R), (0x3000, 50, R)]);
    let pkt = tx(&mem, &mut c).unwrap();
    assert_eq!(pkt.header(), hdr(50));
    let lens: Vec<usize> = pkt.header_slices().map(|s| s.len()).collect();
    assert_eq!(lens, [20, 24]);
    assert_eq!(data_of(&pkt), data);
}

#[test]
fn tx_header_split_over_three_descs_payload_continues_in_the_last() {
    // 10 + 0 (skipped) + 20 + 14 header bytes; the rest of the fourth descriptor is payload
    // (the compat rule only applies to the head), then one more payload descriptor.
    let mem = mem();
    let data = payload(30);
    write_frags(
        &mem,
        &hdr(30).to_bytes(),
        &[(0x1000, 10), (0x2000, 20), (0x3000, 14)],
    );
    mem.write_slice(&data[..6], GuestAddress(0x3000 + 14))
        .unwrap();
    mem.write_slice(&data[6..], GuestAddress(0x4000)).unwrap();
    let mut c = chain(
        &mem,
        &[
            (0x1000, 10, R),
            (0x9000, 0, R),
            (0x2000, 20, R),
            (0x3000, 20, R),
            (0x4000, 100, R),
        ],
    );
    let pkt = tx(&mem, &mut c).unwrap();
    assert_eq!(pkt.header(), hdr(30));
    assert_eq!(pkt.header_slices().count(), 3);
    assert_eq!(
        pkt.data_slices().map(|s| s.len()).collect::<Vec<_>>(),
        [6, 24]
    );
    assert!(
        pkt.data_slice().is_none(),
        "fragmented payload has no single slice"
    );
    assert_eq!(data_of(&pkt), data);
}

#[test]
fn tx_payload_over_four_descs() {
    let mem = mem();
    let data = payload(1000);
    mem.write_slice(&hdr(1000).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let frags = [(0x2000, 100), (0x3000, 400), (0x4000, 250), (0x5000, 250)];
    write_frags(&mem, &data, &frags);
    let mut descs = vec![(0x1000, HDR, R)];
    // The last descriptor is longer than needed; only len bytes are payload.
    descs.extend(frags.iter().map(|&(a, n)| (a, n as u32, R)));
    descs[4].1 = 4096;
    let pkt = tx(&mem, &mut chain(&mem, &descs)).unwrap();
    assert_eq!(
        pkt.data_slices().map(|s| s.len()).collect::<Vec<_>>(),
        [100, 400, 250, 250]
    );
    assert_eq!(pkt.data_len(), 1000);
    assert_eq!(data_of(&pkt), data);
    // A short read stops at the buffer's end, across fragments.
    let mut small = [0u8; 150];
    assert_eq!(pkt.read_data(&mut small).unwrap(), 150);
    assert_eq!(&small[..], &data[..150]);
}

/// `read_data_at`/`write_data_at` start anywhere in a fragmented payload, cross fragment
/// boundaries, and stop where the payload ends.
#[test]
fn data_at_an_offset_across_fragments() {
    let mem = mem();
    let data = payload(1000);
    mem.write_slice(&hdr(1000).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let frags = [(0x2000, 100), (0x3000, 400), (0x4000, 250), (0x5000, 250)];
    write_frags(&mem, &data, &frags);
    let mut descs = vec![(0x1000, HDR, R)];
    descs.extend(frags.iter().map(|&(a, n)| (a, n as u32, R)));
    let pkt = tx(&mem, &mut chain(&mem, &descs)).unwrap();
    for (offset, len) in [
        (0, 1000),
        (99, 2),
        (100, 400),
        (350, 500),
        (990, 50),
        (1000, 5),
    ] {
        let mut buf = vec![0u8; len];
        let n = pkt.read_data_at(offset, &mut buf).unwrap();
        assert_eq!(n, len.min(1000 - offset), "offset {offset}");
        assert_eq!(&buf[..n], &data[offset..offset + n], "offset {offset}");
    }
    let patch = [0xeeu8; 300];
    assert_eq!(pkt.write_data_at(450, &patch).unwrap(), 300);
    let mut all = vec![0u8; 1000];
    assert_eq!(pkt.read_data(&mut all).unwrap(), 1000);
    assert_eq!(&all[..450], &data[..450]);
    assert_eq!(&all[450..750], &patch[..]);
    assert_eq!(&all[750..], &data[750..]);
    assert_eq!(
        pkt.write_data_at(900, &patch).unwrap(),
        100,
        "stops at the end"
    );
}

#[test]
fn tx_zero_length_descs_are_skipped() {
    let mem = mem();
    let data = payload(20);
    mem.write_slice(&hdr(20).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    write_frags(&mem, &data, &[(0x2000, 5), (0x3000, 15)]);
    let mut c = chain(
        &mem,
        &[
            (0x1000, HDR, R),
            (0x7000, 0, R),
            (0x2000, 5, R),
            (0x7000, 0, R),
            (0x3000, 15, R),
        ],
    );
    let pkt = tx(&mem, &mut c).unwrap();
    assert_eq!(pkt.data_slices().count(), 2);
    assert_eq!(data_of(&pkt), data);
}

#[test]
fn tx_descs_after_the_payload_are_ignored() {
    let mem = mem();
    mem.write_slice(&hdr(8).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    // The third descriptor is write-only and outside memory: never looked at.
    let mut c = chain(
        &mem,
        &[(0x1000, HDR, R), (0x2000, 8, R), (0xFFFF_FFFF_0000, 8, W)],
    );
    let pkt = tx(&mem, &mut c).unwrap();
    assert_eq!(pkt.data_len(), 8);
}

#[test]
fn tx_len_equal_to_max_is_accepted() {
    let mem = mem();
    mem.write_slice(&hdr(100).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let mut c = chain(&mem, &[(0x1000, HDR, R), (0x2000, 100, R)]);
    let pkt = VsockPacket::from_tx_virtq_chain(&mem, &mut c, 100).unwrap();
    assert_eq!(pkt.data_len(), 100);
}

// ---------------------------------------------------------------------------------------------
// TX: errors
// ---------------------------------------------------------------------------------------------

#[test]
fn tx_exhausted_chain_is_too_short() {
    let mem = mem();
    let mut c = chain(&mem, &[(0x1000, HDR, R)]);
    while c.next().is_some() {}
    let err = tx(&mem, &mut c).unwrap_err();
    assert!(matches!(err, Error::DescriptorChainTooShort(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "descriptor chain too short: expected a head descriptor holding the packet header, \
         found an empty chain"
    );
}

#[test]
fn tx_write_only_head() {
    let mem = mem();
    let err = tx(&mem, &mut chain(&mem, &[(0x1000, HDR, W)])).unwrap_err();
    assert!(
        matches!(err, Error::UnexpectedWriteOnlyDescriptor { index: 0 }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "unexpected write-only descriptor (index 0 in the chain): TX buffers must be device-readable"
    );
}

#[test]
fn tx_write_only_at_every_index() {
    // Index 1: the data descriptor; index 1 and 2 of a split header; index 3 in the payload.
    let mem = mem();
    mem.write_slice(&hdr(100).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let cases: [(Shape, usize); 4] = [
        (&[(0x1000, HDR, R), (0x2000, 100, W)], 1),
        (&[(0x1000, 20, R), (0x1014, 24, W), (0x2000, 100, R)], 1),
        (&[(0x1000, 20, R), (0x1014, 4, R), (0x1018, 20, W)], 2),
        (
            &[
                (0x1000, HDR, R),
                (0x2000, 10, R),
                (0x3000, 10, R),
                (0x4000, 80, W),
            ],
            3,
        ),
    ];
    for (descs, want) in cases {
        let err = tx(&mem, &mut chain(&mem, descs)).unwrap_err();
        match err {
            Error::UnexpectedWriteOnlyDescriptor { index } => assert_eq!(index, want, "{descs:?}"),
            e => panic!("{descs:?}: expected UnexpectedWriteOnlyDescriptor, got {e:?}"),
        }
    }
}

#[test]
fn tx_head_shorter_than_header_without_next() {
    let mem = mem();
    let err = tx(&mem, &mut chain(&mem, &[(0x1000, 30, R)])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 44,
                found: 30
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "descriptor length too small: expected at least 44 bytes, found 30"
    );
}

#[test]
fn tx_split_header_chain_ends_early() {
    let mem = mem();
    let err = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, 20, R), (0x2000, 0, R), (0x3000, 10, R)]),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 44,
                found: 30
            }
        ),
        "{err:?}"
    );
    // Head claims a next descriptor that is not there.
    let err = tx(&mem, &mut dangling_chain(&mem, 0x1000, 20, R)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 44,
                found: 20
            }
        ),
        "{err:?}"
    );
}

#[test]
fn tx_len_above_max() {
    let mem = mem();
    mem.write_slice(&hdr(MAX + 1).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let err = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, R), (0x2000, MAX + 1, R)]),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::InvalidHeaderLen { len, max: MAX } if len == MAX + 1),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "invalid header `len` field: 65537 exceeds the maximum of 65536"
    );
}

#[test]
fn tx_one_desc_too_short_for_len() {
    let mem = mem();
    mem.write_slice(&hdr(100).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    for len in [HDR, HDR + 99] {
        let err = tx(&mem, &mut chain(&mem, &[(0x1000, len, R)])).unwrap_err();
        assert!(matches!(err, Error::DescriptorChainTooShort(_)), "{err:?}");
        assert!(err.to_string().contains("expected"), "{err}");
    }
}

#[test]
fn tx_one_desc_too_short_is_refused_before_touching_memory() {
    // Parity with 0.12: a head without next that cannot hold the payload is "chain too short",
    // even when the head's remaining bytes are outside memory.
    let mem = fragmented_mem();
    mem.write_slice(&hdr(100).to_bytes(), GuestAddress(REGION * 2 - 44 - 10))
        .unwrap();
    let err = tx(&mem, &mut chain(&mem, &[(REGION * 2 - 54, HDR + 50, R)])).unwrap_err();
    assert!(matches!(err, Error::DescriptorChainTooShort(_)), "{err:?}");
}

#[test]
fn tx_head_has_next_but_chain_ends() {
    let mem = mem();
    mem.write_slice(&hdr(10).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let err = tx(&mem, &mut dangling_chain(&mem, 0x1000, HDR, R)).unwrap_err();
    assert!(matches!(err, Error::DescriptorChainTooShort(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "descriptor chain too short: expected a descriptor holding the packet payload after the \
         header"
    );
}

#[test]
fn tx_data_desc_too_short() {
    let mem = mem();
    mem.write_slice(&hdr(100).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let err = tx(&mem, &mut chain(&mem, &[(0x1000, HDR, R), (0x2000, 99, R)])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 100,
                found: 99
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "descriptor length too small: expected at least 100 bytes, found 99"
    );
    // Refused on its length before its (invalid) address is looked at, as 0.12 does.
    let err = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, R), (0xFFFF_0000_0000, 99, R)]),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::DescriptorLengthTooSmall { .. }),
        "{err:?}"
    );
    // Several payload descriptors that together fall short.
    let err = tx(
        &mem,
        &mut chain(
            &mem,
            &[
                (0x1000, HDR, R),
                (0x2000, 30, R),
                (0x3000, 0, R),
                (0x4000, 30, R),
            ],
        ),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 100,
                found: 60
            }
        ),
        "{err:?}"
    );
}

#[test]
fn tx_invalid_memory_access() {
    let mem = mem();
    // Header outside memory.
    let err = tx(&mem, &mut chain(&mem, &[(0x20_0000, HDR, R)])).unwrap_err();
    assert!(matches!(err, Error::InvalidMemoryAccess(_)), "{err:?}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "the cause survives"
    );
    // Data outside memory.
    mem.write_slice(&hdr(10).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let err = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, R), (0x20_0000, 10, R)]),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidMemoryAccess(_)), "{err:?}");
    // Split header with its second fragment outside memory.
    let err = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, 20, R), (0x20_0000, 24, R)]),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidMemoryAccess(_)), "{err:?}");
}

#[test]
fn tx_fragmented_memory() {
    let mem = fragmented_mem();
    // Header crossing the two regions.
    let err = tx(&mem, &mut chain(&mem, &[(REGION - 20, HDR, R)])).unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { addr, len: 44 } if addr == REGION - 20),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "descriptor buffer at 0xffec of 44 bytes stretches over multiple memory fragments"
    );
    // Payload crossing them, in the head and in a data descriptor.
    mem.write_slice(&hdr(40).to_bytes(), GuestAddress(REGION - 64))
        .unwrap();
    let err = tx(&mem, &mut chain(&mem, &[(REGION - 64, 200, R)])).unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { len: 40, .. }),
        "{err:?}"
    );
    mem.write_slice(&hdr(40).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let err = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, R), (REGION - 8, 40, R)]),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { len: 40, .. }),
        "{err:?}"
    );
    // A buffer reaching past the end of memory is cut short, like a fragment.
    let err = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, R), (2 * REGION - 8, 40, R)]),
    )
    .unwrap_err();
    assert!(matches!(err, Error::FragmentedMemory { .. }), "{err:?}");
}

#[test]
fn tx_addresses_near_u64_max_are_errors_not_panics() {
    let mem = high_mem();
    let top = u64::MAX - 1; // the last byte of memory
    mem.write_slice(&hdr(20).to_bytes(), GuestAddress(top - 63))
        .unwrap();
    // Header runs off the end of the address space.
    for addr in [u64::MAX, u64::MAX - 43, top - 42] {
        let err = tx(&mem, &mut chain(&mem, &[(addr, HDR, R)])).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidMemoryAccess(_) | Error::FragmentedMemory { .. }
            ),
            "{addr:#x}: {err:?}"
        );
    }
    // Header fits, payload in the head runs off the end.
    mem.write_slice(&hdr(20).to_bytes(), GuestAddress(top - 53))
        .unwrap();
    let err = tx(&mem, &mut chain(&mem, &[(top - 43 - 10, HDR + 20, R)])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidMemoryAccess(_) | Error::FragmentedMemory { .. }
        ),
        "{err:?}"
    );
    // Exactly at the end: accepted.
    mem.write_slice(&hdr(20).to_bytes(), GuestAddress(top - 63))
        .unwrap();
    let pkt = tx(&mem, &mut chain(&mem, &[(top - 63, 64, R)])).unwrap();
    assert_eq!(pkt.data_len(), 20);
    // Payload descriptor near u64::MAX.
    let err = tx(
        &mem,
        &mut chain(&mem, &[(top - 63, HDR, R), (u64::MAX - 5, 20, R)]),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidMemoryAccess(_) | Error::FragmentedMemory { .. }
        ),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The region resolved at the head: buffers inside it are sub-slices, the rest are looked up
// ---------------------------------------------------------------------------------------------

/// Each fragment's host address and length are those a lookup of its own gives.
#[track_caller]
fn assert_fragments_at(mem: &Mem, pkt: &VsockPacket<'_, ()>, data: &[(u64, usize)]) {
    let found: Vec<(*const u8, usize)> = pkt
        .data_slices()
        .map(|s| (s.ptr_guard().as_ptr(), s.len()))
        .collect();
    let expected: Vec<(*const u8, usize)> = data
        .iter()
        .map(|&(addr, n)| (unsafe_free_ptr(mem, addr), n))
        .collect();
    assert_eq!(found, expected);
    assert_eq!(
        pkt.header_slice().ptr_guard().as_ptr(),
        unsafe_free_ptr(mem, pkt_head_addr(mem, pkt))
    );
}

/// The guest address of the header slice (the memories here start at 0, one region per
/// `REGION` at most, so the host offset from region 0 maps back).
fn pkt_head_addr(mem: &Mem, pkt: &VsockPacket<'_, ()>) -> u64 {
    let p = pkt.header_slice().ptr_guard().as_ptr() as usize;
    mem.iter()
        .find_map(|r| {
            let base = r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            (p >= base && p < base + r.len() as usize)
                .then(|| r.start_addr().raw_value() + (p - base) as u64)
        })
        .unwrap()
}

#[test]
fn tx_data_below_the_header_in_the_same_region() {
    let mem = mem();
    mem.write_slice(&hdr(300).to_bytes(), GuestAddress(0x8_0000))
        .unwrap();
    let want = payload(300);
    mem.write_slice(&want, GuestAddress(0x2000)).unwrap();
    let pkt = tx(
        &mem,
        &mut chain(&mem, &[(0x8_0000, HDR, R), (0x2000, 300, R)]),
    )
    .unwrap();
    assert_eq!(data_of(&pkt), want);
    assert_fragments_at(&mem, &pkt, &[(0x2000, 300)]);
}

#[test]
fn tx_buffers_in_other_regions_are_looked_up() {
    let mem = fragmented_mem();
    // Header in the first region, payload in the second, then back in the first.
    mem.write_slice(&hdr(30).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let want = payload(30);
    write_frags(&mem, &want, &[(REGION + 0x100, 20), (0x3000, 10)]);
    let pkt = tx(
        &mem,
        &mut chain(
            &mem,
            &[(0x1000, HDR, R), (REGION + 0x100, 20, R), (0x3000, 10, R)],
        ),
    )
    .unwrap();
    assert_eq!(data_of(&pkt), want);
    assert_fragments_at(&mem, &pkt, &[(REGION + 0x100, 20), (0x3000, 10)]);
}

#[test]
fn one_desc_payload_starting_at_the_next_region_is_looked_up() {
    // The head's header fills its region's last bytes; the payload (buffer) is the next
    // region's first bytes: contiguous guest addresses, another host mapping, as 0.12 takes it.
    let mem = fragmented_mem();
    mem.write_slice(&hdr(20).to_bytes(), GuestAddress(REGION - HDR as u64))
        .unwrap();
    let want = payload(20);
    mem.write_slice(&want, GuestAddress(REGION)).unwrap();
    let pkt = tx(
        &mem,
        &mut chain(&mem, &[(REGION - HDR as u64, HDR + 20, R)]),
    )
    .unwrap();
    assert_eq!(data_of(&pkt), want);
    assert_fragments_at(&mem, &pkt, &[(REGION, 20)]);
    let pkt = rx(
        &mem,
        &mut chain(&mem, &[(REGION - HDR as u64, HDR + 64, W)]),
    )
    .unwrap();
    assert_fragments_at(&mem, &pkt, &[(REGION, 64)]);
}

#[test]
fn rx_buffers_across_regions() {
    let mem = fragmented_mem();
    let pkt = rx(
        &mem,
        &mut chain(
            &mem,
            &[
                (REGION + 0x4000, HDR, W),
                (0x2000, 100, W),
                (REGION + 0x100, 200, W),
            ],
        ),
    )
    .unwrap();
    assert_fragments_at(&mem, &pkt, &[(0x2000, 100), (REGION + 0x100, 200)]);
    // A buffer reaching out of the head's region into the next is one buffer over two host
    // mappings: refused, as 0.12 does.
    let err = rx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, W), (REGION - 8, 100, W)]),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { len: 100, .. }),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// RX: accepted layouts
// ---------------------------------------------------------------------------------------------

#[test]
fn rx_two_descs() {
    let mem = mem();
    mem.write_slice(&hdr(5).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let mut pkt = rx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, W), (0x2000, 4096, W)]),
    )
    .unwrap();
    // The copy starts zeroed (as 0.12): the device fills the header.
    assert_eq!(pkt.header(), Header::default());
    assert_eq!(pkt.data_slice().unwrap().len(), 4096);
    assert_eq!(pkt.write_data(b"pong").unwrap(), 4);
    pkt.set_header(&hdr(4));
    let mut back = [0u8; 4];
    mem.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
    assert_eq!(&back, b"pong");
    assert_eq!(header_mem(&pkt), hdr(4));
}

#[test]
fn rx_one_desc() {
    let mem = mem();
    let pkt = rx(&mem, &mut chain(&mem, &[(0x1000, HDR + 100, W)])).unwrap();
    assert_eq!(pkt.data_slice().unwrap().len(), 100);
    assert_eq!(
        pkt.data_slice().unwrap().ptr_guard().as_ptr(),
        unsafe_free_ptr(&mem, 0x1000 + 44)
    );
}

/// A one-descriptor RX buffer is looked up whole; when it is not one slice of memory, the
/// header and the room are looked up one after the other, as 0.12 does, for 0.12's verdict.
#[test]
fn rx_one_desc_not_in_one_slice_is_looked_up_in_two() {
    let mem = fragmented_mem();
    // Whole inside the first region: the header and the room are the parts of one slice.
    let pkt = rx(&mem, &mut chain(&mem, &[(REGION - 200, HDR + 100, W)])).unwrap();
    assert_eq!(
        pkt.header_slice().ptr_guard().as_ptr(),
        unsafe_free_ptr(&mem, REGION - 200)
    );
    assert_eq!(pkt.header_slice().len(), PKT_HEADER_SIZE);
    assert_fragments_at(&mem, &pkt, &[(REGION - 200 + HDR as u64, 100)]);
    // The header straddles the seam: the header lookup fails first, with its own length.
    let err = rx(&mem, &mut chain(&mem, &[(REGION - 20, HDR + 100, W)])).unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { len: 44, .. }),
        "{err:?}"
    );
    // The header ends where its region ends: each part is in one region, so it is accepted.
    let pkt = rx(&mem, &mut chain(&mem, &[(REGION - HDR as u64, HDR + 8, W)])).unwrap();
    assert_fragments_at(&mem, &pkt, &[(REGION, 8)]);
    // Nothing mapped after the header: the room's lookup fails.
    let high = high_mem();
    let err = rx(
        &high,
        &mut chain(&high, &[(u64::MAX - HDR as u64 - 1, HDR + 8, W)]),
    );
    assert!(
        matches!(err, Err(Error::FragmentedMemory { len: 8, .. })),
        "{err:?}"
    );
}

#[test]
fn rx_one_desc_has_no_max_bound() {
    // 0.12 puts no bound on the payload room of a single-descriptor RX buffer; parity keeps it.
    let mem = mem();
    let mut c = chain(&mem, &[(0x1000, HDR + 100, W)]);
    let pkt = VsockPacket::from_rx_virtq_chain(&mem, &mut c, 10).unwrap();
    assert_eq!(pkt.data_len(), 100);
}

#[test]
fn rx_head_padding_is_skipped_when_head_has_next() {
    let mem = mem();
    let pkt = rx(&mem, &mut chain(&mem, &[(0x1000, 100, W), (0x2000, 10, W)])).unwrap();
    assert_eq!(pkt.data_slices().count(), 1);
    assert_eq!(
        pkt.data_slice().unwrap().ptr_guard().as_ptr(),
        unsafe_free_ptr(&mem, 0x2000)
    );
}

#[test]
fn rx_zero_length_data_desc() {
    // 0.12 accepts it with no data slice.
    let mem = mem();
    let pkt = rx(&mem, &mut chain(&mem, &[(0x1000, HDR, W), (0x2000, 0, W)])).unwrap();
    assert!(pkt.data_slice().is_none());
    assert_eq!(pkt.data_len(), 0);
    assert_eq!(pkt.write_data(b"x").unwrap(), 0);
}

#[test]
fn rx_header_split_over_two_and_three_descs() {
    let mem = mem();
    let mut c = chain(&mem, &[(0x1000, 30, W), (0x2000, 14, W), (0x3000, 64, W)]);
    let mut pkt = rx(&mem, &mut c).unwrap();
    assert_eq!(pkt.header_slices().count(), 2);
    assert_eq!(pkt.data_len(), 64);
    pkt.set_header(&hdr(3));
    assert_eq!(header_mem(&pkt), hdr(3));

    // 3 header fragments, the last holding 4 header bytes and 12 bytes of room.
    let mut c = chain(
        &mem,
        &[
            (0x1000, 20, W),
            (0x5000, 0, W),
            (0x2000, 20, W),
            (0x3000, 16, W),
            (0x4000, 8, W),
        ],
    );
    let pkt = rx(&mem, &mut c).unwrap();
    assert_eq!(
        pkt.header_slices().map(|s| s.len()).collect::<Vec<_>>(),
        [20, 20, 4]
    );
    assert_eq!(
        pkt.data_slices().map(|s| s.len()).collect::<Vec<_>>(),
        [12, 8]
    );
}

#[test]
fn rx_payload_over_four_descs_with_zero_length_ones() {
    let mem = mem();
    let mut c = chain(
        &mem,
        &[
            (0x1000, HDR, W),
            (0x2000, 10, W),
            (0x9000, 0, W),
            (0x3000, 20, W),
            (0x4000, 30, W),
            (0x5000, 40, W),
        ],
    );
    let pkt = rx(&mem, &mut c).unwrap();
    assert_eq!(
        pkt.data_slices().map(|s| s.len()).collect::<Vec<_>>(),
        [10, 20, 30, 40]
    );
    assert_eq!(pkt.data_len(), 100);
    // 0.12's buffer: the second descriptor only.
    assert_eq!(pkt.data_slice().map(|s| s.len()), Some(10));
    let data = payload(100);
    assert_eq!(pkt.write_data(&data).unwrap(), 100);
    assert_eq!(data_of(&pkt), data);
    let mut frag = [0u8; 20];
    mem.read_slice(&mut frag, GuestAddress(0x3000)).unwrap();
    assert_eq!(&frag[..], &data[10..30]);
    // Writing more than the room stops at its end.
    assert_eq!(pkt.write_data(&payload(150)).unwrap(), 100);
}

#[test]
fn rx_extra_room_ends_at_the_first_descriptor_that_cannot_hold_it() {
    let mem = fragmented_mem();
    let lens = |pkt: &VsockPacket<'_, ()>| pkt.data_slices().map(|s| s.len()).collect::<Vec<_>>();
    // Read-only, outside memory, across the region seam: the room ends there, later
    // descriptors are not looked at, and the second descriptor stays 0.12's buffer.
    for bad in [
        (0x4000, 10, R),
        (0x10_0000, 10, W),
        (REGION - 4, 10, W),
        (u64::MAX - 3, 10, W),
    ] {
        let descs = [
            (0x1000, HDR, W),
            (0x2000, 10, W),
            (0x3000, 10, W),
            bad,
            (0x5000, 10, W),
        ];
        let pkt = rx(&mem, &mut chain(&mem, &descs)).unwrap();
        assert_eq!(lens(&pkt), [10, 10], "{bad:x?}");
        assert_eq!(pkt.data_slice().map(|s| s.len()), Some(10), "{bad:x?}");
    }
    // An empty second descriptor: no data slice (as 0.12), the extra room still counts.
    let pkt = rx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, W), (0x2000, 0, W), (0x3000, 10, W)]),
    )
    .unwrap();
    assert!(pkt.data_slice().is_none());
    assert_eq!(lens(&pkt), [10]);
    assert_eq!(pkt.write_data(&payload(12)).unwrap(), 10);
    // The second descriptor exactly at the maximum: nothing more.
    let mut c = chain(&mem, &[(0x1000, HDR, W), (0x2000, 100, W), (0x3000, 10, W)]);
    let pkt = VsockPacket::from_rx_virtq_chain(&mem, &mut c, 100).unwrap();
    assert_eq!(lens(&pkt), [100]);
}

#[test]
fn rx_total_equal_to_max_is_accepted() {
    let mem = mem();
    let mut c = chain(&mem, &[(0x1000, HDR, W), (0x2000, 60, W), (0x3000, 40, W)]);
    let pkt = VsockPacket::from_rx_virtq_chain(&mem, &mut c, 100).unwrap();
    assert_eq!(pkt.data_len(), 100);
}

// ---------------------------------------------------------------------------------------------
// RX: errors
// ---------------------------------------------------------------------------------------------

#[test]
fn rx_exhausted_chain_is_too_short() {
    let mem = mem();
    let mut c = chain(&mem, &[(0x1000, HDR, W)]);
    while c.next().is_some() {}
    assert!(matches!(
        rx(&mem, &mut c),
        Err(Error::DescriptorChainTooShort(_))
    ));
}

#[test]
fn rx_read_only_at_every_index() {
    let mem = mem();
    // (A read-only descriptor after 0.12's second one ends the room instead: see
    // `rx_extra_room_ends_at_the_first_descriptor_that_cannot_hold_it`.)
    let cases: [(Shape, usize); 5] = [
        (&[(0x1000, HDR, R), (0x2000, 100, W)], 0),
        (&[(0x1000, HDR, W), (0x2000, 100, R)], 1),
        (&[(0x1000, 20, W), (0x2000, 24, R), (0x3000, 100, W)], 1),
        (&[(0x1000, 20, W), (0x2000, 0, W), (0x3000, 24, R)], 2),
        (
            &[
                (0x1000, 20, W),
                (0x2000, 24, W),
                (0x3000, 10, W),
                (0x4000, 10, R),
            ],
            3,
        ),
    ];
    for (descs, want) in cases {
        let err = rx(&mem, &mut chain(&mem, descs)).unwrap_err();
        match &err {
            Error::UnexpectedReadOnlyDescriptor { index } => assert_eq!(*index, want, "{descs:?}"),
            e => panic!("{descs:?}: expected UnexpectedReadOnlyDescriptor, got {e:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "unexpected read-only descriptor (index {want} in the chain): RX buffers must be \
                 device-writable"
            )
        );
    }
}

#[test]
fn rx_header_only_chain_has_no_room() {
    let mem = mem();
    let err = rx(&mem, &mut chain(&mem, &[(0x1000, HDR, W)])).unwrap_err();
    assert!(matches!(err, Error::DescriptorChainTooShort(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "descriptor chain too short: expected room for a payload after the header, found none"
    );
    let err = rx(&mem, &mut dangling_chain(&mem, 0x1000, HDR, W)).unwrap_err();
    assert!(matches!(err, Error::DescriptorChainTooShort(_)), "{err:?}");
    assert!(err.to_string().contains("found the chain's end"), "{err}");
}

#[test]
fn rx_head_too_small() {
    let mem = mem();
    let err = rx(&mem, &mut chain(&mem, &[(0x1000, 43, W)])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 44,
                found: 43
            }
        ),
        "{err:?}"
    );
    let err = rx(&mem, &mut chain(&mem, &[(0x1000, 0, W)])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 44,
                found: 0
            }
        ),
        "{err:?}"
    );
    let err = rx(&mem, &mut chain(&mem, &[(0x1000, 40, W), (0x2000, 3, W)])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 44,
                found: 43
            }
        ),
        "{err:?}"
    );
}

#[test]
fn rx_room_above_max() {
    let mem = mem();
    let mut c = chain(&mem, &[(0x1000, HDR, W), (0x2000, 101, W)]);
    let err = VsockPacket::from_rx_virtq_chain(&mem, &mut c, 100).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooLong {
                max: 100,
                found: 101
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "descriptor length too long: expected at most 100 bytes, found 101"
    );
    // Spread over several descriptors after a split header.
    let mut c = chain(
        &mem,
        &[
            (0x1000, 20, W),
            (0x2000, 24, W),
            (0x3000, 60, W),
            (0x4000, 41, W),
        ],
    );
    let err = VsockPacket::from_rx_virtq_chain(&mem, &mut c, 100).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooLong {
                max: 100,
                found: 101
            }
        ),
        "{err:?}"
    );
    // After a whole header, room past 0.12's second descriptor is cut at the maximum instead.
    let mut c = chain(&mem, &[(0x1000, HDR, W), (0x2000, 60, W), (0x3000, 41, W)]);
    let pkt = VsockPacket::from_rx_virtq_chain(&mem, &mut c, 100).unwrap();
    assert_eq!(
        pkt.data_slices().map(|s| s.len()).collect::<Vec<_>>(),
        [60, 40]
    );
    // The leftover of a split header's last descriptor counts.
    let mut c = chain(&mem, &[(0x1000, 20, W), (0x2000, 24 + 101, W)]);
    let err = VsockPacket::from_rx_virtq_chain(&mem, &mut c, 100).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooLong {
                max: 100,
                found: 101
            }
        ),
        "{err:?}"
    );
    // A huge data descriptor is refused on its length, before its address is looked at.
    let mut c = chain(&mem, &[(0x1000, HDR, W), (u64::MAX - 5, u32::MAX - 100, W)]);
    let err = rx(&mem, &mut c).unwrap_err();
    assert!(
        matches!(err, Error::DescriptorLengthTooLong { .. }),
        "{err:?}"
    );
}

#[test]
fn rx_memory_errors() {
    let mem = fragmented_mem();
    let err = rx(
        &mem,
        &mut chain(&mem, &[(4 * REGION, HDR, W), (0x2000, 8, W)]),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidMemoryAccess(_)), "{err:?}");
    let err = rx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, W), (4 * REGION, 8, W)]),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidMemoryAccess(_)), "{err:?}");
    let err = rx(
        &mem,
        &mut chain(&mem, &[(REGION - 4, HDR, W), (0x2000, 8, W)]),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { len: 44, .. }),
        "{err:?}"
    );
    let err = rx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, W), (REGION - 4, 8, W)]),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { len: 8, .. }),
        "{err:?}"
    );
    let err = rx(&mem, &mut chain(&mem, &[(REGION - 50, HDR + 10, W)])).unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { len: 10, .. }),
        "{err:?}"
    );
}

#[test]
fn rx_addresses_near_u64_max_are_errors_not_panics() {
    let mem = high_mem();
    for addr in [u64::MAX, u64::MAX - 1, u64::MAX - 43] {
        let err = rx(&mem, &mut chain(&mem, &[(addr, HDR + 10, W)])).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidMemoryAccess(_) | Error::FragmentedMemory { .. }
            ),
            "{addr:#x}: {err:?}"
        );
    }
    let top = u64::MAX - 1;
    let pkt = rx(&mem, &mut chain(&mem, &[(top - 53, HDR + 10, W)])).unwrap();
    assert_eq!(pkt.data_len(), 10);
    assert!(slices_in_memory(&mem, &pkt));
    let err = rx(
        &mem,
        &mut chain(&mem, &[(top - 53, HDR, W), (u64::MAX - 3, 10, W)]),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidMemoryAccess(_) | Error::FragmentedMemory { .. }
        ),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Driver-side constructors
// ---------------------------------------------------------------------------------------------

#[test]
fn used_rx_buffer_accepts_what_the_device_wrote() {
    let mem = mem();
    mem.write_slice(&hdr(3).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    mem.write_slice(b"abc", GuestAddress(0x1000 + 44)).unwrap();
    let pkt = VsockPacket::from_used_rx_buffer(&mem, GuestAddress(0x1000), 4096, 47).unwrap();
    assert_eq!(pkt.header(), hdr(3));
    assert_eq!(data_of(&pkt), b"abc");
    // len 0: no payload slice, even with room.
    mem.write_slice(&hdr(0).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let pkt = VsockPacket::from_used_rx_buffer(&mem, GuestAddress(0x1000), 4096, 44).unwrap();
    assert!(pkt.data_slice().is_none());
}

#[test]
fn used_rx_buffer_errors() {
    let mem = fragmented_mem();
    mem.write_slice(&hdr(10).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let used = |addr: u64, cap: u32, used: u32| {
        VsockPacket::from_used_rx_buffer(&mem, GuestAddress(addr), cap, used).unwrap_err()
    };
    let err = used(0x1000, 100, 101);
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooLong {
                max: 100,
                found: 101
            }
        ),
        "{err:?}"
    );
    let err = used(0x1000, 100, 43);
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 44,
                found: 43
            }
        ),
        "{err:?}"
    );
    // The device claims len 10 but wrote only 5 bytes of payload.
    let err = used(0x1000, 100, 49);
    assert!(
        matches!(err, Error::InvalidHeaderLen { len: 10, max: 5 }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "invalid header `len` field: 10 exceeds the maximum of 5"
    );
    let err = used(8 * REGION, 100, 60);
    assert!(matches!(err, Error::InvalidMemoryAccess(_)), "{err:?}");
    let err = used(REGION - 10, 100, 60);
    assert!(matches!(err, Error::FragmentedMemory { .. }), "{err:?}");
    // Header fits before the boundary, payload crosses it.
    mem.write_slice(&hdr(10).to_bytes(), GuestAddress(REGION - 50))
        .unwrap();
    let err = used(REGION - 50, 100, 60);
    assert!(
        matches!(err, Error::FragmentedMemory { len: 10, .. }),
        "{err:?}"
    );

    let high = high_mem();
    for addr in [u64::MAX, u64::MAX - 10, u64::MAX - 43] {
        let r = VsockPacket::from_used_rx_buffer(&high, GuestAddress(addr), 100, 60);
        assert!(r.is_err(), "{addr:#x}");
    }
    // The header ends on the last byte of memory; a payload after it cannot exist.
    let top = u64::MAX - 1;
    high.write_slice(&hdr(10).to_bytes(), GuestAddress(top - 43))
        .unwrap();
    let r = VsockPacket::from_used_rx_buffer(&high, GuestAddress(top - 43), 100, 60);
    assert!(matches!(
        r,
        Err(Error::InvalidMemoryAccess(_) | Error::FragmentedMemory { .. })
    ));
    high.write_slice(&hdr(0).to_bytes(), GuestAddress(top - 43))
        .unwrap();
    let pkt = VsockPacket::from_used_rx_buffer(&high, GuestAddress(top - 43), 100, 60).unwrap();
    assert_eq!(pkt.data_len(), 0);
}

#[test]
fn tx_buffer_starts_with_a_zeroed_header() {
    let mem = mem();
    mem.write_slice(&[0xFF; 100], GuestAddress(0x1000)).unwrap();
    let mut pkt = VsockPacket::from_tx_buffer(&mem, GuestAddress(0x1000), 100).unwrap();
    assert_eq!(pkt.header(), Header::default());
    assert_eq!(header_mem(&pkt), Header::default());
    assert_eq!(pkt.data_len(), 56);
    pkt.set_header(&hdr(5));
    assert_eq!(pkt.write_data(b"hello").unwrap(), 5);
    let mut back = [0u8; 49];
    mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
    assert_eq!(&back[..44], &hdr(5).to_bytes());
    assert_eq!(&back[44..], b"hello");
    // Exactly a header: no payload room.
    let pkt = VsockPacket::from_tx_buffer(&mem, GuestAddress(0x1000), 44).unwrap();
    assert!(pkt.data_slice().is_none());
}

#[test]
fn tx_buffer_errors() {
    let mem = fragmented_mem();
    let buf = |addr: u64, cap: u32| VsockPacket::from_tx_buffer(&mem, GuestAddress(addr), cap);
    let err = buf(0x1000, 43).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 44,
                found: 43
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        buf(8 * REGION, 100),
        Err(Error::InvalidMemoryAccess(_))
    ));
    assert!(matches!(
        buf(REGION - 10, 100),
        Err(Error::FragmentedMemory { len: 44, .. })
    ));
    assert!(matches!(
        buf(REGION - 50, 100),
        Err(Error::FragmentedMemory { len: 56, .. })
    ));
    let high = high_mem();
    for addr in [u64::MAX, u64::MAX - 10, u64::MAX - 44] {
        assert!(
            VsockPacket::from_tx_buffer(&high, GuestAddress(addr), 100).is_err(),
            "{addr:#x}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// `new` and raw headers
// ---------------------------------------------------------------------------------------------

#[test]
fn new_checks_the_header_size() {
    for n in [0, 43, 45] {
        let mut raw = vec![0u8; n];
        // SAFETY: `raw` outlives the (failed) packet and nothing else accesses it.
        let err = unsafe { VsockPacket::new(&mut raw, None) }.unwrap_err();
        assert!(
            matches!(err, Error::InvalidHeaderInputSize(m) if m == n),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("invalid header input size: expected 44 bytes, found {n}")
        );
    }
}

#[test]
fn set_header_from_raw() {
    let mut raw = [0u8; PKT_HEADER_SIZE];
    // SAFETY: `raw` outlives `pkt` and is only accessed through it.
    let mut pkt = unsafe { VsockPacket::new(&mut raw, None) }.unwrap();
    pkt.set_header_from_raw(&hdr(9).to_bytes()).unwrap();
    assert_eq!(pkt.header(), hdr(9));
    assert_eq!(header_mem(&pkt), hdr(9));
    let err = pkt.set_header_from_raw(&[0u8; 45]).unwrap_err();
    assert!(matches!(err, Error::InvalidHeaderInputSize(45)), "{err:?}");
    assert_eq!(pkt.header(), hdr(9), "a refused write changes nothing");
}

#[test]
fn set_header_from_raw_across_fragments() {
    let mem = mem();
    let mut c = chain(&mem, &[(0x1000, 7, W), (0x2000, 30, W), (0x3000, 20, W)]);
    let mut pkt = rx(&mem, &mut c).unwrap();
    pkt.set_header_from_raw(&hdr(12).to_bytes()).unwrap();
    assert_eq!(pkt.header(), hdr(12));
    let mut raw = [0u8; PKT_HEADER_SIZE];
    mem.read_slice(&mut raw[..7], GuestAddress(0x1000)).unwrap();
    mem.read_slice(&mut raw[7..37], GuestAddress(0x2000))
        .unwrap();
    mem.read_slice(&mut raw[37..], GuestAddress(0x3000))
        .unwrap();
    assert_eq!(raw, hdr(12).to_bytes());
}

// ---------------------------------------------------------------------------------------------
// Header getters and setters
// ---------------------------------------------------------------------------------------------

/// Set every field one by one and check the copy, the memory and the getters agree.
#[track_caller]
fn check_setters<B: BitmapSlice>(pkt: &mut VsockPacket<'_, B>) {
    let h = hdr(0x1234_5678);
    pkt.set_src_cid(h.src_cid)
        .set_dst_cid(h.dst_cid)
        .set_src_port(h.src_port)
        .set_dst_port(h.dst_port)
        .set_len(h.len)
        .set_type(h.type_)
        .set_op(h.op)
        .set_flags(h.flags)
        .set_buf_alloc(h.buf_alloc)
        .set_fwd_cnt(h.fwd_cnt);
    assert_eq!(pkt.src_cid(), h.src_cid);
    assert_eq!(pkt.dst_cid(), h.dst_cid);
    assert_eq!(pkt.src_port(), h.src_port);
    assert_eq!(pkt.dst_port(), h.dst_port);
    assert_eq!(pkt.len(), h.len);
    assert_eq!(pkt.type_(), h.type_);
    assert_eq!(pkt.op(), h.op);
    assert_eq!(pkt.flags(), h.flags);
    assert_eq!(pkt.buf_alloc(), h.buf_alloc);
    assert_eq!(pkt.fwd_cnt(), h.fwd_cnt);
    assert_eq!(pkt.header(), h);
    assert_eq!(header_mem(pkt), h, "memory and copy agree");
    assert!(!pkt.is_empty());

    // Every field again with its maximum value: no byte spills into a neighbour.
    pkt.set_src_cid(u64::MAX);
    pkt.set_dst_cid(u64::MAX);
    pkt.set_src_port(u32::MAX);
    pkt.set_dst_port(u32::MAX);
    pkt.set_len(u32::MAX);
    pkt.set_type(u16::MAX);
    pkt.set_op(u16::MAX);
    pkt.set_flags(u32::MAX);
    pkt.set_buf_alloc(u32::MAX);
    pkt.set_fwd_cnt(u32::MAX);
    assert_eq!(header_mem(pkt).to_bytes(), [0xFF; PKT_HEADER_SIZE]);
    pkt.set_header(&Header::default());
    assert_eq!(header_mem(pkt).to_bytes(), [0; PKT_HEADER_SIZE]);
    assert!(pkt.is_empty());

    // set_flag ORs into flags.
    pkt.set_flag(VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE)
        .set_flag(VIRTIO_VSOCK_SHUTDOWN_F_SEND);
    assert_eq!(pkt.flags(), 3);
    assert_eq!(header_mem(pkt).flags, 3);
}

#[test]
fn setters_and_getters_round_trip_contiguous() {
    let mut raw = [0u8; PKT_HEADER_SIZE];
    // SAFETY: `raw` outlives `pkt` and is only accessed through it.
    let mut pkt = unsafe { VsockPacket::new(&mut raw, None) }.unwrap();
    check_setters(&mut pkt);
    drop(pkt);
    assert_eq!(Header::from_bytes(&raw).flags, 3);
}

#[test]
fn setters_write_across_header_fragments() {
    // Fragments of 5, 17 and 22 bytes: src_cid, dst_cid, src_port and len all straddle a seam.
    let mem = mem();
    let mut c = chain(
        &mem,
        &[
            (0x1000, 5, W),
            (0x2000, 17, W),
            (0x3000, 22, W),
            (0x4000, 8, W),
        ],
    );
    let mut pkt = rx(&mem, &mut c).unwrap();
    assert_eq!(
        pkt.header_slices().map(|s| s.len()).collect::<Vec<_>>(),
        [5, 17, 22]
    );
    check_setters(&mut pkt);
    // Each fragment's memory holds its part of the encoding.
    pkt.set_header(&hdr(1));
    let bytes = hdr(1).to_bytes();
    let mut frag = [0u8; 17];
    mem.read_slice(&mut frag, GuestAddress(0x2000)).unwrap();
    assert_eq!(&frag[..], &bytes[5..22]);
    // The payload descriptor is untouched by header writes.
    let mut data = [0xAAu8; 8];
    mem.read_slice(&mut data, GuestAddress(0x4000)).unwrap();
    assert_eq!(data, [0; 8]);
}

#[test]
fn setters_on_a_tx_packet() {
    let mem = mem();
    mem.write_slice(&hdr(0).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let mut pkt = tx(&mem, &mut chain(&mem, &[(0x1000, HDR, R)])).unwrap();
    check_setters(&mut pkt);
}

#[test]
fn getters_answer_from_the_parsed_copy() {
    // TOCTOU: a peer rewriting the header after parsing cannot change what the getters say.
    let mem = mem();
    mem.write_slice(&hdr(4).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let pkt = tx(&mem, &mut chain(&mem, &[(0x1000, HDR + 4, R)])).unwrap();
    mem.write_slice(&[0x55; PKT_HEADER_SIZE], GuestAddress(0x1000))
        .unwrap();
    assert_eq!(pkt.header(), hdr(4));
    assert_eq!(pkt.len(), 4);
    assert_eq!(pkt.src_cid(), hdr(4).src_cid);
    assert_eq!(pkt.op(), Op::Rw as u16);
    assert_eq!(pkt.data_len(), 4, "the payload bound is the parsed len");
    assert_ne!(header_mem(&pkt), hdr(4), "memory did change");

    // Same with a split header.
    write_frags(&mem, &hdr(2).to_bytes(), &[(0x2000, 30), (0x3000, 14)]);
    let mut c = chain(&mem, &[(0x2000, 30, R), (0x3000, 16, R)]);
    let pkt = tx(&mem, &mut c).unwrap();
    mem.write_slice(&[0x55; 16], GuestAddress(0x3000)).unwrap();
    assert_eq!(pkt.header(), hdr(2));
}

// ---------------------------------------------------------------------------------------------
// Decoded header types
// ---------------------------------------------------------------------------------------------

#[test]
fn header_bytes_round_trip_and_offsets() {
    let h = hdr(0x0102_0304);
    let b = h.to_bytes();
    assert_eq!(Header::from_bytes(&b), h);
    assert_eq!(&b[24..28], &0x0102_0304u32.to_le_bytes());
    assert_eq!(&b[30..32], &(Op::Rw as u16).to_le_bytes());
    assert_eq!(&b[40..44], &77u32.to_le_bytes());
    assert_eq!(
        h.to_string(),
        "VIRTIO_VSOCK_OP_RW VIRTIO_VSOCK_TYPE_STREAM 72623859790382856:1024 -> 2:3735928559 \
         len 16909060 flags 0xa0b0c0d buf_alloc 262144 fwd_cnt 77"
    );
    let odd = Header {
        op: 99,
        type_: 9,
        ..Default::default()
    };
    assert!(odd.to_string().starts_with("op 99 type 9 "), "{odd}");
}

#[test]
fn typed_fields() {
    for v in 1..=7u16 {
        let op = Op::try_from(v).unwrap();
        assert_eq!(op as u16, v);
        assert!(op.to_string().starts_with("VIRTIO_VSOCK_OP_"));
    }
    let err = Op::try_from(0).unwrap_err();
    assert_eq!(
        err,
        UnknownValue {
            field: "op",
            value: 0
        }
    );
    assert_eq!(err.to_string(), "unknown vsock op value 0");
    assert_eq!(SocketType::try_from(2), Ok(SocketType::SeqPacket));
    assert_eq!(
        SocketType::SeqPacket.to_string(),
        "VIRTIO_VSOCK_TYPE_SEQPACKET"
    );
    assert_eq!(
        SocketType::try_from(3).unwrap_err().to_string(),
        "unknown vsock type value 3"
    );
    let h = hdr(0);
    assert_eq!(h.op_typed(), Ok(Op::Rw));
    assert_eq!(h.socket_type(), Ok(SocketType::Stream));
    for bits in 0..8u32 {
        assert_eq!(ShutdownFlags::from_bits(bits).bits(), bits & 3);
        assert_eq!(SeqFlags::from_bits(bits).bits(), bits & 3);
    }
    assert!(ShutdownFlags::from_bits(VIRTIO_VSOCK_SHUTDOWN_F_SEND).send);
    assert!(SeqFlags::from_bits(VIRTIO_VSOCK_SEQ_EOR).eor);
}

// ---------------------------------------------------------------------------------------------
// Properties over random chains
// ---------------------------------------------------------------------------------------------

/// A random descriptor: addresses biased to region ends, the fragment seam and `u64::MAX`.
fn arb_desc() -> impl Strategy<Value = (u64, u32, u16)> {
    let addr = prop_oneof![
        (0x1000u64..REGION),
        (0u64..128).prop_map(|d| REGION - d),
        (0u64..128).prop_map(|d| 2 * REGION - d),
        (0u64..256).prop_map(|d| u64::MAX - d),
        (0u64..256).prop_map(|d| HIGH + d),
        any::<u64>(),
    ];
    let len = prop_oneof![0u32..64, 0u32..300, 0u32..0x2_0000, any::<u32>()];
    let flags = prop_oneof![Just(R), Just(W)];
    (addr, len, flags)
}

/// Memory for the properties: the fragmented pair plus the high region.
fn prop_mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION as usize),
        (GuestAddress(REGION), REGION as usize),
        (GuestAddress(HIGH), REGION as usize),
    ])
    .unwrap()
}

proptest! {
    // Under Miri each case costs about a second: a handful still walks the unsafe slice code.
    #![proptest_config(ProptestConfig {
        cases: if cfg!(miri) { 8 } else { 2000 },
        failure_persistence: if cfg!(miri) { None } else { ProptestConfig::default().failure_persistence },
        ..ProptestConfig::default()
    })]

    /// No panic; a TX payload is exactly `len` bytes; every slice lies in memory; an RX buffer
    /// spread over descriptors is at most `max` bytes (a one-descriptor RX buffer is unbounded
    /// in 0.12, and parity keeps that).
    #[test]
    fn random_chains_keep_the_invariants(
        descs in prop::collection::vec(arb_desc(), 1..=8),
        len in prop_oneof![0u32..200, any::<u32>()],
        max in prop_oneof![Just(MAX), 0u32..300, any::<u32>()],
    ) {
        let mem = prop_mem();
        let h = hdr(len).to_bytes();
        for &(addr, _, _) in &descs {
            let _ = mem.write_slice(&h, GuestAddress(addr));
        }
        let c = chain(&mem, &descs);
        if let Ok(pkt) = VsockPacket::from_tx_virtq_chain(&mem, &mut c.clone(), max) {
            prop_assert_eq!(pkt.data_len(), pkt.len() as usize);
            prop_assert!(pkt.is_empty() || pkt.len() <= max);
            prop_assert_eq!(pkt.header_slices().map(|s| s.len()).sum::<usize>(), PKT_HEADER_SIZE);
            prop_assert!(slices_in_memory(&mem, &pkt));
        }
        if let Ok(pkt) = VsockPacket::from_rx_virtq_chain(&mem, &mut c.clone(), max) {
            prop_assert!(pkt.data_len() <= max as usize || descs.len() == 1);
            prop_assert_eq!(pkt.header_slices().map(|s| s.len()).sum::<usize>(), PKT_HEADER_SIZE);
            prop_assert!(slices_in_memory(&mem, &pkt));
        }
    }
}
