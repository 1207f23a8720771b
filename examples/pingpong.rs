//! Profiling aid: 64-byte ping-pong against the sim's echo service (`busy` argument: busy-poll).
//! Prints the rate and the process's voluntary context switches per round trip (how many
//! times a thread went to sleep: the thread hand-offs a round trip costs).
#![allow(clippy::cast_possible_truncation)] // Test sizes and counters are small and known.
#[path = "shared/threads.rs"]
mod threads;
use std::io::{Read, Write};
use std::time::Instant;
use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
use vdpa_vsock::sim::{SimConfig, ECHO_PORT};
fn main() {
    let busy = std::env::args().any(|a| a == "busy");
    let (d, _host) = VsockDriver::open_sim(
        SimConfig {
            busy_poll: busy,
            ..SimConfig::default()
        },
        DriverConfig {
            busy_poll: busy,
            ..DriverConfig::default()
        },
    )
    .unwrap();
    let mut s = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let n = 50_000;
    let stats = d.stats();
    let switches = voluntary_switches();
    let before_threads = threads::per_thread_switches();
    let t0 = Instant::now();
    for _ in 0..n {
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
    }
    let took = t0.elapsed();
    let switches = voluntary_switches() - switches;
    println!(
        "{:.0} round trips/s, {:.2} voluntary context switches per round trip",
        f64::from(n) / took.as_secs_f64(),
        switches as f64 / f64::from(n)
    );
    let after = d.stats();
    let per = |a: u64, b: u64| (a - b) as f64 / f64::from(n);
    println!(
        "  per round trip: {:.2} tx packets, {:.2} rx packets, {:.2} kicks, {:.2} interrupts",
        per(after.tx_packets, stats.tx_packets),
        per(after.rx_packets, stats.rx_packets),
        per(after.kicks, stats.kicks),
        per(after.interrupts, stats.interrupts)
    );
    for line in threads::switches_since(&before_threads, f64::from(n), "round trip") {
        println!("{line}");
    }
}

/// The process's voluntary context switches so far (every thread's).
fn voluntary_switches() -> i64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map_or(0, |u| u.voluntary_context_switches())
}
