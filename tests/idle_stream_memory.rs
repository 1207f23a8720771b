// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What an idle stream costs in heap memory on the driver's side alone (issue 12's target:
//! at most 1 KiB per idle stream beyond the DMA pool), with 10,000 of them open to the sim
//! host's echo service.
//!
//! `vdpa-vsock bench` reports the RSS the idle streams add, but over sim that is two ends in
//! one process: the driver's and the sim host's (its own protocol endpoint and echo service).
//! Here a counting allocator tells them apart: every block carries a header that says which
//! side allocated it, and the sim host's side is whatever the sim's device thread (named
//! `sim-device`, the only thread that runs the host's endpoint) allocates; the rest is the
//! driver's (its sockets, core tables and protocol endpoint) and this test's. A block counts
//! against its allocating side until it is freed, by whichever thread. The test's own vector of
//! streams is reserved before the first count, so what is measured is what the driver keeps per
//! stream, plus the `VsockStream` handle a program holds.
//!
//! Alone in its binary: the allocator sees only this test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicIsize, Ordering};

use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
use vdpa_vsock::sim::{SimConfig, ECHO_PORT};

/// Idle streams measured.
const STREAMS: usize = 10_000;
/// The target: heap bytes per idle stream on the driver's side.
const DRIVER_MAX_PER_STREAM: isize = 1024;

/// Live heap bytes by allocating side: [driver and test, sim host].
static LIVE: [AtomicIsize; 2] = [AtomicIsize::new(0), AtomicIsize::new(0)];
/// The sim device thread's id (0 until found).
static SIM_TID: AtomicI32 = AtomicI32::new(0);

thread_local! {
    /// This thread's id, looked up once (0: not yet).
    static TID: Cell<i32> = const { Cell::new(0) };
}

/// Where each block's header is kept: just before the block, in a slot of this many bytes
/// (or the block's alignment, if larger).
const HEADER: usize = 16;

/// The global allocator: `System`'s blocks with a header of (size, side).
struct BySide;

impl BySide {
    fn side() -> usize {
        let tid = TID.with(|t| {
            if t.get() == 0 {
                // SAFETY: gettid has no preconditions.
                t.set(unsafe { libc::gettid() });
            }
            t.get()
        });
        usize::from(tid == SIM_TID.load(Ordering::Relaxed))
    }

    /// The layout of the whole block for `layout`, and where the caller's part starts.
    fn outer(layout: Layout) -> Option<(Layout, usize)> {
        let pad = HEADER.max(layout.align());
        let outer = Layout::from_size_align(layout.size().checked_add(pad)?, pad).ok()?;
        Some((outer, pad))
    }
}

// SAFETY: blocks come from `System` with a layout that holds the caller's (same alignment or
// more, `pad` more bytes in front); the caller gets the part after the header, which is its
// size and alignment; dealloc hands `System` back the block it gave, with its layout.
unsafe impl GlobalAlloc for BySide {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some((outer, pad)) = BySide::outer(layout) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `outer` is non-zero-sized (it has `pad` bytes at least).
        let base = unsafe { System.alloc(outer) };
        if base.is_null() {
            return base;
        }
        let side = BySide::side();
        LIVE[side].fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `pad >= 16` bytes lie before the caller's part, inside the block, and the
        // header slot is 8-aligned (pad is a multiple of 16).
        unsafe {
            let p = base.add(pad);
            (p.sub(HEADER) as *mut usize).write(layout.size());
            (p.sub(HEADER / 2) as *mut usize).write(side);
            p
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some((outer, pad)) = BySide::outer(layout) else {
            return;
        };
        // SAFETY: `ptr` came from `alloc` above with this layout: its header is in front.
        let side = unsafe { (ptr.sub(HEADER / 2) as *const usize).read() };
        LIVE[side.min(1)].fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the block `System` gave out for this layout.
        unsafe { System.dealloc(ptr.sub(pad), outer) }
    }
}

#[global_allocator]
static ALLOCATOR: BySide = BySide;

fn live() -> [isize; 2] {
    [
        LIVE[0].load(Ordering::Relaxed),
        LIVE[1].load(Ordering::Relaxed),
    ]
}

/// The id of this process's thread named `name`.
fn thread_id(name: &str) -> Option<i32> {
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))?
        .file_name()
        .to_str()?
        .parse()
        .ok()
}

#[test]
fn an_idle_stream_costs_the_driver_at_most_1_kib_of_heap() {
    let (driver, _host) =
        VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).expect("open sim");
    let sim = thread_id("sim-device").expect("the sim's device thread");
    SIM_TID.store(sim, Ordering::Relaxed);
    // Warm up: the first connection grows what every later one shares the start of.
    drop(
        driver
            .connect(VsockAddr::new(2, ECHO_PORT))
            .expect("connect"),
    );
    let mut streams = Vec::with_capacity(STREAMS);
    let before = live();
    for i in 0..STREAMS {
        let s = driver
            .connect(VsockAddr::new(2, ECHO_PORT))
            .unwrap_or_else(|e| panic!("connect {}: {e}", i + 1));
        streams.push(s);
    }
    // Every connection is established both ways (connect returned on the RESPONSE, which the
    // host sent after its side was set up): nothing is in flight that the count would miss.
    let after = live();
    let per = |side: usize| (after[side] - before[side]) / STREAMS as isize;
    let (ours, host) = (per(0), per(1));
    eprintln!(
        "{STREAMS} idle streams: {ours} heap bytes per stream on the driver's side, {host} on \
         the sim host's ({} together)",
        ours + host
    );
    assert!(
        ours <= DRIVER_MAX_PER_STREAM,
        "an idle stream costs the driver {ours} bytes of heap (target {DRIVER_MAX_PER_STREAM})"
    );
    assert!(host > 0, "nothing was counted against the sim host's side");
    drop(streams);
}
