// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Parse cost of `VsockPacket` against rust-vmm's `virtio-vsock` 0.12 on the same chains.
//!
//! Each shape's descriptor chain is built once in a `MockSplitQueue` and popped once; every
//! iteration parses a fresh clone of that `DescriptorChain` (a few words copied; the descriptors
//! are read from guest memory by the parser, as in a device), then reads the same header fields
//! and the data length from the result. Both parsers do exactly that work.
//!
//! Shapes: TX header and payload in two descriptors, in one; RX header and buffer in two, in one
//! (Linux 6.2 and later); and a TX payload over four descriptors, which 0.12 refuses. The RX
//! groups also time `desc_reads`: cloning the chain and reading its descriptors through
//! `DescriptorChain::next`, as both parsers must, with no parsing: the floor under both.
//!
//! Run: `cargo bench --bench packet -- --warm-up-time 1 --measurement-time 3`

#![allow(
    clippy::cast_possible_truncation,
    reason = "test fixtures: flag constants, header size and region sizes all fit"
)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use vdpa_vsock::packet::{Header, VsockPacket, PKT_HEADER_SIZE};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use virtio_vsock_ref::packet::VsockPacket as RefPacket;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const MAX: u32 = 64 * 1024;
const HDR: u32 = PKT_HEADER_SIZE as u32;
const W: u16 = VRING_DESC_F_WRITE as u16;

/// Pop the chain of `descs` (`(addr, len, flags)`) once; iterations clone it. A chain reads
/// its descriptors lazily from the queue's table, so each shape gets its own queue at `queue`.
fn chain<'m>(mem: &'m Mem, queue: u64, descs: &[(u64, u32, u16)]) -> DescriptorChain<&'m Mem> {
    let vq = MockSplitQueue::create(mem, GuestAddress(queue), 16);
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)))
        .collect();
    vq.build_desc_chain(&raw).unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    queue.pop_descriptor_chain(mem).unwrap()
}

fn setup() -> Mem {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let hdr = Header {
        src_cid: 3,
        dst_cid: 2,
        src_port: 1024,
        dst_port: 1025,
        len: 1024,
        type_: 1,
        op: 5,
        ..Default::default()
    };
    mem.write_slice(&hdr.to_bytes(), GuestAddress(0x1_0000))
        .unwrap();
    mem
}

/// The fields both sides read after parsing, each through its own `black_box`.
///
/// One `black_box` of a tuple of them made the loop copy the tuple with 16-byte loads over the
/// narrower stores that had just filled it: a store-forwarding stall of the harness, not of the
/// parser, that showed on one side or the other depending on how the compiler laid out the copy.
macro_rules! consume {
    ($pkt:expr) => {{
        let p = $pkt;
        black_box(p.src_cid());
        black_box(p.dst_cid());
        black_box(p.src_port());
        black_box(p.dst_port());
        black_box(p.len());
        black_box(p.op());
        black_box(p.data_slice().map(|s| s.len()));
    }};
}

fn bench(c: &mut Criterion) {
    let mem = setup();
    let tx_two = chain(&mem, 0, &[(0x1_0000, HDR, 0), (0x2_0000, 4096, 0)]);
    let tx_one = chain(&mem, 0x1000, &[(0x1_0000, HDR + 4096, 0)]);
    let rx_two = chain(&mem, 0x2000, &[(0x1_0000, HDR, W), (0x2_0000, 4096, W)]);
    // Linux 6.2 and later post RX buffers as one descriptor, header and room together.
    let rx_one = chain(&mem, 0x4000, &[(0x1_0000, HDR + 4096, W)]);
    let tx_four = chain(
        &mem,
        0x3000,
        &[
            (0x1_0000, HDR, 0),
            (0x2_0000, 256, 0),
            (0x3_0000, 256, 0),
            (0x4_0000, 256, 0),
            (0x5_0000, 256, 0),
        ],
    );

    let mut g = c.benchmark_group("tx_two_desc");
    g.bench_function("ours", |b| {
        b.iter(|| {
            let mut ch = black_box(&tx_two).clone();
            consume!(VsockPacket::from_tx_virtq_chain(&mem, &mut ch, MAX).unwrap())
        })
    });
    g.bench_function("ref", |b| {
        b.iter(|| {
            let mut ch = black_box(&tx_two).clone();
            consume!(RefPacket::from_tx_virtq_chain(&mem, &mut ch, MAX).unwrap())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("tx_one_desc");
    g.bench_function("ours", |b| {
        b.iter(|| {
            let mut ch = black_box(&tx_one).clone();
            consume!(VsockPacket::from_tx_virtq_chain(&mem, &mut ch, MAX).unwrap())
        })
    });
    g.bench_function("ref", |b| {
        b.iter(|| {
            let mut ch = black_box(&tx_one).clone();
            consume!(RefPacket::from_tx_virtq_chain(&mem, &mut ch, MAX).unwrap())
        })
    });
    g.finish();

    let mut g = c.benchmark_group("rx_two_desc");
    g.bench_function("ours", |b| {
        b.iter(|| {
            let mut ch = black_box(&rx_two).clone();
            consume!(VsockPacket::from_rx_virtq_chain(&mem, &mut ch, MAX).unwrap())
        })
    });
    g.bench_function("ref", |b| {
        b.iter(|| {
            let mut ch = black_box(&rx_two).clone();
            consume!(RefPacket::from_rx_virtq_chain(&mem, &mut ch, MAX).unwrap())
        })
    });
    // The floor under both: the descriptor reads each parser must make through the chain.
    g.bench_function("desc_reads", |b| {
        b.iter(|| {
            let mut ch = black_box(&rx_two).clone();
            for _ in 0..2 {
                black_box(ch.next().map(|d| d.len()));
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("rx_one_desc");
    g.bench_function("ours", |b| {
        b.iter(|| {
            let mut ch = black_box(&rx_one).clone();
            consume!(VsockPacket::from_rx_virtq_chain(&mem, &mut ch, MAX).unwrap())
        })
    });
    g.bench_function("ref", |b| {
        b.iter(|| {
            let mut ch = black_box(&rx_one).clone();
            consume!(RefPacket::from_rx_virtq_chain(&mem, &mut ch, MAX).unwrap())
        })
    });
    // The floor under both: the descriptor reads each parser must make through the chain.
    g.bench_function("desc_reads", |b| {
        b.iter(|| {
            let mut ch = black_box(&rx_one).clone();
            for _ in 0..1 {
                black_box(ch.next().map(|d| d.len()));
            }
        })
    });
    g.finish();

    // 0.12 refuses this shape; ours only.
    let mut g = c.benchmark_group("tx_four_data_desc");
    g.bench_function("ours", |b| {
        b.iter(|| {
            let mut ch = black_box(&tx_four).clone();
            let p = VsockPacket::from_tx_virtq_chain(&mem, &mut ch, MAX).unwrap();
            black_box(p.data_len());
            consume!(p)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
