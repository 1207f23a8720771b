//! Profiling aid: one-way throughput into the sim's discard service.
#![allow(clippy::cast_possible_truncation)] // Test sizes and counters are small and known.
use std::io::Write;
use std::time::Instant;
use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
use vdpa_vsock::sim::{SimConfig, DISCARD_PORT};
fn main() {
    let (d, host) = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).unwrap();
    let mut s = d.connect(VsockAddr::new(2, DISCARD_PORT)).unwrap();
    let buf = vec![1u8; 65536];
    let total: u64 = 1 << 30;
    let t0 = Instant::now();
    for _ in 0..total / 65536 {
        s.write_all(&buf).unwrap();
    }
    while host.stats().discarded_bytes < total {
        std::thread::yield_now();
    }
    let dt = t0.elapsed();
    println!("{:.2} Gbit/s", total as f64 * 8.0 / dt.as_secs_f64() / 1e9);
}
