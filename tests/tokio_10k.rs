// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! 10,000 concurrent connections on ONE current-thread tokio runtime, each echoing 64 KiB
//! checksummed through the sim host's echo service: every byte intact, and the process's
//! thread count the same before and after (no thread per socket). Prints the time, threads,
//! RSS and descriptors. Alone in its binary so that no other test's threads skew the count.
#![cfg(feature = "tokio")]

mod common;

use std::cell::Cell;
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
/// open at once), then write 64 KiB while reading it back, and compare checksums.
async fn one(driver: &VsockDriver, i: usize, all_open: &Barrier) -> std::io::Result<bool> {
    let s = VsockStream::connect(driver, VsockAddr::new(VMADDR_CID_HOST, ECHO_PORT)).await;
    // A failed connect waits too, so that the others go on and the failure is reported.
    all_open.wait().await;
    let mut s = s?;
    let data = pattern(i as u64, BYTES);
    let want = checksum(&data, 0);
    let (mut r, mut w) = s.split();
    let mut back = vec![0u8; BYTES];
    let (wr, rd) = tokio::join!(w.write_all(&data), r.read_exact(&mut back));
    wr?;
    rd?;
    Ok(checksum(&back, 0) == want)
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
    drop(rt);
    drop(driver);
    drop(host);
    let rss_closed = status("VmRSS");
    println!(
        "{conns} connections x {} KiB echoed on one current-thread runtime in {:.2} s: {intact} intact; \
         threads {threads_before} before, {threads_during} at most during, {threads_after} after; \
         RSS {} MiB before, {} MiB peak, {} MiB after, {} MiB once the driver is dropped; descriptors {fds_before} before, {fds_during} at most during",
        BYTES / 1024,
        elapsed.as_secs_f64(),
        rss_before / 1024,
        rss_peak / 1024,
        rss_after / 1024,
        rss_closed / 1024,
    );
    assert_eq!(intact, conns);
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
