// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fuzzes `SplitQueue::pop_used` against a device that writes arbitrary used-ring contents.
//!
//! Invariants: no panic; every token comes back at most once and only while in flight; a
//! returned `len` never exceeds the chain's writable bytes; once broken, the queue stays broken
//! until `reset`, which hands back exactly the tokens still in flight; descriptor accounting
//! (`num_free` + descriptors in flight == size) always holds.

#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vdpa_vsock::dma::{DmaOptions, DmaRegion, IovaBase};
use vdpa_vsock::virtq::{BufferDesc, QueueError, SplitQueue};
use vm_memory::{Bytes, GuestAddress};

#[derive(Arbitrary, Debug)]
enum Step {
    /// The device writes used element `slot` (taken modulo the queue size).
    WriteElem {
        slot: u16,
        id: u32,
        len: u32,
    },
    /// The device sets used idx to an arbitrary value.
    SetUsedIdx(u16),
    /// The device advances used idx by a small amount.
    BumpUsedIdx(u8),
    /// The device writes a well-formed element for an in-flight chain (keeps runs going deeper).
    Complete {
        pick: u8,
        len: u32,
    },
    Pop,
    Add {
        descs: u8,
        readable: u8,
        len: u16,
    },
    EnableCb,
    DisableCb,
    Kick,
    Reset,
}

#[derive(Arbitrary, Debug)]
struct Input {
    size_log: u8,
    event_idx: bool,
    steps: Vec<Step>,
}

struct Model {
    /// token -> (descriptors, writable bytes, head)
    in_flight: HashMap<u64, (u16, u64, u16)>,
    next_token: u64,
    broken: bool,
    /// The device's used idx as we last wrote it.
    dev_used: u16,
}

fuzz_target!(|input: Input| {
    let size = 1u16 << (input.size_log % 8);
    let dma = DmaRegion::new(&DmaOptions {
        size: 1 << 20,
        iova: IovaBase::Fixed(0x4000_0000),
        hugetlb: false,
        lock: false,
    })
    .unwrap();
    let mut q = SplitQueue::new(&dma, size, input.event_idx).unwrap();
    let pool = dma.alloc(64 * 1024, 8).unwrap();
    let used = q.layout().used_ring.0;
    let mem = dma.memory();
    let mut m = Model {
        in_flight: HashMap::new(),
        next_token: 0,
        broken: false,
        dev_used: 0,
    };
    let write_elem = |slot: u16, id: u32, len: u32| {
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&id.to_le_bytes());
        bytes[4..].copy_from_slice(&len.to_le_bytes());
        let addr = used + 4 + 8 * u64::from(slot % size);
        mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
    };
    let set_used_idx = |idx: u16| {
        mem.store(
            idx.to_le(),
            GuestAddress(used + 2),
            std::sync::atomic::Ordering::Release,
        )
        .unwrap()
    };

    // Start with a few chains in flight.
    for i in 0..size.min(4) {
        add(&mut q, &mut m, pool, 1 + (i % 3) as u8, (i % 2) as u8, 100);
    }

    for step in input.steps.iter().take(256) {
        match *step {
            Step::WriteElem { slot, id, len } => write_elem(slot, id, len),
            Step::SetUsedIdx(idx) => {
                m.dev_used = idx;
                set_used_idx(idx);
            }
            Step::BumpUsedIdx(n) => {
                m.dev_used = m.dev_used.wrapping_add(u16::from(n % 4));
                set_used_idx(m.dev_used);
            }
            Step::Complete { pick, len } => {
                let mut heads: Vec<(u16, u64)> =
                    m.in_flight.values().map(|&(_, w, h)| (h, w)).collect();
                heads.sort_unstable();
                if let Some(&(head, writable)) = heads.get(usize::from(pick) % heads.len().max(1)) {
                    let len = u32::try_from(u64::from(len) % (writable + 1)).unwrap();
                    write_elem(m.dev_used, u32::from(head), len);
                    m.dev_used = m.dev_used.wrapping_add(1);
                    set_used_idx(m.dev_used);
                }
            }
            Step::Pop => match q.pop_used() {
                Ok(Some(u)) => {
                    assert!(!m.broken, "element after Broken");
                    let (_, writable, head) = m
                        .in_flight
                        .remove(&u.token)
                        .expect("token returned twice or never posted");
                    assert_eq!(u.id, head);
                    assert!(u64::from(u.len) <= writable);
                }
                Ok(None) => assert!(!m.broken, "None after Broken"),
                Err(QueueError::Broken { reason }) => {
                    assert_eq!(q.is_broken(), Some(reason.as_str()));
                    m.broken = true;
                }
                Err(e) => panic!("unexpected error {e}"),
            },
            Step::Add {
                descs,
                readable,
                len,
            } => {
                add(&mut q, &mut m, pool, descs, readable, len);
            }
            Step::EnableCb => match q.enable_cb() {
                Ok(_) => assert!(!m.broken),
                Err(QueueError::Broken { .. }) => assert!(m.broken),
                Err(e) => panic!("unexpected error {e}"),
            },
            Step::DisableCb => q.disable_cb(),
            Step::Kick => match q.kick_prepare() {
                Ok(_) => assert!(!m.broken),
                Err(QueueError::Broken { .. }) => assert!(m.broken),
                Err(e) => panic!("unexpected error {e}"),
            },
            Step::Reset => {
                let mut tokens = q.reset();
                tokens.sort_unstable();
                let mut expected: Vec<u64> = m.in_flight.keys().copied().collect();
                expected.sort_unstable();
                assert_eq!(tokens, expected);
                m.in_flight.clear();
                m.broken = false;
                m.dev_used = 0;
                assert!(q.is_broken().is_none());
            }
        }
        assert_eq!(m.broken, q.is_broken().is_some());
        let descs: u16 = m.in_flight.values().map(|&(n, _, _)| n).sum();
        assert_eq!(q.num_free() + descs, size);
        assert_eq!(usize::from(q.in_flight()), m.in_flight.len());
    }
});

fn add(q: &mut SplitQueue, m: &mut Model, pool: GuestAddress, descs: u8, readable: u8, len: u16) {
    let n = 1 + u16::from(descs % 8);
    let readable = u16::from(readable) % (n + 1);
    let bufs: Vec<BufferDesc> = (0..n)
        .map(|i| BufferDesc {
            addr: pool,
            len: u32::from(len),
            writable: i >= readable,
        })
        .collect();
    let token = m.next_token;
    match q.add(&bufs, token) {
        Ok(head) => {
            assert!(!m.broken);
            m.next_token += 1;
            let writable = u64::from(len) * u64::from(n - readable);
            m.in_flight.insert(token, (n, writable, head));
        }
        Err(QueueError::Full { .. }) => assert!(!m.broken && q.num_free() < n),
        Err(QueueError::Broken { .. }) => assert!(m.broken),
        Err(e) => panic!("unexpected error {e}"),
    }
}
