// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vdpa-vsock`: the command-line front end of the userspace virtio-vsock driver.
//!
//! Exit codes: 0 success, 1 runtime failure (device, connection), 2 usage error (clap).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use vdpa_vsock::device::DeviceSpec;
use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver, VsockStream};

mod cli;

/// Userspace virtio-vsock driver: vsock streams over vDPA, VFIO, vhost-vsock or a simulated device.
#[derive(Debug, Parser)]
#[command(name = "vdpa-vsock", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Connect to CID:PORT and pipe stdin/stdout through the stream (like socat).
    Connect {
        /// Peer address, e.g. 2:7 (the sim device's host echo service).
        addr: VsockAddr,
        /// Device: sim, vhost-vdpa:PATH, vfio:BDF[,noiommu], vhost-vsock[:PATH],cid=N, auto.
        #[arg(long, default_value = "sim")]
        device: DeviceSpec,
    },
    /// Listen on PORT, accept one connection and pipe it to stdin/stdout.
    Listen {
        /// Local port.
        port: u32,
        /// Device spec (see `connect --help`).
        #[arg(long, default_value = "sim")]
        device: DeviceSpec,
    },
    /// Measure throughput and latency, side by side with a Unix socketpair, TCP loopback and memcpy.
    Bench(cli::bench::BenchArgs),
}

fn pipe(stream: VsockStream) -> Result<()> {
    let mut reader = stream.try_clone()?;
    let out = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut stdout = std::io::stdout().lock();
        let n = std::io::copy(&mut reader, &mut stdout)?;
        stdout.flush()?;
        Ok(n)
    });
    let mut writer = stream;
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stdin.read(&mut buf).context("reading stdin")?;
        if n == 0 {
            break;
        }
        writer
            .write_all(&buf[..n])
            .context("writing to the vsock stream")?;
    }
    writer
        .shutdown(Shutdown::Write)
        .context("shutting down the write half")?;
    out.join()
        .map_err(|_| anyhow::anyhow!("output thread panicked"))?
        .context("reading from the vsock stream")?;
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Connect { addr, device } => {
            let driver =
                VsockDriver::open(&device).with_context(|| format!("opening device {device}"))?;
            let stream = driver
                .connect(addr)
                .with_context(|| format!("connecting to {addr}"))?;
            pipe(stream)
        }
        Cmd::Listen { port, device } => {
            let driver =
                VsockDriver::open(&device).with_context(|| format!("opening device {device}"))?;
            let listener = driver
                .listen(port)
                .with_context(|| format!("listening on port {port}"))?;
            eprintln!(
                "listening on {}:{port} ({})",
                driver.local_cid(),
                driver.device_name()
            );
            let (stream, peer) = listener.accept().context("accepting")?;
            eprintln!("connection from {peer}");
            pipe(stream)
        }
        Cmd::Bench(args) => cli::bench::run(&args, DriverConfig::default()),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vdpa-vsock: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
