// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A program written against tokio-vsock 0.7's API, compiled against `vdpa_vsock::tokio`.
//!
//! `mod app` is a typical tokio-vsock client and server (the shapes of tokio-vsock's own
//! `tests/vsock.rs` and of its README): connect, `write_all`, `read_exact`, `split`,
//! `into_split` + `unsplit`, and a listener's accept loop that echoes with `tokio::io::copy`.
//! Against tokio-vsock it reads the same except for exactly these lines, each marked `// DIFF`:
//! 1. `use tokio_vsock::{...}` became `use vdpa_vsock::tokio::{...}` (and `VsockDriver` is
//!    imported beside it);
//! 2. the two functions that make sockets take the driver: `fn client(addr)` is
//!    `fn client(driver: &VsockDriver, addr)`, `fn server(addr)` is
//!    `fn server(driver: &VsockDriver, addr)`;
//! 3. the two calls that make sockets pass it: `VsockStream::connect(addr)` is
//!    `VsockStream::connect(driver, addr)`, `VsockListener::bind(addr)` is
//!    `VsockListener::bind(driver, addr)`.
//!
//! Opening the driver (`VsockDriver::open_sim`) is the test's, outside `mod app`: with the
//! kernel's AF_VSOCK there is nothing to open. Everything else (the address constants, the
//! `AsyncReadExt`/`AsyncWriteExt` calls, split halves, `unsplit`, the accept loop) is
//! tokio-vsock's code unchanged.
#![cfg(feature = "tokio")]

mod app {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use vdpa_vsock::driver::VsockDriver; // DIFF 1
    use vdpa_vsock::tokio::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY}; // DIFF 1

    const BLOCK: usize = 5_000;

    /// Sends `blob` to the echo at `addr` block by block, reading each block back.
    // DIFF 2 (the signature below: the driver parameter)
    pub(crate) async fn client(driver: &VsockDriver, addr: VsockAddr, blob: &[u8]) -> Vec<u8> {
        let mut stream = VsockStream::connect(driver, addr) // DIFF 3
            .await
            .expect("connection failed");
        let mut rx_blob = vec![0u8; blob.len()];
        let mut tx_pos = 0;
        while tx_pos < blob.len() {
            let end = (tx_pos + BLOCK).min(blob.len());
            let written_bytes = stream
                .write(&blob[tx_pos..end])
                .await
                .expect("write failed");
            if written_bytes == 0 {
                panic!("stream unexpectedly closed");
            }
            stream
                .read_exact(&mut rx_blob[tx_pos..tx_pos + written_bytes])
                .await
                .expect("read failed");
            tx_pos += written_bytes;
        }
        rx_blob
    }

    /// The same, with the stream split into halves that run at once.
    // DIFF 2 (the signature below: the driver parameter)
    pub(crate) async fn split_client(
        driver: &VsockDriver,
        addr: VsockAddr,
        blob: &[u8],
    ) -> Vec<u8> {
        let mut stream = VsockStream::connect(driver, addr) // DIFF 3
            .await
            .expect("connection failed");
        let (mut read_half, mut write_half) = stream.split();
        let mut rx_blob = vec![0u8; blob.len()];
        let (w, r) = tokio::join!(
            write_half.write_all(blob),
            read_half.read_exact(&mut rx_blob)
        );
        w.expect("failed to write to vsock");
        r.expect("failed to read from vsock");
        rx_blob
    }

    /// The same with owned halves in two tasks, merged again at the end.
    // DIFF 2 (the signature below: the driver parameter)
    pub(crate) async fn into_split_client(
        driver: &VsockDriver,
        addr: VsockAddr,
        blob: Vec<u8>,
    ) -> Vec<u8> {
        let stream = VsockStream::connect(driver, addr) // DIFF 3
            .await
            .expect("connection failed");
        let (mut read_half, mut write_half) = stream.into_split();
        let len = blob.len();
        let writer = tokio::spawn(async move {
            write_half
                .write_all(&blob)
                .await
                .expect("failed to write to vsock");
            write_half
        });
        let mut rx_blob = vec![0u8; len];
        read_half
            .read_exact(&mut rx_blob)
            .await
            .expect("failed to read from vsock");
        let write_half = writer.await.expect("failed to join task");
        // Assert that the halves can be merged together again
        let _ = read_half.unsplit(write_half);
        rx_blob
    }

    /// An echo server: accepts `n` connections and echoes each in a task of its own.
    // DIFF 2 (the signature below: the driver parameter)
    pub(crate) async fn server(driver: &VsockDriver, port: u32, n: usize) {
        let listener = VsockListener::bind(driver, VsockAddr::new(VMADDR_CID_ANY, port)) // DIFF 3
            .expect("bind failed");
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (mut stream, _addr) = listener
                .accept()
                .await
                .expect("failed to accept connection");
            tasks.push(tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                tokio::io::copy(&mut r, &mut w).await.expect("echo");
            }));
        }
        for t in tasks {
            t.await.expect("failed to join task");
        }
    }
}

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;

use vdpa_vsock::driver::{DriverConfig, VsockDriver};
use vdpa_vsock::sim::{SimConfig, ECHO_PORT};
use vdpa_vsock::tokio::{VsockAddr, VMADDR_CID_HOST};

const TEST_BLOB_SIZE: usize = 100_000;

#[tokio::test(flavor = "current_thread")]
async fn tokio_vsock_clients_run_unchanged_against_the_sim_echo() {
    let (driver, _host) =
        VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).expect("sim");
    let addr = VsockAddr::new(VMADDR_CID_HOST, ECHO_PORT);
    let blob = common::pattern(42, TEST_BLOB_SIZE);
    let sum = common::checksum(&blob, 0);
    assert_eq!(
        common::checksum(&app::client(&driver, addr, &blob).await, 0),
        sum
    );
    assert_eq!(app::split_client(&driver, addr, &blob).await, blob);
    assert_eq!(
        app::into_split_client(&driver, addr, blob.clone()).await,
        blob
    );
}

#[tokio::test(flavor = "current_thread")]
async fn tokio_vsock_server_runs_unchanged_for_host_clients() {
    const PORT: u32 = 8000;
    const CLIENTS: usize = 8;
    let (driver, host) =
        VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).expect("sim");
    // The peer (the host, CID 2) is blocking code on a thread: it is the other machine.
    let clients = std::thread::spawn(move || {
        for i in 0..CLIENTS as u64 {
            // The server binds once the runtime runs it: retry until it listens.
            let mut c = (0..200)
                .find_map(|_| {
                    host.connect(PORT).ok().or_else(|| {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        None
                    })
                })
                .expect("connect to the server");
            let msg = common::pattern(i, 30_000);
            c.write_all(&msg).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let mut back = Vec::new();
            c.read_to_end(&mut back).unwrap();
            assert_eq!(back, msg, "client {i}");
        }
    });
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        app::server(&driver, PORT, CLIENTS),
    )
    .await
    .expect("server hung");
    tokio::task::spawn_blocking(move || clients.join().expect("clients"))
        .await
        .unwrap();
}
