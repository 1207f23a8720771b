//! Chaos soak over the simulated device (issue 15), through the public API only.
//!
//! About [`SLOTS`] connections are kept alive at once (each one that ends is replaced): streams
//! and SEQPACKET connections opened by either side, one way or both ways, the sim's echo
//! services, random write and read sizes (1 B to 1 MiB), slow readers, half-closes, writers that
//! drop their socket with bytes still queued (an `RST` when the linger runs out), readers that
//! drop theirs with data unread, connects to closed ports, blocking, non-blocking and zero-copy
//! calls mixed. Meanwhile a fault thread injects transport resets (`SimHost::set_guest_cid`,
//! the CID flipping between 3 and 4), TRANSPORT_RESET events (`SimHost::transport_reset`, on
//! the event queue), NEEDS_RESET (`SimHost::set_needs_reset`, which the driver recovers from
//! by itself), device resets (`VsockDriver::reset_device`, after which the dead driver and its
//! sim are replaced), surprise removals (`SimHost::unplug`: every call must end, then the driver
//! and sim are replaced) and hostile devices (a fresh sim in each `Hostile` mode, with recovery
//! off, which must kill its driver cleanly), and after each one checks that new connections
//! work.
//!
//! Every byte is checked as it arrives: each direction of a connection is a deterministic
//! stream keyed by the run's seed and the connection, so a lost, duplicated or reordered byte
//! fails the test with the connection, the offset and the seed. A connection hit by a fault may
//! end early (with an error or EOF), but only within [`FAULT_BOUND`] of the fault, and what it
//! did receive must still be exact. Every blocking call has a timeout; a watchdog fails the test
//! with a dump of every call in progress for longer than [`STUCK`] instead of hanging.
//!
//! The run is cut into rounds; at the end of each every connection finishes and every driver is
//! dropped, then open file descriptors and RSS are sampled: the fd count must equal the one
//! after the first (warm-up) round exactly, and RSS may not grow beyond [`RSS_SLACK_KIB`].
//!
//! `VDPA_VSOCK_SOAK_SECS` sets the length (default [`DEFAULT_SECS`]); `VDPA_VSOCK_SOAK_SEED`
//! replays a seed (the plans and the fault sequence; thread timing differs run to run).
#![allow(clippy::cast_possible_truncation)] // Sizes and counters are small and known.

use std::fmt::Write as _;
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags};
use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver, VsockSeqPacket, VsockStream};
use vdpa_vsock::packet::VMADDR_PORT_ANY;
use vdpa_vsock::proto;
use vdpa_vsock::sim::{Hostile, SimConfig, SimHost, ECHO_PORT, SEQPACKET_ECHO_PORT};

/// Connections kept alive at once.
const SLOTS: usize = 200;
/// Default length of the run, in seconds (`VDPA_VSOCK_SOAK_SECS` overrides it).
const DEFAULT_SECS: u64 = 12;
/// Timeout of every blocking call on a connection (read, write, accept, connect).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection hit by a fault must have ended this long after the fault began.
const FAULT_BOUND: Duration = Duration::from_secs(10);
/// The watchdog fails the test when one call (or one wait) has run this long: every call is
/// bounded by [`CALL_TIMEOUT`], so this is a hang.
const STUCK: Duration = Duration::from_secs(30);
/// How long the driver's `close` lingers for the peer before `RST` (short, so that a driver
/// writer that drops its socket while a slow reader still owes it credit ends with an `RST`
/// often).
const LINGER: Duration = Duration::from_millis(300);
/// A port nobody listens on, on either side (below the ephemeral range that `VMADDR_PORT_ANY`
/// listeners and `connect` pick from, and not a sim service).
const CLOSED_PORT: u32 = 4444;
/// Largest single write (and read buffer).
const MAX_WRITE: usize = 1 << 20;
/// Largest stream transfer in one direction of one connection.
const MAX_STREAM: u64 = 8 << 20;
/// Largest SEQPACKET message (the default send buffer and `buf_alloc`, 256 KiB, is the limit).
const MAX_MSG: usize = 256 * 1024;
/// Most messages in one direction of one SEQPACKET connection.
const MAX_MSGS: u64 = 200;
/// The RSS may grow by this much between the warm-up sample and any later one (KiB). Each
/// round frees its drivers (their DMA regions are unmapped), its threads (their stacks are
/// unmapped) and its buffers; blocks of 128 KiB and more go back to the system when freed
/// (see [`release_big_blocks`]), so what is left is the small-block heap of glibc's arenas
/// (measured: 16 to 20 MiB after each of the 20 rounds of a 600 s run, flat). A leak of
/// per-connection state (thousands of connections a minute, each with 256 KiB buffers), of a
/// driver's DMA region (about 50 MiB, one or more per fault) or of a thread's stack outgrows
/// this within a round or two.
const RSS_SLACK_KIB: u64 = 32 * 1024;

// ---------------------------------------------------------------------------------------------
// Deterministic randomness and byte streams

/// SplitMix64's finaliser: a good 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seeded PRNG (SplitMix64).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(mix(seed))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `pct` percent.
    fn pct(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    /// Log-uniform in `1..=max`: as many tiny values as big ones.
    fn size(&mut self, max: u64) -> u64 {
        let bits = 64 - max.max(1).leading_zeros();
        let top = 1u64 << self.below(u64::from(bits) + 1);
        1 + self.below(top.min(max))
    }

    fn duration_ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// Byte `off` of stream `key`, eight at a time: the word of `off / 8`.
fn word(key: u64, index: u64) -> [u8; 8] {
    mix(key ^ index.wrapping_mul(0xd6e8_feb8_6659_fd93)).to_le_bytes()
}

/// Fill `buf` with bytes `off..off + buf.len()` of stream `key`.
fn fill(key: u64, off: u64, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let o = off + i as u64;
        let w = word(key, o / 8);
        let start = (o % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[start..start + n]);
        i += n;
    }
}

/// Check `data` against bytes `off..` of stream `key`: the index of the first wrong byte.
fn check(key: u64, off: u64, data: &[u8], scratch: &mut Vec<u8>) -> Result<(), usize> {
    scratch.resize(data.len(), 0);
    fill(key, off, scratch);
    if scratch[..] == *data {
        Ok(())
    } else {
        Err(data
            .iter()
            .zip(scratch.iter())
            .take_while(|(a, b)| a == b)
            .count())
    }
}

/// Message `i` of SEQPACKET stream `key`: its length (at least 1, so that `recv` returning 0
/// can only mean EOF), its EOR flag, and where its bytes come from in the stream.
fn msg_shape(key: u64, i: u64) -> (usize, bool, u64) {
    let h = mix(key ^ mix(i));
    let mut r = Rng::new(h);
    (r.size(MAX_MSG as u64) as usize, h & 1 == 1, i << 32)
}

// ---------------------------------------------------------------------------------------------
// The world: the current driver+sim, counters, the watchdog's view

/// One driver and its simulated device; replaced after a device reset or a hostile device.
struct Gen {
    id: u64,
    driver: VsockDriver,
    host: SimHost,
    /// Faults begun and finished on this generation. A connection that saw `done` = d at its
    /// start, and sees `begun` > d when something goes wrong, was hit by a fault.
    begun: AtomicU64,
    done: AtomicU64,
    /// When the last fault began.
    last_fault: Mutex<Option<Instant>>,
    /// Transport resets done on it: packets the driver sent from its old CID before it took
    /// the new one are the device's to drop (and count as protocol violations).
    cid_changes: AtomicU64,
}

impl Gen {
    fn open(id: u64, hostile: Option<Hostile>) -> Result<Gen, String> {
        // The host keeps Linux's linger (8 s): the sim's echo services close as soon as they
        // read EOF, with up to a send buffer of echo still queued for a reader that may be
        // slow.
        let sim = SimConfig {
            hostile,
            ..SimConfig::default()
        };
        let cfg = DriverConfig {
            proto: proto::Config {
                close_timeout: LINGER,
                ..proto::Config::default()
            },
            // A hostile device here is one that kills its driver: the soak checks that the
            // death is clean (recovery from one is `tests/lifecycle.rs`'s). Every other device
            // recovers from each NEEDS_RESET this soak injects (the limit a minute is
            // `tests/lifecycle.rs`'s too).
            recovery_limit: if hostile.is_some() { 0 } else { u32::MAX },
            ..DriverConfig::default()
        };
        let (driver, host) =
            VsockDriver::open_sim(sim, cfg).map_err(|e| format!("gen {id}: open_sim: {e}"))?;
        // A hostile device is a fault from its first moment.
        let begun = u64::from(hostile.is_some());
        Ok(Gen {
            id,
            driver,
            host,
            begun: AtomicU64::new(begun),
            done: AtomicU64::new(0),
            last_fault: Mutex::new(hostile.map(|_| Instant::now())),
            cid_changes: AtomicU64::new(0),
        })
    }

    /// What both ends and the device counted must show no broken rule: no credit overrun
    /// either way, and no malformed or misaddressed packet from the driver (except from its
    /// old CID around a transport reset).
    fn audit(&self) -> Result<(), String> {
        let (d, h, sim) = (
            self.driver.proto_stats(),
            self.host.proto_stats(),
            self.host.stats(),
        );
        if d.credit_violations != 0 || h.credit_violations != 0 {
            return Err(format!(
                "gen {}: credit overrun: {}",
                self.id,
                self.counters()
            ));
        }
        if sim.protocol_violations != 0 && self.cid_changes.load(SeqCst) == 0 {
            return Err(format!(
                "gen {}: {} protocol violations by the driver, with no transport reset: {}",
                self.id,
                sim.protocol_violations,
                self.counters()
            ));
        }
        Ok(())
    }

    /// The protocol counters of both ends and the device's, for failure messages.
    fn counters(&self) -> String {
        format!(
            "gen {} driver {:?} {:?}; host {:?}; sim {:?}",
            self.id,
            self.driver.stats(),
            self.driver.proto_stats(),
            self.host.proto_stats(),
            self.host.stats()
        )
    }

    fn fault_begins(&self) {
        *lock(&self.last_fault) = Some(Instant::now());
        self.begun.fetch_add(1, SeqCst);
    }

    /// Was a connection that started when `done` was `done0` hit by a fault?
    fn faulted_since(&self, done0: u64) -> bool {
        self.begun.load(SeqCst) > done0
    }

    fn in_fault(&self) -> bool {
        self.begun.load(SeqCst) > self.done.load(SeqCst)
    }
}

#[derive(Default)]
struct Counters {
    conns: AtomicU64,
    conns_clean: AtomicU64,
    conns_faulted: AtomicU64,
    connects_failed_in_fault: AtomicU64,
    refused: AtomicU64,
    bytes_d2h: AtomicU64,
    bytes_h2d: AtomicU64,
    bytes_echo: AtomicU64,
    msgs: AtomicU64,
    half_closes: AtomicU64,
    slow_readers: AtomicU64,
    rst_seen: AtomicU64,
    reader_aborts: AtomicU64,
    writer_drops: AtomicU64,
    transport_resets: AtomicU64,
    event_resets: AtomicU64,
    recoveries: AtomicU64,
    unplugs: AtomicU64,
    device_resets: AtomicU64,
    hostile: [AtomicU64; 4],
    checks: AtomicU64,
    gens: AtomicU64,
    /// Longest a faulted connection took to end after its fault (ms).
    max_fault_end_ms: AtomicU64,
}

/// What one thread is doing, for the watchdog.
struct Beat {
    name: Mutex<String>,
    /// Start of the call in progress (ms since the run began), or `u64::MAX` between calls.
    since_ms: AtomicU64,
    what: Mutex<&'static str>,
    off: AtomicU64,
}

struct World {
    seed: u64,
    start: Instant,
    current: Mutex<Option<Arc<Gen>>>,
    /// Notified when a fault ends or a generation is replaced, and when the round stops.
    changed: Condvar,
    stop: AtomicBool,
    failure: Mutex<Option<String>>,
    beats: Mutex<Vec<Weak<Beat>>>,
    c: Counters,
    next_gen: AtomicU64,
    /// Which faulted connection took longest to end, and how it ended.
    slowest_fault_end: Mutex<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Relaxed)
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Relaxed);
}

impl World {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn stopping(&self) -> bool {
        self.stop.load(SeqCst)
    }

    /// Record the first failure and stop everything.
    fn fail(&self, msg: String) {
        let mut f = lock(&self.failure);
        if f.is_none() {
            *f = Some(format!("{msg} (seed {})", self.seed));
        }
        drop(f);
        self.stop.store(true, SeqCst);
        self.changed.notify_all();
    }

    fn gen(&self) -> Option<Arc<Gen>> {
        lock(&self.current).clone()
    }

    /// Make `g` the current generation; the one it replaces is audited ([`Gen::audit`]).
    fn set_gen(&self, g: Option<Arc<Gen>>) -> Result<(), String> {
        let old = std::mem::replace(&mut *lock(&self.current), g);
        self.changed.notify_all();
        old.map_or(Ok(()), |o| o.audit())
    }

    fn open_gen(&self, hostile: Option<Hostile>) -> Result<Arc<Gen>, String> {
        add(&self.c.gens, 1);
        Gen::open(self.next_gen.fetch_add(1, SeqCst), hostile).map(Arc::new)
    }

    /// Wait until the fault that hit `g` is over: `g` was replaced, or its fault finished.
    fn wait_fault_over(&self, g: &Arc<Gen>, beat: &Beat) -> Result<(), String> {
        beat.enter("waiting for the fault to end", 0);
        let deadline = Instant::now() + FAULT_BOUND + CALL_TIMEOUT;
        let mut cur = lock(&self.current);
        loop {
            let replaced = cur.as_ref().is_none_or(|c| !Arc::ptr_eq(c, g));
            if replaced || !g.in_fault() || self.stopping() {
                beat.leave();
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "gen {}: a fault was not over {:?} after this connection failed",
                    g.id,
                    FAULT_BOUND + CALL_TIMEOUT
                ));
            }
            cur = self
                .changed
                .wait_timeout(cur, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn beat(&self, name: String) -> Arc<Beat> {
        let b = Arc::new(Beat {
            name: Mutex::new(name),
            since_ms: AtomicU64::new(u64::MAX),
            what: Mutex::new("idle"),
            off: AtomicU64::new(0),
        });
        let mut beats = lock(&self.beats);
        beats.retain(|w| w.strong_count() > 0);
        beats.push(Arc::downgrade(&b));
        b
    }

    /// Every call in progress for longer than [`STUCK`], one a line.
    fn stuck(&self) -> Option<String> {
        let now = self.now_ms();
        let mut out = String::new();
        let mut n = 0;
        for b in lock(&self.beats).iter().filter_map(Weak::upgrade) {
            let since = b.since_ms.load(SeqCst);
            if since != u64::MAX && now.saturating_sub(since) > STUCK.as_millis() as u64 {
                n += 1;
                let _ = writeln!(
                    out,
                    "  {}: {} (offset {}) for {} ms",
                    lock(&b.name),
                    lock(&b.what),
                    b.off.load(Relaxed),
                    now - since
                );
            }
        }
        (n > 0).then(|| format!("{n} calls stuck for more than {STUCK:?}:\n{out}"))
    }

    fn summary(&self) -> String {
        let c = &self.c;
        format!(
            "{} connections ({} clean, {} hit by faults, {} connects failed in a fault, {} refused \
             as expected), bytes verified d2h {} h2d {} echo {}, {} messages, {} half-closes, {} \
             slow readers, {} RST seen by readers, {} reader aborts, {} writer drops; faults: {} \
             transport resets, {} TRANSPORT_RESET events, {} NEEDS_RESET recoveries, {} \
             unplugs, {} device resets, hostile devices {}, {} post-fault checks passed, \
             {} drivers opened; a faulted connection ended at most {} ms after its fault ({})",
            load(&c.conns),
            load(&c.conns_clean),
            load(&c.conns_faulted),
            load(&c.connects_failed_in_fault),
            load(&c.refused),
            load(&c.bytes_d2h),
            load(&c.bytes_h2d),
            load(&c.bytes_echo),
            load(&c.msgs),
            load(&c.half_closes),
            load(&c.slow_readers),
            load(&c.rst_seen),
            load(&c.reader_aborts),
            load(&c.writer_drops),
            load(&c.transport_resets),
            load(&c.event_resets),
            load(&c.recoveries),
            load(&c.unplugs),
            load(&c.device_resets),
            HOSTILE
                .iter()
                .zip(&c.hostile)
                .map(|(h, n)| format!("{h:?} {}", load(n)))
                .collect::<Vec<_>>()
                .join(" "),
            load(&c.checks),
            load(&c.gens),
            load(&c.max_fault_end_ms),
            lock(&self.slowest_fault_end),
        )
    }
}

impl Beat {
    fn enter(&self, what: &'static str, off: u64) {
        *lock(&self.what) = what;
        self.off.store(off, Relaxed);
        self.since_ms.store(now_ms_global(), SeqCst);
    }

    fn leave(&self) {
        self.since_ms.store(u64::MAX, SeqCst);
    }

    fn rename(&self, name: String) {
        *lock(&self.name) = name;
    }
}

/// Milliseconds since the first call (the watchdog compares with [`World::now_ms`], whose start
/// is taken before any beat).
fn now_ms_global() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

const HOSTILE: [Hostile; 4] = [
    Hostile::BogusUsedId,
    Hostile::LenBeyondBuffer,
    Hostile::DuplicateUsed,
    Hostile::UsedIdxJump,
];

// ---------------------------------------------------------------------------------------------
// Connection plans

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Stream,
    Seq,
    /// The sim's stream echo (port 7): the driver writes and reads back the same stream.
    Echo,
    /// The sim's SEQPACKET echo (port 8).
    SeqEcho,
    /// A connect to a port nobody listens on: must be refused.
    Refused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The writer shuts down its write half; the reader must see EOF after every byte.
    Shutdown,
    /// The writer drops its socket after its last write: EOF after every byte, or `RST` (the
    /// linger ran out with bytes still queued) after an exact prefix.
    WriterDrop,
    /// The reader drops its socket, data unread, after this many bytes (messages); the writer
    /// ends with `BrokenPipe`/`ConnectionReset`, or finishes.
    ReaderAbort(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Blocking,
    /// Non-blocking calls, waiting with `poll(2)` on the socket's descriptor.
    Nonblocking,
}

/// One direction of a connection.
#[derive(Debug, Clone)]
struct Dir {
    key: u64,
    /// Bytes (streams) or messages (SEQPACKET).
    total: u64,
    end: End,
    slow: bool,
    /// Writes (stream): vectored, zero-copy (`send_with`, driver side) or plain; reads:
    /// zero-copy (`recv_with`, driver side) or plain.
    zero_copy_write: bool,
    vectored_write: bool,
    zero_copy_read: bool,
    seed: u64,
}

#[derive(Debug, Clone)]
struct Plan {
    name: String,
    kind: Kind,
    host_initiates: bool,
    d2h: Option<Dir>,
    h2d: Option<Dir>,
    driver_mode: Mode,
    host_mode: Mode,
}

impl Plan {
    fn random(r: &mut Rng, name: String, key: u64) -> Plan {
        let kind = match r.below(100) {
            0..=49 => Kind::Stream,
            50..=71 => Kind::Seq,
            72..=86 => Kind::Echo,
            87..=97 => Kind::SeqEcho,
            _ => Kind::Refused,
        };
        let seq = matches!(kind, Kind::Seq | Kind::SeqEcho);
        let echo = matches!(kind, Kind::Echo | Kind::SeqEcho);
        // 0: d2h only, 1: h2d only, 2: both ways.
        let ways = if echo { 0 } else { r.below(3) };
        let dir = |r: &mut Rng, k: u64, alone: bool| {
            let total = if seq {
                r.size(MAX_MSGS)
            } else {
                r.size(MAX_STREAM)
            };
            let end = match r.below(100) {
                // Dropping a socket ends both of its directions: only one-way connections.
                0..=14 if alone && !echo => End::WriterDrop,
                15..=29 if alone && !echo => End::ReaderAbort(r.below(total + 1)),
                _ => End::Shutdown,
            };
            Dir {
                key: mix(key ^ k),
                total,
                end,
                // A slow reader is what makes a dropped writer's linger end in RST.
                slow: r.pct(if end == End::WriterDrop { 50 } else { 15 }),
                zero_copy_write: r.pct(20),
                vectored_write: r.pct(20),
                zero_copy_read: r.pct(20),
                seed: r.next(),
            }
        };
        let d2h = (ways != 1).then(|| dir(r, 1, ways == 0));
        let h2d = (ways != 0).then(|| dir(r, 2, ways == 1));
        let mode = |r: &mut Rng| {
            if r.pct(25) {
                Mode::Nonblocking
            } else {
                Mode::Blocking
            }
        };
        Plan {
            name,
            kind,
            host_initiates: !echo && r.pct(40),
            d2h,
            h2d,
            driver_mode: mode(r),
            host_mode: mode(r),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sockets

enum Sock {
    Stream(VsockStream),
    Seq(VsockSeqPacket),
}

impl Sock {
    fn prepare(mut self, mode: Mode) -> io::Result<Arc<Sock>> {
        match &mut self {
            Sock::Stream(s) => {
                s.set_read_timeout(Some(CALL_TIMEOUT))?;
                s.set_write_timeout(Some(CALL_TIMEOUT))?;
                s.set_nonblocking(mode == Mode::Nonblocking)?;
            }
            Sock::Seq(s) => {
                s.set_read_timeout(Some(CALL_TIMEOUT))?;
                s.set_write_timeout(Some(CALL_TIMEOUT))?;
                s.set_nonblocking(mode == Mode::Nonblocking)?;
            }
        }
        Ok(Arc::new(self))
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Sock::Stream(s) => s.as_fd(),
            Sock::Seq(s) => s.as_fd(),
        }
    }

    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Sock::Stream(s) => s.shutdown(Shutdown::Write),
            Sock::Seq(s) => s.shutdown(Shutdown::Write),
        }
    }
}

/// Wait for `events` on a non-blocking socket's descriptor, up to [`CALL_TIMEOUT`].
fn wait_ready(fd: BorrowedFd<'_>, events: PollFlags) -> io::Result<()> {
    let mut fds = [PollFd::new(fd, events)];
    match poll(&mut fds, CALL_TIMEOUT.as_millis() as u16) {
        Ok(0) => Err(io::Error::new(
            ErrorKind::TimedOut,
            "poll: the descriptor did not become ready",
        )),
        Ok(_) => Ok(()),
        Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Run `op` until it does not say `WouldBlock`, waiting on the descriptor in between (and,
/// after a wake-up that still found nothing to do, a millisecond: a SEQPACKET send that needs
/// room for a whole message is `POLLOUT` with less room than that).
fn retry<T>(
    sock: &Sock,
    mode: Mode,
    events: PollFlags,
    mut op: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let deadline = Instant::now() + CALL_TIMEOUT;
    let mut woken = false;
    loop {
        match op() {
            Err(e) if e.kind() == ErrorKind::WouldBlock && mode == Mode::Nonblocking => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        ErrorKind::TimedOut,
                        "non-blocking call: no progress",
                    ));
                }
                if woken {
                    thread::sleep(Duration::from_millis(1));
                }
                if let Err(e) = wait_ready(sock.fd(), events) {
                    // Tell a descriptor that missed its readiness from a call that cannot
                    // make progress.
                    let again = match op() {
                        Ok(_) => "succeeds: the descriptor missed its readiness".to_string(),
                        Err(e2) => format!("still fails: {e2}"),
                    };
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{e}; the call now {again}"),
                    ));
                }
                woken = true;
            }
            r => return r,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One connection

/// What the threads of one connection share.
struct ConnCtx {
    world: Arc<World>,
    gen: Arc<Gen>,
    done0: u64,
    plan: Plan,
}

/// What the writer and the reader of one direction tell each other.
#[derive(Default)]
struct Sent {
    /// Bytes (messages) queued so far.
    n: AtomicU64,
    /// The writer finished (stored before its shutdown or drop).
    finished: AtomicBool,
    /// Bytes (messages) the reader has checked.
    read: AtomicU64,
    /// The reader is done (any way).
    reader_done: Mutex<bool>,
    cv: Condvar,
}

impl Sent {
    fn reader_finished(&self) {
        *lock(&self.reader_done) = true;
        self.cv.notify_all();
    }

    /// A writer that shut down keeps its socket until the reader is done, as a program that
    /// shuts down and then waits for the peer's close does: closing at once would discard
    /// (after the linger, with `RST`) whatever a slow reader has not taken yet, which is
    /// [`End::WriterDrop`]'s case. The beat restarts whenever the reader makes progress, so
    /// only a reader stuck for [`STUCK`] trips the watchdog.
    fn wait_reader(&self, beat: &Beat) {
        let mut seen = self.read.load(SeqCst);
        beat.enter("waiting for the reader", seen);
        let mut done = lock(&self.reader_done);
        while !*done {
            done = self
                .cv
                .wait_timeout(done, Duration::from_secs(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            let now = self.read.load(SeqCst);
            if now != seen {
                seen = now;
                beat.enter("waiting for the reader", seen);
            }
        }
        beat.leave();
    }
}

/// Tells the writer when the reader's thread is done, however it ends.
struct ReaderDone<'a>(&'a Sent);

impl Drop for ReaderDone<'_> {
    fn drop(&mut self) {
        self.0.reader_finished();
    }
}

/// How a direction ended, when that was acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Complete,
    Faulted,
    Rst,
    ReaderAborted,
    WriterSawAbort,
}

impl ConnCtx {
    /// An error `e` at `off` on direction `dir`: acceptable if a fault hit the connection, or
    /// if `allowed`; otherwise the test's failure.
    fn judge(
        &self,
        dir: &str,
        side: &str,
        e: &io::Error,
        off: u64,
        allowed: bool,
    ) -> Result<Ending, String> {
        if e.kind() == ErrorKind::TimedOut {
            return Err(format!(
                "{} {dir} {side}: timed out after {CALL_TIMEOUT:?} at offset {off}: {e}; faulted {}; plan {:?}; {}",
                self.plan.name,
                self.gen.faulted_since(self.done0),
                self.plan,
                self.gen.counters()
            ));
        }
        let own = allowed && matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset);
        if self.gen.faulted_since(self.done0) {
            // A connection that opened while a fault was under way may outlive it by far, and
            // then meet the RST its own plan causes.
            let late = lock(&self.gen.last_fault).is_some_and(|at| at.elapsed() > FAULT_BOUND);
            if !(late && own) {
                self.fault_ended(&format!("{dir} {side} at {off}: {e}"))?;
                return Ok(Ending::Faulted);
            }
        }
        if own {
            return Ok(Ending::Rst);
        }
        Err(format!(
            "{} {dir} {side}: unexpected error at offset {off} (no fault hit gen {}): {e} ({:?}); plan {:?}; {}",
            self.plan.name,
            self.gen.id,
            e.kind(),
            self.plan,
            self.gen.counters()
        ))
    }

    /// A faulted connection ends now (`how`): within [`FAULT_BOUND`] of the fault?
    fn fault_ended(&self, how: &str) -> Result<(), String> {
        let Some(at) = *lock(&self.gen.last_fault) else {
            return Ok(());
        };
        let took = at.elapsed();
        let ms = took.as_millis() as u64;
        if self.world.c.max_fault_end_ms.fetch_max(ms, Relaxed) < ms {
            *lock(&self.world.slowest_fault_end) =
                format!("{} (gen {}): {how}", self.plan.name, self.gen.id);
        }
        if took > FAULT_BOUND {
            return Err(format!(
                "{}: ended ({how}) {took:?} after the fault on gen {} (bound {FAULT_BOUND:?}): \
                 a connection the fault hit that outlived it, or one that opened during it \
                 and failed much later; plan {:?}; {}",
                self.plan.name,
                self.gen.id,
                self.plan,
                self.gen.counters()
            ));
        }
        Ok(())
    }

    /// An early EOF on a direction: acceptable only after a fault.
    fn early_eof(&self, dir: &str, got: u64, sent: &Sent) -> Result<Ending, String> {
        if self.gen.faulted_since(self.done0) {
            self.fault_ended(&format!("{dir} EOF at {got}"))?;
            return Ok(Ending::Faulted);
        }
        Err(format!(
            "{} {dir}: EOF after {got}, but the writer {} {} (lost data); plan {:?}",
            self.plan.name,
            if sent.finished.load(SeqCst) {
                "finished with"
            } else {
                "is still writing, at"
            },
            sent.n.load(SeqCst),
            self.plan
        ))
    }
}

/// Which total a stream direction's verified bytes count in.
#[derive(Debug, Clone, Copy)]
enum Tally {
    D2h,
    H2d,
    Echo,
}

/// One end of a direction: its socket, how its calls block, and whether it is the driver's.
struct Io {
    sock: Arc<Sock>,
    mode: Mode,
    driver_side: bool,
}

fn stream_writer(
    ctx: &ConnCtx,
    beat: &Beat,
    io: Io,
    dir: &Dir,
    dname: &str,
    sent: &Sent,
) -> Result<Ending, String> {
    let Io {
        sock,
        mode,
        driver_side,
    } = io;
    let Sock::Stream(s) = &*sock else {
        unreachable!("a stream plan has stream sockets")
    };
    let mut r = Rng::new(dir.seed);
    let mut buf = vec![0u8; MAX_WRITE];
    let mut off = 0u64;
    let allowed = matches!(dir.end, End::ReaderAbort(_));
    while off < dir.total && !ctx.world.stopping() {
        let n = r.size((dir.total - off).min(MAX_WRITE as u64)) as usize;
        fill(dir.key, off, &mut buf[..n]);
        let mut done = 0;
        while done < n {
            beat.enter("write", off);
            let chunk = &buf[done..n];
            let res = if dir.zero_copy_write && driver_side {
                let mut w = s.try_clone().map_err(|e| e.to_string())?;
                retry(&sock, mode, PollFlags::POLLOUT, || {
                    w.send_with(chunk.len(), |slices| {
                        let mut k = 0;
                        for sl in slices {
                            let m = sl.len().min(chunk.len() - k);
                            sl.copy_from(&chunk[k..k + m]);
                            k += m;
                            if k == chunk.len() {
                                break;
                            }
                        }
                        k
                    })
                })
            } else if dir.vectored_write && chunk.len() > 1 {
                let (a, b) = chunk.split_at(chunk.len() / 2);
                retry(&sock, mode, PollFlags::POLLOUT, || {
                    (&*s).write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
                })
            } else {
                retry(&sock, mode, PollFlags::POLLOUT, || (&*s).write(chunk))
            };
            beat.leave();
            match res {
                Ok(0) => {
                    return Err(format!("{} {dname}: write returned 0", ctx.plan.name));
                }
                Ok(k) => {
                    done += k;
                    off += k as u64;
                    sent.n.store(off, SeqCst);
                }
                Err(e) => {
                    let end = ctx.judge(dname, "writer", &e, off, allowed)?;
                    return Ok(if end == Ending::Rst {
                        Ending::WriterSawAbort
                    } else {
                        end
                    });
                }
            }
        }
    }
    sent.finished.store(true, SeqCst);
    finish_writer(ctx, beat, sock, dir, dname, off, sent)
}

/// The writer's end: shut down (or, for [`End::WriterDrop`], drop the socket).
fn finish_writer(
    ctx: &ConnCtx,
    beat: &Beat,
    sock: Arc<Sock>,
    dir: &Dir,
    dname: &str,
    off: u64,
    sent: &Sent,
) -> Result<Ending, String> {
    match dir.end {
        End::WriterDrop => {
            add(&ctx.world.c.writer_drops, 1);
            drop(sock);
            Ok(Ending::Complete)
        }
        End::Shutdown | End::ReaderAbort(_) => {
            beat.enter("shutdown", off);
            let r = sock.shutdown_write();
            beat.leave();
            match r {
                Ok(()) => {
                    if dir.end == End::Shutdown {
                        add(&ctx.world.c.half_closes, 1);
                    }
                    sent.wait_reader(beat);
                    Ok(Ending::Complete)
                }
                // The reader dropped its socket first: the connection is gone (Linux's
                // shutdown says ENOTCONN then too).
                Err(e)
                    if matches!(dir.end, End::ReaderAbort(_))
                        && e.kind() == ErrorKind::NotConnected =>
                {
                    Ok(Ending::WriterSawAbort)
                }
                Err(e) => {
                    let allowed = matches!(dir.end, End::ReaderAbort(_));
                    ctx.judge(dname, "shutdown", &e, off, allowed)
                }
            }
        }
    }
}

/// Read `dir` to its end, checking every byte; `counter` gets the verified bytes.
fn stream_reader(
    ctx: &ConnCtx,
    beat: &Beat,
    io: Io,
    dir: &Dir,
    dname: &str,
    sent: &Sent,
    counter: &AtomicU64,
) -> Result<Ending, String> {
    let Io {
        sock,
        mode,
        driver_side,
    } = io;
    let Sock::Stream(s) = &*sock else {
        unreachable!("a stream plan has stream sockets")
    };
    let mut r = Rng::new(dir.seed ^ 0x5eed);
    let mut buf = vec![0u8; MAX_WRITE];
    let mut scratch = Vec::new();
    let mut off = 0u64;
    let _done = ReaderDone(sent);
    if dir.slow {
        add(&ctx.world.c.slow_readers, 1);
    }
    let result = loop {
        if let End::ReaderAbort(after) = dir.end {
            if off >= after {
                add(&ctx.world.c.reader_aborts, 1);
                break Ok(Ending::ReaderAborted);
            }
        }
        let len = if dir.slow {
            r.size(4096) as usize
        } else {
            r.size(MAX_WRITE as u64) as usize
        };
        beat.enter("read", off);
        let res = if dir.zero_copy_read && driver_side {
            let mut rd = s.try_clone().map_err(|e| e.to_string())?;
            let dst = &mut buf[..len];
            retry(&sock, mode, PollFlags::POLLIN, || {
                rd.recv_with(|slices| {
                    let mut k = 0;
                    for sl in slices {
                        let m = sl.len().min(dst.len() - k);
                        k += sl
                            .subslice(0, m)
                            .map_or(0, |sub| sub.copy_to(&mut dst[k..k + m]));
                        if k == dst.len() {
                            break;
                        }
                    }
                    k
                })
            })
        } else {
            retry(&sock, mode, PollFlags::POLLIN, || {
                (&*s).read(&mut buf[..len])
            })
        };
        beat.leave();
        match res {
            Ok(0) => {
                let total = sent.n.load(SeqCst);
                if sent.finished.load(SeqCst) && off == total {
                    break Ok(Ending::Complete);
                }
                break ctx.early_eof(dname, off, sent);
            }
            Ok(n) => {
                if let Err(i) = check(dir.key, off, &buf[..n], &mut scratch) {
                    break Err(format!(
                        "{} {dname}: wrong byte at offset {} (read of {n} at {off}): lost, duplicated or reordered data; gen {} faulted {}; plan {:?}",
                        ctx.plan.name,
                        off + i as u64,
                        ctx.gen.id,
                        ctx.gen.faulted_since(ctx.done0),
                        ctx.plan
                    ));
                }
                off += n as u64;
                sent.read.store(off, SeqCst);
                add(counter, n as u64);
                if dir.slow {
                    thread::sleep(Duration::from_micros(100 + r.below(1900)));
                }
            }
            Err(e) => {
                // An RST after the writer dropped its socket with bytes queued: the prefix
                // was exact.
                let allowed = dir.end == End::WriterDrop && e.kind() == ErrorKind::ConnectionReset;
                break ctx.judge(dname, "reader", &e, off, allowed);
            }
        }
    };
    drop(sock);
    result
}

fn seq_writer(
    ctx: &ConnCtx,
    beat: &Beat,
    io: Io,
    dir: &Dir,
    dname: &str,
    sent: &Sent,
) -> Result<Ending, String> {
    let Io { sock, mode, .. } = io;
    let Sock::Seq(s) = &*sock else {
        unreachable!("a seqpacket plan has seqpacket sockets")
    };
    let mut buf = vec![0u8; MAX_MSG];
    let allowed = matches!(dir.end, End::ReaderAbort(_));
    let mut i = 0;
    while i < dir.total && !ctx.world.stopping() {
        let (len, eor, at) = msg_shape(dir.key, i);
        fill(dir.key, at, &mut buf[..len]);
        beat.enter("send message", i);
        let res = retry(&sock, mode, PollFlags::POLLOUT, || {
            s.send_eor(&buf[..len], eor)
        });
        beat.leave();
        match res {
            Ok(n) if n == len => {
                i += 1;
                sent.n.store(i, SeqCst);
            }
            Ok(n) => {
                return Err(format!(
                    "{} {dname}: message {i} of {len} bytes: send said {n}",
                    ctx.plan.name
                ));
            }
            Err(e) => {
                let end = ctx.judge(dname, "sender", &e, i, allowed)?;
                return Ok(if end == Ending::Rst {
                    Ending::WriterSawAbort
                } else {
                    end
                });
            }
        }
    }
    sent.finished.store(true, SeqCst);
    finish_writer(ctx, beat, sock, dir, dname, i, sent)
}

fn seq_reader(
    ctx: &ConnCtx,
    beat: &Beat,
    io: Io,
    dir: &Dir,
    dname: &str,
    sent: &Sent,
) -> Result<Ending, String> {
    let Io { sock, mode, .. } = io;
    let Sock::Seq(s) = &*sock else {
        unreachable!("a seqpacket plan has seqpacket sockets")
    };
    let mut r = Rng::new(dir.seed ^ 0x5eed);
    let mut buf = vec![0u8; MAX_MSG];
    let mut scratch = Vec::new();
    let mut i = 0u64;
    let _done = ReaderDone(sent);
    if dir.slow {
        add(&ctx.world.c.slow_readers, 1);
    }
    let result = loop {
        if let End::ReaderAbort(after) = dir.end {
            if i >= after {
                add(&ctx.world.c.reader_aborts, 1);
                break Ok(Ending::ReaderAborted);
            }
        }
        beat.enter("receive message", i);
        let res = retry(&sock, mode, PollFlags::POLLIN, || s.recv_full(&mut buf));
        beat.leave();
        match res {
            Ok((0, _, _)) => {
                let total = sent.n.load(SeqCst);
                if sent.finished.load(SeqCst) && i == total {
                    break Ok(Ending::Complete);
                }
                break ctx.early_eof(dname, i, sent);
            }
            Ok((n, full, eor)) => {
                let (len, want_eor, at) = msg_shape(dir.key, i);
                if n != len || full != len || eor != want_eor {
                    break Err(format!(
                        "{} {dname}: message {i}: got {n} bytes of {full}, EOR {eor}; expected {len} bytes, EOR {want_eor} (boundary lost or messages reordered); plan {:?}",
                        ctx.plan.name, ctx.plan
                    ));
                }
                if let Err(k) = check(dir.key, at, &buf[..n], &mut scratch) {
                    break Err(format!(
                        "{} {dname}: message {i}: wrong byte at {k} of {n}; plan {:?}",
                        ctx.plan.name, ctx.plan
                    ));
                }
                i += 1;
                sent.read.store(i, SeqCst);
                add(&ctx.world.c.msgs, 1);
                if dir.slow {
                    thread::sleep(Duration::from_micros(100 + r.below(1900)));
                }
            }
            Err(e) => {
                let allowed = dir.end == End::WriterDrop && e.kind() == ErrorKind::ConnectionReset;
                break ctx.judge(dname, "receiver", &e, i, allowed);
            }
        }
    };
    drop(sock);
    result
}

/// Open the two ends of `plan` on `gen`: (driver's socket, host's socket); for the echo kinds
/// the host's is `None`.
fn open_conn(plan: &Plan, gen: &Gen, beat: &Beat) -> io::Result<(Sock, Option<Sock>)> {
    let d = &gen.driver;
    let h = &gen.host;
    let seq = plan.kind == Kind::Seq;
    beat.enter("connect", 0);
    let r = match (plan.kind, plan.host_initiates) {
        (Kind::Echo, _) => d
            .connect_timeout(VsockAddr::new(2, ECHO_PORT), CALL_TIMEOUT)
            .map(|s| (Sock::Stream(s), None)),
        (Kind::SeqEcho, _) => d
            .connect_seqpacket(VsockAddr::new(2, SEQPACKET_ECHO_PORT))
            .map(|s| (Sock::Seq(s), None)),
        (Kind::Refused, _) => unreachable!("refused connects are run by run_refused"),
        (_, false) => {
            let l = if seq {
                h.listen_seqpacket(VMADDR_PORT_ANY)?
            } else {
                h.listen(VMADDR_PORT_ANY)?
            };
            let addr = VsockAddr::new(2, l.port());
            let ds = if seq {
                Sock::Seq(d.connect_seqpacket(addr)?)
            } else {
                Sock::Stream(d.connect_timeout(addr, CALL_TIMEOUT)?)
            };
            let hs = accept(&l, seq)?;
            Ok((ds, Some(hs)))
        }
        (_, true) => {
            let l = if seq {
                d.listen_seqpacket(VMADDR_PORT_ANY)?
            } else {
                d.listen(VMADDR_PORT_ANY)?
            };
            let hs = if seq {
                Sock::Seq(h.connect_seqpacket(l.port())?)
            } else {
                Sock::Stream(h.connect(l.port())?)
            };
            let ds = accept(&l, seq)?;
            Ok((ds, Some(hs)))
        }
    };
    beat.leave();
    r
}

/// Accept one connection, within [`CALL_TIMEOUT`] (SEQPACKET's accept has no timeout of its
/// own: non-blocking, waiting on the listener's descriptor).
fn accept(l: &vdpa_vsock::driver::VsockListener, seq: bool) -> io::Result<Sock> {
    if !seq {
        return l
            .accept_timeout(Some(CALL_TIMEOUT))
            .map(|(s, _)| Sock::Stream(s));
    }
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + CALL_TIMEOUT;
    loop {
        match l.accept_seqpacket() {
            Ok((s, _)) => {
                // Accepted sockets inherit the listener's mode; the plan sets its own.
                s.set_nonblocking(false)?;
                return Ok(Sock::Seq(s));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(io::Error::new(ErrorKind::TimedOut, "accept_seqpacket"));
                }
                wait_ready(l.as_fd(), PollFlags::POLLIN)?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Run one connection of `plan` on the current generation.
fn run_conn(world: &Arc<World>, beat: &Arc<Beat>, plan: Plan) -> Result<(), String> {
    let Some(gen) = world.gen() else {
        return Ok(());
    };
    let done0 = gen.done.load(SeqCst);
    add(&world.c.conns, 1);
    beat.rename(format!("{} (gen {})", plan.name, gen.id));
    if plan.kind == Kind::Refused {
        return run_refused(world, beat, &gen, done0, &plan);
    }
    let (ds, hs) = match open_conn(&plan, &gen, beat) {
        Ok(p) => p,
        Err(e) => {
            if gen.faulted_since(done0) {
                add(&world.c.connects_failed_in_fault, 1);
                return world.wait_fault_over(&gen, beat);
            }
            return Err(format!(
                "{}: connect failed with no fault on gen {}: {e} ({:?}); plan {plan:?}",
                plan.name,
                gen.id,
                e.kind()
            ));
        }
    };
    let prep = |s: Sock, m| {
        s.prepare(m)
            .map_err(|e| format!("{}: socket setup: {e}", plan.name))
    };
    let ds = prep(ds, plan.driver_mode)?;
    let hs = match hs {
        Some(h) => Some(prep(h, plan.host_mode)?),
        None => None,
    };
    let ctx = Arc::new(ConnCtx {
        world: world.clone(),
        gen: gen.clone(),
        done0,
        plan: plan.clone(),
    });
    drop(gen);
    let mut threads: Vec<JoinHandle<Result<Ending, String>>> = Vec::new();
    let seq = matches!(plan.kind, Kind::Seq | Kind::SeqEcho);
    // Each direction: its writer's end, its reader's end, and which total its bytes count in.
    let mut dirs = Vec::new();
    let end = |sock: &Arc<Sock>, mode, driver_side| Io {
        sock: sock.clone(),
        mode,
        driver_side,
    };
    if let Some(d) = &plan.d2h {
        let (reader, tally) = match &hs {
            Some(h) => (end(h, plan.host_mode, false), Tally::D2h),
            // The echo: the driver reads back what it wrote.
            None => (end(&ds, plan.driver_mode, true), Tally::Echo),
        };
        dirs.push((
            d.clone(),
            "d2h",
            end(&ds, plan.driver_mode, true),
            reader,
            tally,
        ));
    }
    if let (Some(d), Some(h)) = (&plan.h2d, &hs) {
        let (writer, reader) = (
            end(h, plan.host_mode, false),
            end(&ds, plan.driver_mode, true),
        );
        dirs.push((d.clone(), "h2d", writer, reader, Tally::H2d));
    }
    // Each thread holds its own handles: a socket closes when its last thread lets go.
    drop(ds);
    drop(hs);
    for (dir, dname, writer, reader, tally) in dirs {
        let sent = Arc::new(Sent::default());
        let (c, b, d, s) = (
            ctx.clone(),
            world.beat(format!("{} {dname} writer", plan.name)),
            dir.clone(),
            sent.clone(),
        );
        threads.push(spawn(move || {
            if seq {
                seq_writer(&c, &b, writer, &d, dname, &s)
            } else {
                stream_writer(&c, &b, writer, &d, dname, &s)
            }
        })?);
        let (c, b) = (
            ctx.clone(),
            world.beat(format!("{} {dname} reader", plan.name)),
        );
        threads.push(spawn(move || {
            if seq {
                seq_reader(&c, &b, reader, &dir, dname, &sent)
            } else {
                let counter = match tally {
                    Tally::D2h => &c.world.c.bytes_d2h,
                    Tally::H2d => &c.world.c.bytes_h2d,
                    Tally::Echo => &c.world.c.bytes_echo,
                };
                stream_reader(&c, &b, reader, &dir, dname, &sent, counter)
            }
        })?);
    }
    beat.enter("joining the connection's threads", 0);
    let mut faulted = false;
    let mut first_err = None;
    for t in threads {
        match t.join() {
            Ok(Ok(end)) => {
                faulted |= end == Ending::Faulted;
                if end == Ending::Rst {
                    add(&world.c.rst_seen, 1);
                }
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(format!("{}: a thread panicked", plan.name));
            }
        }
    }
    beat.leave();
    if let Some(e) = first_err {
        return Err(e);
    }
    if faulted {
        add(&world.c.conns_faulted, 1);
        world.wait_fault_over(&ctx.gen, beat)?;
    } else {
        add(&world.c.conns_clean, 1);
    }
    Ok(())
}

fn spawn<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, String> {
    thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(f)
        .map_err(|e| format!("spawn: {e}"))
}

/// A connect to a port nobody listens on is refused (an `RST` from the peer).
fn run_refused(
    world: &World,
    beat: &Beat,
    gen: &Arc<Gen>,
    done0: u64,
    plan: &Plan,
) -> Result<(), String> {
    beat.enter("connect to a closed port", 0);
    let r = if plan.host_initiates {
        gen.host.connect(CLOSED_PORT).map(|_| ())
    } else {
        gen.driver
            .connect_timeout(VsockAddr::new(2, CLOSED_PORT), CALL_TIMEOUT)
            .map(|_| ())
    };
    beat.leave();
    match r {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            add(&world.c.refused, 1);
            add(&world.c.conns_clean, 1);
            Ok(())
        }
        _ if gen.faulted_since(done0) => {
            add(&world.c.connects_failed_in_fault, 1);
            world.wait_fault_over(gen, beat)
        }
        r => Err(format!(
            "{}: connect to a closed port: expected ConnectionRefused, got {:?}",
            plan.name,
            r.map_err(|e| (e.kind(), e.to_string()))
        )),
    }
}

fn slot(world: Arc<World>, round: u64, slot: usize) {
    let beat = world.beat(format!("r{round}s{slot}"));
    let mut r = Rng::new(world.seed ^ mix(round << 16 | slot as u64));
    let mut n = 0u64;
    while !world.stopping() {
        let name = format!("conn r{round}s{slot}c{n}");
        let key = mix(world.seed ^ mix((round << 40) | ((slot as u64) << 24) | n));
        let plan = Plan::random(&mut r, name, key);
        n += 1;
        if let Err(e) = run_conn(&world, &beat, plan) {
            world.fail(e);
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Faults

/// New connections work on `g`: a stream both ways (driver to the echo, host to a driver
/// listener) and a SEQPACKET message.
fn check_gen(world: &World, beat: &Beat, g: &Gen, after: &str) -> Result<(), String> {
    let e = |what: &str, err: io::Error| format!("after {after}: gen {}: {what}: {err}", g.id);
    beat.enter("post-fault check", g.id);
    let mut s = g
        .driver
        .connect_timeout(VsockAddr::new(2, ECHO_PORT), CALL_TIMEOUT)
        .map_err(|x| e("connect to the echo", x))?;
    s.set_read_timeout(Some(CALL_TIMEOUT))
        .map_err(|x| e("timeout", x))?;
    s.set_write_timeout(Some(CALL_TIMEOUT))
        .map_err(|x| e("timeout", x))?;
    let mut data = vec![0u8; 4096];
    fill(g.id, 0, &mut data);
    s.write_all(&data).map_err(|x| e("echo write", x))?;
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).map_err(|x| e("echo read", x))?;
    if back != data {
        return Err(format!(
            "after {after}: gen {}: the echo came back altered",
            g.id
        ));
    }
    let l = g
        .driver
        .listen(VMADDR_PORT_ANY)
        .map_err(|x| e("listen", x))?;
    let mut h = g.host.connect(l.port()).map_err(|x| e("host connect", x))?;
    let (mut a, _) = l
        .accept_timeout(Some(CALL_TIMEOUT))
        .map_err(|x| e("accept", x))?;
    a.set_read_timeout(Some(CALL_TIMEOUT))
        .map_err(|x| e("timeout", x))?;
    h.write_all(&data[..100]).map_err(|x| e("host write", x))?;
    let mut got = [0u8; 100];
    a.read_exact(&mut got).map_err(|x| e("driver read", x))?;
    if got[..] != data[..100] {
        return Err(format!(
            "after {after}: gen {}: host to driver altered",
            g.id
        ));
    }
    let mut q = g
        .driver
        .connect_seqpacket(VsockAddr::new(2, SEQPACKET_ECHO_PORT))
        .map_err(|x| e("seqpacket connect", x))?;
    q.set_read_timeout(Some(CALL_TIMEOUT))
        .map_err(|x| e("timeout", x))?;
    q.send_eor(&data[..1000], true)
        .map_err(|x| e("seqpacket send", x))?;
    let mut m = vec![0u8; 2000];
    let (n, full, eor) = q.recv_full(&mut m).map_err(|x| e("seqpacket recv", x))?;
    if (n, full, eor) != (1000, 1000, true) || m[..n] != data[..1000] {
        return Err(format!(
            "after {after}: gen {}: seqpacket echo came back as ({n}, {full}, {eor})",
            g.id
        ));
    }
    beat.leave();
    add(&world.c.checks, 1);
    Ok(())
}

fn transport_reset(world: &World, beat: &Beat, g: &Arc<Gen>) -> Result<(), String> {
    let new = if g.driver.local_cid() == 3 { 4 } else { 3 };
    g.fault_begins();
    g.cid_changes.fetch_add(1, SeqCst);
    beat.enter("set_guest_cid", new);
    g.host
        .set_guest_cid(new)
        .map_err(|e| format!("gen {}: set_guest_cid({new}): {e}", g.id))?;
    // The driver takes the new CID on the config interrupt (a condition with no event to wait
    // on through the public API: polled, bounded).
    let t0 = Instant::now();
    while g.driver.local_cid() != new {
        if t0.elapsed() > FAULT_BOUND {
            return Err(format!(
                "gen {}: the driver still has CID {} {FAULT_BOUND:?} after set_guest_cid({new})",
                g.id,
                g.driver.local_cid()
            ));
        }
        thread::sleep(Duration::from_millis(1));
    }
    beat.leave();
    check_gen(world, beat, g, "a transport reset")?;
    add(&world.c.transport_resets, 1);
    g.done.fetch_add(1, SeqCst);
    world.changed.notify_all();
    Ok(())
}

/// Wait, bounded by [`FAULT_BOUND`], until `done` says the driver handled the fault `what`.
fn await_driver(g: &Gen, what: &str, mut done: impl FnMut() -> bool) -> Result<(), String> {
    // A counter the driver bumps, with no event to wait on through the public API: polled.
    let t0 = Instant::now();
    while !done() {
        if t0.elapsed() > FAULT_BOUND {
            return Err(format!(
                "gen {}: the driver had not handled {what} {FAULT_BOUND:?} later",
                g.id
            ));
        }
        thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// TRANSPORT_RESET on the event queue: every connection ends, the driver goes on.
fn event_reset(world: &World, beat: &Beat, g: &Arc<Gen>) -> Result<(), String> {
    let before = g.driver.stats().transport_resets;
    g.fault_begins();
    beat.enter("transport_reset", g.id);
    g.host
        .transport_reset()
        .map_err(|e| format!("gen {}: transport_reset: {e}", g.id))?;
    await_driver(g, "TRANSPORT_RESET", || {
        g.driver.stats().transport_resets > before
    })?;
    beat.leave();
    check_gen(world, beat, g, "a TRANSPORT_RESET")?;
    add(&world.c.event_resets, 1);
    g.done.fetch_add(1, SeqCst);
    world.changed.notify_all();
    Ok(())
}

/// NEEDS_RESET: the driver resets the device, brings it up again, and goes on.
fn needs_reset(world: &World, beat: &Beat, g: &Arc<Gen>) -> Result<(), String> {
    let before = g.driver.stats().recoveries;
    g.fault_begins();
    beat.enter("set_needs_reset", g.id);
    g.host
        .set_needs_reset()
        .map_err(|e| format!("gen {}: set_needs_reset: {e}", g.id))?;
    await_driver(g, "NEEDS_RESET", || g.driver.stats().recoveries > before)?;
    beat.leave();
    check_gen(world, beat, g, "a NEEDS_RESET recovery")?;
    add(&world.c.recoveries, 1);
    g.done.fetch_add(1, SeqCst);
    world.changed.notify_all();
    Ok(())
}

/// A surprise removal: every call on the driver ends; it is replaced.
fn unplug(world: &World, beat: &Beat, g: &Arc<Gen>) -> Result<(), String> {
    g.fault_begins();
    beat.enter("unplug", g.id);
    g.host
        .unplug()
        .map_err(|e| format!("gen {}: unplug: {e}", g.id))?;
    let mut last = None;
    await_driver(g, "the removal", || {
        match g
            .driver
            .connect_timeout(VsockAddr::new(2, ECHO_PORT), CALL_TIMEOUT)
        {
            Err(e) if e.kind() == ErrorKind::ConnectionAborted => true,
            r => {
                last = Some(r.map(|_| ()).map_err(|e| e.to_string()));
                false
            }
        }
    })
    .map_err(|e| format!("{e} (last connect: {last:?})"))?;
    beat.leave();
    let n = world.open_gen(None)?;
    world.set_gen(Some(n.clone()))?;
    check_gen(world, beat, &n, "a removal")?;
    add(&world.c.unplugs, 1);
    Ok(())
}

fn device_reset(world: &World, beat: &Beat, g: &Arc<Gen>) -> Result<(), String> {
    g.fault_begins();
    beat.enter("reset_device", g.id);
    g.driver.reset_device("chaos: device reset");
    beat.leave();
    // A reset driver is dead for good: its calls fail at once, with the reason.
    match g
        .driver
        .connect_timeout(VsockAddr::new(2, ECHO_PORT), CALL_TIMEOUT)
    {
        Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
        r => {
            return Err(format!(
                "gen {}: connect after reset_device: expected ConnectionAborted, got {:?}",
                g.id,
                r.map(|_| ()).map_err(|e| e.to_string())
            ))
        }
    }
    let n = world.open_gen(None)?;
    world.set_gen(Some(n.clone()))?;
    check_gen(world, beat, &n, "a device reset")?;
    add(&world.c.device_resets, 1);
    Ok(())
}

fn hostile(world: &World, beat: &Beat, which: usize) -> Result<(), String> {
    let mode = HOSTILE[which % HOSTILE.len()];
    let h = world.open_gen(Some(mode))?;
    world.set_gen(Some(h.clone()))?;
    // Whoever touches it first (a slot or this connect) makes the device write its bogus used
    // element: the call must fail, not hang, and so must every later one.
    beat.enter("connect to a hostile device", which as u64);
    let t0 = Instant::now();
    let r = h
        .driver
        .connect_timeout(VsockAddr::new(2, ECHO_PORT), CALL_TIMEOUT);
    beat.leave();
    match r {
        Err(e) if e.kind() == ErrorKind::ConnectionAborted && t0.elapsed() < FAULT_BOUND => {}
        r => {
            return Err(format!(
                "hostile {mode:?} (gen {}): connect: expected ConnectionAborted within {FAULT_BOUND:?}, got {:?} after {:?}",
                h.id,
                r.map(|_| ()).map_err(|e| e.to_string()),
                t0.elapsed()
            ))
        }
    }
    if let Ok(_s) = h.driver.connect(VsockAddr::new(2, ECHO_PORT)) {
        return Err(format!(
            "hostile {mode:?} (gen {}): the dead driver connected",
            h.id
        ));
    }
    let n = world.open_gen(None)?;
    world.set_gen(Some(n.clone()))?;
    check_gen(world, beat, &n, &format!("a hostile device ({mode:?})"))?;
    add(&world.c.hostile[which % HOSTILE.len()], 1);
    Ok(())
}

fn faults(world: Arc<World>, round: u64) {
    let beat = world.beat(format!("faults r{round}"));
    let mut r = Rng::new(world.seed ^ mix(0xfa17 ^ round));
    let mut hostile_n = r.below(4) as usize;
    loop {
        // A random pause, cut short when the round stops.
        let pause = r.duration_ms(200, 2000);
        {
            let cur = lock(&world.current);
            let _ = world
                .changed
                .wait_timeout_while(cur, pause, |_| !world.stopping());
        }
        if world.stopping() {
            return;
        }
        let Some(g) = world.gen() else { return };
        let res = match r.below(100) {
            0..=24 => transport_reset(&world, &beat, &g),
            25..=39 => event_reset(&world, &beat, &g),
            40..=54 => needs_reset(&world, &beat, &g),
            55..=69 => device_reset(&world, &beat, &g),
            70..=79 => unplug(&world, &beat, &g),
            _ => {
                hostile_n += 1;
                hostile(&world, &beat, hostile_n)
            }
        };
        if let Err(e) = res {
            world.fail(format!("fault r{round}: {e}"));
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resources

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

// ---------------------------------------------------------------------------------------------
// The test

/// Fail the test with the first failure recorded. The threads are left behind: joining a stuck
/// one would hang the suite.
fn fail(world: &World, msg: String) -> ! {
    world.fail(msg);
    let f = lock(&world.failure).clone().unwrap_or_default();
    panic!("chaos: {f}\nsummary so far: {}", world.summary());
}

/// Make glibc give big blocks back to the system when they are freed: a fixed mmap threshold
/// (setting it turns off glibc's dynamic threshold, which after the first free of a 1 MiB
/// block would serve every later one from a thread's arena and keep it there). Without this
/// the RSS of this test measures how glibc caches hundreds of threads' 1 MiB buffers, not what
/// the library keeps.
fn release_big_blocks() {
    // SAFETY: mallopt only sets malloc's tunables; it is called before the test's threads
    // start, and any value is valid for M_MMAP_THRESHOLD up to 32 MiB.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
    assert_eq!(ok, 1, "mallopt(M_MMAP_THRESHOLD) failed");
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn chaos_soak() {
    let _ = now_ms_global();
    let _ = env_logger::try_init();
    release_big_blocks();
    let seed = env_u64("VDPA_VSOCK_SOAK_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        mix(t ^ u64::from(std::process::id()))
    });
    let secs = env_u64("VDPA_VSOCK_SOAK_SECS")
        .unwrap_or(DEFAULT_SECS)
        .max(3);
    // Rounds of about 30 s (at least three: a warm-up and two to compare with it).
    let rounds = (secs / 30).max(3);
    let round_len = Duration::from_secs(secs) / rounds as u32;
    println!(
        "chaos: seed {seed} (replay: VDPA_VSOCK_SOAK_SEED={seed}), {secs} s in {rounds} rounds of {round_len:?}, {SLOTS} connections"
    );
    let world = Arc::new(World {
        seed,
        start: Instant::now(),
        current: Mutex::new(None),
        changed: Condvar::new(),
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
        beats: Mutex::new(Vec::new()),
        c: Counters::default(),
        next_gen: AtomicU64::new(0),
        slowest_fault_end: Mutex::new(String::new()),
    });
    let t0 = Instant::now();
    let mut last_progress = Instant::now();
    let mut samples: Vec<(usize, u64)> = Vec::new();
    for round in 0..rounds {
        world.stop.store(false, SeqCst);
        let g = world.open_gen(None).unwrap_or_else(|e| fail(&world, e));
        if let Err(e) = world.set_gen(Some(g)) {
            fail(&world, e);
        }
        let mut handles = Vec::new();
        for s in 0..SLOTS {
            let w = world.clone();
            handles.push(spawn(move || slot(w, round, s)).unwrap_or_else(|e| fail(&world, e)));
        }
        let w = world.clone();
        handles.push(spawn(move || faults(w, round)).unwrap_or_else(|e| fail(&world, e)));
        let end = t0 + round_len * (round as u32 + 1);
        // Run, then stop and wait for every thread; the watchdog looks on all the while.
        let mut stopping_since = None;
        loop {
            if let Some(f) = lock(&world.failure).clone() {
                panic!("chaos: {f}\nsummary so far: {}", world.summary());
            }
            if let Some(d) = world.stuck() {
                fail(&world, format!("watchdog: {d}"));
            }
            if last_progress.elapsed() >= Duration::from_secs(10) {
                last_progress = Instant::now();
                println!(
                    "chaos: {:.0} s, round {round}: {}; RSS {} KiB, {} fds",
                    t0.elapsed().as_secs_f64(),
                    world.summary(),
                    rss_kib(),
                    open_fds()
                );
            }
            if stopping_since.is_none() && Instant::now() >= end {
                world.stop.store(true, SeqCst);
                world.changed.notify_all();
                stopping_since = Some(Instant::now());
            }
            if stopping_since.is_some() && handles.iter().all(JoinHandle::is_finished) {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        for h in handles {
            if h.join().is_err() {
                fail(&world, format!("round {round}: a thread panicked"));
            }
        }
        if let Some(f) = lock(&world.failure).clone() {
            panic!("chaos: {f}\nsummary so far: {}", world.summary());
        }
        if let Err(e) = world.set_gen(None) {
            fail(&world, format!("round {round}: {e}"));
        }
        // Every driver of the round is gone now (the last handles were the threads').
        let sample = (open_fds(), rss_kib());
        println!(
            "chaos: round {round} done after {:.0} s: {} fds, RSS {} KiB",
            t0.elapsed().as_secs_f64(),
            sample.0,
            sample.1
        );
        samples.push(sample);
    }
    let (fd0, rss0) = samples[0];
    println!("chaos: {}", world.summary());
    println!(
        "chaos: samples (fds, RSS KiB) after each round: {samples:?}; bound: fds equal to the warm-up's {fd0}, RSS at most {rss0} + {RSS_SLACK_KIB} KiB"
    );
    for (i, &(fds, rss)) in samples.iter().enumerate().skip(1) {
        assert_eq!(
            fds, fd0,
            "open fds after round {i} differ from the warm-up's (seed {seed}): {samples:?}"
        );
        assert!(
            rss <= rss0 + RSS_SLACK_KIB,
            "RSS after round {i} grew by {} KiB over the warm-up's (seed {seed}): {samples:?}",
            rss - rss0
        );
    }
    let c = &world.c;
    assert!(load(&c.conns_clean) > 0, "no connection completed cleanly");
    assert!(
        load(&c.transport_resets)
            + load(&c.event_resets)
            + load(&c.recoveries)
            + load(&c.unplugs)
            + load(&c.device_resets)
            + c.hostile.iter().map(load).sum::<u64>()
            > 0,
        "no fault was injected"
    );
}
