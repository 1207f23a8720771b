// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Unit tests for the split virtqueue, grouped by queue state, plus a pairing test against
//! virtio-queue's device-side `Queue` and hostile-device tests that scribble on the used ring.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test values are bounded by construction (queue sizes, `below(n)` results)"
)]

use std::collections::{HashMap, HashSet, VecDeque};

use super::*;
use crate::dma::{DmaOptions, IovaBase};

/// Tiny deterministic RNG (xorshift64*), so failures reproduce from the printed seed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
}

#[track_caller]
fn dma(size: usize) -> DmaRegion {
    DmaRegion::new(&DmaOptions {
        size,
        iova: IovaBase::Fixed(0x10_0000),
        hugetlb: false,
        lock: false,
    })
    .expect("DMA region")
}

#[track_caller]
fn queue(dma: &DmaRegion, size: u16, event_idx: bool) -> SplitQueue {
    SplitQueue::new(dma, size, event_idx).expect("queue")
}

#[track_caller]
fn buf(dma: &DmaRegion, len: u32, writable: bool) -> BufferDesc {
    let addr = dma.alloc(len.max(1) as usize, 8).expect("buffer");
    BufferDesc {
        addr,
        len,
        writable,
    }
}

#[track_caller]
fn read_u16(dma: &DmaRegion, addr: u64) -> u16 {
    u16::from_le(dma.memory().read_obj(GuestAddress(addr)).unwrap())
}

#[track_caller]
fn write_u16(dma: &DmaRegion, addr: u64, val: u16) {
    dma.memory()
        .write_obj(val.to_le(), GuestAddress(addr))
        .unwrap()
}

#[track_caller]
fn read_desc(dma: &DmaRegion, q: &SplitQueue, id: u16) -> Descriptor {
    let raw: RawDescriptor = dma.memory().read_obj(q.desc_addr(id)).unwrap();
    Descriptor::from(raw)
}

/// Acts as a (misbehaving) device: writes used element number `idx` and sets used idx to
/// `idx + 1`.
#[track_caller]
fn device_push_used(dma: &DmaRegion, q: &SplitQueue, idx: u16, id: u32, len: u32) {
    let mut elem = VirtqUsedElem::default();
    elem.as_mut_slice()[..4].copy_from_slice(&id.to_le_bytes());
    elem.as_mut_slice()[4..].copy_from_slice(&len.to_le_bytes());
    let slot = idx & (q.size() - 1);
    dma.memory()
        .write_obj(elem, q.used_elem_addr(slot))
        .unwrap();
    set_used_idx(dma, q, idx.wrapping_add(1));
}

#[track_caller]
fn set_used_idx(dma: &DmaRegion, q: &SplitQueue, idx: u16) {
    write_u16(dma, q.layout().used_ring.0 + 2, idx);
}

#[track_caller]
fn assert_broken<T: std::fmt::Debug>(r: Result<T, QueueError>, needle: &str) {
    match r {
        Err(QueueError::Broken { reason }) => {
            assert!(
                reason.contains(needle),
                "reason {reason:?} lacks {needle:?}"
            )
        }
        other => panic!("expected Broken containing {needle:?}, got {other:?}"),
    }
}

/// Every public entry point of a broken queue reports `Broken`.
#[track_caller]
fn assert_stays_broken(dma: &DmaRegion, q: &mut SplitQueue) {
    assert!(q.is_broken().is_some());
    let b = buf(dma, 16, false);
    assert_broken(q.add(&[b], 99), "");
    assert_broken(q.pop_used(), "");
    assert_broken(q.kick_prepare(), "");
    assert_broken(q.enable_cb(), "");
    q.disable_cb();
    assert_broken(q.pop_used(), "");
}

mod construction {
    use super::*;

    #[test]
    fn rejects_invalid_sizes() {
        let dma = dma(1 << 20);
        for size in [0, 3, 100, 32769, 65535] {
            assert!(
                matches!(SplitQueue::new(&dma, size, false), Err(QueueError::InvalidSize(s)) if s == size),
                "size {size}"
            );
        }
    }

    #[test]
    fn accepts_one_and_max() {
        let dma = dma(1 << 20);
        assert_eq!(queue(&dma, 1, false).size(), 1);
        assert_eq!(queue(&dma, MAX_QUEUE_SIZE, true).num_free(), MAX_QUEUE_SIZE);
    }

    #[test]
    fn reports_exhausted_dma() {
        let dma = dma(4096);
        assert!(matches!(
            SplitQueue::new(&dma, 256, false),
            Err(QueueError::Dma(DmaError::Exhausted { .. }))
        ));
    }

    #[test]
    fn layout_is_aligned_and_zeroed() {
        let dma = dma(1 << 20);
        // Dirty the memory the rings will occupy, to prove `new` zeroes it.
        dma.memory()
            .write_slice(&[0xff; 3 * 4096], GuestAddress(0x10_0000))
            .unwrap();
        let q = queue(&dma, 256, true);
        let l = q.layout();
        assert_eq!(l.size, 256);
        assert_eq!(l.desc_table.0 % 16, 0);
        assert_eq!(l.avail_ring.0 % 2, 0);
        assert_eq!(l.used_ring.0 % 4, 0);
        assert!(l.desc_table.0 + 16 * 256 <= l.avail_ring.0);
        assert!(l.avail_ring.0 + 6 + 2 * 256 <= l.used_ring.0);
        let mut bytes = vec![0u8; 4096];
        dma.memory().read_slice(&mut bytes, l.desc_table).unwrap();
        assert!(bytes.iter().all(|&b| b == 0));
        assert_eq!(q.num_free(), 256);
        assert_eq!(q.in_flight(), 0);
        assert!(q.is_broken().is_none());
    }

    #[test]
    fn queue_is_send() {
        fn check<T: Send>() {}
        check::<SplitQueue>();
    }
}

mod empty {
    use super::*;

    #[test]
    fn nothing_to_pop_or_kick() {
        let dma = dma(1 << 20);
        let mut q = queue(&dma, 8, false);
        assert!(q.pop_used().unwrap().is_none());
        assert!(!q.kick_prepare().unwrap());
        assert!(q.enable_cb().unwrap());
    }

    #[test]
    fn used_idx_moving_with_nothing_in_flight_breaks() {
        let dma = dma(1 << 20);
        let mut q = queue(&dma, 8, false);
        set_used_idx(&dma, &q, 1);
        assert_broken(q.pop_used(), "chains in flight");
        assert_stays_broken(&dma, &mut q);
    }
}

mod adding {
    use super::*;

    #[test]
    fn writes_descriptors_avail_entry_and_idx() {
        let dma = dma(1 << 20);
        let mut q = queue(&dma, 8, false);
        let bufs = [
            buf(&dma, 44, false),
            buf(&dma, 100, false),
            buf(&dma, 4096, true),
        ];
        let head = q.add(&bufs, 5).unwrap();
        assert_eq!(head, 0);
        let mut id = head;
        for (i, b) in bufs.iter().enumerate() {
            let d = read_desc(&dma, &q, id);
            assert_eq!(d.addr(), b.addr);
            assert_eq!(d.len(), b.len);
            assert_eq!(d.is_write_only(), b.writable);
            assert_eq!(d.has_next(), i != bufs.len() - 1);
            id = d.next();
        }
        let l = q.layout();
        assert_eq!(read_u16(&dma, l.avail_ring.0 + 2), 1, "avail idx");
        assert_eq!(read_u16(&dma, l.avail_ring.0 + 4), head, "avail ring[0]");
        assert_eq!(q.num_free(), 5);
        assert_eq!(q.in_flight(), 1);
        assert_eq!(q.add(&[buf(&dma, 8, true)], 6).unwrap(), 3);
        assert_eq!(read_u16(&dma, l.avail_ring.0 + 6), 3, "avail ring[1]");
    }

    #[test]
    fn rejects_bad_chains_without_side_effects() {
        let dma = dma(1 << 20);
        let mut q = queue(&dma, 4, false);
        assert!(matches!(q.add(&[], 0), Err(QueueError::EmptyChain)));
        let r = buf(&dma, 8, false);
        let w = buf(&dma, 8, true);
        assert!(matches!(
            q.add(&[r, w, r], 0),
            Err(QueueError::WritableBeforeReadable { index: 2 })
        ));
        let outside = BufferDesc {
            addr: GuestAddress(0x10_0000 + (1 << 20) - 4),
            len: 8,
            writable: true,
        };
        assert!(matches!(
            q.add(&[outside], 0),
            Err(QueueError::BufferOutOfRange { len: 8, .. })
        ));
        let wrapping = BufferDesc {
            addr: GuestAddress(u64::MAX),
            len: 2,
            writable: false,
        };
        assert!(matches!(
            q.add(&[wrapping], 0),
            Err(QueueError::BufferOutOfRange { .. })
        ));
        assert!(matches!(
            q.add(&[r; 5], 0),
            Err(QueueError::Full { needed: 5, free: 4 })
        ));
        assert_eq!(q.num_free(), 4);
        assert_eq!(q.in_flight(), 0);
        assert_eq!(read_u16(&dma, q.layout().avail_ring.0 + 2), 0);
    }

    #[test]
    fn full_queue_reports_needed_and_free() {
        let dma = dma(1 << 20);
        let mut q = queue(&dma, 4, false);
        let r = buf(&dma, 8, false);
        q.add(&[r, r, r], 1).unwrap();
        let err = q.add(&[r, r], 2).unwrap_err();
        assert!(matches!(err, QueueError::Full { needed: 2, free: 1 }));
        assert!(err.to_string().contains("needs 2"));
        q.add(&[r], 3).unwrap();
        assert_eq!(q.num_free(), 0);
    }

    #[test]
    fn kick_follows_used_flags_without_event_idx() {
        let dma = dma(1 << 20);
        let mut q = queue(&dma, 8, false);
        let r = buf(&dma, 8, false);
        q.add(&[r], 1).unwrap();
        assert!(q.kick_prepare().unwrap());
        assert!(
            !q.kick_prepare().unwrap(),
            "nothing new since the last kick"
        );
        write_u16(&dma, q.layout().used_ring.0, USED_F_NO_NOTIFY);
        q.add(&[r], 2).unwrap();
        assert!(!q.kick_prepare().unwrap());
    }

    #[test]
    fn kick_follows_avail_event_with_event_idx() {
        let dma = dma(1 << 20);
        let mut q = queue(&dma, 8, true);
        let r = buf(&dma, 8, false);
        let avail_event = q.avail_event_addr();
        // avail_event = 0: the device wants a kick when entry 0 becomes available.
        q.add(&[r], 1).unwrap();
        assert!(q.kick_prepare().unwrap());
        // Device still at 0 (has not re-armed): entries 1 and 2 need no kick.
        q.add(&[r], 2).unwrap();
        q.add(&[r], 3).unwrap();
        assert!(!q.kick_prepare().unwrap());
        // Device re-armed at 4: adding entry 3 is not enough, entry 4 is.
        write_u16(&dma, avail_event, 4);
        q.add(&[r], 4).unwrap();
        assert!(!q.kick_prepare().unwrap());
        q.add(&[r], 5).unwrap();
        assert!(q.kick_prepare().unwrap());
    }
}

mod in_flight {
    use super::*;

    #[test]
    fn pop_returns_token_and_frees_chain() {
        let dma = dma(1 << 20);
        let mut q = queue(&dma, 4, false);
        let r = buf(&dma, 8, false);
        let w = buf(&dma, 100, true);
        let head = q.add(&[r, w, w], 42).unwrap();
        device_push_used(&dma, &q, 0, u32::from(head), 200);
        let used = q.pop_used().unwrap().unwrap();
        assert_eq!(
            used,
            UsedElem {
                id: head,
                len: 200,
                token: 42
            }
        );
        assert_eq!(q.num_free(), 4);
        assert_eq!(q.in_flight(), 0);
        assert!(q.pop_used().unwrap().is_none());
        // The freed descriptors are reused, the whole table is usable again.
        q.add(&[r, r, r, w], 43).unwrap();
        assert_eq!(q.num_free(), 0);
    }

    #[test]
    fn out_of_order_completion() {
        let dma = dma(1 << 20);
        let mut q = queue(&dma, 8, false);
        let w = buf(&dma, 64, true);
        let a = q.add(&[w, w], 1).unwrap();
        let b = q.add(&[w], 2).unwrap();
        let c = q.add(&[w, w, w], 3).unwrap();
        device_push_used(&dma, &q, 0, u32::from(b), 64);
        device_push_used(&dma, &q, 1, u32::from(c), 0);
        device_push_used(&dma, &q, 2, u32::from(a), 128);
        let tokens: Vec<u64> = std::iter::from_fn(|| q.pop_used().unwrap())
            .map(|u| u.token)
            .collect();
        assert_eq!(tokens, [2, 3, 1]);
        assert_eq!(q.num_free(), 8);
    }

    #[test]
    fn enable_cb_reports_pending_used() {
        let dma = dma(1 << 20);
        let mut q = queue(&dma, 4, false);
        let w = buf(&dma, 64, true);
        let head = q.add(&[w], 1).unwrap();
        q.disable_cb();
        assert_eq!(
            read_u16(&dma, q.layout().avail_ring.0),
            AVAIL_F_NO_INTERRUPT,
            "avail flags"
        );
        device_push_used(&dma, &q, 0, u32::from(head), 1);
        assert!(!q.enable_cb().unwrap(), "an element is already pending");
        assert_eq!(read_u16(&dma, q.layout().avail_ring.0), 0);
        q.pop_used().unwrap().unwrap();
        assert!(q.enable_cb().unwrap());
    }

    #[test]
    fn used_event_tracks_last_used_only_while_enabled() {
        let dma = dma(1 << 20);
        let mut q = queue(&dma, 4, true);
        let w = buf(&dma, 64, true);
        let used_event = q.used_event_addr();
        for token in 0..3 {
            q.add(&[w], token).unwrap();
        }
        device_push_used(&dma, &q, 0, 0, 1);
        q.pop_used().unwrap().unwrap();
        assert_eq!(read_u16(&dma, used_event), 1);
        q.disable_cb();
        device_push_used(&dma, &q, 1, 1, 1);
        q.pop_used().unwrap().unwrap();
        assert_eq!(read_u16(&dma, used_event), 1, "frozen while disabled");
        assert!(q.enable_cb().unwrap());
        assert_eq!(read_u16(&dma, used_event), 2);
        device_push_used(&dma, &q, 2, 2, 1);
        assert!(!q.enable_cb().unwrap());
    }

    #[test]
    fn reset_returns_in_flight_tokens_and_rezeroes() {
        let dma = dma(1 << 20);
        let mut q = queue(&dma, 8, true);
        let w = buf(&dma, 64, true);
        q.add(&[w], 10).unwrap();
        q.add(&[w, w], 11).unwrap();
        device_push_used(&dma, &q, 0, 7, 1); // bogus: breaks the queue
        assert!(q.pop_used().is_err());
        let mut tokens = q.reset();
        tokens.sort_unstable();
        assert_eq!(tokens, [10, 11]);
        assert!(q.is_broken().is_none());
        assert_eq!(q.num_free(), 8);
        assert_eq!(q.in_flight(), 0);
        assert_eq!(read_u16(&dma, q.layout().used_ring.0 + 2), 0);
        assert_eq!(read_u16(&dma, q.layout().avail_ring.0 + 2), 0);
        assert_eq!(q.add(&[w], 12).unwrap(), 0);
        device_push_used(&dma, &q, 0, 0, 64);
        assert_eq!(q.pop_used().unwrap().unwrap().token, 12);
    }
}

mod hostile_device {
    use super::*;

    /// A queue of 8 with chains (heads 0, 2, 3): 2 descs/64 writable, 1 desc/16 writable,
    /// 1 desc read-only.
    #[track_caller]
    fn setup(event_idx: bool) -> (DmaRegion, SplitQueue) {
        let dma = dma(1 << 20);
        let mut q = queue(&dma, 8, event_idx);
        let r = buf(&dma, 32, false);
        let w = buf(&dma, 64, true);
        let w16 = buf(&dma, 16, true);
        assert_eq!(q.add(&[r, w], 100).unwrap(), 0);
        assert_eq!(q.add(&[w16], 101).unwrap(), 2);
        assert_eq!(q.add(&[r], 102).unwrap(), 3);
        (dma, q)
    }

    #[test]
    fn id_beyond_queue_size() {
        for id in [8, 0x1_0000, u32::MAX] {
            let (dma, mut q) = setup(false);
            device_push_used(&dma, &q, 0, id, 0);
            assert_broken(q.pop_used(), &format!("below the queue size 8, found {id}"));
            assert_stays_broken(&dma, &mut q);
        }
    }

    #[test]
    fn id_not_in_flight() {
        let (dma, mut q) = setup(true);
        // 1 is the second descriptor of chain 0, 5 was never posted.
        for id in [1, 5] {
            let (dma, mut q) = setup(false);
            device_push_used(&dma, &q, 0, id, 0);
            assert_broken(q.pop_used(), &format!("found id {id}"));
            assert_stays_broken(&dma, &mut q);
        }
        device_push_used(&dma, &q, 0, 7, 0);
        assert_broken(q.pop_used(), "in-flight chain");
    }

    #[test]
    fn duplicate_used_entry() {
        let (dma, mut q) = setup(false);
        device_push_used(&dma, &q, 0, 2, 16);
        assert_eq!(q.pop_used().unwrap().unwrap().token, 101);
        device_push_used(&dma, &q, 1, 2, 16);
        assert_broken(q.pop_used(), "already returned");
        assert_stays_broken(&dma, &mut q);
    }

    #[test]
    fn len_beyond_writable_space() {
        let (dma, mut q) = setup(false);
        device_push_used(&dma, &q, 0, 0, 65);
        assert_broken(
            q.pop_used(),
            "expected len at most 64 (writable bytes posted), found 65",
        );
        assert_stays_broken(&dma, &mut q);
        // A read-only chain may not report any written bytes.
        let (dma, mut q) = setup(true);
        device_push_used(&dma, &q, 0, 3, 1);
        assert_broken(q.pop_used(), "at most 0");
    }

    #[test]
    fn used_idx_jump_beyond_size() {
        for jump in [9u16, 100, 0x8000, 0xffff] {
            let (dma, mut q) = setup(false);
            set_used_idx(&dma, &q, jump);
            assert_broken(
                q.pop_used(),
                &format!("expected at most 8 (queue size) new entries, found {jump}"),
            );
            assert_stays_broken(&dma, &mut q);
        }
    }

    #[test]
    fn used_idx_beyond_chains_in_flight() {
        let (dma, mut q) = setup(false);
        set_used_idx(&dma, &q, 4);
        assert_broken(
            q.pop_used(),
            "expected at most 3 new entries (chains in flight), found 4",
        );
        assert_stays_broken(&dma, &mut q);
    }

    #[test]
    fn valid_entries_before_a_bad_one_are_delivered() {
        let (dma, mut q) = setup(false);
        device_push_used(&dma, &q, 0, 3, 0);
        device_push_used(&dma, &q, 1, 9, 0);
        assert_eq!(q.pop_used().unwrap().unwrap().token, 102);
        assert_broken(q.pop_used(), "found 9");
        // Broken state keeps the bookkeeping intact: the two chains are still accounted for.
        assert_eq!(q.in_flight(), 2);
        assert_eq!(q.num_free(), 5);
    }
}

/// Our driver against virtio-queue's device-side `Queue` over the same memory.
mod pairing {
    use super::*;
    use virtio_queue::{Queue, QueueT};

    struct Device {
        q: Queue,
        /// Notifications enabled and nothing pending: waits for a kick.
        sleeping: bool,
    }

    #[track_caller]
    fn device(dma: &DmaRegion, layout: QueueLayout, event_idx: bool) -> Device {
        let mut q = Queue::new(layout.size).unwrap();
        q.set_size(layout.size);
        let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        let (lo, hi) = split(layout.desc_table);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(layout.avail_ring);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(layout.used_ring);
        q.set_used_ring_address(lo, hi);
        q.set_event_idx(event_idx);
        q.set_ready(true);
        assert!(q.is_valid(dma.memory()), "device rejects our layout");
        Device { q, sleeping: false }
    }

    struct Stats {
        adds: u64,
        kicks: u64,
        suppressed_kicks: u64,
        interrupts: u64,
    }

    /// Random operations until `min_adds` chains were added, then drains; panics on any lost buffer, lost notification or mismatch.
    fn run(seed: u64, size: u16, event_idx: bool, min_adds: u64) -> Stats {
        let dma = dma(4 << 20);
        let mut drv = queue(&dma, size, event_idx);
        let mut dev = device(&dma, drv.layout(), event_idx);
        let mem = dma.memory();
        let pool = dma.alloc(64 * 1024, 8).unwrap();
        let mut rng = XorShift(seed);
        let mut posted: HashMap<u16, (u64, Vec<BufferDesc>)> = HashMap::new();
        let mut completed: VecDeque<(u16, u32, u64)> = VecDeque::new();
        let mut outstanding: HashSet<u64> = HashSet::new();
        let mut next_token = 0u64;
        let mut unkicked = false;
        let mut driver_sleeping = false;
        let mut stats = Stats {
            adds: 0,
            kicks: 0,
            suppressed_kicks: 0,
            interrupts: 0,
        };
        let max_chain = u64::from(size.min(5));

        let mut ops = 0u64;
        let mut draining = false;
        loop {
            ops += 1;
            if stats.adds >= min_adds {
                draining = true;
            }
            let op = if draining {
                4 + rng.below(6)
            } else {
                rng.below(10)
            };
            match op {
                // Driver adds a chain, maybe kicking.
                0..=3 => {
                    let n = 1 + rng.below(max_chain) as usize;
                    let readable = rng.below(n as u64 + 1) as usize;
                    let bufs: Vec<BufferDesc> = (0..n)
                        .map(|i| BufferDesc {
                            addr: GuestAddress(pool.0 + rng.below(60 * 1024)),
                            len: 1 + rng.below(4096) as u32,
                            writable: i >= readable,
                        })
                        .collect();
                    let token = next_token;
                    match drv.add(&bufs, token) {
                        Ok(head) => {
                            next_token += 1;
                            stats.adds += 1;
                            assert!(posted.insert(head, (token, bufs)).is_none(), "head reused");
                            outstanding.insert(token);
                            unkicked = true;
                        }
                        Err(QueueError::Full { needed, free }) => {
                            assert_eq!(needed, n);
                            assert!(usize::from(free) < n);
                            assert_eq!(free, drv.num_free());
                        }
                        Err(e) => panic!("add failed: {e}"),
                    }
                    if rng.chance(2) {
                        kick(&mut drv, &mut dev, &mut unkicked, &mut stats);
                    }
                }
                // Device processes a batch.
                4..=5 => {
                    if !dev.sleeping {
                        dev.q.disable_notification(mem).unwrap();
                        let batch = 1 + rng.below(4);
                        let mut added = false;
                        for _ in 0..batch {
                            let Some(chain) = dev.q.pop_descriptor_chain(mem) else {
                                break;
                            };
                            let head = chain.head_index();
                            let (token, bufs) = posted
                                .remove(&head)
                                .unwrap_or_else(|| panic!("device got unknown head {head}"));
                            let descs: Vec<Descriptor> = chain.collect();
                            assert_eq!(descs.len(), bufs.len(), "chain length, head {head}");
                            let mut writable = 0u64;
                            for (d, b) in descs.iter().zip(&bufs) {
                                assert_eq!((d.addr(), d.len()), (b.addr, b.len));
                                assert_eq!(d.is_write_only(), b.writable);
                                if b.writable {
                                    writable += u64::from(b.len);
                                }
                            }
                            let len = rng.below(writable + 1) as u32;
                            dev.q.add_used(mem, head, len).unwrap();
                            completed.push_back((head, len, token));
                            added = true;
                        }
                        if added && dev.q.needs_notification(mem).unwrap() {
                            stats.interrupts += 1;
                            if driver_sleeping {
                                driver_sleeping = false;
                                drv.disable_cb();
                            }
                        }
                        if rng.chance(3) || posted.is_empty() {
                            // Go idle: re-arm and sleep unless more arrived meanwhile.
                            dev.sleeping = !dev.q.enable_notification(mem).unwrap();
                        }
                    }
                }
                // Driver polls the used ring.
                6..=7 => {
                    if !driver_sleeping {
                        for _ in 0..1 + rng.below(6) {
                            let Some(used) = drv.pop_used().unwrap() else {
                                break;
                            };
                            let (head, len, token) = completed
                                .pop_front()
                                .expect("driver popped more than device used");
                            assert_eq!(
                                used,
                                UsedElem {
                                    id: head,
                                    len,
                                    token
                                }
                            );
                            assert!(outstanding.remove(&token), "token {token} returned twice");
                        }
                    }
                }
                8 => kick(&mut drv, &mut dev, &mut unkicked, &mut stats),
                // Driver goes idle: re-arm callbacks and sleep unless something is pending.
                _ => {
                    if !driver_sleeping {
                        driver_sleeping = drv.enable_cb().unwrap();
                        if !driver_sleeping && rng.chance(2) {
                            drv.disable_cb();
                        }
                    }
                }
            }

            // No lost kick: a sleeping device with available buffers must have been kicked,
            // unless the driver has not called kick_prepare since adding them.
            let avail = dev.q.avail_idx(mem, Ordering::Acquire).unwrap();
            if dev.sleeping && !unkicked {
                assert_eq!(
                    avail.0,
                    dev.q.next_avail(),
                    "lost kick: device sleeps with buffers available (seed {seed:#x}, op {ops})"
                );
            }
            // No lost interrupt: a sleeping driver has nothing in the used ring.
            if driver_sleeping {
                assert!(
                    completed.is_empty(),
                    "lost interrupt: driver sleeps with {} used buffers (seed {seed:#x}, op {ops})",
                    completed.len()
                );
            }
            // Descriptor accounting matches what is in flight.
            let in_flight_descs: usize = posted.values().map(|(_, b)| b.len()).sum::<usize>();
            assert!(usize::from(drv.num_free()) + in_flight_descs <= usize::from(size));
            assert_eq!(usize::from(drv.in_flight()), outstanding.len());

            if draining && outstanding.is_empty() {
                break;
            }
            // Draining: make sure nobody sleeps forever.
            if draining {
                if unkicked {
                    kick(&mut drv, &mut dev, &mut unkicked, &mut stats);
                }
                if dev.sleeping && posted.is_empty() && driver_sleeping {
                    panic!(
                        "deadlock: both sides asleep with {} outstanding",
                        outstanding.len()
                    );
                }
            }
            assert!(
                ops < 50 * min_adds + 100_000,
                "no progress (seed {seed:#x})"
            );
        }
        assert!(completed.is_empty() && posted.is_empty());
        assert_eq!(drv.num_free(), size);
        if min_adds >= 70_000 {
            assert!(ops > 70_000, "only {ops} operations");
            assert!(stats.adds > 65_536, "avail idx did not wrap");
        }
        stats
    }

    fn kick(drv: &mut SplitQueue, dev: &mut Device, unkicked: &mut bool, stats: &mut Stats) {
        *unkicked = false;
        if drv.kick_prepare().unwrap() {
            stats.kicks += 1;
            dev.sleeping = false;
        } else {
            stats.suppressed_kicks += 1;
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "too slow under Miri; see pairing_short")]
    fn with_event_idx_small_queue() {
        let s = run(0x9e37_79b9_7f4a_7c15, 4, true, 70_000);
        assert!(s.suppressed_kicks > 0 && s.kicks > 0 && s.interrupts > 0);
    }

    #[test]
    #[cfg_attr(miri, ignore = "too slow under Miri; see pairing_short")]
    fn with_event_idx_large_queue() {
        let s = run(0xdead_beef_cafe_f00d, 256, true, 70_000);
        assert!(s.suppressed_kicks > 0 && s.kicks > 0);
    }

    #[test]
    #[cfg_attr(miri, ignore = "too slow under Miri; see pairing_short")]
    fn without_event_idx_small_queue() {
        let s = run(0x0123_4567_89ab_cdef, 8, false, 70_000);
        assert!(s.suppressed_kicks > 0 && s.kicks > 0);
    }

    #[test]
    #[cfg_attr(miri, ignore = "too slow under Miri; see pairing_short")]
    fn without_event_idx_large_queue() {
        run(0x5555_aaaa_3333_cccc, 128, false, 70_000);
    }

    /// A short run that Miri can afford (no u16 wrap).
    #[test]
    fn pairing_short() {
        run(1, 4, true, 300);
        run(2, 8, false, 300);
    }
}

/// Random used-ring contents: never a panic, and the driver's bookkeeping stays consistent.
mod random_used_ring {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: if cfg!(miri) { 4 } else { 512 },
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn never_panics_and_keeps_invariants(
            event_idx in any::<bool>(),
            size_log in 0u32..5,
            chains in prop::collection::vec((1u16..4, 0u16..4, 0u32..3000), 0..20),
            elems in prop::collection::vec(
                (prop_oneof![0u32..20, any::<u32>()], prop_oneof![0u32..6000, any::<u32>()]),
                16,
            ),
            used_idx in prop_oneof![0u16..20, any::<u16>()],
        ) {
            let size = 1u16 << size_log;
            let dma = dma(1 << 20);
            let mut q = queue(&dma, size, event_idx);
            let pool = dma.alloc(4096, 8).unwrap();
            let mut in_flight: HashMap<u64, (u16, u64)> = HashMap::new();
            for (token, &(n, readable, len)) in chains.iter().enumerate() {
                let bufs: Vec<BufferDesc> = (0..n)
                    .map(|i| BufferDesc { addr: pool, len, writable: i >= readable })
                    .collect();
                if let Ok(head) = q.add(&bufs, token as u64) {
                    let writable = u64::from(len) * u64::from(n.saturating_sub(readable));
                    in_flight.insert(token as u64, (n, writable));
                    prop_assert!(head < size);
                }
            }
            for (i, &(id, len)) in elems.iter().enumerate().take(usize::from(size)) {
                let mut elem = VirtqUsedElem::default();
                elem.as_mut_slice()[..4].copy_from_slice(&id.to_le_bytes());
                elem.as_mut_slice()[4..].copy_from_slice(&len.to_le_bytes());
                dma.memory().write_obj(elem, q.used_elem_addr(i as u16)).unwrap();
            }
            set_used_idx(&dma, &q, used_idx);

            let mut broken = false;
            for _ in 0..40 {
                match q.pop_used() {
                    Ok(Some(used)) => {
                        prop_assert!(!broken, "element after Broken");
                        let (_, writable) = in_flight
                            .remove(&used.token)
                            .ok_or_else(|| TestCaseError::fail("token not in flight"))?;
                        prop_assert!(u64::from(used.len) <= writable);
                    }
                    Ok(None) => prop_assert!(!broken, "None after Broken"),
                    Err(QueueError::Broken { reason }) => {
                        prop_assert!(!reason.is_empty());
                        prop_assert_eq!(q.is_broken(), Some(reason.as_str()));
                        broken = true;
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("unexpected {e}"))),
                }
                let descs: u16 = in_flight.values().map(|&(n, _)| n).sum();
                prop_assert_eq!(q.num_free() + descs, size);
                prop_assert_eq!(usize::from(q.in_flight()), in_flight.len());
            }
            let mut left = q.reset();
            left.sort_unstable();
            let mut expected: Vec<u64> = in_flight.keys().copied().collect();
            expected.sort_unstable();
            prop_assert_eq!(left, expected);
            prop_assert!(q.is_broken().is_none());
        }
    }
}
