// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `serve` with 10,000 idle clients plus 100 active ones (issue 13): the `serve` binary over
//! the sim device; 10,000 Unix clients complete the handshake to the sim host's echo
//! (`CONNECT 7`) and stay idle; then 100 more each echo 1 MiB checksummed while the 10,000
//! are open; then a sample of the idle ones still echo. Serve's thread count
//! (`/proc/PID/status` `Threads`) is sampled throughout and must never move; its RSS and
//! descriptors are printed. Alone in its binary: it needs most of the descriptor limit.

mod common;
#[path = "common/serve.rs"]
mod serve;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::{checksum, pattern};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use serve::{proc_status, read_line, Daemon, BIN};

const IDLE: usize = 10_000;
const ACTIVE: usize = 100;
const ACTIVE_BYTES: usize = 1 << 20;
/// Clients connected before their replies are read (the listener's backlog holds them).
const BATCH: usize = 500;
/// Any wait longer than this is a hang.
const LIMIT: Duration = Duration::from_secs(60);

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).expect("connect to serve");
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.set_write_timeout(Some(LIMIT)).unwrap();
    s
}

#[track_caller]
fn expect_ok(s: &mut UnixStream, who: usize) {
    let reply = read_line(s);
    assert!(reply.starts_with("OK "), "client {who}: {reply:?}");
    reply[3..].parse::<u32>().expect("OK <local_port>");
}

/// Echo `len` bytes through `s` (already connected to the echo) and check the checksum.
fn echo(s: &UnixStream, seed: u64, len: usize) {
    let data = pattern(seed, len);
    let want = checksum(&data, 0);
    thread::scope(|sc| {
        sc.spawn(|| {
            let mut w = s;
            for chunk in data.chunks(32 * 1024) {
                w.write_all(chunk).expect("write to serve");
            }
        });
        let mut r = s;
        let mut got = 0;
        let mut sum = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < len {
            let n = r
                .read(&mut buf[..(len - got).min(64 * 1024)])
                .expect("read from serve");
            assert!(n > 0, "client {seed}: EOF after {got} of {len} bytes");
            sum = checksum(&buf[..n], sum);
            got += n;
        }
        assert_eq!(sum, want, "client {seed}: echoed bytes differ");
    });
}

#[test]
fn serve_10k_idle_plus_100_active_clients() {
    // Each client is one descriptor here (and one in serve, which raises its own limit).
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let need = (IDLE + ACTIVE + 256) as u64;
    assert!(
        hard >= need,
        "RLIMIT_NOFILE hard limit {hard}: {need} descriptors are needed for {IDLE} + {ACTIVE} clients"
    );
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise the soft RLIMIT_NOFILE");
    }
    // No --max-conns: the default (what the descriptor limit holds) must take them.
    let mut cmd = Command::new(BIN);
    cmd.env("RUST_LOG", "warn");
    let mut d = Daemon::start(cmd, &[], LIMIT);
    let pid = d.pid();
    let threads = proc_status(pid, "Threads");
    // Serve's thread count, sampled while it serves: (min, max).
    let stop = AtomicBool::new(false);
    let seen = Mutex::new((threads, threads));
    let result = thread::scope(|sc| {
        let monitor = sc.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let t = proc_status(pid, "Threads");
                let mut s = seen.lock().unwrap();
                *s = (s.0.min(t), s.1.max(t));
                drop(s);
                thread::sleep(Duration::from_millis(20));
            }
        });
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&d, pid, threads)));
        stop.store(true, Ordering::Relaxed);
        monitor.join().expect("monitor");
        r
    });
    let idle = match result {
        Ok(idle) => idle,
        Err(p) => {
            eprintln!("serve's log:\n{}", d.log());
            std::panic::resume_unwind(p);
        }
    };
    let (min, max) = *seen.lock().unwrap();
    assert_eq!(
        (min, max),
        (threads, threads),
        "serve's thread count moved (started at {threads})"
    );

    // SIGTERM with the 10,000 still open: every one ended, exit 0, within a second.
    let (took, code) = d.signal_and_wait(libc::SIGTERM, LIMIT);
    eprintln!("serve: SIGTERM to exit with {IDLE} clients open: {took:?}");
    assert_eq!(code, Some(0), "{}", d.log());
    assert!(took < Duration::from_secs(1), "{took:?}");
    for s in [&idle[0], &idle[IDLE - 1]] {
        let mut rest = Vec::new();
        let mut s = s;
        assert_eq!(
            s.read_to_end(&mut rest).unwrap_or(0),
            0,
            "ended by the shutdown"
        );
    }
}

/// Connect the idle clients, run the active ones, check a sample of the idle; returns the
/// idle clients, still open.
fn run(d: &Daemon, pid: u32, threads: u64) -> Vec<UnixStream> {
    let t0 = Instant::now();
    let mut idle: Vec<UnixStream> = Vec::with_capacity(IDLE);
    while idle.len() < IDLE {
        let first = idle.len();
        let n = BATCH.min(IDLE - first);
        for _ in 0..n {
            let mut s = connect(&d.uds);
            s.write_all(b"CONNECT 7\n").unwrap();
            idle.push(s);
        }
        for (i, s) in idle[first..].iter_mut().enumerate() {
            expect_ok(s, first + i);
        }
    }
    let connected = t0.elapsed();
    let rss_idle = proc_status(pid, "VmRSS");
    let fds_idle = open_fds(pid);
    eprintln!(
        "serve: {IDLE} idle clients connected in {connected:?}; serve has {} threads, \
         VmRSS {rss_idle} kB, {fds_idle} descriptors",
        proc_status(pid, "Threads")
    );
    assert!(
        (IDLE..IDLE + 100).contains(&fds_idle),
        "serve holds {fds_idle} descriptors for {IDLE} clients: expected one each and a few"
    );

    let t1 = Instant::now();
    thread::scope(|sc| {
        for i in 0..ACTIVE {
            let path = &d.uds;
            sc.spawn(move || {
                let mut s = connect(path);
                s.write_all(b"CONNECT 7\n").unwrap();
                expect_ok(&mut s, IDLE + i);
                echo(&s, i as u64, ACTIVE_BYTES);
            });
        }
    });
    let active = t1.elapsed();
    let mib = (ACTIVE * ACTIVE_BYTES) as f64 / f64::from(1 << 20);
    eprintln!(
        "serve: {ACTIVE} active clients x 1 MiB echoed in {active:?} ({:.0} MiB/s each way) \
         beside {IDLE} idle ones",
        mib / active.as_secs_f64()
    );

    // The idle ones still work: a sample echo a small message each.
    for i in (0..IDLE).step_by(IDLE / 20) {
        echo(&idle[i], 1_000_000 + i as u64, 100);
    }
    let rss = proc_status(pid, "VmRSS");
    let hwm = proc_status(pid, "VmHWM");
    eprintln!(
        "serve: afterwards {} threads (started with {threads}), VmRSS {rss} kB, peak VmHWM \
         {hwm} kB; whole run {:?}",
        proc_status(pid, "Threads"),
        t0.elapsed()
    );
    let log = d.log();
    assert!(
        !log.contains("WARN") && !log.contains("ERROR"),
        "serve warned: {log}"
    );
    idle
}
