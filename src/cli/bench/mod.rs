//! `vdpa-vsock bench`: the data path measured side by side with the yardsticks, in one run.
//!
//! Workloads: one-way throughput with 64 KiB writes (into the sim host's discard service), and
//! 64-byte ping-pong round trips (against its echo service), in eventfd and busy-poll mode; the
//! same workloads over a Unix socketpair and TCP loopback, and a memcpy of the same bytes as the
//! upper limit of any copying transport.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use vdpa_vsock::device::sim::{SimConfig, DISCARD_PORT, ECHO_PORT};
use vdpa_vsock::device::DeviceSpec;
use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};

mod progress;

use progress::{Step, Steps, Unit};

/// Options of `vdpa-vsock bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Device to measure (only `sim` can be measured without hardware).
    #[arg(long, default_value = "sim")]
    device: DeviceSpec,
    /// Bytes to send in the one-way throughput test.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Size of each write in the throughput test.
    #[arg(long, default_value_t = 64 * 1024)]
    write_size: usize,
    /// Round trips in the ping-pong test.
    #[arg(long, default_value_t = 20_000)]
    round_trips: u32,
    /// Message size of the ping-pong test.
    #[arg(long, default_value_t = 64)]
    msg_size: usize,
    /// Where the writer's buffer starts, in bytes past a page boundary (0 to 4095), for every
    /// transport alike. Copy speed depends on it (4K aliasing); 0 is the common page-aligned case.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..4096))]
    buffer_offset: u16,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One measured line.
struct Row {
    workload: &'static str,
    transport: &'static str,
    value: f64,
    unit: &'static str,
}

fn gbits(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

/// A page-aligned buffer of `len` bytes filled with `fill`, as a window into a larger `Vec`.
///
/// Where a buffer starts relative to a 4 KiB page changes copy speed a lot: a copy whose
/// destination sits just above its source modulo 4096 (4K aliasing) ran at 16 Gbit/s here
/// against 300 Gbit/s otherwise. Heap addresses differ from run to run, so every buffer the
/// bench copies from or into is page-aligned, which makes the rows repeatable.
struct PageBuf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageBuf {
    const PAGE: usize = 4096;

    fn new(len: usize, fill: u8) -> PageBuf {
        Self::at_offset(len, fill, 0)
    }

    /// `offset` bytes past a page boundary (`offset` < 4096).
    fn at_offset(len: usize, fill: u8, offset: usize) -> PageBuf {
        let vec = vec![fill; len + 2 * Self::PAGE];
        let start = vec.as_ptr().align_offset(Self::PAGE) + offset % Self::PAGE;
        PageBuf { vec, start, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.len]
    }
}

fn one_way<W: Write + Send + 'static>(
    mut w: W,
    (bytes, write_size, offset): (u64, usize, usize),
    step: &Step,
    wait_done: impl FnOnce() -> Result<()>,
) -> Result<Duration> {
    let page_buf = PageBuf::at_offset(write_size, 0xa5, offset);
    let buf = page_buf.as_slice();
    let t0 = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(write_size, |l| l.min(write_size));
        w.write_all(&buf[..n]).context("writing")?;
        step.inc(n as u64);
        left -= n as u64;
    }
    wait_done()?;
    Ok(t0.elapsed())
}

fn reader_thread<R: Read + Send + 'static>(
    mut r: R,
    bytes: u64,
) -> std::thread::JoinHandle<std::io::Result<u64>> {
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

fn join_reader(h: std::thread::JoinHandle<std::io::Result<u64>>, bytes: u64) -> Result<()> {
    let got = h.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    if got != bytes {
        bail!("reader got {got} bytes, expected {bytes}");
    }
    Ok(())
}

fn ping_pong<S: Read + Write>(s: &mut S, n: u32, size: usize, step: &Step) -> Result<Duration> {
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let t0 = Instant::now();
    for i in 0..n {
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        if i % 256 == 255 {
            step.inc(256);
        }
    }
    let d = t0.elapsed();
    if back != msg {
        bail!("echo returned different bytes");
    }
    Ok(d)
}

fn echo_thread<S: Read + Write + Send + 'static>(mut s: S) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
}

fn open_sim(busy_poll: bool, base: &DriverConfig) -> Result<VsockDriver> {
    let cfg = DriverConfig {
        busy_poll,
        ..base.clone()
    };
    VsockDriver::open_sim(
        SimConfig {
            busy_poll,
            ..SimConfig::default()
        },
        cfg,
    )
    .context("opening the sim device")
}

fn wait_discarded(driver: &VsockDriver, total: u64) -> Result<()> {
    let host = driver.sim_host().context("not a sim device")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while host.stats().discarded_bytes < total {
        if Instant::now() > deadline {
            bail!(
                "sim discarded only {} of {total} bytes",
                host.stats().discarded_bytes
            );
        }
        std::thread::yield_now();
    }
    Ok(())
}

pub(crate) fn run(args: &BenchArgs, base: DriverConfig) -> Result<()> {
    if args.device != DeviceSpec::Sim {
        bail!("bench measures the in-process sim device only (found --device {}); for hardware backends, tests/vm/run.sh prints throughput comparisons (e.g. vhost_vsock_throughput_vs_loopback)", args.device);
    }
    if args.write_size == 0 || args.msg_size == 0 || args.bytes == 0 || args.round_trips == 0 {
        bail!("--bytes, --write-size, --round-trips and --msg-size must be positive");
    }
    let mut steps = Steps::new(8);
    let mut rows = Vec::new();
    let (bytes, ws) = (args.bytes, args.write_size);
    let shape = (bytes, ws, usize::from(args.buffer_offset));

    let mut step = steps.start("one-way: vdpa-vsock (sim, eventfd)", Unit::Bytes(bytes));
    let driver = open_sim(false, &base)?;
    let s = driver
        .connect(VsockAddr::new(2, DISCARD_PORT))
        .context("connect to discard port")?;
    let d = one_way(s, shape, &step, || wait_discarded(&driver, bytes))?;
    rows.push(Row {
        workload: "one-way 64KiB writes",
        transport: "vdpa-vsock sim",
        value: gbits(bytes, d),
        unit: "Gbit/s",
    });

    step = steps.start("one-way: unix socketpair", Unit::Bytes(bytes));
    let (a, b) = UnixStream::pair()?;
    let r = reader_thread(b, bytes);
    let d = one_way(a, shape, &step, || join_reader(r, bytes))?;
    rows.push(Row {
        workload: "one-way 64KiB writes",
        transport: "unix socketpair",
        value: gbits(bytes, d),
        unit: "Gbit/s",
    });

    step = steps.start("one-way: tcp loopback", Unit::Bytes(bytes));
    let l = TcpListener::bind("127.0.0.1:0")?;
    let a = TcpStream::connect(l.local_addr()?)?;
    let (b, _) = l.accept()?;
    let r = reader_thread(b, bytes);
    let d = one_way(a, shape, &step, || join_reader(r, bytes))?;
    rows.push(Row {
        workload: "one-way 64KiB writes",
        transport: "tcp loopback",
        value: gbits(bytes, d),
        unit: "Gbit/s",
    });

    step = steps.start("one-way: memcpy (limit)", Unit::Bytes(bytes));
    // The same bytes copied once: from the writer's 64 KiB buffer into a 256 KiB ring, the
    // footprint of a socket buffer (a 16 MiB ring would measure DRAM, not the copy). Both are
    // page-aligned (see PageBuf): with heap luck this row once read 21 Gbit/s instead of ~300.
    let src_buf = PageBuf::new(ws, 0x11);
    let src = src_buf.as_slice();
    let mut dst_buf = PageBuf::new((256 * 1024).max(ws), 0);
    let dst = dst_buf.as_mut_slice();
    let t0 = Instant::now();
    let mut left = bytes;
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
    rows.push(Row {
        workload: "one-way 64KiB writes",
        transport: "memcpy",
        value: gbits(bytes, t0.elapsed()),
        unit: "Gbit/s",
    });

    let n = args.round_trips;
    let rt = |d: Duration| f64::from(n) / d.as_secs_f64();
    step = steps.start(
        "ping-pong: vdpa-vsock (sim, eventfd)",
        Unit::Ops(u64::from(args.round_trips)),
    );
    let mut s = driver.connect(VsockAddr::new(2, ECHO_PORT))?;
    let d = ping_pong(&mut s, n, args.msg_size, &step)?;
    rows.push(Row {
        workload: "ping-pong 64B",
        transport: "vdpa-vsock sim eventfd",
        value: rt(d),
        unit: "round trips/s",
    });
    drop(s);
    drop(driver);

    step = steps.start(
        "ping-pong: vdpa-vsock (sim, busy-poll)",
        Unit::Ops(u64::from(args.round_trips)),
    );
    let busy = open_sim(true, &base)?;
    let mut s = busy.connect(VsockAddr::new(2, ECHO_PORT))?;
    let d = ping_pong(&mut s, n, args.msg_size, &step)?;
    rows.push(Row {
        workload: "ping-pong 64B",
        transport: "vdpa-vsock sim busy-poll",
        value: rt(d),
        unit: "round trips/s",
    });
    drop(s);
    drop(busy);

    step = steps.start(
        "ping-pong: unix socketpair",
        Unit::Ops(u64::from(args.round_trips)),
    );
    let (mut a, b) = UnixStream::pair()?;
    echo_thread(b);
    let d = ping_pong(&mut a, n, args.msg_size, &step)?;
    rows.push(Row {
        workload: "ping-pong 64B",
        transport: "unix socketpair",
        value: rt(d),
        unit: "round trips/s",
    });

    step = steps.start(
        "ping-pong: tcp loopback",
        Unit::Ops(u64::from(args.round_trips)),
    );
    let l = TcpListener::bind("127.0.0.1:0")?;
    let mut a = TcpStream::connect(l.local_addr()?)?;
    a.set_nodelay(true)?;
    let (b, _) = l.accept()?;
    b.set_nodelay(true)?;
    echo_thread(b);
    let d = ping_pong(&mut a, n, args.msg_size, &step)?;
    rows.push(Row {
        workload: "ping-pong 64B",
        transport: "tcp loopback",
        value: rt(d),
        unit: "round trips/s",
    });
    drop(step);

    let baseline = |w: &str| {
        rows.iter()
            .find(|r| r.workload == w && r.transport == "unix socketpair")
            .map(|r| r.value)
    };
    if args.json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                let ratio = baseline(r.workload).map_or(0.0, |b| r.value / b);
                format!(
                    "{{\"workload\":\"{}\",\"transport\":\"{}\",\"value\":{:.4},\"unit\":\"{}\",\"vs_socketpair\":{:.3}}}",
                    r.workload, r.transport, r.value, r.unit, ratio
                )
            })
            .collect();
        outln!("[{}]", items.join(","))?;
    } else {
        outln!(
            "bytes={} write_size={} buffer_offset={} round_trips={} msg_size={}",
            bytes,
            ws,
            args.buffer_offset,
            n,
            args.msg_size
        )?;
        outln!(
            "{:<22} {:<26} {:>14} {:<14} {:>12}",
            "workload",
            "transport",
            "value",
            "unit",
            "x socketpair"
        )?;
        for r in &rows {
            let ratio =
                baseline(r.workload).map_or(String::from("-"), |b| format!("{:.2}x", r.value / b));
            outln!(
                "{:<22} {:<26} {:>14.2} {:<14} {:>12}",
                r.workload,
                r.transport,
                r.value,
                r.unit,
                ratio
            )?;
        }
        let memcpy = rows
            .iter()
            .find(|r| r.transport == "memcpy")
            .map(|r| r.value);
        if let (Some(ours), Some(m)) = (rows.first().map(|r| r.value), memcpy) {
            outln!(
                "vdpa-vsock one-way = {:.0}% of memcpy bandwidth",
                100.0 * ours / m
            )?;
        }
    }
    Ok(())
}
