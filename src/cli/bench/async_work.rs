//! The async rows (feature `tokio`): the one-way and ping-pong workloads of `work`, on the same
//! driver, through `vdpa_vsock::tokio` on one current-thread runtime (the runtime is built
//! before the clock starts; connecting is outside the timed part, as in the blocking rows).

use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use vdpa_vsock::driver::{VsockAddr, VsockDriver};
use vdpa_vsock::tokio::VsockStream;

use super::progress::Step;
use super::work::Shape;

/// As the blocking rows: how long the sink may take to close after our last byte.
const PEER_TIMEOUT: Duration = Duration::from_secs(120);

/// Progress is counted in batches of this many round trips.
const OPS_BATCH: u32 = 256;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("building a current-thread tokio runtime")
}

async fn connect(driver: &VsockDriver, addr: VsockAddr, what: &str) -> Result<VsockStream> {
    VsockStream::connect(driver, addr)
        .await
        .with_context(|| format!("connecting to the {what} at {addr} (async)"))
}

/// What the writer of an async one-way run saw of the stream: how often `poll_write` was
/// called, how often it was `Pending` (the task then slept until woken: on one task, each
/// `Pending` is one wake-up), and how often it took less than it was given.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct WriteCounts {
    /// `poll_write` calls.
    pub(super) calls: u64,
    /// Calls that returned `Pending` (no room: the task waits for the next edge).
    pub(super) pending: u64,
    /// Calls that returned fewer bytes than given.
    pub(super) partial: u64,
}

impl WriteCounts {
    /// Add another run's counts.
    pub(super) fn add(&mut self, o: WriteCounts) {
        self.calls += o.calls;
        self.pending += o.pending;
        self.partial += o.partial;
    }

    /// `count` per MiB of `bytes`.
    pub(super) fn per_mib(count: u64, bytes: u64) -> f64 {
        count as f64 * f64::from(1u32 << 20) / bytes as f64
    }
}

/// A stream whose `poll_write` calls are counted ([`WriteCounts`]).
struct Counted<'a> {
    inner: &'a mut VsockStream,
    counts: WriteCounts,
}

impl AsyncWrite for Counted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.counts.calls += 1;
        let r = Pin::new(&mut *self.inner).poll_write(cx, buf);
        match &r {
            Poll::Pending => self.counts.pending += 1,
            Poll::Ready(Ok(n)) if *n < buf.len() => self.counts.partial += 1,
            Poll::Ready(_) => {}
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// `shape.bytes` to the sink in `shape.write_size` writes with `write_all`, then our EOF and
/// the sink's; the time from the first write to the sink's EOF, and what the writer saw.
pub(super) fn one_way(
    driver: &VsockDriver,
    sink: VsockAddr,
    shape: Shape,
    step: &Step,
) -> Result<(Duration, WriteCounts)> {
    let rt = runtime()?;
    let buf = shape.buffer();
    rt.block_on(async {
        let mut s = connect(driver, sink, "sink").await?;
        let t0 = Instant::now();
        let mut left = shape.bytes;
        let b = buf.as_slice();
        let mut w = Counted {
            inner: &mut s,
            counts: WriteCounts::default(),
        };
        while left > 0 {
            let n = usize::try_from(left).map_or(b.len(), |l| l.min(b.len()));
            w.write_all(&b[..n]).await.context("writing (async)")?;
            step.inc(n as u64);
            left -= n as u64;
        }
        let counts = w.counts;
        s.shutdown(Shutdown::Write)
            .with_context(|| format!("shutting down our write half to the sink at {sink}"))?;
        let mut tail = [0u8; 256];
        match tokio::time::timeout(PEER_TIMEOUT, s.read(&mut tail)).await {
            Ok(Ok(0)) => Ok((t0.elapsed(), counts)),
            Ok(Ok(n)) => bail!("the sink at {sink} sent {n} bytes back; expected it to close"),
            Ok(Err(e)) => {
                Err(e).with_context(|| format!("waiting for the sink at {sink} to close"))
            }
            Err(_) => bail!(
                "the sink at {sink} did not close within {} s of our EOF",
                PEER_TIMEOUT.as_secs()
            ),
        }
    })
}

/// `n` round trips of `size` bytes against the echo service, with `write_all` and
/// `read_exact`.
pub(super) fn ping_pong(
    driver: &VsockDriver,
    echo: VsockAddr,
    n: u32,
    size: usize,
    step: &Step,
) -> Result<Duration> {
    let rt = runtime()?;
    rt.block_on(async {
        let mut s = connect(driver, echo, "echo service").await?;
        let msg = vec![0x5au8; size];
        let mut back = vec![0u8; size];
        let t0 = Instant::now();
        for i in 1..=n {
            s.write_all(&msg).await?;
            s.read_exact(&mut back).await?;
            if i % OPS_BATCH == 0 {
                step.inc(OPS_BATCH.into());
            }
        }
        let d = t0.elapsed();
        if back != msg {
            bail!("echo returned different bytes");
        }
        Ok(d)
    })
}
