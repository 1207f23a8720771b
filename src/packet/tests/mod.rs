// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Unit tests of the packet parser, one file per part of `packet/`: `tx_chain` and `rx_chain`
//! (accepted layouts first, then every error path), `lookup` (the region resolved at the head),
//! `buffer` (the driver-side constructors), `vsock_packet` (the header accessors), `wire` (the
//! decoded header types) and `props` (properties over random chains). The shared fixtures are
//! here. Chains are built with virtio-queue's `MockSplitQueue`; the queue itself lives at
//! address 0, buffers from 0x1000 up.

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

/// The host pointer of guest address `addr` (to compare slice positions).
fn unsafe_free_ptr(mem: &Mem, addr: u64) -> *const u8 {
    mem.get_host_address(GuestAddress(addr)).unwrap() as *const u8
}

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

mod buffer;
mod lookup;
mod props;
mod rx_chain;
mod tx_chain;
mod vsock_packet;
mod wire;
