// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The HTTP/1 example (`examples/hyper_http.rs`) as a test: the same code, compiled in from
//! `examples/shared/hyper_http.rs`, serves HTTP with hyper on the driver's async listener and
//! checks every response a hyper client on the sim host gets.
#![cfg(feature = "tokio")]

use std::time::Duration;

use vdpa_vsock::driver::{DriverConfig, VsockDriver};
use vdpa_vsock::sim::SimConfig;

#[path = "../examples/shared/hyper_http.rs"]
mod hyper_http;

/// Longest a run may take before the test fails.
const STALL: Duration = Duration::from_secs(120);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn hyper_serves_and_every_response_checks_out() {
    let (driver, host) =
        VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).unwrap();
    let (conns, requests) = (6, 40);
    let s = runtime()
        .block_on(async {
            tokio::time::timeout(STALL, hyper_http::run(&driver, &host, conns, requests)).await
        })
        .expect("the run finishes")
        .unwrap_or_else(|e| panic!("hyper_http: {e}"));
    assert_eq!(s.responses, conns * requests);
    assert_eq!(s.server_errors, 0, "every server connection ended cleanly");
    // Each connection sent 16 bodies up (POST /echo) and got 32 back (GETs and echoes).
    assert!(s.bytes_up > 0 && s.bytes_down > s.bytes_up, "{s:?}");
    assert_eq!(host.proto_stats().credit_violations, 0);
    assert_eq!(driver.proto_stats().credit_violations, 0);
}
