//! Profiling aid: one-way throughput from the sim's host side into the driver (the receive
//! path), 64 KiB reads.
#![allow(clippy::cast_possible_truncation)] // Test sizes and counters are small and known.
use std::io::{Read, Write};
use std::time::Instant;
use vdpa_vsock::driver::{DriverConfig, VsockDriver};
use vdpa_vsock::sim::SimConfig;
fn main() {
    let (d, host) = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).unwrap();
    let l = d.listen(5000).unwrap();
    let mut peer = host.connect(5000).unwrap();
    let (mut s, _) = l.accept().unwrap();
    let total: u64 = 1 << 30;
    let writer = std::thread::spawn(move || {
        let buf = vec![1u8; 65536];
        for _ in 0..total / 65536 {
            peer.write_all(&buf).unwrap();
        }
        peer
    });
    let mut buf = vec![0u8; 65536];
    let mut got = 0u64;
    let t0 = Instant::now();
    while got < total {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "end of stream after {got} bytes");
        got += n as u64;
    }
    let dt = t0.elapsed();
    drop(writer.join().unwrap());
    println!("{:.2} Gbit/s", total as f64 * 8.0 / dt.as_secs_f64() / 1e9);
}
