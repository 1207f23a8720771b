// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! An HTTP/1 server with hyper over the async API (`vdpa_vsock::tokio`), on the sim device,
//! and a hyper client that checks every response.
//!
//! ```text
//! cargo run --release --example hyper_http -- [CONNECTIONS] [REQUESTS_PER_CONNECTION]
//! ```
//! (defaults 8 and 100). The driver serves HTTP on port 8080; the sim host (CID 2) opens the
//! connections and sends its requests on each (keep-alive): `GET /data/{seed}/{len}`,
//! `POST /echo` and a path that is not found, with bodies up to about 200 KiB. Every
//! response's status, checksum header and body are checked; the first mismatch or error ends
//! the run with exit status 1. The code is in `examples/shared/hyper_http.rs`, which
//! `tests/hyper_http.rs` runs too.

use std::process::ExitCode;
use std::time::Instant;

use vdpa_vsock::driver::{DriverConfig, VsockDriver};
use vdpa_vsock::sim::SimConfig;

#[path = "shared/hyper_http.rs"]
mod hyper_http;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let parse = |a: Option<String>, default: usize| a.map_or(Ok(default), |a| a.parse());
    let (conns, requests) = match (parse(args.next(), 8), parse(args.next(), 100)) {
        (Ok(c), Ok(r)) => (c, r),
        _ => {
            eprintln!("usage: hyper_http [CONNECTIONS] [REQUESTS_PER_CONNECTION]");
            return ExitCode::from(2);
        }
    };
    let opened = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default());
    let (driver, host) = match opened {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("hyper_http: opening the sim device: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hyper_http: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let t0 = Instant::now();
    match rt.block_on(hyper_http::run(&driver, &host, conns, requests)) {
        Ok(s) => {
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "hyper_http: {} responses on {conns} connections checked in {secs:.2} s \
                 ({:.0} requests/s), {} bytes up, {} bytes down",
                s.responses,
                s.responses as f64 / secs,
                s.bytes_up,
                s.bytes_down
            );
            if s.responses == conns * requests && s.server_errors == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "hyper_http: expected {} responses and no server error, found {} and {}",
                    conns * requests,
                    s.responses,
                    s.server_errors
                );
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("hyper_http: {e}");
            ExitCode::FAILURE
        }
    }
}
