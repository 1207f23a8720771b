// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A scripted device for tests of the [`Core`] without a device or the sim: a [`Transport`]
//! whose `pump` swallows what the endpoint sends (recording the ops and the payload bytes) and
//! then delivers the next [`Step`] of a script: what a peer would send (`RESPONSE`, `REQUEST`,
//! `RW` with payload, `CREDIT_UPDATE`, `SHUTDOWN`, `RST`), a wake-up with nothing in it, or the
//! device's death (`pump` fails). One step per pump, whoever pumps: the loop thread, or a user
//! call that runs the transport itself (`kick`, busy-poll).
//!
//! A script may also be gated, as a real device's traffic is: a step is delivered only once
//! the peer has made it arrive ([`Rig::arrive`]), and under `cfg(loom)` its arrival raises the
//! rx interrupt of the leader's stand-in (`irq/model.rs`), so that the models run the leader
//! hand-off (`irq.rs`): a core made with [`Setup::leader`] has that stand-in attached, and its
//! transport's `wake` writes the stand-in's loop waker.
//!
//! The loom models (`loom_tests.rs`) run on it; so do the regression tests at the end of this
//! file, in normal builds, for what those models found. Payload lives on the heap (the sim
//! host's storage), or in a driver's DMA pools over a small [`DmaRegion`] when a test needs the
//! unlocked copies.

use std::collections::VecDeque;
use std::io;
use std::sync::Mutex as StdMutex;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress};

use super::core::{Core, RtEndpoint, Transport};
use super::error::TransportError;
#[cfg(loom)]
use super::irq::model::{Line, Lines};
#[cfg(loom)]
use super::irq::IrqWait;
use super::storage::{DmaStorage, RtStorage, RxPool, TxPool, TX_CHUNK};
use super::sync::atomic::{AtomicUsize, Ordering};
use super::sync::Arc;
use crate::dma::{DmaOptions, DmaRegion, IovaBase};
use crate::packet::{Header, Op, SocketType, PKT_HEADER_SIZE, VMADDR_CID_HOST};
use crate::proto::{Config, ConnId, ConnState};

/// Our CID in every model.
pub(crate) const CID: u64 = 3;
/// The peer's port for the connections we open.
pub(crate) const PEER_PORT: u32 = 5000;
/// The port our listeners listen on.
pub(crate) const LISTEN_PORT: u32 = 6000;
/// The peer's port for the connections it opens to us.
pub(crate) const PEER_CLIENT_PORT: u32 = 7000;

/// What the scripted peer (or device) does at a pump, in script order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    not(loom),
    allow(
        dead_code,
        reason = "the loom models use every step; normal builds a few"
    )
)]
pub(crate) enum Step {
    /// `RESPONSE` to our last `REQUEST` (waits until one was sent).
    Response,
    /// `REQUEST` to our listener on [`LISTEN_PORT`].
    Request,
    /// `RW` with this payload.
    Data(Vec<u8>),
    /// `RW` with this payload on the connection of our n-th `REQUEST` (0: the first).
    DataOn(usize, Vec<u8>),
    /// `CREDIT_UPDATE` advertising this receive buffer (and every byte we sent as consumed).
    Credit(u32),
    /// `SHUTDOWN` with both flags (the peer will neither send nor receive).
    Shutdown,
    /// `RST`.
    Rst,
    /// The device signalled, but brought nothing (a spurious wake-up).
    Nothing,
    /// The device dies: `pump` fails.
    Fail,
}

/// What the fake device saw and did; shared with the model, which inspects it after its
/// threads joined (or under the core's lock). It is touched only from `Transport` calls, all
/// made under the core's lock, so a std mutex (never contended, no scheduling point) keeps it.
/// loom does not see it: what another thread changes without the core's lock must be a loom
/// object, or loom would not explore both orders (and a thread that blocked on this lock while
/// a pump held it would hang the model); hence [`Gate`].
#[derive(Debug)]
pub(crate) struct DeviceLog {
    pub(crate) script: VecDeque<Step>,
    /// The connection the peer knows: (our port, its port).
    pub(crate) conn: Option<(u32, u32)>,
    /// Every connection we opened, in order of their `REQUEST`s.
    pub(crate) conns: Vec<(u32, u32)>,
    /// The script is gated ([`Gate`]): set before any model thread starts.
    pub(crate) gated: bool,
    /// The ops we sent, in order.
    pub(crate) ops: Vec<Op>,
    /// Every payload byte we sent, in order (the peer consumes at once).
    pub(crate) received: Vec<u8>,
    /// The peer's receive buffer, advertised in every header it sends.
    pub(crate) buf_alloc: u32,
    /// What `set_polling` said last.
    pub(crate) polling: bool,
    /// `shutdown` was called: the device must not be pumped again.
    pub(crate) shut_down: bool,
    /// `wake` calls.
    pub(crate) wakes: usize,
}

impl DeviceLog {
    fn new(script: Vec<Step>, buf_alloc: u32, polling: bool) -> Arc<StdMutex<DeviceLog>> {
        Arc::new(StdMutex::new(DeviceLog {
            script: script.into(),
            conn: None,
            conns: Vec::new(),
            gated: false,
            ops: Vec::new(),
            received: Vec::new(),
            buf_alloc,
            polling,
            shut_down: false,
            wakes: 0,
        }))
    }

    /// A header from the peer on the connection it knows.
    fn header(&self, op: Op, (ours, peer): (u32, u32)) -> Header {
        Header {
            src_cid: VMADDR_CID_HOST,
            dst_cid: CID,
            src_port: peer,
            dst_port: ours,
            len: 0,
            type_: SocketType::Stream as u16,
            op: op as u16,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: u32::try_from(self.received.len()).unwrap_or(u32::MAX),
        }
    }
}

/// The steps of a gated script that arrived and are not delivered yet: what a real device's
/// used ring holds. A peer thread adds to it with no lock of the core's, so it is an atomic
/// of the shim's (a loom one in the models).
#[derive(Debug)]
pub(crate) struct Gate(AtomicUsize);

impl Gate {
    /// Nothing arrived yet.
    fn new() -> Gate {
        Gate(AtomicUsize::new(0))
    }

    /// A step arrived.
    #[cfg_attr(
        not(loom),
        allow(dead_code, reason = "only the loom models gate a script")
    )]
    fn arrive(&self) {
        self.0.fetch_add(1, Ordering::Release);
    }

    /// Take an arrived step to deliver; false when none has.
    fn take(&self) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }
}

pub(crate) fn log_of(log: &Arc<StdMutex<DeviceLog>>) -> std::sync::MutexGuard<'_, DeviceLog> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// The scripted device (see the module docs).
pub(crate) struct FakeDevice {
    log: Arc<StdMutex<DeviceLog>>,
    /// A gated script's arrived steps.
    gate: Arc<Gate>,
    /// The DMA region of a driver's storage (payload is on the heap when `None`).
    dma: Option<Arc<DmaRegion>>,
    /// The RX pool of a driver's storage.
    rx_pool: Option<Arc<RxPool>>,
    /// The leader's interrupts (a core made with [`Setup::leader`]): `wake` writes the loop's
    /// waker there.
    #[cfg(loom)]
    lines: Option<Arc<Lines>>,
}

impl FakeDevice {
    /// Take everything the endpoint has to send; true if there was anything.
    fn swallow(&self, ep: &mut RtEndpoint, now: Instant, log: &mut DeviceLog) -> bool {
        let mut moved = false;
        loop {
            let sent = ep.poll_transmit_with(now, usize::MAX, |h, q| {
                let mut bytes = Vec::new();
                match (q, &self.dma) {
                    (Some(q), None) => {
                        if let Some(q) = q.as_heap() {
                            q.take_with(h.len as usize, |_, piece| bytes.extend_from_slice(piece));
                        }
                    }
                    (Some(q), Some(dma)) => {
                        if let Some(seg) = q.as_dma().and_then(|q| q.take_segment(h.len as usize)) {
                            bytes.resize(seg.len as usize, 0);
                            dma.memory()
                                .read_slice(&mut bytes, seg.addr)
                                .expect("a TX segment lies in the DMA region");
                            // Dropping the segment is the device returning its descriptor.
                        }
                    }
                    (None, _) => {}
                }
                (*h, bytes)
            });
            let Some((h, bytes)) = sent else {
                return moved;
            };
            moved = true;
            let op = Op::try_from(h.op).expect("the endpoint sends known ops");
            if op == Op::Request {
                log.conn = Some((h.src_port, h.dst_port));
                log.conns.push((h.src_port, h.dst_port));
            }
            log.ops.push(op);
            log.received.extend_from_slice(&bytes);
        }
    }

    /// Hand `data` to the endpoint as the payload of `h`.
    fn deliver(&self, ep: &mut RtEndpoint, now: Instant, h: &Header, data: &[u8]) {
        match (&self.dma, &self.rx_pool) {
            (Some(dma), Some(pool)) => {
                let buf = pool.alloc().expect("the model's RX pool has a free buffer");
                let at = GuestAddress(buf.addr().0 + PKT_HEADER_SIZE as u64);
                dma.memory()
                    .write_slice(data, at)
                    .expect("an RX buffer lies in the DMA region");
                ep.handle_packet_with(now, h, data.len(), |rx| {
                    if let Some(rx) = rx.as_dma() {
                        rx.push(buf, PKT_HEADER_SIZE, data.len());
                    }
                });
            }
            _ => ep.handle_packet_with(now, h, data.len(), |rx| {
                if let Some(rx) = rx.as_heap() {
                    rx.push(data);
                }
            }),
        }
    }
}

impl Transport for FakeDevice {
    fn pump(&mut self, ep: &mut RtEndpoint, now: Instant) -> Result<bool, TransportError> {
        let log = self.log.clone();
        let mut log = log_of(&log);
        assert!(!log.shut_down, "the device was pumped after its shutdown");
        let mut moved = self.swallow(ep, now, &mut log);
        let Some(step) = log.script.front().cloned() else {
            return Ok(moved);
        };
        let conn = match &step {
            Step::DataOn(n, _) => log.conns.get(*n).copied(),
            _ => log.conn,
        };
        match (&step, conn) {
            // A RESPONSE waits for the REQUEST it answers; everything else but a REQUEST needs
            // a connection the peer knows.
            (Step::Response, None) => return Ok(moved),
            (Step::Request | Step::Nothing | Step::Fail, _) | (_, Some(_)) => {}
            (_, None) => panic!("script step {step:?} without a connection"),
        }
        if log.gated && !self.gate.take() {
            // The next step has not arrived.
            return Ok(moved);
        }
        log.script.pop_front();
        moved = true;
        match step {
            Step::Response => {
                let h = log.header(Op::Response, conn.expect("checked above"));
                self.deliver(ep, now, &h, &[]);
            }
            Step::Request => {
                let ids = (LISTEN_PORT, PEER_CLIENT_PORT);
                log.conn = Some(ids);
                let h = log.header(Op::Request, ids);
                self.deliver(ep, now, &h, &[]);
            }
            Step::Data(data) | Step::DataOn(_, data) => {
                let mut h = log.header(Op::Rw, conn.expect("checked above"));
                h.len = u32::try_from(data.len()).expect("a small payload");
                self.deliver(ep, now, &h, &data);
            }
            Step::Credit(buf_alloc) => {
                log.buf_alloc = buf_alloc;
                let h = log.header(Op::CreditUpdate, conn.expect("checked above"));
                self.deliver(ep, now, &h, &[]);
            }
            Step::Shutdown => {
                let mut h = log.header(Op::Shutdown, conn.expect("checked above"));
                h.flags = 3;
                self.deliver(ep, now, &h, &[]);
            }
            Step::Rst => {
                let h = log.header(Op::Rst, conn.expect("checked above"));
                self.deliver(ep, now, &h, &[]);
            }
            Step::Nothing => {}
            Step::Fail => {
                return Err(TransportError::EventLoop {
                    op: "the model's scripted device failure",
                    source: io::Error::other("the device died"),
                })
            }
        }
        // The endpoint may answer at once (a credit update, a RST to a REQUEST nobody takes).
        self.swallow(ep, now, &mut log);
        Ok(moved)
    }

    fn wake(&self) {
        log_of(&self.log).wakes += 1;
        #[cfg(loom)]
        if let Some(lines) = &self.lines {
            lines.wake_loop();
        }
    }

    fn shutdown(&mut self) {
        log_of(&self.log).shut_down = true;
    }

    fn set_polling(&mut self, polling: bool) {
        log_of(&self.log).polling = polling;
    }
}

/// How a model's core is set up.
pub(crate) struct Setup {
    pub(crate) script: Vec<Step>,
    pub(crate) busy_poll: bool,
    /// The peer's receive buffer (our credit).
    pub(crate) peer_buf_alloc: u32,
    /// Our per-connection send buffer.
    pub(crate) send_buffer: usize,
    /// Payload in a driver's DMA pools rather than on the heap.
    pub(crate) dma: bool,
    /// Connections [`Setup::connected`] opens (1 when 0).
    pub(crate) conns: usize,
    /// Let blocked callers lead over the stand-in of the leader's interrupts, and gate the
    /// script (see the module docs).
    #[cfg(loom)]
    pub(crate) leader: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            script: Vec::new(),
            busy_poll: false,
            peer_buf_alloc: 64 * 1024,
            send_buffer: 64 * 1024,
            dma: false,
            conns: 1,
            #[cfg(loom)]
            leader: false,
        }
    }
}

/// A model's core over its fake device, and the device's log.
pub(crate) struct Rig {
    pub(crate) core: Arc<Core>,
    pub(crate) log: Arc<StdMutex<DeviceLog>>,
    /// A gated script's arrived steps.
    #[cfg_attr(
        not(loom),
        allow(dead_code, reason = "only the loom models gate a script")
    )]
    gate: Arc<Gate>,
    /// The leader's interrupts (a core made with [`Setup::leader`]).
    #[cfg(loom)]
    pub(crate) lines: Option<Arc<Lines>>,
}

impl Setup {
    pub(crate) fn core(self) -> Rig {
        let config = Config {
            local_cid: CID,
            send_buffer: self.send_buffer,
            ..Config::default()
        };
        let log = DeviceLog::new(self.script, self.peer_buf_alloc, self.busy_poll);
        let (storage, dma, rx_pool) = if self.dma {
            let dma = Arc::new(
                DmaRegion::new(&DmaOptions {
                    size: 4 * TX_CHUNK,
                    iova: IovaBase::Fixed(0x10_0000),
                    hugetlb: false,
                    lock: false,
                })
                .expect("a small DMA region maps"),
            );
            let storage = DmaStorage {
                tx_pool: TxPool::new(&dma, 2 * TX_CHUNK).expect("TX pool"),
                rx_pool: RxPool::new(&dma, 4, 8 * 1024 + 44, 2).expect("RX pool"),
                counters: Arc::default(),
            };
            let rx_pool = storage.rx_pool.clone();
            (RtStorage::Dma(storage), Some(dma), Some(rx_pool))
        } else {
            (RtStorage::Heap, None, None)
        };
        let ep = RtEndpoint::with_storage(config, storage);
        #[cfg(loom)]
        let lines = self.leader.then(Lines::new);
        let gate = Arc::new(Gate::new());
        let device = FakeDevice {
            log: log.clone(),
            gate: gate.clone(),
            dma,
            rx_pool,
            #[cfg(loom)]
            lines: lines.clone(),
        };
        let core = Core::new(ep, Box::new(device), self.busy_poll).expect("a core");
        #[cfg(loom)]
        if let Some(lines) = &lines {
            core.attach_irq(IrqWait::model(lines.clone()));
        }
        Rig {
            core,
            log,
            gate,
            #[cfg(loom)]
            lines,
        }
    }

    /// A core with one established connection (set up before any thread starts); the script
    /// starts once it is.
    pub(crate) fn connected(self) -> (Rig, ConnId) {
        let (rig, c) = self.connected_all();
        (rig, c[0])
    }

    /// A core with [`Setup::conns`] established connections (set up before any thread
    /// starts), in order of their `REQUEST`s; the script starts once they are, gated when
    /// [`Setup::leader`] says.
    pub(crate) fn connected_all(mut self) -> (Rig, Vec<ConnId>) {
        let script = std::mem::take(&mut self.script);
        let n = self.conns.max(1);
        #[cfg(loom)]
        let gated = self.leader;
        #[cfg(not(loom))]
        let gated = false;
        let rig = self.core();
        let c = (0..n).map(|_| rig.connect()).collect();
        let mut log = rig.log();
        log.script.extend(script);
        if gated {
            log.gated = true;
        }
        drop(log);
        #[cfg(loom)]
        if let Some(lines) = &rig.lines {
            lines.clear_loop_waker();
        }
        (rig, c)
    }
}

impl Rig {
    /// Open a connection to the peer and establish it (the peer answers before any other
    /// step of the script); the script's steps go to it from then on.
    pub(crate) fn connect(&self) -> ConnId {
        self.log().script.push_front(Step::Response);
        let c = self
            .core
            .connect(
                (VMADDR_CID_HOST, PEER_PORT),
                None,
                SocketType::Stream,
                None,
                true,
            )
            .expect("connect");
        while self.log().script.front() == Some(&Step::Response) {
            assert!(self.pump(), "the device answers the REQUEST");
        }
        assert_eq!(self.core.lock().ep.state(c), Some(ConnState::Connected));
        c
    }

    /// One round of the device, as the loop thread runs it.
    pub(crate) fn pump(&self) -> bool {
        let mut st = self.core.lock();
        Core::pump_locked(&mut st, Instant::now())
    }

    /// Pump until nothing moves (after the threads joined).
    pub(crate) fn settle(&self) {
        for _ in 0..16 {
            if !self.pump() {
                return;
            }
        }
        panic!("the device never went quiet");
    }

    pub(crate) fn log(&self) -> std::sync::MutexGuard<'_, DeviceLog> {
        log_of(&self.log)
    }

    /// The leader's interrupts of a core made with [`Setup::leader`].
    #[cfg(loom)]
    pub(crate) fn lines(&self) -> Arc<Lines> {
        self.lines
            .clone()
            .expect("a core made with Setup::leader has the leader's interrupts")
    }

    /// The peer's next step arrives (a gated script): the device makes it available, then
    /// raises the rx interrupt, as a device writes the used ring before it signals.
    #[cfg(loom)]
    pub(crate) fn arrive(&self) {
        // Not `self.log()`: a pump holds it across loom operations (the gate's among them),
        // and a thread blocked on a std mutex is one loom believes runs.
        self.gate.arrive();
        self.lines().raise(Line::Rx);
    }
}

/// Regression tests (normal builds) for what the loom models found. They cannot see a wait
/// itself, so they time rounds that would each wait for the core's 100 ms re-check if a
/// wake-up were missing, and bound the median round far below that.
#[cfg(all(test, not(loom)))]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::runtime::Wait;

    /// A position-dependent byte pattern (reordering or loss shows).
    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from(i % 251).unwrap_or(0))
            .collect()
    }

    /// Rounds each test makes: a missed wake-up costs each round the core's 100 ms re-check.
    const ROUNDS: usize = 40;
    /// The bound on the median round: half the re-check a missed wake-up costs every round,
    /// and far above a round when nothing waits. The median, not the total: on a loaded
    /// machine a few rounds lose the CPU for tens of milliseconds (40 rounds once took 406 ms
    /// in all), which says nothing about wake-ups; a missed wake-up slows every round.
    const WOKEN: Duration = Duration::from_millis(50);

    /// The middle of `rounds` (sorted in place).
    fn median(rounds: &mut [Duration]) -> Duration {
        rounds.sort_unstable();
        rounds[rounds.len() / 2]
    }

    /// A write of many send buffers to a device that takes each at once (the writer's own kick
    /// sends it) never waits: the room its kick made is used at once. Before the fix every
    /// round after the first slept until the re-check (the `Writable` the kick raised came
    /// before the wait), so a 1 MiB write to the sim's discard service took 300 ms.
    #[test]
    fn regression_a_write_larger_than_the_send_buffer_does_not_wait_for_its_own_kick() {
        const BUF: usize = 16;
        let (rig, c) = Setup {
            send_buffer: BUF,
            ..Setup::default()
        }
        .connected();
        // Each write is one and a half send buffers: it must refill the buffer once.
        let data = pattern(BUF * 3 / 2 * ROUNDS);
        let mut rounds = Vec::with_capacity(ROUNDS);
        for chunk in data.chunks(BUF * 3 / 2) {
            let t0 = Instant::now();
            assert_eq!(
                rig.core.write(c, chunk, Wait::Forever).expect("write"),
                chunk.len()
            );
            rounds.push(t0.elapsed());
        }
        rig.settle();
        assert_eq!(rig.log().received, data);
        let mid = median(&mut rounds);
        assert!(
            mid < WOKEN,
            "the median of {ROUNDS} writes took {mid:?}: writes wait for their own kick"
        );
    }

    /// The same through `write_vectored`.
    #[test]
    fn regression_a_vectored_write_larger_than_the_send_buffer_does_not_wait_for_its_own_kick() {
        const BUF: usize = 16;
        let (rig, c) = Setup {
            send_buffer: BUF,
            ..Setup::default()
        }
        .connected();
        // Each write is one and a half send buffers in three slices: it must refill the buffer
        // once.
        let data = pattern(BUF * 3 / 2 * ROUNDS);
        let mut rounds = Vec::with_capacity(ROUNDS);
        for chunk in data.chunks(BUF * 3 / 2) {
            let bufs: Vec<io::IoSlice<'_>> = chunk.chunks(BUF / 2).map(io::IoSlice::new).collect();
            let t0 = Instant::now();
            assert_eq!(
                rig.core
                    .write_vectored(c, &bufs, Wait::Forever)
                    .expect("write"),
                chunk.len()
            );
            rounds.push(t0.elapsed());
        }
        rig.settle();
        assert_eq!(rig.log().received, data);
        let mid = median(&mut rounds);
        assert!(
            mid < WOKEN,
            "the median of {ROUNDS} writes took {mid:?}: writes wait for their own kick"
        );
    }

    /// Our `shutdown(Read)` from another thread wakes a reader asleep on the connection at
    /// once. Before the fix nothing notified it: it saw the end of stream only at the 100 ms
    /// re-check. The reader is on a busy-poll core, so that it is known to be asleep (it turned
    /// the device's notifications on) before the shutdown.
    #[test]
    fn regression_our_shutdown_wakes_a_blocked_reader_at_once() {
        let rig = Setup {
            busy_poll: true,
            ..Setup::default()
        }
        .core();
        let mut rounds = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let c = rig.connect();
            let core = rig.core.clone();
            let reader = std::thread::spawn(move || {
                let r = core.read(c, &mut [0u8; 8], Wait::Forever);
                (r, Instant::now())
            });
            // Asleep: notifications on (the sleeper turned polling off), under the core's lock
            // until it waits.
            while rig.log().polling {
                std::thread::yield_now();
            }
            let t0 = Instant::now();
            rig.core
                .shutdown(c, std::net::Shutdown::Read)
                .expect("shutdown");
            let (r, woke) = reader.join().unwrap();
            assert_eq!(r.expect("read"), 0, "end of stream");
            rounds.push(woke.saturating_duration_since(t0));
            assert!(
                rig.log().polling,
                "the woken reader turned notifications off again"
            );
            rig.core.close(c);
        }
        let mid = median(&mut rounds);
        assert!(
            mid < WOKEN,
            "the median reader woke {mid:?} after the shutdown: the shutdown woke nobody"
        );
    }
}
