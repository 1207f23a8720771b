// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Thousands of async echo clients on one current-thread tokio runtime, over the sim device.
//!
//! ```text
//! cargo run --release --example tokio_echo -- [CONNECTIONS] [BYTES_PER_CONNECTION]
//! ```
//! (defaults 4000 and 65536). Each client connects to the sim host's echo service (2:7),
//! writes its bytes while reading them back (`split`), and checks them; the summary says how
//! many connections, how many bytes, how long, and how many threads the process had. Each
//! socket costs two descriptors: the soft `RLIMIT_NOFILE` must allow it (`ulimit -n`).
//!
//! Known problem (runtime, reported): with about 1000 or more clients of 64 KiB the shared TX
//! pool runs dry, a write returns `WouldBlock` while the descriptor stays writable, and since
//! the pool's refill changes no descriptor state no edge wakes the writer: the run stalls. The
//! example gives up after 60 s and says how many clients finished; 200 clients complete.

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vdpa_vsock::driver::{DriverConfig, VsockDriver};
use vdpa_vsock::sim::{SimConfig, ECHO_PORT};
use vdpa_vsock::tokio::{VsockAddr, VsockStream, VMADDR_CID_HOST};

/// `len` bytes that differ per connection.
#[allow(clippy::cast_possible_truncation)] // Masked to a byte first.
fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i.wrapping_mul(31) ^ seed) & 0xff) as u8)
        .collect()
}

async fn client(driver: &VsockDriver, i: usize, bytes: usize) -> std::io::Result<()> {
    let mut s = VsockStream::connect(driver, VsockAddr::new(VMADDR_CID_HOST, ECHO_PORT)).await?;
    let data = pattern(i, bytes);
    let mut back = vec![0u8; bytes];
    let (mut r, mut w) = s.split();
    let (wr, rd) = tokio::join!(w.write_all(&data), r.read_exact(&mut back));
    wr?;
    rd?;
    if back != data {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("connection {i}: the echo came back different"),
        ));
    }
    Ok(())
}

fn threads() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().to_string()))
        })
        .unwrap_or_else(|| "?".into())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let conns: usize = args.next().map_or(Ok(4000), |a| a.parse())?;
    let bytes: usize = args.next().map_or(Ok(65536), |a| a.parse())?;
    let (driver, _host) = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default())?;
    let driver = std::sync::Arc::new(driver);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let before = threads();
    let t0 = Instant::now();
    let failed = rt.block_on(async {
        let tasks: Vec<_> = (0..conns)
            .map(|i| {
                let d = driver.clone();
                tokio::spawn(async move { client(&d, i, bytes).await })
            })
            .collect();
        let mut failed = 0usize;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        for (done, t) in tasks.into_iter().enumerate() {
            let Ok(t) = tokio::time::timeout_at(deadline, t).await else {
                eprintln!("stalled: {done} of {conns} clients finished within 60 s");
                return conns - done;
            };
            match t {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    eprintln!("{e}");
                    failed += 1;
                }
                Err(e) => {
                    eprintln!("task: {e}");
                    failed += 1;
                }
            }
        }
        failed
    });
    let d = t0.elapsed();
    let moved = 2 * conns as u64 * bytes as u64;
    println!(
        "{conns} connections, {} echoed intact, {failed} failed; {moved} bytes moved (both ways) in {:.2} s = {:.2} Gbit/s; threads {before} before, {} after, on one current-thread runtime",
        conns - failed,
        d.as_secs_f64(),
        moved as f64 * 8.0 / d.as_secs_f64() / 1e9,
        threads(),
    );
    if failed > 0 {
        return Err(format!("{failed} connections failed").into());
    }
    Ok(())
}
