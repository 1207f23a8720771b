// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! 10,000 concurrent connections on ONE current-thread tokio runtime, each echoing 64 KiB
//! checksummed through the sim host's echo service: every byte intact, and the process's
//! thread count the same before and after (no thread per socket). Prints the time, threads,
//! RSS, live heap and descriptors. Alone in its binary so that no other test's threads skew
//! the count, and so that its counting allocator sees only this test's (and the driver's and
//! the sim's) allocations.
//!
//! Memory: RSS is what the kernel sees, and after the connections close it stays high even
//! though almost nothing is allocated any more: glibc keeps freed blocks in its arenas (a
//! block still in use above them pins a heap; `malloc_trim` gives them back). The heap the
//! process really holds is what the counting allocator says, and that is what is checked:
//! at the peak, about one connection's 64 KiB in flight per connection (the sim host holds what
//! it has not echoed yet); once all are closed, nothing per connection.
#![cfg(feature = "tokio")]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{checksum, pattern};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;
use vdpa_vsock::driver::{DriverConfig, VsockDriver};
use vdpa_vsock::sim::{SimConfig, ECHO_PORT};
use vdpa_vsock::tokio::{VsockAddr, VsockStream, VMADDR_CID_HOST};

const CONNS: usize = 10_000;
/// Overrides [`CONNS`] (for measuring where the descriptor limit cannot hold 10,000).
const CONNS_ENV: &str = "VDPA_VSOCK_TOKIO_CONNS";
const BYTES: usize = 64 * 1024;
/// Each connection writes and reads its 64 KiB in pieces of this size, so that the test's own
/// buffers (10,000 x 2 x 64 KiB would be 1.25 GiB) do not hide the driver's memory.
const PIECE: usize = 4096;
/// Most heap bytes in use at the peak, per connection: its 64 KiB in flight (in the sim host's
/// queues: received and not yet echoed, or echoed and not yet sent) plus what the socket, the
/// task and the tables cost. Before the queues gave their memory back when they emptied, the
/// peak was about 100 KiB per connection (the host kept a received and an echoed 64 KiB).
const PEAK_HEAP_PER_CONN: usize = 96 * 1024;
/// Most heap bytes per connection still in use once every stream is closed, with the driver
/// alive: tables grown for 10,000 connections give most of their memory back (before they
/// did, 1.6 KiB per connection stayed).
const CLOSED_HEAP_PER_CONN: usize = 512;

/// The global allocator, counting the bytes in use and their peak.
struct Counting;

static HEAP_LIVE: AtomicUsize = AtomicUsize::new(0);
static HEAP_PEAK: AtomicUsize = AtomicUsize::new(0);

impl Counting {
    fn add(n: usize) {
        let live = HEAP_LIVE.fetch_add(n, Ordering::Relaxed) + n;
        HEAP_PEAK.fetch_max(live, Ordering::Relaxed);
    }
    fn sub(n: usize) {
        HEAP_LIVE.fetch_sub(n, Ordering::Relaxed);
    }
    /// Bytes in use now.
    fn live() -> usize {
        HEAP_LIVE.load(Ordering::Relaxed)
    }
    /// The most bytes in use since the last reset; resets it to what is in use now.
    fn take_peak() -> usize {
        HEAP_PEAK.swap(Counting::live(), Ordering::Relaxed)
    }
}

// SAFETY: every call goes to `System` with the caller's own arguments, so `System`'s
// guarantees are ours; the counters are only read, never used to allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract (a non-zero-sized layout).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Counting::add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Counting::sub(layout.size());
        // SAFETY: the caller passes a block this allocator (that is, `System`) gave out, with
        // its layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller passes a block `System` gave out, its layout and a valid new
        // size.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            Counting::sub(layout.size());
            Counting::add(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What RSS is once glibc has handed its free blocks back to the kernel (`malloc_trim`), in kB:
/// printed beside RSS to show how much of it was the allocator's, not ours.
fn rss_trimmed() -> u64 {
    #[cfg(target_env = "gnu")]
    // SAFETY: `malloc_trim` only releases free memory of glibc's own arenas; no pointer of
    // ours is involved.
    unsafe {
        libc::malloc_trim(0);
    }
    status("VmRSS")
}
/// The whole run may take this long before it counts as a hang.
const LIMIT: Duration = Duration::from_secs(300);

/// A field of `/proc/self/status` (`Threads`, `VmRSS` in kB), as a number.
fn status(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

/// Each socket registered with tokio costs one descriptor (its edge notifier, an eventfd):
/// raise the soft limit to the hard one, and the hard one too when it is short (root may).
/// Fails, never skips.
fn raise_nofile(conns: usize) {
    // One per socket, plus what is open now (the harness's) and the driver's, the sim's and
    // the runtime's own.
    let need = conns as u64 + open_fds() as u64 + 64;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let hard = if hard < need {
        setrlimit(Resource::RLIMIT_NOFILE, need, need).unwrap_or_else(|e| {
            panic!(
                "RLIMIT_NOFILE: {conns} polled sockets need {need} descriptors (one each: the edge notifier), \
                 the hard limit is {hard} and raising it failed ({e}): run with CAP_SYS_RESOURCE (ulimit -Hn {need}), \
                 or set {CONNS_ENV} to fewer connections to measure"
            )
        });
        need
    } else {
        hard
    };
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raising the soft RLIMIT_NOFILE");
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        soft >= need,
        "RLIMIT_NOFILE soft limit {soft} < {need} after raising it"
    );
}

/// One connection: connect, wait until every connection is open (so that all of them are
/// open at once), then write 64 KiB (in [`PIECE`]s) while reading it back, and compare
/// checksums.
async fn one(driver: &VsockDriver, i: usize, all_open: &Barrier) -> std::io::Result<bool> {
    let s = VsockStream::connect(driver, VsockAddr::new(VMADDR_CID_HOST, ECHO_PORT)).await;
    // A failed connect waits too, so that the others go on and the failure is reported.
    all_open.wait().await;
    let mut s = s?;
    let pieces = BYTES / PIECE;
    let (mut r, mut w) = s.split();
    let write = async {
        let mut sum = 0;
        for k in 0..pieces {
            let piece = pattern((i * pieces + k) as u64, PIECE);
            sum = checksum(&piece, sum);
            w.write_all(&piece).await?;
        }
        Ok::<_, std::io::Error>(sum)
    };
    let read = async {
        let mut sum = 0;
        let mut back = [0u8; PIECE];
        for _ in 0..pieces {
            r.read_exact(&mut back).await?;
            sum = checksum(&back, sum);
        }
        Ok::<_, std::io::Error>(sum)
    };
    let (sent, echoed) = tokio::join!(write, read);
    Ok(sent? == echoed?)
}

#[test]
fn ten_thousand_connections_on_one_current_thread_runtime() {
    let conns = std::env::var(CONNS_ENV)
        .ok()
        .map(|v| {
            v.parse::<usize>()
                .unwrap_or_else(|e| panic!("{CONNS_ENV}={v:?}: {e}"))
        })
        .unwrap_or(CONNS);
    raise_nofile(conns);
    let cfg = DriverConfig::default();
    let (driver, host) = VsockDriver::open_sim(SimConfig::default(), cfg).expect("sim device");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let threads_before = status("Threads");
    let rss_before = status("VmRSS");
    let heap_before = Counting::live();
    Counting::take_peak();
    let fds_before = open_fds();
    let t0 = Instant::now();
    let driver = Arc::new(driver);
    let (intact, threads_during, fds_during, rss_peak) = rt.block_on(async {
        // Every connection, and the sampler once, waits here: past it all are open at once.
        let all_open = Arc::new(Barrier::new(conns + 1));
        let handles: Vec<_> = (0..conns)
            .map(|i| {
                let driver = driver.clone();
                let all_open = all_open.clone();
                tokio::spawn(async move { one(&driver, i, &all_open).await })
            })
            .collect();
        let open_at_once = async {
            all_open.wait().await;
            open_fds()
        };
        let done = Cell::new(false);
        // Sample the process while the connections are in flight.
        let sampler = async {
            let mut most = (0, 0, 0);
            while !done.get() {
                most.0 = most.0.max(status("Threads"));
                most.1 = most.1.max(open_fds());
                most.2 = most.2.max(status("VmRSS"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            most
        };
        let run = async {
            let mut intact = 0usize;
            for (i, h) in handles.into_iter().enumerate() {
                match h.await {
                    Ok(Ok(true)) => intact += 1,
                    Ok(Ok(false)) => panic!("connection {i}: the echo came back different"),
                    Ok(Err(e)) => panic!("connection {i}: {e}"),
                    Err(e) => panic!("connection {i}: task failed: {e}"),
                }
            }
            done.set(true);
            intact
        };
        let body = async { tokio::join!(run, sampler, open_at_once) };
        let (intact, (t, f, r), at_once) = tokio::time::timeout(LIMIT, body)
            .await
            .unwrap_or_else(|_| panic!("not done within {LIMIT:?}"));
        (intact, t, f.max(at_once), r)
    });
    let elapsed = t0.elapsed();
    let threads_after = status("Threads");
    let rss_after = status("VmRSS");
    let heap_peak = Counting::take_peak();
    let heap_after = Counting::live();
    let rss_after_trim = rss_trimmed();
    drop(rt);
    drop(driver);
    drop(host);
    let rss_closed = status("VmRSS");
    let mib = |bytes: usize| bytes >> 20;
    println!(
        "{conns} connections x {} KiB echoed on one current-thread runtime in {:.2} s: {intact} intact; \
         threads {threads_before} before, {threads_during} at most during, {threads_after} after; \
         RSS {} MiB before, {} MiB peak, {} MiB after ({} MiB once glibc trims its free blocks), {} MiB once the driver is dropped; \
         heap in use {} MiB before, {} MiB peak, {} MiB after; descriptors {fds_before} before, {fds_during} at most during",
        BYTES / 1024,
        elapsed.as_secs_f64(),
        rss_before / 1024,
        rss_peak / 1024,
        rss_after / 1024,
        rss_after_trim / 1024,
        rss_closed / 1024,
        mib(heap_before),
        mib(heap_peak),
        mib(heap_after),
    );
    assert_eq!(intact, conns);
    let peak_per_conn = heap_peak.saturating_sub(heap_before) / conns;
    assert!(
        peak_per_conn <= PEAK_HEAP_PER_CONN,
        "expected at most {PEAK_HEAP_PER_CONN} bytes of heap per connection at the peak, saw {peak_per_conn}"
    );
    let left_per_conn = heap_after.saturating_sub(heap_before) / conns;
    assert!(
        left_per_conn <= CLOSED_HEAP_PER_CONN,
        "expected at most {CLOSED_HEAP_PER_CONN} bytes of heap per connection once all are closed, saw {left_per_conn}"
    );
    assert_eq!(
        threads_during.max(threads_before),
        threads_before,
        "a thread was started"
    );
    assert_eq!(threads_after, threads_before, "the thread count changed");
    // One descriptor per socket (its notifier), not two (a socketpair each): with all of them
    // open at once the count is about `conns` above the baseline (which moves by a few as the
    // driver's and the harness's own descriptors come and go).
    assert!(
        fds_during >= conns && fds_during < fds_before + conns + 100,
        "expected one notifier per open socket with all {conns} open at once, saw {fds_during} descriptors (from {fds_before})"
    );
}
