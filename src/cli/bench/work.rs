//! The workloads, each generic over the transport where it can be: write N bytes in fixed-size
//! writes, ping-pong fixed-size messages, and (vdpa-vsock only) the same one-way load on many
//! connections at once and the per-operation cost with many connections open.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vdpa_vsock::driver::{VsockAddr, VsockDriver, VsockStream};

use super::progress::Step;

/// How long the sink may take to close after our last byte, and the echo to answer.
const PEER_TIMEOUT: Duration = Duration::from_secs(120);

/// Progress is counted in batches of this many operations (not every 4 us round trip).
const OPS_BATCH: u32 = 256;

/// A page-aligned buffer of `len` bytes filled with `fill`, as a window into a larger `Vec`.
///
/// Where a buffer starts relative to a 4 KiB page changes copy speed a lot: a copy whose
/// destination sits just above its source modulo 4096 (4K aliasing) ran at 16 Gbit/s here
/// against 300 Gbit/s otherwise. Heap addresses differ from run to run, so every buffer the
/// bench copies from or into is page-aligned, which makes the rows repeatable.
pub(super) struct PageBuf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageBuf {
    const PAGE: usize = 4096;

    pub(super) fn new(len: usize, fill: u8) -> PageBuf {
        Self::at_offset(len, fill, 0)
    }

    /// `offset` bytes past a page boundary (`offset` < 4096).
    pub(super) fn at_offset(len: usize, fill: u8, offset: usize) -> PageBuf {
        let vec = vec![fill; len + 2 * Self::PAGE];
        let start = vec.as_ptr().align_offset(Self::PAGE) + offset % Self::PAGE;
        PageBuf { vec, start, len }
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.len]
    }
}

/// The shape of a one-way run: total bytes, bytes per write, the writer buffer's page offset.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub(super) bytes: u64,
    pub(super) write_size: usize,
    pub(super) offset: usize,
}

impl Shape {
    /// The writer's buffer, page-aligned plus the offset (allocated before the clock starts).
    pub(super) fn buffer(&self) -> PageBuf {
        PageBuf::at_offset(self.write_size, 0xa5, self.offset)
    }
}

/// Write `bytes` bytes from `buf` in writes of `buf.len()`.
pub(super) fn write_bytes<W: Write>(w: &mut W, buf: &[u8], bytes: u64, step: &Step) -> Result<()> {
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        w.write_all(&buf[..n]).context("writing")?;
        step.inc(n as u64);
        left -= n as u64;
    }
    Ok(())
}

/// The end of a one-way transfer to a sink: we shut down our write half, the sink reads to
/// that EOF and closes its end, and we read its EOF. Only then has the sink consumed every
/// byte (a finished `write` means only that the bytes left our buffer).
pub(super) fn finish_sink(s: &mut VsockStream, sink: VsockAddr) -> Result<()> {
    s.shutdown(Shutdown::Write)
        .with_context(|| format!("shutting down our write half to the sink at {sink}"))?;
    s.set_read_timeout(Some(PEER_TIMEOUT))?;
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => Ok(()),
        Ok(n) => bail!(
            "the sink at {sink} sent {n} bytes back; expected it to read, discard, and close after our EOF"
        ),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            bail!(
                "the sink at {sink} did not close within {} s of our EOF; it must close its end once it has read everything",
                PEER_TIMEOUT.as_secs()
            )
        }
        Err(e) => Err(e).with_context(|| format!("waiting for the sink at {sink} to close")),
    }
}

/// Connect to `what` (the sink, the echo service) at `addr`; the error names the address.
pub(super) fn connect(driver: &VsockDriver, addr: VsockAddr, what: &str) -> Result<VsockStream> {
    driver
        .connect(addr)
        .with_context(|| format!("connecting to the {what} at {addr}"))
}

/// One connection to the sink: `shape.bytes` bytes, until the sink closed. `consumed` reads
/// what the sink has counted so far, where it can be read (the sim's discard service).
pub(super) fn one_way_vsock(
    driver: &VsockDriver,
    sink: VsockAddr,
    shape: Shape,
    step: &Step,
    consumed: impl Fn() -> Option<u64>,
) -> Result<Duration> {
    let mut s = connect(driver, sink, "sink")?;
    let buf = shape.buffer();
    let before = consumed();
    let t0 = Instant::now();
    write_bytes(&mut s, buf.as_slice(), shape.bytes, step)?;
    finish_sink(&mut s, sink)?;
    let d = t0.elapsed();
    check_consumed(before, consumed(), shape.bytes)?;
    Ok(d)
}

/// `conns` connections to the sink at once, one writer thread each, `shape.bytes / conns`
/// bytes each (rounded up to a whole byte). Returns the bytes sent and the time from the start
/// (all threads released together) until the last sink closed.
pub(super) fn one_way_parallel(
    driver: &VsockDriver,
    sink: VsockAddr,
    conns: usize,
    shape: Shape,
    step: &Step,
    consumed: impl Fn() -> Option<u64>,
) -> Result<(u64, Duration)> {
    let per = shape.bytes.div_ceil(conns as u64);
    let streams = (0..conns)
        .map(|_| connect(driver, sink, "sink"))
        .collect::<Result<Vec<_>>>()?;
    let before = consumed();
    let start = Barrier::new(conns + 1);
    let start = &start;
    let d = std::thread::scope(|scope| {
        let writers: Vec<_> = streams
            .into_iter()
            .map(|mut s| {
                scope.spawn(move || -> Result<()> {
                    let buf = shape.buffer();
                    start.wait();
                    write_bytes(&mut s, buf.as_slice(), per, step)?;
                    finish_sink(&mut s, sink)
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        for w in writers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a writer thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(t0.elapsed())
    })?;
    let total = per * conns as u64;
    check_consumed(before, consumed(), total)?;
    Ok((total, d))
}

pub(super) fn check_consumed(before: Option<u64>, after: Option<u64>, sent: u64) -> Result<()> {
    if let (Some(b), Some(a)) = (before, after) {
        if a - b != sent {
            bail!(
                "the sink consumed {} bytes, expected {sent}",
                a.wrapping_sub(b)
            );
        }
    }
    Ok(())
}

/// `n` round trips of `size`-byte messages; the echo must return the same bytes.
pub(super) fn ping_pong<S: Read + Write>(
    s: &mut S,
    n: u32,
    size: usize,
    step: &Step,
) -> Result<Duration> {
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let t0 = Instant::now();
    for i in 1..=n {
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        if i % OPS_BATCH == 0 {
            step.inc(OPS_BATCH.into());
        }
    }
    let d = t0.elapsed();
    if back != msg {
        bail!("echo returned different bytes");
    }
    Ok(d)
}

/// The per-operation cost with `open` idle streams to the echo service.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scale {
    /// Idle streams open while measuring.
    pub(super) open: usize,
    /// Mean time of a connect to the echo service and a close.
    pub(super) connect_close: Duration,
    /// Mean time of a 1-byte echo round trip on one more stream.
    pub(super) round_trip: Duration,
    /// Resident memory the idle streams added, per stream (driver, and on sim its host side
    /// too; the DMA pools are allocated up front and not in it). `None` without /proc, or for
    /// fewer than [`MEMORY_ROW_MIN`] streams.
    pub(super) rss_per_stream: Option<u64>,
}

/// The idle streams of the scale rows, held open to the echo service: grown to each count in
/// turn, then shrunk back, so that every smaller count is measured both before and after the
/// larger ones (on a machine whose wake-up latency drifts with what the CPUs did just before,
/// a larger count measured after a smaller one would otherwise show the drift as its cost).
pub(super) struct IdleStreams<'a> {
    driver: &'a VsockDriver,
    echo: VsockAddr,
    open: Vec<VsockStream>,
}

impl<'a> IdleStreams<'a> {
    pub(super) fn new(driver: &'a VsockDriver, echo: VsockAddr) -> Self {
        IdleStreams {
            driver,
            echo,
            open: Vec::new(),
        }
    }

    /// Hold exactly `n` idle streams: open more, or close the newest and wait until the driver
    /// no longer holds them (each close ends when the echo service is done with it). Growing
    /// by [`MEMORY_ROW_MIN`] streams or more reports the resident memory each one added.
    pub(super) fn hold(&mut self, n: usize, step: &Step) -> Result<Option<u64>> {
        if n <= self.open.len() {
            step.phase(format!("closing idle streams down to {n}"), 0);
            self.open.truncate(n);
            // Besides the idle ones, the driver holds nothing else of ours by now.
            let deadline = Instant::now() + PEER_TIMEOUT;
            while self.driver.stats().connections > n as u64 {
                if Instant::now() >= deadline {
                    bail!(
                        "{} connections still held {}s after closing down to {n}: the echo service does not finish its closes",
                        self.driver.stats().connections,
                        PEER_TIMEOUT.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            return Ok(None);
        }
        let more = n - self.open.len();
        step.phase(format!("opening idle streams up to {n}"), more as u64);
        let rss_before = rss_bytes();
        while self.open.len() < n {
            let s = connect(self.driver, self.echo, "echo service")
                .with_context(|| format!("opening idle stream {} of {n}", self.open.len() + 1))?;
            self.open.push(s);
            step.inc(1);
        }
        // Below a thousand streams the allocator's reuse of freed memory is most of the reading.
        Ok(match (rss_before, rss_bytes()) {
            (Some(b), Some(a)) if more >= MEMORY_ROW_MIN => Some(a.saturating_sub(b) / more as u64),
            _ => None,
        })
    }

    /// Measure `ops` connect+close pairs and `ops` 1-byte round trips on one more stream, with
    /// the streams held now open.
    pub(super) fn measure(&self, ops: u32, step: &Step) -> Result<Scale> {
        let open = self.open.len();
        step.phase(format!("connect+close, {open} open"), ops.into());
        let t0 = Instant::now();
        for i in 1..=ops {
            drop(connect(self.driver, self.echo, "echo service")?);
            if i % OPS_BATCH == 0 {
                step.inc(OPS_BATCH.into());
            }
        }
        let connect_close = t0.elapsed() / ops;

        step.phase(format!("1 B round trips, {open} open"), ops.into());
        let mut s = connect(self.driver, self.echo, "echo service")?;
        s.set_read_timeout(Some(PEER_TIMEOUT))?;
        let round_trip = ping_pong(&mut s, ops, 1, step)? / ops;
        Ok(Scale {
            open,
            connect_close,
            round_trip,
            rss_per_stream: None,
        })
    }
}

/// The fewest idle streams a scale step reports a memory row for.
const MEMORY_ROW_MIN: usize = 1000;

/// This process's resident set size, from `VmRSS` in `/proc/self/status`.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

// ---------------------------------------------------------------------------------------------
// Yardsticks: a reader and an echo for socketpairs and TCP, and memcpy.
// ---------------------------------------------------------------------------------------------

/// Read and count until `bytes` arrived or EOF.
pub(super) fn reader_thread<R: Read + Send + 'static>(
    mut r: R,
    bytes: u64,
) -> std::thread::JoinHandle<io::Result<u64>> {
    std::thread::spawn(move || {
        let mut page_buf = PageBuf::new(256 * 1024, 0);
        let buf = page_buf.as_mut_slice();
        let mut got = 0u64;
        while got < bytes {
            let n = r.read(buf)?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        Ok(got)
    })
}

pub(super) fn join_reader(h: std::thread::JoinHandle<io::Result<u64>>, bytes: u64) -> Result<()> {
    let got = h.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    if got != bytes {
        bail!("reader got {got} bytes, expected {bytes}");
    }
    Ok(())
}

/// Write `shape.bytes` into `w`; the clock stops when `wait_done` (the reader) returns.
pub(super) fn one_way<W: Write>(
    mut w: W,
    shape: Shape,
    step: &Step,
    wait_done: impl FnOnce() -> Result<()>,
) -> Result<Duration> {
    let buf = shape.buffer();
    let t0 = Instant::now();
    write_bytes(&mut w, buf.as_slice(), shape.bytes, step)?;
    wait_done()?;
    Ok(t0.elapsed())
}

pub(super) fn echo_thread<S: Read + Write + Send + 'static>(mut s: S) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

/// The same bytes copied once: from the writer's buffer into a 256 KiB ring, the footprint of
/// a socket buffer (a 16 MiB ring would measure DRAM, not the copy). Both are page-aligned (see
/// [`PageBuf`]): with heap luck this row once read 21 Gbit/s instead of ~300.
pub(super) fn memcpy(shape: Shape, step: &Step) -> Duration {
    let ws = shape.write_size;
    let src_buf = PageBuf::new(ws, 0x11);
    let src = src_buf.as_slice();
    let mut dst_buf = PageBuf::new((256 * 1024).max(ws), 0);
    let dst = dst_buf.as_mut_slice();
    let t0 = Instant::now();
    let mut left = shape.bytes;
    let mut off = 0usize;
    while left > 0 {
        let n = usize::try_from(left).map_or(ws, |l| l.min(ws));
        if off + n > dst.len() {
            off = 0;
        }
        dst[off..off + n].copy_from_slice(&src[..n]);
        std::hint::black_box(&mut *dst);
        off += n;
        step.inc(n as u64);
        left -= n as u64;
    }
    t0.elapsed()
}
