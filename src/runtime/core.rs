// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The shared core: one protocol [`Endpoint`] behind a mutex, plus what blocked callers wait on.
//!
//! Whoever moves packets for that endpoint (the driver's event loop, or the simulated device's
//! host side) is a [`Transport`]: after every user call the core wakes it, and after every batch
//! it processes the core routes the endpoint's events to the waiting callers (one condition
//! variable per connection, so 1,000 connections do not wake each other). The sockets are thin
//! handles on a core; this file is where a blocking call blocks.
//!
//! In busy-poll mode nobody sleeps: a blocked caller runs the transport itself in a spin loop
//! (run-to-completion, as DPDK does), which removes the thread hand-offs from the latency path.

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use super::error::{error_chain, Ended, ResetCause, TransportError};
use super::event_loop::MAX_PUMP_ROUNDS;
use super::irq::IrqWait;
use super::poller::{Interest, PollQueue, PollReg};
use super::readiness::{Notifier, ReadyFd, UserFd};
use super::stats::DriverStats;
use super::storage::{RtStorage, RtTx};
use super::sync::{self, Arc, Condvar, Mutex, MutexGuard};
use crate::packet::{ShutdownFlags, SocketType};
use crate::proto::storage::TxBuf;
use crate::proto::{shrink_sparse, ConnId, Endpoint, Event, ListenerId, ProtoError, Readiness};
use vm_memory::VolatileSlice;

/// The endpoint of a core: payload in DMA memory (a driver) or on the heap (the sim's host).
pub(crate) type RtEndpoint = Endpoint<RtStorage>;

/// Whoever moves packets between an endpoint and a device.
pub(crate) trait Transport: Send {
    /// Move packets both ways once, without blocking. Returns whether anything moved.
    /// An error means the device is dead: the core ends every connection with it.
    fn pump(&mut self, ep: &mut RtEndpoint, now: Instant) -> Result<bool, TransportError>;
    /// Wake the thread that runs this transport (new data to send, a timer changed).
    fn wake(&self);
    /// Stop the device: it must not touch the rings afterwards.
    fn shutdown(&mut self);
    /// The device raised its config interrupt: re-read what the configuration decides (the
    /// driver's CID). An error means the device is dead, as for [`Transport::pump`].
    fn config_changed(
        &mut self,
        _ep: &mut RtEndpoint,
        _now: Instant,
    ) -> Result<(), TransportError> {
        Ok(())
    }
    /// The transport failed with `e` (from [`Transport::pump`] or
    /// [`Transport::config_changed`]): reset the device and bring it up again, ending every
    /// connection (listeners stay). `Err` when it cannot (the default: `e` itself); the core
    /// then ends for good.
    fn recover(
        &mut self,
        _ep: &mut RtEndpoint,
        _now: Instant,
        e: TransportError,
    ) -> Result<(), TransportError> {
        Err(e)
    }
    /// Whether the device is still there: `removal_signalled` says its removal eventfd fired.
    /// An error is final (no recovery): the core ends and [`Transport::release`]s the device.
    fn check_device(&mut self, _removal_signalled: bool) -> Result<(), TransportError> {
        Ok(())
    }
    /// The device is being removed but may still work: put out what the endpoint has to send
    /// (the RSTs of every connection) and give the device a short, bounded time to take it.
    /// Errors are ignored: the device may already be gone.
    fn farewell(&mut self, _ep: &mut RtEndpoint, _now: Instant) {}
    /// Let go of a removed device (close its descriptors); called after [`Transport::shutdown`].
    fn release(&mut self) {}
    /// Why the transport reset every connection in the call just made (a TRANSPORT_RESET, a
    /// new CID, a recovery), taken: the core attaches it to each connection's reset.
    fn take_reset_cause(&mut self) -> Option<ResetCause> {
        None
    }
    /// `true`: ask the device not to notify (its buffers are polled by spinning threads);
    /// `false`: notifications on, so a thread asleep on them is woken. Only busy-poll cores
    /// switch it, when every spinning caller has run out of its spin budget.
    fn set_polling(&mut self, _polling: bool) {}
    /// The driver's data-path counters (a driver's transport only).
    fn driver_stats(&self) -> Option<DriverStats> {
        None
    }
}

/// The endpoint's state as callers see it.
pub(crate) struct CoreState {
    pub(crate) ep: RtEndpoint,
    transport: Box<dyn Transport>,
    /// Set when the device died or was reset: every blocked call ends with this (shared, as the
    /// inner error of each call's `io::Error`).
    pub(crate) dead: Option<Arc<Ended>>,
    conn_wait: HashMap<ConnId, Arc<Condvar>>,
    listen_wait: HashMap<ListenerId, Arc<Condvar>>,
    /// Connections whose connect attempt ended: Ok, or the error.
    connect_result: HashMap<ConnId, Result<(), ProtoError>>,
    /// Connections reset by the peer or the transport (reads drain first, then
    /// ConnectionReset), with why when the transport said.
    reset: HashMap<ConnId, Option<Arc<ResetCause>>>,
    /// The readiness descriptors of the connections and listeners that were asked for one
    /// (`readiness.rs`): kept showing what each is ready for after every call and event.
    /// Their edge notifiers too, for sockets registered with an edge-triggered poller (the
    /// tokio API).
    shown: HashMap<Target, Shown>,
    /// Per-connection write locks: a write holds its connection's while it copies with the
    /// core's lock let go, so that writes to one connection stay in order.
    writers: HashMap<ConnId, Arc<Mutex<()>>>,
    /// Connections with callers blocked in `flush` (how many each): checked after every round
    /// of the rings.
    flushing: HashMap<ConnId, usize>,
    /// Receive low-water marks above 1 (`SO_RCVLOWAT`).
    rcvlowat: HashMap<ConnId, usize>,
    /// Busy-poll threads asleep (out of their spin budget): notifications are on while > 0.
    sleepers: usize,
    /// How long busy-poll callers spin before they sleep.
    spin: SpinBudget,
    /// What lets a blocked caller wait on the device's interrupts itself (`irq.rs`): a
    /// driver's core in eventfd mode.
    irq: Option<Arc<IrqWait>>,
    /// The call whose caller leads (waits on the interrupts; see `irq.rs`).
    leader: Option<Target>,
    /// The protocol timer the loop thread last planned to wake for (`None`: none). A caller
    /// that pumps and leaves an earlier one wakes the loop ([`Core::timer_check`]).
    pub(crate) loop_timer: Option<Instant>,
}

impl CoreState {
    /// The transport's data-path counters, when it is a driver's.
    pub(crate) fn transport_stats(&self) -> Option<DriverStats> {
        self.transport.driver_stats()
    }

    /// Interrupts blocked callers waited on and handled themselves (`irq.rs`).
    pub(crate) fn caller_interrupts(&self) -> u64 {
        self.irq.as_ref().map_or(0, |irq| irq.taken())
    }

    /// A blocked caller leads now (waits on the device's interrupts itself).
    #[cfg(test)]
    pub(crate) fn has_leader(&self) -> bool {
        self.leader.is_some()
    }
}

impl std::fmt::Debug for CoreState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreState")
            .field("ep", &self.ep)
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

/// One endpoint and its waiters. Shared by every socket of a driver (or of the sim's host side).
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) state: Mutex<CoreState>,
    /// Spin (run the transport in the caller) instead of sleeping.
    busy_poll: bool,
    /// The descriptor a socket hands out when it cannot get one of its own (no descriptor
    /// left): hung up with an error, so a poller wakes at once and the call it then makes
    /// tells it what is wrong, rather than waiting forever.
    failed_fd: UserFd,
}

/// How long a call may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Until it can complete (or the device dies).
    Forever,
    /// Until then, and then `TimedOut`.
    Until(Instant),
    /// Not at all: `WouldBlock` at once (non-blocking mode).
    Never,
}

impl Wait {
    /// A socket's wait for a call: non-blocking, or its timeout from now (one too long for
    /// the clock to represent is no deadline at all, as the protocol's timers treat it).
    pub(crate) fn new(nonblocking: bool, timeout: Option<Duration>) -> Wait {
        match (nonblocking, timeout) {
            (true, _) => Wait::Never,
            (false, Some(t)) => Instant::now()
                .checked_add(t)
                .map_or(Wait::Forever, Wait::Until),
            (false, None) => Wait::Forever,
        }
    }

    fn deadline(self) -> Option<Instant> {
        match self {
            Wait::Until(d) => Some(d),
            _ => None,
        }
    }
}

/// Whether a blocked call may lead: wait on the device's interrupts itself (`irq.rs`).
///
/// Calls waiting for something to arrive (data, a connection, the handshake's answer) may:
/// that is the latency path, and a reply then wakes the thread that waits for it. Calls
/// waiting for room (writes, flush, a lingering close) may not: what frees room (TX
/// completions, the peer's credit) is then the loop thread's to handle, on another core, while
/// the writer copies its next bytes. A leading writer did all of it in turn itself, and one
/// way over sim fell from 42-50 to 26-27 Gbit/s (`examples/oneway.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lead {
    /// The call may lead.
    May,
    /// The call sleeps on its condition variable; the loop thread (or a leader) wakes it.
    No,
}

/// What a call's readiness descriptor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Target {
    /// A stream or seqpacket connection.
    Conn(ConnId),
    /// A listener.
    Listener(ListenerId),
}

/// How one socket's readiness is shown: its descriptor for `poll(2)`, its edge notifier for
/// tokio, its registration with a driver-level poller (`poller.rs`), or any of them (each made
/// when first asked for).
#[derive(Debug, Default)]
struct Shown {
    fd: Option<ReadyFd>,
    notifier: Option<Notifier>,
    polled: Option<PollReg>,
}

impl Shown {
    fn show(&mut self, r: Readiness) {
        if let Some(fd) = &mut self.fd {
            fd.show(r);
        }
        if let Some(n) = &mut self.notifier {
            n.show(r);
        }
        if let Some(p) = &mut self.polled {
            p.show(r);
        }
    }

    fn is_empty(&self) -> bool {
        self.fd.is_none() && self.notifier.is_none() && self.polled.is_none()
    }
}

/// The longest a busy-poll caller (or a spinning loop thread) spins without progress before it
/// sleeps as in eventfd mode, with the device's notifications turned back on: on a machine with
/// no spare core a spinner only takes time from the thread it waits for. The budget in force
/// adapts ([`SpinBudget`]).
pub(crate) const SPIN_BUDGET: Duration = Duration::from_micros(50);

/// The shortest budget: about one round of the rings, then sleep.
const SPIN_BUDGET_MIN: Duration = Duration::from_micros(2);

/// An adaptive spin budget, as adaptive mutexes have: a spin that ended in progress doubles it
/// (up to [`SPIN_BUDGET`]); one that ran out halves it (down to 2 us). On an idle machine the
/// peer answers within the budget and spinning stays; where cores are short (a compile beside
/// us) spins run out, the budget shrinks, and the spinner behaves nearly as eventfd mode.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SpinBudget(Duration);

impl Default for SpinBudget {
    fn default() -> Self {
        SpinBudget(SPIN_BUDGET)
    }
}

impl SpinBudget {
    /// How long to spin now.
    pub(crate) fn get(self) -> Duration {
        self.0
    }
    /// Progress came while spinning.
    pub(crate) fn hit(&mut self) {
        self.0 = (self.0 * 2).min(SPIN_BUDGET);
    }
    /// The spin ran out: sleeping was needed.
    pub(crate) fn miss(&mut self) {
        self.0 = (self.0 / 2).max(SPIN_BUDGET_MIN);
    }
}

/// Within [`SPIN_BUDGET`], a spinner first only spins; past this it yields the core between
/// rounds, so that the thread it waits for (the peer, the device) can run where there is no
/// spare core. An idle machine answers a 64-byte ping in about 3 us.
pub(crate) const SPIN_BEFORE_YIELD: Duration = Duration::from_micros(20);

/// One round of waiting in a spin loop that started `idle` ago.
pub(crate) fn spin_pause(idle: Duration) {
    if idle < SPIN_BEFORE_YIELD {
        sync::spin_loop();
    } else {
        sync::yield_now();
    }
}

/// Reads and writes of at least this many bytes copy payload with the core's lock let go
/// (smaller ones copy under it: a second round of the lock would cost more than the copy).
pub(crate) const UNLOCKED_COPY_MIN: usize = 4096;

/// Transport rounds a user call runs itself after queueing data (see [`Core::kick`]). Only a
/// round that moves nothing proves nothing is left; with 2, a reply that came during the second
/// round (the sim answers a ping that fast) woke the loop thread for work already done: 0.4
/// loop wake-ups per 64-byte round trip, none with 4 (`examples/pingpong.rs`).
const CALLER_PUMP_ROUNDS: u32 = 4;

/// How long a sleeping caller waits before re-checking by itself (a safety net only: every
/// state change notifies).
const WAIT_SLICE: Duration = Duration::from_millis(100);

impl Core {
    /// A core; fails only when no file descriptor is left (for the hung-up readiness
    /// descriptor every core keeps).
    pub(crate) fn new(
        ep: RtEndpoint,
        transport: Box<dyn Transport>,
        busy_poll: bool,
    ) -> io::Result<Arc<Core>> {
        let mut failed = ReadyFd::new()?;
        failed.show(Readiness {
            error: true,
            ..Readiness::default()
        });
        Ok(Arc::new(Core {
            state: Mutex::new(CoreState {
                ep,
                transport,
                dead: None,
                conn_wait: HashMap::new(),
                listen_wait: HashMap::new(),
                connect_result: HashMap::new(),
                reset: HashMap::new(),
                shown: HashMap::new(),
                writers: HashMap::new(),
                flushing: HashMap::new(),
                rcvlowat: HashMap::new(),
                sleepers: 0,
                spin: SpinBudget::default(),
                irq: None,
                leader: None,
                loop_timer: None,
            }),
            busy_poll,
            failed_fd: failed.user(),
        }))
    }

    /// Let blocked callers lead: wait on the device's interrupts themselves, one at a time,
    /// instead of a hand-off through the loop thread (`irq.rs`). Not in busy-poll mode, where
    /// callers run the rings themselves.
    pub(crate) fn attach_irq(&self, irq: IrqWait) {
        if !self.busy_poll {
            self.lock().irq = Some(Arc::new(irq));
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, CoreState> {
        // A panic while holding the lock leaves the endpoint in an unknown state; we still hand it
        // out (the protocol core keeps its invariants per call) rather than poisoning every socket.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run the transport once and route the resulting events (called by the loop thread, and by
    /// callers in busy-poll mode).
    pub(crate) fn pump_locked(st: &mut CoreState, now: Instant) -> bool {
        if st.dead.is_some() {
            return false;
        }
        let CoreState { ep, transport, .. } = st;
        let mut moved = match transport.pump(ep, now) {
            Ok(m) => m,
            Err(e) => {
                Core::failed_locked(st, now, e);
                return true;
            }
        };
        // The protocol's timers, for every transport: what they put out (an RST, a retried
        // credit request) leaves in the next round, which `moved` asks for.
        if st.ep.poll_timeout().is_some_and(|t| t <= now) {
            st.ep.handle_timeout(now);
            moved = true;
        }
        Core::route_transport_events(st);
        if moved && !st.flushing.is_empty() {
            let waiting: Vec<ConnId> = st.flushing.keys().copied().collect();
            for c in waiting {
                if Core::flushed(st, c) {
                    Core::notify(st, Target::Conn(c));
                }
            }
        }
        moved
    }

    /// Pump until a round moves nothing, at most `rounds` times; returns whether the last round
    /// still moved something (work may be left that no interrupt announces again).
    pub(crate) fn pump_rounds(st: &mut CoreState, now: Instant, rounds: u32) -> bool {
        for _ in 0..rounds {
            if !Core::pump_locked(st, now) {
                return false;
            }
        }
        true
    }

    /// Everything written on `c` has left: handed to the device and returned by it.
    fn flushed(st: &mut CoreState, c: ConnId) -> bool {
        st.ep
            .send_queue(c)
            .is_none_or(|q| q.is_empty() && q.as_dma().is_none_or(|q| q.in_flight() == 0))
    }

    /// Wait until everything written on `c` has left (see [`Core::flushed`]): the device
    /// returned the descriptors of its last byte. Fails if the connection is reset or the core
    /// ends first; `WouldBlock` / `TimedOut` as `wait` says (the peer may grant no credit).
    pub(crate) fn flush(self: &Arc<Self>, c: ConnId, wait: Wait) -> io::Result<()> {
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        *st.flushing.entry(c).or_default() += 1;
        let r = self.wait_until_guard(st, &cv, wait, Target::Conn(c), Lead::No, |mut st| {
            if let Some(e) = Core::reset_error(&st, c) {
                return (st, Some(Err(e)));
            }
            let done = Core::flushed(&mut st, c).then_some(Ok(()));
            (st, done)
        });
        let mut st = self.lock();
        if let Some(n) = st.flushing.get_mut(&c) {
            *n -= 1;
            if *n == 0 {
                st.flushing.remove(&c);
            }
        }
        r
    }

    /// Let the transport handle a config interrupt, then route the events (resets) it caused.
    pub(crate) fn config_changed_locked(st: &mut CoreState, now: Instant) {
        if st.dead.is_some() {
            return;
        }
        let CoreState { ep, transport, .. } = st;
        if let Err(e) = transport.config_changed(ep, now) {
            Core::failed_locked(st, now, e);
            return;
        }
        Core::route_transport_events(st);
    }

    /// Route the events of a transport call, with the reset cause it reports (if any).
    fn route_transport_events(st: &mut CoreState) {
        let cause = st.transport.take_reset_cause().map(Arc::new);
        Core::route_events_with(st, cause.as_ref());
    }

    /// The transport failed with `e`: let it recover (every connection is reset, the device
    /// comes up again), or, when it cannot, stop it and end the core with why.
    fn failed_locked(st: &mut CoreState, now: Instant, e: TransportError) {
        let CoreState { ep, transport, .. } = st;
        match transport.recover(ep, now, e) {
            Ok(()) => Core::route_transport_events(st),
            Err(e) => {
                st.transport.shutdown();
                Core::kill_locked(st, e.into());
            }
        }
    }

    /// Ask the transport whether its device is still there (`removal_signalled`: its removal
    /// eventfd fired). When it is gone, every blocked and future call fails with why and the
    /// device is let go of. Returns whether the core is still alive.
    pub(crate) fn check_device_locked(st: &mut CoreState, removal_signalled: bool) -> bool {
        if st.dead.is_some() {
            return false;
        }
        match st.transport.check_device(removal_signalled) {
            Ok(()) => true,
            Err(e) => {
                // A device being taken away may still carry packets (the kernel waits for us
                // to let go): tell every peer its connection ended, as a close would, rather
                // than leave it holding a dead one.
                let now = Instant::now();
                for c in st.ep.connections() {
                    st.ep.reset(now, c);
                }
                let CoreState { ep, transport, .. } = st;
                transport.farewell(ep, now);
                st.transport.shutdown();
                st.transport.release();
                Core::kill_locked(st, e.into());
                false
            }
        }
    }

    /// Drain the endpoint's events to the waiters.
    pub(crate) fn route_events(st: &mut CoreState) {
        Core::route_events_with(st, None);
    }

    /// [`Core::route_events`]; every connection reset meanwhile was reset because of `cause`.
    fn route_events_with(st: &mut CoreState, cause: Option<&Arc<ResetCause>>) {
        while let Some(ev) = st.ep.poll_event() {
            match &ev {
                Event::Incoming(l) => Core::show(st, Target::Listener(*l)),
                Event::Connected(c)
                | Event::ConnectFailed(c, _)
                | Event::Readable(c)
                | Event::Writable(c)
                | Event::PeerShutdown(c, _)
                | Event::Reset(c)
                | Event::Closed(c) => Core::show(st, Target::Conn(*c)),
            }
            match ev {
                Event::Connected(c) => {
                    st.connect_result.insert(c, Ok(()));
                    Core::notify(st, Target::Conn(c));
                }
                Event::ConnectFailed(c, e) => {
                    if let Some(why) = cause.filter(|_| e == ProtoError::ConnectionReset) {
                        st.reset.insert(c, Some(why.clone()));
                    }
                    st.connect_result.insert(c, Err(e));
                    Core::notify(st, Target::Conn(c));
                }
                Event::Incoming(l) => Core::notify(st, Target::Listener(l)),
                Event::Reset(c) => {
                    st.reset.insert(c, cause.cloned());
                    st.connect_result
                        .entry(c)
                        .or_insert(Err(ProtoError::ConnectionReset));
                    Core::notify(st, Target::Conn(c));
                }
                Event::Closed(c) => {
                    st.reset.remove(&c);
                    st.connect_result.remove(&c);
                    Core::notify(st, Target::Conn(c));
                }
                Event::Readable(c) | Event::Writable(c) | Event::PeerShutdown(c, _) => {
                    Core::notify(st, Target::Conn(c));
                }
            }
        }
    }

    /// The device is gone: every blocked and future call fails with `why`.
    fn kill_locked(st: &mut CoreState, why: Ended) {
        log::error!("{}", error_chain(&why));
        Core::end_locked(st, why);
    }

    /// Every blocked and future call fails with `why` (no failure is logged).
    fn end_locked(st: &mut CoreState, why: Ended) {
        st.dead = Some(Arc::new(why));
        for cv in st.conn_wait.values().chain(st.listen_wait.values()) {
            cv.notify_all();
        }
        if let Some(irq) = st.irq.as_ref().filter(|_| st.leader.is_some()) {
            irq.wake();
        }
        let failed = Readiness {
            error: true,
            ..Readiness::default()
        };
        for shown in st.shown.values_mut() {
            shown.show(failed);
        }
    }

    /// What `t` is ready for now.
    fn readiness(st: &CoreState, t: Target) -> Readiness {
        if st.dead.is_some() {
            return Readiness {
                error: true,
                ..Readiness::default()
            };
        }
        match t {
            Target::Conn(c) => {
                let mut r = st.ep.readiness(c);
                r.error |=
                    st.reset.contains_key(&c) || matches!(st.connect_result.get(&c), Some(Err(_)));
                if let Some(&low) = st.rcvlowat.get(&c) {
                    r.readable &= st.ep.readable_bytes(c) >= low;
                }
                r
            }
            Target::Listener(l) => Readiness {
                readable: st.ep.pending_accepts(l) > 0,
                ..Readiness::default()
            },
        }
    }

    /// Bring `t`'s readiness descriptor and notifier (if it has them) up to date.
    fn show(st: &mut CoreState, t: Target) {
        if !st.shown.contains_key(&t) {
            return;
        }
        let r = Core::readiness(st, t);
        if let Some(shown) = st.shown.get_mut(&t) {
            shown.show(r);
        }
    }

    #[cfg(feature = "tokio")]
    /// The edge notifier of `t` (see `readiness.rs`), made on first use; an error when no
    /// descriptor can be made.
    fn notifier_of(&self, t: Target) -> io::Result<UserFd> {
        let mut st = self.lock();
        if let Some(n) = st.shown.get(&t).and_then(|s| s.notifier.as_ref()) {
            return Ok(n.user());
        }
        let mut n = Notifier::new()?;
        // What is ready now counts as an edge: a waiter registering late still wakes.
        n.show(Core::readiness(&st, t));
        let user = n.user();
        st.shown.entry(t).or_default().notifier = Some(n);
        Ok(user)
    }

    #[cfg(feature = "tokio")]
    /// Connection `c`'s edge notifier.
    pub(crate) fn conn_notifier(&self, c: ConnId) -> io::Result<UserFd> {
        self.notifier_of(Target::Conn(c))
    }

    #[cfg(feature = "tokio")]
    /// Listener `l`'s edge notifier.
    pub(crate) fn listener_notifier(&self, l: ListenerId) -> io::Result<UserFd> {
        self.notifier_of(Target::Listener(l))
    }

    /// The readiness descriptor of `t`, made on first use; when none can be made (no
    /// descriptor left), the core's hung-up one, and the failure is logged.
    fn fd_of(&self, t: Target) -> UserFd {
        let mut st = self.lock();
        if let Some(fd) = st.shown.get(&t).and_then(|s| s.fd.as_ref()) {
            return fd.user();
        }
        let mut fd = match ReadyFd::new() {
            Ok(fd) => fd,
            Err(e) => {
                log::error!("{t:?}: no readiness descriptor ({e}): handing out a hung-up one");
                return self.failed_fd.clone();
            }
        };
        fd.show(Core::readiness(&st, t));
        let user = fd.user();
        st.shown.entry(t).or_default().fd = Some(fd);
        user
    }

    /// Connection `c`'s readiness descriptor (see `readiness.rs`).
    pub(crate) fn conn_fd(&self, c: ConnId) -> UserFd {
        self.fd_of(Target::Conn(c))
    }

    /// Listener `l`'s readiness descriptor: readable while a connection waits to be accepted.
    pub(crate) fn listener_fd(&self, l: ListenerId) -> UserFd {
        self.fd_of(Target::Listener(l))
    }

    #[cfg(feature = "tokio")]
    /// How the handshake of connection `c` ended: `None` while it is in progress, else `Ok`
    /// or the error (taken, as [`Core::take_error`] would).
    pub(crate) fn connect_status(&self, c: ConnId) -> Option<io::Result<()>> {
        let mut st = self.lock();
        if let Err(e) = Core::check_dead(&st) {
            return Some(Err(e));
        }
        match st.connect_result.get(&c) {
            Some(Err(_)) => match st.connect_result.remove(&c) {
                Some(Err(e)) => Some(Err(Core::conn_error(&st, c, e))),
                _ => Some(Ok(())),
            },
            Some(Ok(())) => Some(Ok(())),
            None if st.ep.state(c) == Some(crate::proto::ConnState::Connecting) => None,
            None => Some(Ok(())),
        }
    }

    /// The pending error of connection `c`, taken (as `SO_ERROR`): a failed connect, a reset,
    /// or the device's end. A reset stays visible to reads and writes.
    pub(crate) fn take_error(&self, c: ConnId) -> Option<io::Error> {
        let mut st = self.lock();
        if let Err(e) = Core::check_dead(&st) {
            return Some(e);
        }
        match st.connect_result.get(&c) {
            Some(Err(_)) => match st.connect_result.remove(&c) {
                Some(Err(e)) => Some(Core::conn_error(&st, c, e)),
                _ => None,
            },
            _ => None,
        }
    }

    /// Mark the core dead from outside and stop the device (device reset, driver shutdown).
    pub(crate) fn kill(&self, why: Ended) {
        let mut st = self.lock();
        st.transport.shutdown();
        if st.dead.is_none() {
            Core::kill_locked(&mut st, why);
        }
    }

    /// An orderly close by the owner: like [`Core::kill`], but nothing failed, so nothing is
    /// logged as an error.
    pub(crate) fn close_all(&self, why: &'static str) {
        let mut st = self.lock();
        st.transport.shutdown();
        if st.dead.is_none() {
            log::debug!("closing: {why}");
            Core::end_locked(&mut st, Ended::Closed(why));
        }
    }

    /// An orderly end before the device is reset: every connection is closed as `close` does
    /// (what was written is sent, then SHUTDOWN, then the linger for the peer's answer) and
    /// every listener stops; whoever runs the transport keeps moving packets meanwhile. Waits
    /// until every connection is released or `within` passes; what is left then gets RST (one
    /// more round of the rings puts them out). Returns how many were cut short that way.
    pub(crate) fn drain(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        {
            let mut st = self.lock();
            if st.dead.is_some() {
                return 0;
            }
            let now = Instant::now();
            for l in st.ep.listener_ids() {
                st.ep.unlisten(now, l);
            }
            for c in st.ep.connections() {
                st.ep.close(now, c);
            }
            self.kick(&mut st);
        }
        loop {
            let mut st = self.lock();
            let left = st.ep.connections();
            if left.is_empty() || st.dead.is_some() {
                return 0;
            }
            if Instant::now() >= deadline {
                let now = Instant::now();
                for &c in &left {
                    st.ep.abort(now, c);
                }
                Core::pump_locked(&mut st, now);
                log::debug!("drain: {} connections reset after {within:?}", left.len());
                return left.len();
            }
            if self.busy_poll {
                // Nobody else moves the rings in busy-poll mode.
                Core::pump_locked(&mut st, Instant::now());
            }
            drop(st);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Block until `ready` says yes (returns its value), the deadline passes, or the device dies.
    /// `cv` is the condition variable the awaited state change notifies.
    /// On the way out, `target`'s readiness descriptor is brought up to date. With
    /// [`Wait::Never`] a call that would wait fails with `WouldBlock` instead (after one round
    /// of the rings in busy-poll mode, where nobody else moves them).
    fn wait_until<'a, T>(
        self: &'a Arc<Self>,
        st: MutexGuard<'a, CoreState>,
        cv: &Arc<Condvar>,
        wait: Wait,
        target: Target,
        lead: Lead,
        mut ready: impl FnMut(&mut CoreState) -> Option<io::Result<T>>,
    ) -> io::Result<T> {
        self.wait_until_guard(st, cv, wait, target, lead, |mut st| {
            let r = ready(&mut st);
            (st, r)
        })
    }

    /// [`Core::wait_until`] where `ready` gets the lock's guard itself, and may let go of the
    /// lock for a while (to copy payload with no lock held) before it hands a guard back.
    fn wait_until_guard<'a, T>(
        self: &'a Arc<Self>,
        mut st: MutexGuard<'a, CoreState>,
        cv: &Arc<Condvar>,
        wait: Wait,
        target: Target,
        lead_ok: Lead,
        mut ready: impl FnMut(
            MutexGuard<'a, CoreState>,
        ) -> (MutexGuard<'a, CoreState>, Option<io::Result<T>>),
    ) -> io::Result<T> {
        let deadline = wait.deadline();
        // Busy-poll: spin (moving packets ourselves) while progress is likely, then sleep.
        let mut spin_since = Instant::now();
        let mut asleep = false;
        let mut spun = false;
        let mut polled = false;
        // Set while this call leads (waits on the device's interrupts itself).
        let mut lead: Option<Arc<IrqWait>> = None;
        let result = loop {
            let (guard, r) = ready(st);
            st = guard;
            if let Some(r) = r {
                if spun && !asleep {
                    st.spin.hit();
                }
                break r;
            }
            if let Err(e) = Core::check_dead(&st) {
                break Err(e);
            }
            let now = Instant::now();
            if wait == Wait::Never {
                if self.busy_poll && !polled {
                    polled = true;
                    Core::pump_locked(&mut st, now);
                    continue;
                }
                break Err(io::ErrorKind::WouldBlock.into());
            }
            if deadline.is_some_and(|d| now >= d) {
                break Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "vsock operation timed out",
                ));
            }
            if self.busy_poll && !asleep {
                let idle = now.saturating_duration_since(spin_since);
                if sync::keep_spinning(idle, st.spin.get()) {
                    spun = true;
                    // Run-to-completion: move packets ourselves, then let others at the lock.
                    Core::pump_locked(&mut st, now);
                    drop(st);
                    spin_pause(idle);
                    st = self.lock();
                    continue;
                }
                // Out of budget (no spare core, or a slow peer): sleep as eventfd mode does,
                // with notifications on; one more pump catches what came before they were.
                st.spin.miss();
                Core::sleeper_in(&mut st);
                asleep = true;
                Core::pump_locked(&mut st, now);
                continue;
            }
            let slice = deadline.map_or(WAIT_SLICE, |d| {
                d.saturating_duration_since(now).min(WAIT_SLICE)
            });
            if lead.is_none() && lead_ok == Lead::May && !self.busy_poll {
                lead = Core::take_lead(&mut st, target);
            }
            if let Some(irq) = &lead {
                drop(st);
                let fired = irq.wait(slice);
                st = self.lock();
                match fired {
                    Ok(true) => {
                        // What the loop thread would have done for this interrupt.
                        if Core::pump_rounds(&mut st, Instant::now(), MAX_PUMP_ROUNDS) {
                            // Work left that no interrupt may announce again (its eventfd
                            // is read): the loop thread's, if our call is done before it.
                            st.transport.wake();
                        }
                        Core::timer_check(&mut st);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        // Back to the condition variable; the loop watches again.
                        log::debug!("waiting on the device's interrupts: {e}");
                        Core::give_up_lead(&mut st, irq);
                        lead = None;
                    }
                }
                continue;
            }
            st = cv
                .wait_timeout(st, slice)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if asleep {
                // Woken: spin again, the next reply is likely close behind.
                Core::sleeper_out(&mut st);
                asleep = false;
                spin_since = Instant::now();
            }
        };
        if asleep {
            Core::sleeper_out(&mut st);
        }
        if let Some(irq) = &lead {
            Core::give_up_lead(&mut st, irq);
        }
        Core::show(&mut st, target);
        result
    }

    /// A busy-poll waiter (or spinning loop thread) goes to sleep: the first one turns the
    /// device's notifications on.
    pub(crate) fn sleeper_in(st: &mut CoreState) {
        st.sleepers += 1;
        if st.sleepers == 1 {
            st.transport.set_polling(false);
        }
    }

    /// A sleeper woke: the last one turns notifications off again (spinning resumes).
    pub(crate) fn sleeper_out(st: &mut CoreState) {
        st.sleepers = st.sleepers.saturating_sub(1);
        if st.sleepers == 0 {
            st.transport.set_polling(true);
        }
    }

    /// Wake the callers blocked on `t`: those asleep on its condition variable, and the
    /// leader (`irq.rs`) if its call is on `t`.
    fn notify(st: &CoreState, t: Target) {
        let cv = match t {
            Target::Conn(c) => st.conn_wait.get(&c),
            Target::Listener(l) => st.listen_wait.get(&l),
        };
        if let Some(cv) = cv {
            cv.notify_all();
        }
        if st.leader == Some(t) {
            if let Some(irq) = &st.irq {
                irq.wake();
            }
        }
    }

    /// Become the leader for a call on `t` (wait on the device's interrupts, `irq.rs`) if the
    /// core has interrupts to wait on and nobody leads; the loop thread stops watching them.
    fn take_lead(st: &mut CoreState, t: Target) -> Option<Arc<IrqWait>> {
        if st.leader.is_some() || st.dead.is_some() {
            return None;
        }
        let irq = st.irq.clone()?;
        irq.clear_wake();
        if let Err(e) = irq.loop_watches(false) {
            // Leave the loop watching: this call sleeps on its condition variable instead.
            log::debug!("taking the interrupts from the loop thread: {e}");
            let _ = irq.loop_watches(true);
            return None;
        }
        st.leader = Some(t);
        Some(irq)
    }

    /// The leader's call ends: the loop thread watches the interrupts again (one that came
    /// meanwhile is still pending in its eventfd, so the loop sees it).
    fn give_up_lead(st: &mut CoreState, irq: &IrqWait) {
        st.leader = None;
        if let Err(source) = irq.loop_watches(true) {
            // Nobody would see the device's interrupts again.
            Core::kill_locked(
                st,
                TransportError::EventLoop {
                    op: "epoll_ctl",
                    source,
                }
                .into(),
            );
        }
    }

    /// A caller pumped: if the protocol now has a timer earlier than the one the loop thread
    /// sleeps until, wake the loop so it plans for it (the interrupt that would have woken it
    /// may have been the caller's, not its own).
    fn timer_check(st: &mut CoreState) {
        if let Some(t) = st.ep.poll_timeout() {
            if st.loop_timer.is_none_or(|planned| t < planned) {
                st.loop_timer = Some(t);
                st.transport.wake();
            }
        }
    }

    fn conn_cv(st: &mut CoreState, c: ConnId) -> Arc<Condvar> {
        st.conn_wait.entry(c).or_default().clone()
    }

    fn writer(st: &mut CoreState, c: ConnId) -> Arc<Mutex<()>> {
        st.writers.entry(c).or_default().clone()
    }

    /// After a user call changed what the endpoint wants to send: send it from this thread
    /// (run-to-completion: the packets are posted and the device kicked here, with no hand-off
    /// to the loop thread). A pump that moved something runs again, since its completions or
    /// replies may have arrived meanwhile; work still left after [`CALLER_PUMP_ROUNDS`] is the
    /// loop thread's (woken here, as interrupts that came while we held the rings may have
    /// been consumed by us).
    fn kick(&self, st: &mut CoreState) {
        let now = Instant::now();
        if self.busy_poll {
            // The caller spins on the rings anyway: one round to post what it queued.
            Core::pump_locked(st, now);
            return;
        }
        if Core::pump_rounds(st, now, CALLER_PUMP_ROUNDS) {
            st.transport.wake();
        } else {
            Core::timer_check(st);
        }
    }

    fn check_dead(st: &CoreState) -> io::Result<()> {
        match &st.dead {
            Some(why) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                Arc::clone(why),
            )),
            None => Ok(()),
        }
    }

    /// Open a connection to `cid:port` from `local_port` (an ephemeral port when `None`).
    /// The handshake may take `timeout` (the protocol's connect timeout, 2 s as Linux's, when
    /// `None`; any length is honoured). Blocking: waits for it. Non-blocking: returns at once;
    /// the connection's readiness descriptor turns writable once it is established, and
    /// [`Core::take_error`] tells a failure (as `connect` with `EINPROGRESS`, then `SO_ERROR`).
    pub(crate) fn connect(
        self: &Arc<Self>,
        (cid, port): (u64, u32),
        local_port: Option<u32>,
        ty: SocketType,
        timeout: Option<Duration>,
        nonblocking: bool,
    ) -> io::Result<ConnId> {
        let mut st = self.lock();
        Core::check_dead(&st)?;
        let now = Instant::now();
        let timeout = timeout.unwrap_or(st.ep.config().connect_timeout);
        let c = st
            .ep
            .connect_with_timeout(now, cid, port, local_port, ty, timeout)
            .map_err(to_io)?;
        let cv = Core::conn_cv(&mut st, c);
        self.kick(&mut st);
        if nonblocking {
            return Ok(c);
        }
        // The protocol core's timer ends the handshake (TimedOut) after `timeout`; the wait
        // ends then by itself too, since only a running loop fires timers (the sim's host
        // side has none once its device is reset).
        let wait = Wait::new(false, Some(timeout));
        let mut r = self.wait_until(st, &cv, wait, Target::Conn(c), Lead::May, |st| {
            st.connect_result
                .remove(&c)
                .map(|r| r.map_err(|e| Core::conn_error(st, c, e)))
        });
        if matches!(&r, Err(e) if e.kind() == io::ErrorKind::TimedOut) {
            // Our deadline and the protocol's timer are the same instant: whoever notices first
            // must settle the handshake the same way. One round here (the rings, then the
            // protocol's due timers: a RESPONSE may sit there unseen by a loop thread that has
            // not run yet) makes a timeout the protocol's (counted in its stats, its RST sent)
            // even when this thread woke before the loop's.
            let mut st = self.lock();
            Core::pump_locked(&mut st, Instant::now());
            if let Some(settled) = st.connect_result.remove(&c) {
                r = settled.map_err(to_io);
            }
        }
        if r.is_err() {
            let mut st = self.lock();
            st.ep.abort(Instant::now(), c);
            st.conn_wait.remove(&c);
            st.reset.remove(&c);
            self.kick(&mut st);
        }
        r.map(|()| c)
    }

    /// Listen on `port` (`VMADDR_PORT_ANY`: a free one); returns the listener and its port.
    pub(crate) fn listen(
        self: &Arc<Self>,
        port: u32,
        backlog: usize,
        ty: SocketType,
    ) -> io::Result<(ListenerId, u32)> {
        let mut st = self.lock();
        Core::check_dead(&st)?;
        let l = st.ep.listen(port, backlog, ty).map_err(to_io)?;
        let port = st.ep.listener_port(l).unwrap_or(port);
        st.listen_wait.insert(l, Arc::new(Condvar::new()));
        Ok((l, port))
    }

    pub(crate) fn accept(self: &Arc<Self>, l: ListenerId, wait: Wait) -> io::Result<ConnId> {
        let mut st = self.lock();
        let cv = st.listen_wait.entry(l).or_default().clone();
        self.wait_until(st, &cv, wait, Target::Listener(l), Lead::May, |st| {
            st.ep.accept(l).map(|c| {
                st.conn_wait.entry(c).or_default();
                Ok(c)
            })
        })
    }

    /// Listen on every port without a listener of its own; its connections wait for
    /// [`Core::answer`] (see `Endpoint::listen_any_port`).
    pub(crate) fn listen_any_port(
        self: &Arc<Self>,
        backlog: usize,
        ty: SocketType,
    ) -> io::Result<ListenerId> {
        let mut st = self.lock();
        Core::check_dead(&st)?;
        let l = st.ep.listen_any_port(backlog, ty).map_err(to_io)?;
        st.listen_wait.insert(l, Arc::new(Condvar::new()));
        Ok(l)
    }

    /// Answer a held `REQUEST`: `RESPONSE` when `accept`, else `RST`.
    pub(crate) fn answer(&self, c: ConnId, accept: bool) -> io::Result<()> {
        let mut st = self.lock();
        let r = st.ep.answer(Instant::now(), c, accept).map_err(to_io);
        self.kick(&mut st);
        r
    }

    pub(crate) fn unlisten(&self, l: ListenerId) {
        let mut st = self.lock();
        st.ep.unlisten(Instant::now(), l);
        st.listen_wait.remove(&l);
        st.shown.remove(&Target::Listener(l));
        self.kick(&mut st);
    }

    /// Blocking read: waits for data, EOF (Ok(0)) or an error.
    pub(crate) fn read(
        self: &Arc<Self>,
        c: ConnId,
        buf: &mut [u8],
        wait: Wait,
    ) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        let this = self.clone();
        let unlocked = buf.len() >= UNLOCKED_COPY_MIN;
        let r = self.wait_until_guard(st, &cv, wait, Target::Conn(c), Lead::May, |mut st| {
            let now = Instant::now();
            // Non-blocking reads take what there is, as Linux's do.
            if wait != Wait::Never && Core::below_low_water(&st, c, buf.len()) {
                return (st, None);
            }
            let r = if unlocked {
                // Take the payload off the queue (accounted and credited as read), copy it
                // out with the lock let go, then give its buffers back.
                match st
                    .ep
                    .recv_with(now, c, |rx| rx.as_dma().map(|q| q.lease(buf.len())))
                {
                    Ok(Some((Some(lease), n))) => {
                        drop(st);
                        lease.copy_to(buf);
                        drop(lease);
                        st = this.lock();
                        Ok(n)
                    }
                    // A heap queue: copied under the lock.
                    Ok(Some((None, _))) => st.ep.recv(now, c, buf),
                    Ok(None) => Ok(0),
                    Err(e) => Err(e),
                }
            } else {
                st.ep.recv(now, c, buf)
            };
            let r = match r {
                Ok(n) => {
                    if n > 0 {
                        // Freed receive space may owe the peer a credit update, and freed
                        // buffers go back on the ring.
                        this.kick(&mut st);
                    }
                    Some(Ok(n))
                }
                Err(e) => Core::read_error(&st, c, e),
            };
            (st, r)
        });
        match r {
            // A read waiting for its low-water mark that times out returns what did arrive,
            // as Linux's does.
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                self.read(c, buf, Wait::Never).or(Err(e))
            }
            r => r,
        }
    }

    /// A read of `len` bytes on `c` waits for more: fewer than its low-water mark (or `len`,
    /// if smaller) are buffered, and more can come (as Linux's `sock_rcvlowat` target).
    fn below_low_water(st: &CoreState, c: ConnId, len: usize) -> bool {
        st.rcvlowat.get(&c).is_some_and(|&low| {
            let r = st.ep.readiness(c);
            // A buffer shrunk below the mark since it was set: more than the buffer never
            // comes, so wait for a full buffer.
            let size = st.ep.buffer(c).map_or(usize::MAX, |b| {
                usize::try_from(b.size).unwrap_or(usize::MAX)
            });
            !r.read_closed && !r.error && st.ep.readable_bytes(c) < low.min(len).min(size)
        })
    }

    /// Set `c`'s receive low-water mark (`SO_RCVLOWAT`): blocking reads wait for that many
    /// bytes (or end of stream) and the descriptor turns readable only then. At most the
    /// connection's receive buffer size (as Linux's `vsock_set_rcvlowat`); 0 counts as 1.
    pub(crate) fn set_rcvlowat(&self, c: ConnId, low: usize) -> io::Result<()> {
        let mut st = self.lock();
        let max = st.ep.buffer(c).map_or(0, |b| b.size);
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        if low > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("receive low-water mark {low} exceeds the receive buffer ({max} bytes)"),
            ));
        }
        if low > 1 {
            st.rcvlowat.insert(c, low);
        } else {
            st.rcvlowat.remove(&c);
        }
        Core::show(&mut st, Target::Conn(c));
        Ok(())
    }

    /// Connection `c`'s receive buffer settings (`getsockopt(SO_VM_SOCKETS_BUFFER_*)`).
    pub(crate) fn buffer(&self, c: ConnId) -> io::Result<crate::proto::BufferSize> {
        self.lock()
            .ep
            .buffer(c)
            .ok_or_else(|| to_io(ProtoError::NotConnected))
    }

    /// Change one of `c`'s receive buffer settings (`setsockopt`, see [`crate::proto::BufferSize`]); a
    /// `CREDIT_UPDATE` goes out when the advertised size changes.
    pub(crate) fn set_buffer(
        &self,
        c: ConnId,
        opt: crate::proto::BufferOption,
        val: u64,
    ) -> io::Result<crate::proto::BufferSize> {
        let mut st = self.lock();
        let b = st.ep.set_buffer(c, opt, val).map_err(to_io)?;
        self.kick(&mut st);
        // A low-water mark waits for at most a full buffer.
        Core::show(&mut st, Target::Conn(c));
        Ok(b)
    }

    /// Listener `l`'s receive buffer settings, which the connections it accepts inherit.
    pub(crate) fn listener_buffer(&self, l: ListenerId) -> io::Result<crate::proto::BufferSize> {
        self.lock()
            .ep
            .listener_buffer(l)
            .ok_or_else(|| to_io(ProtoError::InvalidInput("unknown listener")))
    }

    /// Change one of listener `l`'s receive buffer settings.
    pub(crate) fn set_listener_buffer(
        &self,
        l: ListenerId,
        opt: crate::proto::BufferOption,
        val: u64,
    ) -> io::Result<crate::proto::BufferSize> {
        self.lock()
            .ep
            .set_listener_buffer(l, opt, val)
            .map_err(to_io)
    }

    /// Blocking peek: waits for data (or EOF, or an error) like [`Core::read`], then copies
    /// without consuming.
    pub(crate) fn peek(
        self: &Arc<Self>,
        c: ConnId,
        buf: &mut [u8],
        wait: Wait,
    ) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        self.wait_until(st, &cv, wait, Target::Conn(c), Lead::May, |st| {
            match st.ep.peek(c, buf) {
                Ok(n) => Some(Ok(n)),
                Err(e) => Core::read_error(st, c, e),
            }
        })
    }

    /// Blocking write of the whole buffer (returns once all of it is queued in the endpoint).
    ///
    /// On a driver's core the copy into DMA memory runs with no lock held: under the core's
    /// lock the room is found and DMA memory set aside at the back of the send queue
    /// ([`DmaTx::reserve`]); the caller fills it unlocked, holding only this connection's
    /// write lock (which keeps its writers in order); then, locked again, the bytes are queued
    /// and sent. Writes of fewer than [`UNLOCKED_COPY_MIN`] bytes, and the sim host's heap
    /// queues, copy under the lock: a second lock round would cost more than the copy.
    pub(crate) fn write(
        self: &Arc<Self>,
        c: ConnId,
        mut data: &[u8],
        wait: Wait,
    ) -> io::Result<usize> {
        let mut queued = 0;
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        let writer = Core::writer(&mut st, c);
        drop(st);
        let _order = writer.lock().unwrap_or_else(|p| p.into_inner());
        let st = self.lock();
        let this = self.clone();
        let r = self.wait_until_guard(st, &cv, wait, Target::Conn(c), Lead::No, |mut st| loop {
            if let Some(e) = Core::reset_error(&st, c) {
                return (st, Some(Err(e)));
            }
            let sent = if data.len() >= UNLOCKED_COPY_MIN {
                let (guard, r) = this.send_unlocked(st, c, data);
                st = guard;
                r
            } else {
                st.ep.send(Instant::now(), c, data)
            };
            match sent {
                Ok(n) => {
                    if n > 0 {
                        this.kick(&mut st);
                    }
                    data = &data[n..];
                    queued += n;
                    if data.is_empty() || (wait == Wait::Never && queued > 0) {
                        return (st, Some(Ok(queued)));
                    }
                    if n == 0 {
                        // No room: the send armed `Writable`, whose notification wakes us.
                        return (st, None);
                    }
                    // Part of it queued: the kick may have sent it at once, so there may be
                    // room again that nothing will announce (any `Writable` it raised came
                    // before we wait). Go on until a send finds no room.
                }
                Err(ProtoError::WouldBlock) => return (st, None),
                Err(e) => {
                    let e = Core::conn_error(&st, c, e);
                    return (st, Some(Err(e)));
                }
            }
        });
        Core::partial(r, queued)
    }

    /// Queue what fits of `data` on connection `c`, copying it into DMA memory with the core's
    /// lock let go meanwhile (see [`Core::write`]); a heap queue is copied into under the lock.
    fn send_unlocked<'a>(
        &'a self,
        mut st: MutexGuard<'a, CoreState>,
        c: ConnId,
        data: &[u8],
    ) -> (MutexGuard<'a, CoreState>, Result<usize, ProtoError>) {
        let room = match st.ep.send_room(c, data.len()) {
            Ok(0) => return (st, Ok(0)),
            Ok(room) => room,
            Err(e) => return (st, Err(e)),
        };
        let reserved = match st.ep.send_queue(c).and_then(RtTx::as_dma) {
            Some(q) => q.reserve(room),
            None => {
                let r = st.ep.send(Instant::now(), c, data);
                return (st, r);
            }
        };
        let Some(mut reserved) = reserved else {
            // The pool has no chunk free: wait for one (queueing nothing arms Writable, and
            // returned chunks wake writers through `storage_freed`).
            let r = st.ep.send_with(Instant::now(), c, room, |_, _| {});
            return (st, r);
        };
        drop(st);
        let filled = reserved.fill(&data[..reserved.len().min(data.len())]);
        let mut st = self.lock();
        // A reset meanwhile fails the queueing; the reservation goes back to the pool.
        let r = st.ep.send_with(Instant::now(), c, filled, |tx, room| {
            if let Some(q) = tx.as_dma() {
                q.commit(reserved, room);
            }
        });
        (st, r)
    }

    /// A write that queued `queued` bytes and then timed out (or would block) returns that
    /// count, as a socket's write does: an error would hide what was sent, and a retry would
    /// send it twice.
    fn partial(r: io::Result<usize>, queued: usize) -> io::Result<usize> {
        match r {
            Err(e)
                if queued > 0
                    && matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    ) =>
            {
                Ok(queued)
            }
            r => r,
        }
    }

    /// Blocking vectored read: waits for data (or EOF, or an error) like [`Core::read`], then
    /// fills the buffers in order under one hold of the lock.
    pub(crate) fn read_vectored(
        self: &Arc<Self>,
        c: ConnId,
        bufs: &mut [io::IoSliceMut<'_>],
        wait: Wait,
    ) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        let this = self.clone();
        self.wait_until(st, &cv, wait, Target::Conn(c), Lead::May, |st| {
            let now = Instant::now();
            let mut total = 0;
            for buf in bufs.iter_mut().filter(|b| !b.is_empty()) {
                match st.ep.recv(now, c, buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        total += n;
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(_) if total > 0 => break,
                    Err(e) => return Core::read_error(st, c, e),
                }
            }
            if total > 0 {
                this.kick(st);
            }
            Some(Ok(total))
        })
    }

    /// Blocking vectored write of every buffer (returns once all of it is queued), with one
    /// transport round per wait instead of one per buffer.
    pub(crate) fn write_vectored(
        self: &Arc<Self>,
        c: ConnId,
        bufs: &[io::IoSlice<'_>],
        wait: Wait,
    ) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let (mut i, mut off) = (0, 0);
        let mut queued = 0;
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        // In order with the other writes (one may be filling memory it set aside).
        let writer = Core::writer(&mut st, c);
        drop(st);
        let _order = writer.lock().unwrap_or_else(|p| p.into_inner());
        let st = self.lock();
        let this = self.clone();
        let r = self.wait_until(st, &cv, wait, Target::Conn(c), Lead::No, |st| loop {
            if let Some(e) = Core::reset_error(st, c) {
                return Some(Err(e));
            }
            let now = Instant::now();
            let mut sent = false;
            let r = loop {
                let Some(buf) = bufs.get(i) else {
                    break Some(Ok(total));
                };
                if off == buf.len() {
                    (i, off) = (i + 1, 0);
                    continue;
                }
                match st.ep.send(now, c, &buf[off..]) {
                    Ok(0) | Err(ProtoError::WouldBlock) => {
                        break (wait == Wait::Never && queued > 0).then_some(Ok(queued))
                    }
                    Ok(n) => {
                        off += n;
                        queued += n;
                        sent = true;
                    }
                    Err(e) => break Some(Err(Core::conn_error(st, c, e))),
                }
            };
            if sent {
                this.kick(st);
            }
            if r.is_some() || !sent {
                return r;
            }
            // As in `write`: the kick may have made room that nothing will announce; go on
            // until a send finds none (which arms `Writable`).
        });
        Core::partial(r, queued)
    }

    /// Blocking zero-copy write: waits for room in the send buffer, then `fill` writes up to
    /// `max` bytes straight into the connection's send storage (DMA memory on a driver) and
    /// says how many; they are queued. Runs `fill` under the core's lock, once.
    pub(crate) fn send_with(
        self: &Arc<Self>,
        c: ConnId,
        max: usize,
        wait: Wait,
        fill: impl FnOnce(&[VolatileSlice<'_, ()>]) -> usize,
    ) -> io::Result<usize> {
        if max == 0 {
            return Ok(0);
        }
        let mut fill = Some(fill);
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        // In order with the other writes (one may be filling memory it set aside).
        let writer = Core::writer(&mut st, c);
        drop(st);
        let _order = writer.lock().unwrap_or_else(|p| p.into_inner());
        let st = self.lock();
        let this = self.clone();
        self.wait_until(st, &cv, wait, Target::Conn(c), Lead::No, |st| {
            if let Some(e) = Core::reset_error(st, c) {
                return Some(Err(e));
            }
            let r = st.ep.send_with(Instant::now(), c, max, |tx, room| {
                if let Some(f) = fill.take() {
                    // The pool is empty: keep `fill` for when chunks come back.
                    fill = tx.fill_with(room, f).err();
                }
            });
            match r {
                // No room in the send buffer, or no DMA memory in the pool: `fill` waits.
                Ok(0) if fill.is_some() => None,
                Ok(n) => {
                    if n > 0 {
                        this.kick(st);
                    }
                    Some(Ok(n))
                }
                Err(ProtoError::WouldBlock) => None,
                Err(e) => Some(Err(Core::conn_error(st, c, e))),
            }
        })
    }

    /// Blocking zero-copy read: waits for data, then `take` sees the received payload where it
    /// lies (DMA memory on a driver) and says how many bytes it consumed. `Ok(0)` at end of
    /// stream, without calling `take`. Runs `take` under the core's lock, once.
    pub(crate) fn recv_with(
        self: &Arc<Self>,
        c: ConnId,
        wait: Wait,
        take: impl FnOnce(&[VolatileSlice<'_, ()>]) -> usize,
    ) -> io::Result<usize> {
        let mut take = Some(take);
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        let this = self.clone();
        self.wait_until(st, &cv, wait, Target::Conn(c), Lead::May, |st| {
            let r = st.ep.recv_with(Instant::now(), c, |rx| {
                if let Some(f) = take.take() {
                    rx.with_slices(f);
                }
            });
            match r {
                Ok(Some(((), n))) => {
                    if n > 0 {
                        this.kick(st);
                    }
                    Some(Ok(n))
                }
                Ok(None) => Some(Ok(0)),
                Err(e) => Core::read_error(st, c, e),
            }
        })
    }

    /// Blocking send of one SEQPACKET message.
    pub(crate) fn send_msg(
        self: &Arc<Self>,
        c: ConnId,
        msg: &[u8],
        eor: bool,
        wait: Wait,
    ) -> io::Result<usize> {
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        let this = self.clone();
        self.wait_until(st, &cv, wait, Target::Conn(c), Lead::No, |st| {
            if let Some(e) = Core::reset_error(st, c) {
                return Some(Err(e));
            }
            match st.ep.send_msg(Instant::now(), c, msg, eor) {
                Ok(()) => {
                    this.kick(st);
                    Some(Ok(msg.len()))
                }
                Err(ProtoError::WouldBlock) => None,
                Err(e) => Some(Err(Core::conn_error(st, c, e))),
            }
        })
    }

    /// Blocking receive of one SEQPACKET message: (bytes copied, full message length, EOR).
    pub(crate) fn recv_msg(
        self: &Arc<Self>,
        c: ConnId,
        buf: &mut [u8],
        wait: Wait,
    ) -> io::Result<(usize, usize, bool)> {
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        let this = self.clone();
        self.wait_until(st, &cv, wait, Target::Conn(c), Lead::May, |st| {
            match st.ep.recv_msg(Instant::now(), c, buf) {
                Ok(r) => {
                    this.kick(st);
                    Some(Ok(r))
                }
                Err(e) => Core::read_error(st, c, e),
            }
        })
    }

    /// A send on a connection the peer reset fails at once with ConnectionReset, and after the
    /// core's end with why it ended (a read drains what arrived first, see
    /// [`Core::read_error`]).
    fn reset_error(st: &CoreState, c: ConnId) -> Option<io::Error> {
        if let Err(e) = Core::check_dead(st) {
            return Some(e);
        }
        st.reset
            .contains_key(&c)
            .then(|| Core::conn_error(st, c, ProtoError::ConnectionReset))
    }

    /// `e` on connection `c` as an `io::Error`; a reset the transport caused says why, and
    /// once the core has ended, every connection's error is why it ended.
    fn conn_error(st: &CoreState, c: ConnId, e: ProtoError) -> io::Error {
        if let Err(dead) = Core::check_dead(st) {
            return dead;
        }
        match st.reset.get(&c) {
            Some(Some(why)) if e == ProtoError::ConnectionReset => {
                io::Error::new(io::ErrorKind::ConnectionReset, ConnReset(why.clone()))
            }
            _ => to_io(e),
        }
    }

    /// What a blocked read does with a receive error: nothing buffered (`WouldBlock`) means
    /// wait, unless the peer reset the connection; anything else ends the read.
    fn read_error<T>(st: &CoreState, c: ConnId, e: ProtoError) -> Option<io::Result<T>> {
        match e {
            ProtoError::WouldBlock if !st.reset.contains_key(&c) => None,
            ProtoError::WouldBlock => {
                Some(Err(Core::conn_error(st, c, ProtoError::ConnectionReset)))
            }
            e => Some(Err(Core::conn_error(st, c, e))),
        }
    }

    pub(crate) fn shutdown(&self, c: ConnId, how: Shutdown) -> io::Result<()> {
        let mut st = self.lock();
        Core::check_dead(&st)?;
        let flags = match how {
            Shutdown::Read => ShutdownFlags {
                receive: true,
                send: false,
            },
            Shutdown::Write => ShutdownFlags {
                receive: false,
                send: true,
            },
            Shutdown::Both => ShutdownFlags {
                receive: true,
                send: true,
            },
        };
        st.ep.shutdown(Instant::now(), c, flags).map_err(to_io)?;
        // Callers blocked on `c` (a reader on another clone of the socket) see the end now, as
        // Linux's wake at a shutdown: reads return end of stream, writes BrokenPipe.
        Core::notify(&st, Target::Conn(c));
        self.kick(&mut st);
        Core::show(&mut st, Target::Conn(c));
        Ok(())
    }

    pub(crate) fn close(&self, c: ConnId) {
        let mut st = self.lock();
        st.ep.close(Instant::now(), c);
        st.conn_wait.remove(&c);
        st.shown.remove(&Target::Conn(c));
        st.writers.remove(&c);
        st.rcvlowat.remove(&c);
        st.reset.remove(&c);
        st.connect_result.remove(&c);
        // Tables grown for many connections give their memory back as they empty.
        shrink_sparse(&mut st.conn_wait);
        shrink_sparse(&mut st.shown);
        shrink_sparse(&mut st.writers);
        shrink_sparse(&mut st.reset);
        shrink_sparse(&mut st.connect_result);
        self.kick(&mut st);
    }

    /// [`Core::close`], then wait (as `SO_LINGER` does) until the connection is released (the
    /// peer answered the close, or the protocol's linger ended it) or `linger` passes.
    pub(crate) fn close_linger(self: &Arc<Self>, c: ConnId, linger: Duration) {
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        st.ep.close(Instant::now(), c);
        self.kick(&mut st);
        let wait = Wait::new(false, Some(linger));
        let _ = self.wait_until(st, &cv, wait, Target::Conn(c), Lead::No, |st| {
            st.ep.state(c).is_none().then_some(Ok(()))
        });
        self.close(c);
    }

    /// Reset `c` now: RST to the peer, queues dropped; later calls fail with `ConnectionReset`.
    pub(crate) fn abort(&self, c: ConnId) -> io::Result<()> {
        let mut st = self.lock();
        Core::check_dead(&st)?;
        st.ep.reset(Instant::now(), c);
        Core::route_events(&mut st);
        self.kick(&mut st);
        Ok(())
    }

    /// Our CID.
    pub(crate) fn local_cid(&self) -> u64 {
        self.lock().ep.local_cid()
    }

    /// Our (CID, port) of connection `c`.
    pub(crate) fn local_addr(&self, c: ConnId) -> Option<(u64, u32)> {
        let st = self.lock();
        st.ep.local_port(c).map(|p| (st.ep.local_cid(), p))
    }

    /// The peer's (CID, port) of connection `c`.
    pub(crate) fn peer_addr(&self, c: ConnId) -> Option<(u64, u32)> {
        self.lock().ep.peer_addr(c)
    }
}

// ---- The driver-level poller (`poller.rs`): a socket's registration lives in its `Shown`,
// brought up to date by `Core::show` with the descriptors; dropped with it on close. ----
impl Core {
    /// Register `t` with the poller `queue` under `token`; reported at once if ready now.
    /// `AlreadyExists` if `t` is registered with a poller (this one or another).
    pub(crate) fn poll_register(
        &self,
        t: Target,
        queue: &Arc<PollQueue>,
        token: u64,
        interest: Interest,
    ) -> io::Result<()> {
        let mut st = self.lock();
        let r = Core::readiness(&st, t);
        let shown = st.shown.entry(t).or_default();
        if shown.polled.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "socket already registered with a poller: expected it unregistered",
            ));
        }
        shown.polled = Some(queue.add(token, interest, interest.mask(r)));
        Ok(())
    }

    /// Change `t`'s token and interest with `queue` (reported at once if ready now);
    /// `NotFound` if it is not registered there.
    pub(crate) fn poll_reregister(
        &self,
        t: Target,
        queue: &Arc<PollQueue>,
        token: u64,
        interest: Interest,
    ) -> io::Result<()> {
        let mut st = self.lock();
        let r = Core::readiness(&st, t);
        match st
            .shown
            .get_mut(&t)
            .and_then(|s| s.polled.as_mut())
            .filter(|p| p.is_with(queue))
        {
            Some(p) => {
                p.modify(token, interest, r);
                Ok(())
            }
            None => Err(Core::not_registered()),
        }
    }

    /// Take `t` off `queue`; `NotFound` if it is not registered there.
    pub(crate) fn poll_deregister(&self, t: Target, queue: &Arc<PollQueue>) -> io::Result<()> {
        let mut st = self.lock();
        let Some(shown) = st.shown.get_mut(&t) else {
            return Err(Core::not_registered());
        };
        if !shown.polled.as_ref().is_some_and(|p| p.is_with(queue)) {
            return Err(Core::not_registered());
        }
        shown.polled = None;
        if shown.is_empty() {
            st.shown.remove(&t);
        }
        Ok(())
    }

    fn not_registered() -> io::Error {
        io::Error::new(
            io::ErrorKind::NotFound,
            "socket not registered with this poller",
        )
    }
}

/// A connection reset because of the transport: says so, and why (the inner error of the
/// connection's `ConnectionReset`). Causes: the cause is in the message (the crate docs,
/// "Errors and their causes"): the [`ResetCause`]'s text, then its source.
#[derive(Debug)]
pub(crate) struct ConnReset(pub(crate) Arc<ResetCause>);

impl std::fmt::Display for ConnReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connection reset: {}", self.0)
    }
}

impl std::error::Error for ConnReset {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.0)
    }
}

/// Map protocol errors to what an AF_VSOCK user expects from `std::io`.
pub(crate) fn to_io(e: ProtoError) -> io::Error {
    use io::ErrorKind as K;
    let kind = match &e {
        ProtoError::ConnectionRefused => K::ConnectionRefused,
        ProtoError::ConnectionReset => K::ConnectionReset,
        ProtoError::TimedOut => K::TimedOut,
        ProtoError::AddrInUse { .. } => K::AddrInUse,
        ProtoError::PortsExhausted { .. } => K::AddrNotAvailable,
        ProtoError::NotConnected | ProtoError::UnknownConnection => K::NotConnected,
        ProtoError::BrokenPipe => K::BrokenPipe,
        ProtoError::WouldBlock => K::WouldBlock,
        ProtoError::InvalidInput(_)
        | ProtoError::InvalidCid { .. }
        | ProtoError::MessageTooLarge { .. } => K::InvalidInput,
        _ => K::Other,
    };
    io::Error::new(kind, e)
}

/// The loom model check of this file's synchronisation (built with `--cfg loom` only): a
/// child of this module, so that its models can look at the state they check.
#[cfg(all(test, loom))]
#[path = "loom_tests.rs"]
mod loom_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// A timeout beyond what `Instant` can hold (a caller's `Duration::MAX`) is no deadline,
    /// not a panic: `set_read_timeout(Some(Duration::MAX))` made the next read panic, and a
    /// connect with such a timeout would too now that its wait has a deadline.
    #[test]
    fn regression_a_timeout_too_long_for_the_clock_waits_forever() {
        assert_eq!(Wait::new(false, Some(Duration::MAX)), Wait::Forever);
        assert!(matches!(
            Wait::new(false, Some(Duration::from_secs(1))),
            Wait::Until(_)
        ));
        assert_eq!(Wait::new(true, Some(Duration::MAX)), Wait::Never);
    }

    /// A transport nobody runs: no loop thread, so no timer fires unless a caller pumps (the
    /// sim's host side once its device was reset).
    struct Stopped;

    impl Transport for Stopped {
        fn pump(&mut self, _ep: &mut RtEndpoint, _now: Instant) -> Result<bool, TransportError> {
            Ok(false)
        }
        fn wake(&self) {}
        fn shutdown(&mut self) {}
    }

    /// From the chaos soak (`tests/chaos.rs`): a connect on the sim's host side after the
    /// device was reset never returned. It waited forever for the protocol's connect timer,
    /// which only the (stopped) loop thread fires; the connect's own timeout now bounds its
    /// wait.
    #[test]
    fn regression_connect_times_out_with_no_loop_running() {
        let cfg = crate::proto::Config {
            local_cid: 2,
            ..crate::proto::Config::default()
        };
        let ep = Endpoint::with_storage(cfg, RtStorage::Heap);
        let core = Core::new(ep, Box::new(Stopped), false).unwrap();
        let stats = core.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = core.connect(
                (3, 1234),
                None,
                crate::packet::SocketType::Stream,
                Some(Duration::from_millis(100)),
                false,
            );
            let _ = tx.send(r.map(|_| ()));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("connect still waiting 10 s after its 100 ms timeout");
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
        // The caller fired the protocol's timer itself: the timeout is the protocol's, counted
        // as one (the VM test vfio_connect_refused_times_out saw 0 when the caller woke first).
        assert_eq!(stats.lock().ep.stats().connect_timeouts, 1);
    }

    #[test]
    fn spin_budget_halves_on_a_miss_and_doubles_on_a_hit_within_bounds() {
        let mut b = SpinBudget::default();
        assert_eq!(b.get(), SPIN_BUDGET);
        b.hit();
        assert_eq!(b.get(), SPIN_BUDGET, "never above the ceiling");
        for _ in 0..20 {
            b.miss();
        }
        assert_eq!(b.get(), SPIN_BUDGET_MIN, "never below the floor");
        b.hit();
        assert_eq!(b.get(), SPIN_BUDGET_MIN * 2);
        for _ in 0..20 {
            b.hit();
        }
        assert_eq!(b.get(), SPIN_BUDGET);
    }
}
