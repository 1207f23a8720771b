// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vdpa-vsock`: the command-line front end of the userspace virtio-vsock driver.
//!
//! Exit codes: 0 success, 1 runtime failure (device, connection), 2 usage error (bad flag,
//! spec or address). Errors are one line on stderr, `vdpa-vsock: error: ...`, with a hint.
//! `RUST_LOG` (e.g. `RUST_LOG=info`) sets the log level; the default is `warn`.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use vdpa_vsock::device::DeviceSpec;
use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver, VsockStream};

mod cli;

/// Userspace virtio-vsock driver: vsock streams over vDPA, VFIO, vhost-vsock or a simulated device.
#[derive(Debug, Parser)]
#[command(
    name = "vdpa-vsock",
    version,
    about,
    long_about = None,
    after_help = "Exit codes: 0 success, 1 runtime failure, 2 usage error.\nLogging: RUST_LOG=info|debug|trace (default warn)."
)]
struct Cli {
    /// Stand-in for /sys (testing on a fake tree; also the SYSFS_ROOT variable).
    #[arg(long, global = true, hide = true, value_name = "DIR")]
    sysfs_root: Option<PathBuf>,
    /// Stand-in for /dev (testing on a fake tree; also the DEV_ROOT variable).
    #[arg(long, global = true, hide = true, value_name = "DIR")]
    dev_root: Option<PathBuf>,
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
        /// Local port; 4294967295 (VMADDR_PORT_ANY) picks a free one, printed on stderr.
        port: u32,
        /// Device spec (see `connect --help`).
        #[arg(long, default_value = "sim")]
        device: DeviceSpec,
    },
    /// Measure throughput and latency, side by side with a Unix socketpair, TCP loopback and memcpy.
    Bench(cli::bench::BenchArgs),
    /// List every device the driver could run on, and whether it can right now (and why not).
    List(cli::list::ListArgs),
    /// Show a device's features (offered and negotiated, by name), CID and queues.
    Inspect(cli::inspect::InspectArgs),
    /// Serve the transport on a Unix socket with Firecracker's hybrid-vsock protocol (one
    /// event-loop thread for every client).
    Serve(cli::serve::ServeArgs),
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
    let roots = cli::Roots::new(cli.sysfs_root, cli.dev_root);
    match cli.cmd {
        Cmd::Connect { addr, device } => {
            cli::preflight(&device, &roots)?;
            let driver =
                VsockDriver::open(&device).with_context(|| format!("opening device {device}"))?;
            let stream = driver
                .connect(addr)
                .with_context(|| format!("connecting to {addr}"))?;
            pipe(stream)
        }
        Cmd::Listen { port, device } => {
            cli::preflight(&device, &roots)?;
            let driver =
                VsockDriver::open(&device).with_context(|| format!("opening device {device}"))?;
            let listener = driver
                .listen(port)
                .with_context(|| format!("listening on port {port}"))?;
            eprintln!(
                "listening on {}:{} ({})",
                driver.local_cid(),
                listener.port(),
                driver.device_name()
            );
            let (stream, peer) = listener.accept().context("accepting")?;
            eprintln!("connection from {peer}");
            pipe(stream)
        }
        Cmd::Bench(args) => cli::bench::run(&args, DriverConfig::default()),
        Cmd::List(args) => cli::list::run(&args, &roots),
        Cmd::Inspect(args) => cli::inspect::run(&args, &roots),
        Cmd::Serve(args) => cli::serve::run(&args, &roots),
    }
}

/// Exit code of a usage error.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // clap's first paragraph says what is wrong (a missing argument is on the lines
            // under it); keep it to one line, with a pointer to the help.
            let text = e.render().to_string();
            let first: Vec<&str> = text
                .lines()
                .map(str::trim)
                .skip_while(|l| l.is_empty())
                .take_while(|l| !l.is_empty())
                .collect();
            let first = first.join(" ");
            let first = first.strip_prefix("error: ").unwrap_or(&first);
            eprintln!("vdpa-vsock: error: {first} (hint: see `vdpa-vsock --help` or `vdpa-vsock <command> --help`)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // Whoever read our output stopped reading (`| head`): nothing to report.
        Err(e) if e.downcast_ref::<cli::StdoutClosed>().is_some() => ExitCode::SUCCESS,
        Err(e) => {
            match cli::hint(&e) {
                Some(h) => eprintln!("vdpa-vsock: error: {e:#} (hint: {h})"),
                None => eprintln!("vdpa-vsock: error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
