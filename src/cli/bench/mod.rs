//! `vdpa-vsock bench`: the data path measured side by side with the yardsticks, in one run.
//!
//! Workloads, on the sim device or a real one (`--device SPEC --peer CID:PORT[,ECHO_PORT]`):
//! one-way throughput with 64 KiB writes into a sink, on one connection and on `--parallel`
//! connections at once (one writer thread each); 64-byte ping-pong round trips against an echo
//! service, in eventfd and busy-poll mode; and, for each N of `--scale`, the mean cost of a
//! connect+close and of a 1-byte round trip while N other streams are open (the counts take
//! turns on one driver, `100,10000` as 100, 10000, 100, 10000, 100, so that the smaller count's
//! runs bracket the larger one's: a wake-up's cost drifts with what the CPUs did just before,
//! by up to 6x between two runs of the same count here). The same one-way
//! and ping-pong workloads run over a Unix socketpair and TCP loopback, and a memcpy of the
//! same bytes is the upper limit of any copying transport.
//!
//! With the `tokio` feature the one-way and ping-pong workloads also run through the async API
//! (`vdpa_vsock::tokio`) on one current-thread runtime, on the same driver, beside the blocking
//! rows, with their ratios to them in the notes. The single-connection one-way rows run in
//! `--rounds` rounds, blocking and async by turns, and each row is its median round: on a
//! shared machine a whole run of either can land in a slow spell (the same build measured 20
//! and 80 Gbit/s in consecutive runs, as the threads of driver, device and writer shared a
//! core or not), which made a ratio of two single runs anything from 0.4x to 1.5x. A slow
//! spell can still fall on one row's turn more than the other's, so a note also gives the
//! paired ratio: the median of the per-round async/blocking ratios.
//!
//! Files: `peer` (the `--peer` flag), `async_work` (the async rows), `sim` (everything sim-specific), `work` (the workloads),
//! `report` (table and JSON), `progress` (the progress display).

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use vdpa_vsock::device::DeviceSpec;
use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
use vdpa_vsock::proto;
use vdpa_vsock::sim::SimHost;

#[cfg(feature = "tokio")]
mod async_work;
mod peer;
mod progress;
mod report;
mod sim;
mod work;

use peer::{device_kind, Peer};
use progress::{Steps, Unit};
use report::Row;
use work::Shape;

const PEER_HELP: &str = "\
Real devices: --peer CID:PORT[,ECHO_PORT] names the programs at the peer.
  CID:PORT   a sink: it reads and discards everything, and closes its end after our EOF. The
             one-way rows write all bytes, shut down their write half, and stop the clock when
             they read the sink's EOF.
  ECHO_PORT  an echo service at the same CID: it writes back every byte, and closes when we
             close. Without it the ping-pong and scale rows of vdpa-vsock are skipped.
  For example, at the peer (CID 2):
    socat -u VSOCK-LISTEN:1234,fork OPEN:/dev/null   (sink)
    socat VSOCK-LISTEN:1235,fork EXEC:cat            (echo)
  then: vdpa-vsock bench --device vhost-vsock,cid=4 --peer 2:1234,1235
On sim the peer is the sim host's discard (2:9) and echo (2:7) services.";

/// Options of `vdpa-vsock bench`.
#[derive(Debug, Args)]
#[command(after_help = PEER_HELP)]
pub(crate) struct BenchArgs {
    /// Device to measure: sim (default), vhost-vdpa:PATH, vfio:BDF[,noiommu],
    /// vhost-vsock[:PATH],cid=N or auto. Devices other than sim need --peer.
    #[arg(long, default_value = "sim")]
    device: DeviceSpec,
    /// Sink (and echo service) at the peer, CID:PORT[,ECHO_PORT], e.g. 2:1234,1235 (see below).
    /// Default on sim: 2:9,7, the sim host's discard and echo services.
    #[arg(long, value_name = "CID:PORT[,ECHO_PORT]")]
    peer: Option<Peer>,
    /// Bytes to send in the one-way throughput tests (single and parallel alike).
    #[arg(long, default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(1..))]
    bytes: u64,
    /// Size of each write in the throughput tests.
    #[arg(long, default_value_t = 64 * 1024, value_parser = positive)]
    write_size: usize,
    /// Rounds of the single-connection one-way test: the blocking and the async rows take
    /// turns, --bytes split evenly over the rounds of each, and each row is its median round.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,
    /// Connections of the parallel one-way test (one writer thread each, --bytes split evenly).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    parallel: u16,
    /// Round trips in the ping-pong test.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    round_trips: u32,
    /// Message size of the ping-pong test.
    #[arg(long, default_value_t = 64, value_parser = positive)]
    msg_size: usize,
    /// Idle streams held open to the echo service while connect+close and 1-byte round trips
    /// are timed (comma-separated): the values take turns, up and back down twice (100, 10000,
    /// 100, 10000, 100); a value's rows are the mean of its runs.
    #[arg(long, value_delimiter = ',', default_value = "100,10000", value_parser = clap::value_parser!(u16).range(0..=MAX_SCALE))]
    scale: Vec<u16>,
    /// Connect+close pairs, and 1-byte round trips, timed in each scale run.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    scale_ops: u32,
    /// Where the writer's buffer starts, in bytes past a page boundary (0 to 4095), for every
    /// transport alike. Copy speed depends on it (4K aliasing); 0 is the common page-aligned case.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..4096))]
    buffer_offset: u16,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Most idle streams of a scale run: the driver's ephemeral ports (49152..=65535) must also
/// hold the other connections of the run.
const MAX_SCALE: i64 = 15_000;

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("expected a positive number, found 0".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("expected a positive number, found {s:?} ({e})")),
    }
}

/// A usage error found after parsing: reported as `main` reports clap's (one line, exit 2).
/// Called before anything is opened, so exiting here skips no cleanup.
fn usage_error(msg: &str) -> ! {
    eprintln!("vdpa-vsock: error: {msg} (hint: see `vdpa-vsock bench --help`)");
    std::process::exit(2)
}

fn gbits(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Open the device under test, with the settings of this run.
/// Open the device under test, with the settings of this run (and the sim's host side, for
/// its counters).
fn open(spec: &DeviceSpec, cfg: DriverConfig) -> Result<(VsockDriver, Option<SimHost>)> {
    if *spec == DeviceSpec::Sim {
        return sim::open(cfg).map(|(d, h)| (d, Some(h)));
    }
    let driver =
        VsockDriver::open_with(spec, cfg).with_context(|| format!("opening device {spec}"))?;
    Ok((driver, None))
}

pub(crate) fn run(args: &BenchArgs, base: DriverConfig) -> Result<()> {
    let spec = &args.device;
    let peer = match (args.peer, spec) {
        (Some(p), _) => p,
        (None, DeviceSpec::Sim) => sim::PEER,
        (None, _) => usage_error(&format!(
            "--device {spec} needs --peer CID:PORT[,ECHO_PORT]: a sink (and an echo service) at the peer to measure against"
        )),
    };
    if *spec != DeviceSpec::Sim {
        super::preflight(spec, &super::Roots::new(None, None))?;
    }
    let ours = format!("vdpa-vsock {}", device_kind(spec));
    let parallel = usize::from(args.parallel);
    let scale: Vec<usize> = if peer.echo.is_some() {
        args.scale.iter().copied().map(usize::from).collect()
    } else {
        Vec::new()
    };
    // The scale runs hold N streams plus the ones they time (closed ones linger until the peer
    // answers): a limit set in the base config is raised to what the run needs.
    let most = scale.iter().max().copied().unwrap_or(0);
    let max_connections = base
        .proto
        .max_connections
        .max(most + parallel + args.scale_ops as usize + 64);
    let cfg = DriverConfig {
        busy_poll: false,
        proto: proto::Config {
            max_connections,
            ..base.proto.clone()
        },
        ..base
    };
    let echo_steps = if peer.echo.is_some() {
        2 + scale_visits(&scale).len()
    } else {
        0
    };
    // The async one-way rounds share the blocking one's step.
    let async_steps = if cfg!(feature = "tokio") {
        usize::from(peer.echo.is_some())
    } else {
        0
    };
    let mut steps = Steps::new(7 + echo_steps + async_steps);
    let mut rows = Vec::new();
    let mut scale_rows = Vec::new();
    let mut notes = Vec::new();
    let shape = Shape {
        bytes: args.bytes,
        write_size: args.write_size,
        offset: usize::from(args.buffer_offset),
    };
    let one_way = "one-way 64KiB writes";
    let ping = "ping-pong 64B";

    let (driver, host) = open(spec, cfg.clone())?;
    if let Some(echo) = peer.echo {
        // A wrong echo port fails now, not after the one-way rows.
        drop(work::connect(&driver, echo, "echo service")?);
    }
    let consumed = || sim::discarded(host.as_ref(), peer.sink);
    {
        // The blocking and the async rows take turns, round by round, so that both see the
        // same machine: on a loaded one, a whole run of either can land in a slow spell.
        let rounds = args.rounds;
        let round = Shape {
            bytes: shape.bytes.div_ceil(u64::from(rounds)),
            ..shape
        };
        let kinds = if cfg!(feature = "tokio") { 2 } else { 1 };
        let what = if kinds == 2 {
            format!("one-way: {ours}, blocking and async by turns")
        } else {
            format!("one-way: {ours}")
        };
        let step = steps.start(&what, Unit::Bytes(round.bytes * u64::from(rounds) * kinds));
        let mut blocking = Vec::new();
        let mut totals = [0u64; 4];
        #[cfg(feature = "tokio")]
        let (mut asynced, mut w) = (Vec::new(), async_work::WriteCounts::default());
        for _ in 0..rounds {
            let before = driver.stats();
            let d = work::one_way_vsock(&driver, peer.sink, round, &step, consumed)?;
            let s = driver.stats();
            blocking.push(gbits(round.bytes, d));
            totals[0] += s.tx_payload_bytes_copied - before.tx_payload_bytes_copied;
            totals[1] += s.tx_packets - before.tx_packets;
            totals[2] += s.kicks - before.kicks;
            totals[3] += s.interrupts - before.interrupts;
            #[cfg(feature = "tokio")]
            {
                let before = consumed();
                let (d, counts) = async_work::one_way(&driver, peer.sink, round, &step)?;
                work::check_consumed(before, consumed(), round.bytes)?;
                asynced.push(gbits(round.bytes, d));
                w.add(counts);
            }
        }
        let [copied, packets, kicks, interrupts] = totals;
        let sent = round.bytes * u64::from(rounds);
        notes.push(format!(
            "{ours} one-way: the driver copied {:.2} bytes per payload byte sent, {packets} packets, {kicks} kicks, {interrupts} interrupts",
            copied as f64 / sent as f64,
        ));
        notes.push(format!(
            "{ours} one-way rounds, Gbit/s (each row is their median): {}",
            list(&blocking)
        ));
        let row = Row::new(one_way, &ours, median(&blocking), "Gbit/s")
            .with("rounds", rounds.into())
            .with("tx_payload_bytes_copied", copied)
            .with("tx_packets", packets)
            .with("kicks", kicks)
            .with("interrupts", interrupts);
        rows.push(row);
        #[cfg(feature = "tokio")]
        {
            let row = Row::new(one_way, format!("{ours} async"), median(&asynced), "Gbit/s")
                .with("rounds", rounds.into())
                .with("poll_write_calls", w.calls)
                .with("poll_write_pending", w.pending)
                .with("poll_write_partial", w.partial);
            notes.push(format!(
                "{ours} async one-way rounds, Gbit/s: {}",
                list(&asynced)
            ));
            let per_mib = |n| async_work::WriteCounts::per_mib(n, sent);
            notes.push(format!(
                "{ours} async one-way, per MiB: {:.1} poll_write calls, {:.1} Pending (each one wake-up), {:.1} partial writes",
                per_mib(w.calls),
                per_mib(w.pending),
                per_mib(w.partial)
            ));
            notes.push(ratio_note("async one-way", &row, &rows[0], 0.9));
            // Round by round: a slow spell that starts between a blocking round and its async
            // turn moves one row's median and not the other's; the ratio within each pair of
            // turns does not care when it came.
            let paired: Vec<f64> = asynced.iter().zip(&blocking).map(|(a, b)| a / b).collect();
            let p = median(&paired);
            notes.push(format!(
                "async one-way, paired = {p:.2}x {ours} (median of the {rounds} rounds' ratios: {}; target >= 0.9x: {})",
                list_ratios(&paired),
                if p >= 0.9 { "met" } else { "missed" }
            ));
            rows.push(row);
        }
    }
    {
        let what = format!("one-way: {ours}, {parallel} connections");
        let step = steps.start(&what, Unit::Bytes(shape.bytes));
        let (sent, d) =
            work::one_way_parallel(&driver, peer.sink, parallel, shape, &step, consumed)?;
        let workload = format!("{one_way}, {parallel} conns");
        let row = Row::new(workload, &ours, gbits(sent, d), "Gbit/s");
        rows.push(row.with("connections", parallel as u64));
    }
    rows.extend(one_way_yardsticks(&mut steps, shape, &mut notes)?);

    let n = args.round_trips;
    let rt = |d: Duration| f64::from(n) / d.as_secs_f64();
    if let Some(echo) = peer.echo {
        {
            let step = steps.start(&format!("ping-pong: {ours}, eventfd"), ops(n));
            let mut s = work::connect(&driver, echo, "echo service")?;
            let before = driver.stats();
            let d = work::ping_pong(&mut s, n, args.msg_size, &step)?;
            let after = driver.stats();
            let per_rt = |a: u64, b: u64| (a - b) as f64 / f64::from(n);
            let interrupts = per_rt(after.interrupts, before.interrupts);
            let by_callers = per_rt(after.caller_interrupts, before.caller_interrupts);
            notes.push(format!(
                "{ours} eventfd ping-pong, per round trip: {:.2} packets sent, {:.2} kicks, {interrupts:.2} interrupts ({by_callers:.2} taken by the blocked reader itself, the rest by the loop thread)",
                per_rt(after.tx_packets, before.tx_packets),
                per_rt(after.kicks, before.kicks),
            ));
            let transport = format!("{ours} eventfd");
            rows.push(
                Row::new(ping, transport, rt(d), "round trips/s")
                    .with("interrupts", after.interrupts - before.interrupts)
                    .with(
                        "caller_interrupts",
                        after.caller_interrupts - before.caller_interrupts,
                    ),
            );
        }
        #[cfg(feature = "tokio")]
        {
            let step = steps.start(&format!("ping-pong: {ours} async, eventfd"), ops(n));
            let d = async_work::ping_pong(&driver, echo, n, args.msg_size, &step)?;
            let row = Row::new(ping, format!("{ours} async"), rt(d), "round trips/s");
            if let Some(eventfd) = rows
                .iter()
                .find(|r| r.transport == format!("{ours} eventfd"))
            {
                notes.push(ratio_note("async ping-pong", &row, eventfd, 0.9));
            }
            rows.push(row);
        }
        scale_rows = scale_runs(
            &driver,
            echo,
            &scale,
            args.scale_ops,
            &ours,
            &mut steps,
            &mut notes,
        )?;
        drop(driver);
        let step = steps.start(&format!("ping-pong: {ours}, busy-poll"), ops(n));
        let (busy, _host) = open(
            spec,
            DriverConfig {
                busy_poll: true,
                ..cfg
            },
        )?;
        let mut s = work::connect(&busy, echo, "echo service")?;
        let d = work::ping_pong(&mut s, n, args.msg_size, &step)?;
        rows.push(Row::new(
            ping,
            format!("{ours} busy-poll"),
            rt(d),
            "round trips/s",
        ));
    } else {
        drop(driver);
    }
    rows.extend(ping_pong_yardsticks(
        &mut steps,
        n,
        args.msg_size,
        &mut notes,
    )?);
    rows.extend(scale_rows);

    // Both TCP rows fail alike where `lo` is down: say it once.
    notes.dedup();
    if peer.echo.is_none() {
        notes.push(format!(
            "no echo port in --peer {peer}: the ping-pong and scale rows of vdpa-vsock were skipped (give --peer CID:PORT,ECHO_PORT)"
        ));
    }
    if args.json {
        // Notes are not rows: on stderr, as warnings, so stdout stays one JSON value.
        for n in &notes {
            log::warn!("{n}");
        }
        return report::json(&rows, &spec.to_string());
    }
    let memcpy = rows.iter().find(|r| r.transport == "memcpy");
    if let (Some(first), Some(m)) = (rows.first(), memcpy) {
        notes.insert(
            0,
            format!(
                "vdpa-vsock one-way = {:.0}% of memcpy bandwidth",
                100.0 * first.value / m.value
            ),
        );
    }
    let scale_list: Vec<String> = scale.iter().map(ToString::to_string).collect();
    let header = format!(
        "device={spec} peer={peer} bytes={} write_size={} buffer_offset={} rounds={} parallel={parallel} round_trips={n} msg_size={} scale={} scale_ops={}",
        shape.bytes,
        shape.write_size,
        args.buffer_offset,
        args.rounds,
        args.msg_size,
        if scale_list.is_empty() { "-".into() } else { scale_list.join(",") },
        args.scale_ops,
    );
    report::table(&rows, &header, &notes)
}

/// "async one-way = 0.95x vdpa-vsock sim (target >= 0.9x: met)".
#[cfg(feature = "tokio")]
fn ratio_note(what: &str, row: &Row, blocking: &Row, target: f64) -> String {
    let ratio = row.value / blocking.value;
    format!(
        "{what} = {ratio:.2}x {} (target >= {target}x: {})",
        blocking.transport,
        if ratio >= target { "met" } else { "missed" }
    )
}

/// The median of `v` (the mean of the middle two for an even count; 0 when empty).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Values as the table shows them: `21.3 80.1 79.8`.
fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Ratios as the notes show them: `0.98 1.02`.
#[cfg(feature = "tokio")]
fn list_ratios(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn ops(n: u32) -> Unit {
    Unit::Ops(n.into())
}

/// Passes up and down through the scale counts (see [`scale_visits`]).
const SCALE_PASSES: usize = 2;

/// The order the scale counts are measured in: up through the sorted, distinct counts and back
/// down, [`SCALE_PASSES`] times (`100,10000` gives 100, 10000, 100, 10000, 100), so that the
/// counts take turns and each smaller one brackets the larger ones in time.
///
/// Why turns on one driver, and not one driver per count measured side by side: on this
/// machine a round trip's cost is mostly its thread wake-ups, and those are 7x cheaper when the
/// threads that hand off to each other happen to share a CPU. Two sim drivers side by side
/// measured 87 us and 12 us per 1-byte round trip with the same 100 streams open, depending on
/// which was opened first; one driver's threads are placed once, for every count alike.
fn scale_visits(scale: &[usize]) -> Vec<usize> {
    let mut up = scale.to_vec();
    up.sort_unstable();
    up.dedup();
    let mut visits = up.clone();
    for pass in 0..SCALE_PASSES {
        // Back down to the smallest; then, but for the last pass, up again to the largest.
        visits.extend(up.iter().rev().skip(1));
        if pass + 1 < SCALE_PASSES {
            visits.extend(up.iter().skip(1));
        }
    }
    visits
}

/// The scale rows: each count of `scale` measured on every visit (`scale_visits`), its rows the
/// mean of its visits; a note per larger count gives its cost against the smallest count's,
/// with the smallest's visits apart (the drift they bracket).
fn scale_runs(
    driver: &VsockDriver,
    echo: VsockAddr,
    scale: &[usize],
    scale_ops: u32,
    ours: &str,
    steps: &mut Steps,
    notes: &mut Vec<String>,
) -> Result<Vec<Row>> {
    let mut idle = work::IdleStreams::new(driver, echo);
    let mut runs: Vec<(usize, Vec<work::Scale>, Option<u64>)> = Vec::new();
    for open in scale_visits(scale) {
        let step = steps.start(&format!("scale: {open} open"), ops(scale_ops));
        let rss = idle.hold(open, &step)?;
        let r = idle.measure(scale_ops, &step)?;
        match runs.iter_mut().find(|(n, ..)| *n == open) {
            Some((_, visits, _)) => visits.push(r),
            None => runs.push((open, vec![r], rss)),
        }
    }
    drop(idle);
    let mean = |v: &[work::Scale], f: fn(&work::Scale) -> Duration| {
        let n = u32::try_from(v.len()).unwrap_or(u32::MAX).max(1);
        v.iter().map(f).sum::<Duration>() / n
    };
    let mut rows = Vec::new();
    let smallest = runs.first().map(|(n, v, _)| (*n, v.clone()));
    for (open, visits, rss) in &runs {
        let r = work::Scale {
            open: *open,
            connect_close: mean(visits, |s| s.connect_close),
            round_trip: mean(visits, |s| s.round_trip),
            rss_per_stream: *rss,
        };
        rows.extend(scale_rows_of(&r, ours, scale_ops));
        let Some((base_n, base)) = smallest.as_ref().filter(|(n, _)| n != open) else {
            continue;
        };
        for (what, f) in [
            (
                "connect+close",
                (|s: &work::Scale| s.connect_close) as fn(&work::Scale) -> Duration,
            ),
            ("echo 1B rtt", |s: &work::Scale| s.round_trip),
        ] {
            let ratio = mean(visits, f).as_secs_f64() / mean(base, f).as_secs_f64();
            let each: Vec<String> = base
                .iter()
                .map(|s| format!("{:.1}", micros(f(s))))
                .collect();
            notes.push(format!(
                "{what} with {open} open = {ratio:.2}x its cost with {base_n} open, its runs in turn with it: {} us (target <= 1.5x: {})",
                each.join(" / "),
                if ratio <= 1.5 { "met" } else { "missed" }
            ));
        }
    }
    Ok(rows)
}

/// The two rows of one scale run, in microseconds per operation.
fn scale_rows_of(r: &work::Scale, ours: &str, ops: u32) -> Vec<Row> {
    let open = r.open as u64;
    let mut rows: Vec<Row> = [
        Row::new(
            format!("connect+close, {} open", r.open),
            ours,
            micros(r.connect_close),
            "us/op",
        ),
        Row::new(
            format!("echo 1B rtt, {} open", r.open),
            ours,
            micros(r.round_trip),
            "us/op",
        ),
    ]
    .map(|row| row.with("open_streams", open).with("ops", ops.into()))
    .into();
    if let Some(bytes) = r.rss_per_stream {
        rows.push(
            Row::new(
                format!("memory per idle stream, {} open", r.open),
                ours,
                bytes as f64,
                "bytes RSS",
            )
            .with("open_streams", open),
        );
    }
    rows
}

/// A connected TCP pair on 127.0.0.1 (absent where `lo` is down, as in a bare initramfs).
fn tcp_pair() -> Result<(TcpStream, TcpStream)> {
    let pair = || -> std::io::Result<(TcpStream, TcpStream)> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let a = TcpStream::connect(l.local_addr()?)?;
        let (b, _) = l.accept()?;
        Ok((a, b))
    };
    pair().context("TCP loopback on 127.0.0.1")
}

/// The note for a TCP row that could not run: the other rows are still worth having.
fn skipped_tcp(e: &anyhow::Error) -> String {
    format!("tcp loopback rows skipped: {e:#}")
}

/// One-way over a Unix socketpair, TCP loopback, and memcpy.
fn one_way_yardsticks(
    steps: &mut Steps,
    shape: Shape,
    notes: &mut Vec<String>,
) -> Result<Vec<Row>> {
    let one_way = "one-way 64KiB writes";
    let bytes = shape.bytes;
    let mut rows = Vec::new();
    {
        let step = steps.start("one-way: unix socketpair", Unit::Bytes(bytes));
        let (a, b) = UnixStream::pair()?;
        let r = work::reader_thread(b, bytes);
        let d = work::one_way(a, shape, &step, || work::join_reader(r, bytes))?;
        rows.push(Row::new(
            one_way,
            "unix socketpair",
            gbits(bytes, d),
            "Gbit/s",
        ));
    }
    {
        let step = steps.start("one-way: tcp loopback", Unit::Bytes(bytes));
        match tcp_pair() {
            Ok((a, b)) => {
                let r = work::reader_thread(b, bytes);
                let d = work::one_way(a, shape, &step, || work::join_reader(r, bytes))?;
                rows.push(Row::new(one_way, "tcp loopback", gbits(bytes, d), "Gbit/s"));
            }
            Err(e) => notes.push(skipped_tcp(&e)),
        }
    }
    {
        let step = steps.start("one-way: memcpy (limit)", Unit::Bytes(bytes));
        let d = work::memcpy(shape, &step);
        rows.push(Row::new(one_way, "memcpy", gbits(bytes, d), "Gbit/s"));
    }
    Ok(rows)
}

/// Ping-pong over a Unix socketpair and TCP loopback (with TCP_NODELAY).
fn ping_pong_yardsticks(
    steps: &mut Steps,
    n: u32,
    size: usize,
    notes: &mut Vec<String>,
) -> Result<Vec<Row>> {
    let ping = "ping-pong 64B";
    let rt = |d: Duration| f64::from(n) / d.as_secs_f64();
    let mut rows = Vec::new();
    {
        let step = steps.start("ping-pong: unix socketpair", ops(n));
        let (mut a, b) = UnixStream::pair()?;
        work::echo_thread(b);
        let d = work::ping_pong(&mut a, n, size, &step)?;
        rows.push(Row::new(ping, "unix socketpair", rt(d), "round trips/s"));
    }
    {
        let step = steps.start("ping-pong: tcp loopback", ops(n));
        match tcp_pair() {
            Ok((mut a, b)) => {
                a.set_nodelay(true)?;
                b.set_nodelay(true)?;
                work::echo_thread(b);
                let d = work::ping_pong(&mut a, n, size, &step)?;
                rows.push(Row::new(ping, "tcp loopback", rt(d), "round trips/s"));
            }
            Err(e) => notes.push(skipped_tcp(&e)),
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::scale_visits;

    #[test]
    fn scale_counts_are_visited_up_then_back_down() {
        assert_eq!(
            scale_visits(&[100, 10_000]),
            vec![100, 10_000, 100, 10_000, 100]
        );
        assert_eq!(
            scale_visits(&[30, 10, 30, 20]),
            vec![10, 20, 30, 20, 10, 20, 30, 20, 10]
        );
        assert_eq!(scale_visits(&[5]), vec![5]);
        assert!(scale_visits(&[]).is_empty());
    }
}
