// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fuzz the vsock packet parser: arbitrary descriptor chains (lengths, flags, addresses near
//! memory-region ends and near `u64::MAX`, header `len` values) parsed as TX and as RX, plus the
//! driver-side constructors. Asserts no panic and the parser's invariants.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use vdpa_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress, VolatileSlice,
};

/// `VRING_DESC_F_WRITE` (virtio 1.2 2.7.5); virtio-bindings is not a dependency of this crate.
const VRING_DESC_F_WRITE: u16 = 2;

/// Two adjacent regions (a buffer crossing 0x1_0000 is fragmented) and one ending just below u64::MAX.
const REGION_SIZE: u64 = 0x1_0000;
// vm-memory refuses a region whose end (start + size) overflows, so the last byte is u64::MAX - 1.
const HIGH_START: u64 = u64::MAX - REGION_SIZE;

#[derive(Arbitrary, Debug)]
struct FuzzDesc {
    /// Where the address points: 0 low region, 1 near the fragment boundary, 2 near the end of
    /// low memory, 3 near u64::MAX, 4 any u64.
    base: u8,
    offset: u16,
    raw_addr: u64,
    /// Small lengths most of the time, arbitrary otherwise.
    len_kind: u8,
    len: u32,
    write: bool,
}

#[derive(Arbitrary, Debug)]
struct FuzzInput {
    descs: Vec<FuzzDesc>,
    header_len: u32,
    max_data_size: u32,
    used_len: u32,
    capacity: u32,
}

fn addr_of(d: &FuzzDesc) -> u64 {
    let off = u64::from(d.offset);
    match d.base % 5 {
        0 => 0x1000 + off % (REGION_SIZE - 0x1000),
        1 => REGION_SIZE - (off % 256),
        2 => 2 * REGION_SIZE - (off % 256),
        3 => u64::MAX - (off % 512),
        _ => d.raw_addr,
    }
}

fn len_of(d: &FuzzDesc) -> u32 {
    match d.len_kind % 4 {
        0 => d.len % 64,
        1 => d.len % 256,
        2 => d.len % 0x2_0000,
        _ => d.len,
    }
}

/// Does `s` lie entirely inside one of the memory's regions?
fn in_memory<B: BitmapSlice>(mem: &GuestMemoryMmap, s: &VolatileSlice<'_, B>) -> bool {
    let start = s.ptr_guard().as_ptr() as usize;
    let end = start + s.len();
    mem.iter().any(|r| {
        let host = r
            .get_host_address(MemoryRegionAddress(0))
            .expect("region start") as usize;
        start >= host && end <= host + r.len() as usize
    })
}

fn check<B: BitmapSlice>(mem: &GuestMemoryMmap, pkt: &VsockPacket<'_, B>) {
    let hdr: usize = pkt.header_slices().map(|s| s.len()).sum();
    assert_eq!(hdr, PKT_HEADER_SIZE);
    for s in pkt.header_slices().chain(pkt.data_slices()) {
        assert!(in_memory(mem, s), "slice outside memory");
        assert!(!s.is_empty());
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(input) = FuzzInput::arbitrary(&mut u) else {
        return;
    };
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION_SIZE as usize),
        (GuestAddress(REGION_SIZE), REGION_SIZE as usize),
        (GuestAddress(HIGH_START), REGION_SIZE as usize),
    ])
    .expect("memory");
    let vq = MockSplitQueue::new(&mem, 16);
    let descs: Vec<RawDescriptor> = input
        .descs
        .iter()
        .take(8)
        .map(|d| {
            let addr = addr_of(d);
            // A header at every buffer (ignored when out of memory), so TX sees the fuzzed len.
            let mut hdr = [0u8; PKT_HEADER_SIZE];
            hdr[24..28].copy_from_slice(&input.header_len.to_le_bytes());
            // Never over the queue's own rings (below 0x1000).
            if addr >= 0x1000 {
                let _ = mem.write_slice(&hdr, GuestAddress(addr));
            }
            let flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
            RawDescriptor::from(SplitDescriptor::new(addr, len_of(d), flags, 0))
        })
        .collect();
    if descs.is_empty() {
        return;
    }
    let Ok(chain) = vq.build_desc_chain(&descs) else {
        return;
    };
    let max = input.max_data_size;

    if let Ok(pkt) = VsockPacket::from_tx_virtq_chain(&mem, &mut chain.clone(), max) {
        check(&mem, &pkt);
        // The payload is exactly `len` bytes, and `len` is within the maximum.
        assert_eq!(pkt.data_len(), pkt.len() as usize);
        assert!(pkt.len() <= max || pkt.is_empty());
        let mut buf = vec![0u8; pkt.data_len()];
        assert_eq!(pkt.read_data(&mut buf).expect("read"), buf.len());
    }

    if let Ok(mut pkt) = VsockPacket::from_rx_virtq_chain(&mem, &mut chain.clone(), max) {
        check(&mem, &pkt);
        // 0.12 puts no bound on a single-descriptor RX buffer (header and room in the head).
        assert!(pkt.data_len() <= max as usize || descs.len() == 1);
        pkt.set_len(7).set_src_cid(3);
        assert_eq!(pkt.len(), 7);
        let n = pkt.write_data(&[0xAA; 100]).expect("write");
        assert_eq!(n, pkt.data_len().min(100));
    }

    let first = addr_of(&input.descs[0]);
    if let Ok(pkt) =
        VsockPacket::from_used_rx_buffer(&mem, GuestAddress(first), input.capacity, input.used_len)
    {
        check(&mem, &pkt);
        assert!(input.used_len <= input.capacity);
        assert!(pkt.len() as usize + PKT_HEADER_SIZE <= input.used_len as usize);
        assert_eq!(pkt.data_len(), pkt.len() as usize);
    }
    if let Ok(pkt) = VsockPacket::from_tx_buffer(&mem, GuestAddress(first), input.capacity) {
        check(&mem, &pkt);
        assert_eq!(pkt.data_len() + PKT_HEADER_SIZE, input.capacity as usize);
        assert_eq!(pkt.header(), Default::default());
    }
});
