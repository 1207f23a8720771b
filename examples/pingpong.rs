//! Profiling aid: 64-byte ping-pong against the sim's echo service (`busy` argument: busy-poll).
#![allow(clippy::cast_possible_truncation)] // Test sizes and counters are small and known.
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
    let t0 = Instant::now();
    for _ in 0..n {
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
    }
    println!(
        "{:.0} round trips/s",
        f64::from(n) / t0.elapsed().as_secs_f64()
    );
}
