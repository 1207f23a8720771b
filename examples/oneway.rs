//! Profiling aid: one-way throughput into the sim's discard service, with the driver's
//! counters and each thread's sleeps and CPU time per 64 KiB write. `GIB=n` sends n GiB;
//! `HOST_BUF=bytes` sets the buffer the sim host advertises.
#![allow(clippy::cast_possible_truncation)] // Test sizes and counters are small and known.
#![allow(clippy::cast_precision_loss)] // Rates and per-write figures are printed, not computed on.
#[path = "shared/threads.rs"]
mod threads;
use std::io::Write;
use std::time::Instant;
use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
use vdpa_vsock::sim::{SimConfig, DISCARD_PORT};
fn main() {
    // `HOST_BUF=bytes`: the receive buffer the sim host advertises (Linux's 256 KiB by
    // default), which bounds what one stream has in flight.
    let mut sim = SimConfig::default();
    if let Some(b) = std::env::var("HOST_BUF").ok().and_then(|v| v.parse().ok()) {
        sim.host.buf_alloc = b;
    }
    let (d, host) = VsockDriver::open_sim(sim, DriverConfig::default()).unwrap();
    let mut s = d.connect(VsockAddr::new(2, DISCARD_PORT)).unwrap();
    let buf = vec![1u8; 65536];
    let total: u64 = std::env::var("GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        << 30;
    let writes = total / 65536;
    let before = d.stats();
    let before_threads = threads::per_thread_switches();
    let t0 = Instant::now();
    for _ in 0..writes {
        s.write_all(&buf).unwrap();
    }
    while host.stats().discarded_bytes < total {
        std::thread::yield_now();
    }
    let dt = t0.elapsed();
    println!("{:.2} Gbit/s", total as f64 * 8.0 / dt.as_secs_f64() / 1e9);
    let after = d.stats();
    let per = |a: u64, b: u64| (a - b) as f64 / writes as f64;
    println!(
        "  per 64 KiB write: {:.2} tx packets, {:.2} rx packets, {:.2} kicks, {:.2} interrupts ({:.2} by a caller)",
        per(after.tx_packets, before.tx_packets),
        per(after.rx_packets, before.rx_packets),
        per(after.kicks, before.kicks),
        per(after.interrupts, before.interrupts),
        per(after.caller_interrupts, before.caller_interrupts),
    );
    for line in threads::switches_since(&before_threads, writes as f64, "write") {
        println!("{line}");
    }
}
