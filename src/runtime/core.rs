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
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::error::{error_chain, Ended, TransportError};
use super::stats::DriverStats;
use super::storage::RtStorage;
use crate::packet::{ShutdownFlags, SocketType};
use crate::proto::{ConnId, Endpoint, Event, ListenerId, ProtoError};
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
    /// Connections reset by the peer (reads drain first, then ConnectionReset).
    reset: HashMap<ConnId, ()>,
    /// Busy-poll threads asleep (out of their spin budget): notifications are on while > 0.
    sleepers: usize,
    /// How long busy-poll callers spin before they sleep.
    spin: SpinBudget,
}

impl CoreState {
    /// The transport's data-path counters, when it is a driver's.
    pub(crate) fn transport_stats(&self) -> Option<DriverStats> {
        self.transport.driver_stats()
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
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Transport rounds a user call runs itself after queueing data (see [`Core::kick`]).
const CALLER_PUMP_ROUNDS: u32 = 2;

/// How long a sleeping caller waits before re-checking by itself (a safety net only: every
/// state change notifies).
const WAIT_SLICE: Duration = Duration::from_millis(100);

impl Core {
    pub(crate) fn new(ep: RtEndpoint, transport: Box<dyn Transport>, busy_poll: bool) -> Arc<Core> {
        Arc::new(Core {
            state: Mutex::new(CoreState {
                ep,
                transport,
                dead: None,
                conn_wait: HashMap::new(),
                listen_wait: HashMap::new(),
                connect_result: HashMap::new(),
                reset: HashMap::new(),
                sleepers: 0,
                spin: SpinBudget::default(),
            }),
            busy_poll,
        })
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
        let moved = match transport.pump(ep, now) {
            Ok(m) => m,
            Err(e) => {
                st.transport.shutdown();
                Core::kill_locked(st, e.into());
                return true;
            }
        };
        Core::route_events(st);
        moved
    }

    /// Let the transport handle a config interrupt, then route the events (resets) it caused.
    pub(crate) fn config_changed_locked(st: &mut CoreState, now: Instant) {
        if st.dead.is_some() {
            return;
        }
        let CoreState { ep, transport, .. } = st;
        if let Err(e) = transport.config_changed(ep, now) {
            st.transport.shutdown();
            Core::kill_locked(st, e.into());
            return;
        }
        Core::route_events(st);
    }

    /// Drain the endpoint's events to the waiters.
    pub(crate) fn route_events(st: &mut CoreState) {
        while let Some(ev) = st.ep.poll_event() {
            match ev {
                Event::Connected(c) => {
                    st.connect_result.insert(c, Ok(()));
                    notify(&st.conn_wait, c);
                }
                Event::ConnectFailed(c, e) => {
                    st.connect_result.insert(c, Err(e));
                    notify(&st.conn_wait, c);
                }
                Event::Incoming(l) => {
                    if let Some(cv) = st.listen_wait.get(&l) {
                        cv.notify_all();
                    }
                }
                Event::Reset(c) => {
                    st.reset.insert(c, ());
                    st.connect_result
                        .entry(c)
                        .or_insert(Err(ProtoError::ConnectionReset));
                    notify(&st.conn_wait, c);
                }
                Event::Closed(c) => {
                    st.reset.remove(&c);
                    st.connect_result.remove(&c);
                    notify(&st.conn_wait, c);
                }
                Event::Readable(c) | Event::Writable(c) | Event::PeerShutdown(c, _) => {
                    notify(&st.conn_wait, c);
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

    /// Block until `ready` says yes (returns its value), the deadline passes, or the device dies.
    /// `cv` is the condition variable the awaited state change notifies.
    fn wait_until<'a, T>(
        self: &'a Arc<Self>,
        mut st: MutexGuard<'a, CoreState>,
        cv: &Arc<Condvar>,
        deadline: Option<Instant>,
        mut ready: impl FnMut(&mut CoreState) -> Option<io::Result<T>>,
    ) -> io::Result<T> {
        // Busy-poll: spin (moving packets ourselves) while progress is likely, then sleep.
        let mut spin_since = Instant::now();
        let mut asleep = false;
        let mut spun = false;
        let result = loop {
            if let Some(r) = ready(&mut st) {
                if spun && !asleep {
                    st.spin.hit();
                }
                break r;
            }
            if let Err(e) = Core::check_dead(&st) {
                break Err(e);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "vsock operation timed out",
                ));
            }
            if self.busy_poll && !asleep {
                let idle = now.saturating_duration_since(spin_since);
                if idle < st.spin.get() {
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

    fn conn_cv(st: &mut CoreState, c: ConnId) -> Arc<Condvar> {
        st.conn_wait.entry(c).or_default().clone()
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
        for _ in 0..CALLER_PUMP_ROUNDS {
            if !Core::pump_locked(st, now) {
                return;
            }
        }
        st.transport.wake();
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

    /// Open a connection to `cid:port` and wait for the handshake.
    pub(crate) fn connect(
        self: &Arc<Self>,
        cid: u64,
        port: u32,
        ty: SocketType,
        timeout: Option<Duration>,
    ) -> io::Result<ConnId> {
        let mut st = self.lock();
        Core::check_dead(&st)?;
        let now = Instant::now();
        let c = st.ep.connect(now, cid, port, None, ty).map_err(to_io)?;
        let cv = Core::conn_cv(&mut st, c);
        self.kick(&mut st);
        let deadline = timeout.map(|t| now + t);
        let r = self.wait_until(st, &cv, deadline, |st| {
            st.connect_result.remove(&c).map(|r| r.map_err(to_io))
        });
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

    pub(crate) fn accept(
        self: &Arc<Self>,
        l: ListenerId,
        deadline: Option<Instant>,
    ) -> io::Result<ConnId> {
        let mut st = self.lock();
        let cv = st.listen_wait.entry(l).or_default().clone();
        self.wait_until(st, &cv, deadline, |st| {
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
        self.kick(&mut st);
    }

    /// Blocking read: waits for data, EOF (Ok(0)) or an error.
    pub(crate) fn read(
        self: &Arc<Self>,
        c: ConnId,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        let this = self.clone();
        self.wait_until(st, &cv, deadline, |st| {
            match st.ep.recv(Instant::now(), c, buf) {
                Ok(n) => {
                    if n > 0 {
                        // Freed receive space may owe the peer a credit update.
                        this.kick(st);
                    }
                    Some(Ok(n))
                }
                Err(e) => Core::read_error(st, c, e),
            }
        })
    }

    /// Blocking write of the whole buffer (returns once all of it is queued in the endpoint).
    pub(crate) fn write(
        self: &Arc<Self>,
        c: ConnId,
        mut data: &[u8],
        deadline: Option<Instant>,
    ) -> io::Result<usize> {
        let total = data.len();
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        let this = self.clone();
        self.wait_until(st, &cv, deadline, |st| {
            if let Some(e) = Core::reset_error(st, c) {
                return Some(Err(e));
            }
            match st.ep.send(Instant::now(), c, data) {
                Ok(n) => {
                    if n > 0 {
                        this.kick(st);
                    }
                    data = &data[n..];
                    if data.is_empty() {
                        Some(Ok(total))
                    } else {
                        None
                    }
                }
                Err(ProtoError::WouldBlock) => None,
                Err(e) => Some(Err(to_io(e))),
            }
        })
    }

    /// Blocking vectored read: waits for data (or EOF, or an error) like [`Core::read`], then
    /// fills the buffers in order under one hold of the lock.
    pub(crate) fn read_vectored(
        self: &Arc<Self>,
        c: ConnId,
        bufs: &mut [io::IoSliceMut<'_>],
        deadline: Option<Instant>,
    ) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        let this = self.clone();
        self.wait_until(st, &cv, deadline, |st| {
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
        deadline: Option<Instant>,
    ) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let (mut i, mut off) = (0, 0);
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        let this = self.clone();
        self.wait_until(st, &cv, deadline, |st| {
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
                    Ok(0) | Err(ProtoError::WouldBlock) => break None,
                    Ok(n) => {
                        off += n;
                        sent = true;
                    }
                    Err(e) => break Some(Err(to_io(e))),
                }
            };
            if sent {
                this.kick(st);
            }
            r
        })
    }

    /// Blocking zero-copy write: waits for room in the send buffer, then `fill` writes up to
    /// `max` bytes straight into the connection's send storage (DMA memory on a driver) and
    /// says how many; they are queued. Runs `fill` under the core's lock, once.
    pub(crate) fn send_with(
        self: &Arc<Self>,
        c: ConnId,
        max: usize,
        deadline: Option<Instant>,
        fill: impl FnOnce(&[VolatileSlice<'_, ()>]) -> usize,
    ) -> io::Result<usize> {
        if max == 0 {
            return Ok(0);
        }
        let mut fill = Some(fill);
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        let this = self.clone();
        self.wait_until(st, &cv, deadline, |st| {
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
                Err(e) => Some(Err(to_io(e))),
            }
        })
    }

    /// Blocking zero-copy read: waits for data, then `take` sees the received payload where it
    /// lies (DMA memory on a driver) and says how many bytes it consumed. `Ok(0)` at end of
    /// stream, without calling `take`. Runs `take` under the core's lock, once.
    pub(crate) fn recv_with(
        self: &Arc<Self>,
        c: ConnId,
        deadline: Option<Instant>,
        take: impl FnOnce(&[VolatileSlice<'_, ()>]) -> usize,
    ) -> io::Result<usize> {
        let mut take = Some(take);
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        let this = self.clone();
        self.wait_until(st, &cv, deadline, |st| {
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
        deadline: Option<Instant>,
    ) -> io::Result<usize> {
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        let this = self.clone();
        self.wait_until(st, &cv, deadline, |st| {
            if let Some(e) = Core::reset_error(st, c) {
                return Some(Err(e));
            }
            match st.ep.send_msg(Instant::now(), c, msg, eor) {
                Ok(()) => {
                    this.kick(st);
                    Some(Ok(msg.len()))
                }
                Err(ProtoError::WouldBlock) => None,
                Err(e) => Some(Err(to_io(e))),
            }
        })
    }

    /// Blocking receive of one SEQPACKET message: (bytes copied, full message length, EOR).
    pub(crate) fn recv_msg(
        self: &Arc<Self>,
        c: ConnId,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> io::Result<(usize, usize, bool)> {
        let mut st = self.lock();
        let cv = Core::conn_cv(&mut st, c);
        let this = self.clone();
        self.wait_until(st, &cv, deadline, |st| {
            match st.ep.recv_msg(Instant::now(), c, buf) {
                Ok(r) => {
                    this.kick(st);
                    Some(Ok(r))
                }
                Err(e) => Core::read_error(st, c, e),
            }
        })
    }

    /// A send on a connection the peer reset fails at once with ConnectionReset (a read
    /// drains what arrived first, see [`Core::read_error`]).
    fn reset_error(st: &CoreState, c: ConnId) -> Option<io::Error> {
        st.reset
            .contains_key(&c)
            .then(|| to_io(ProtoError::ConnectionReset))
    }

    /// What a blocked read does with a receive error: nothing buffered (`WouldBlock`) means
    /// wait, unless the peer reset the connection; anything else ends the read.
    fn read_error<T>(st: &CoreState, c: ConnId, e: ProtoError) -> Option<io::Result<T>> {
        match e {
            ProtoError::WouldBlock if !st.reset.contains_key(&c) => None,
            ProtoError::WouldBlock => Some(Err(to_io(ProtoError::ConnectionReset))),
            e => Some(Err(to_io(e))),
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
        self.kick(&mut st);
        Ok(())
    }

    pub(crate) fn close(&self, c: ConnId) {
        let mut st = self.lock();
        st.ep.close(Instant::now(), c);
        st.conn_wait.remove(&c);
        st.reset.remove(&c);
        st.connect_result.remove(&c);
        self.kick(&mut st);
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

fn notify(map: &HashMap<ConnId, Arc<Condvar>>, c: ConnId) {
    if let Some(cv) = map.get(&c) {
        cv.notify_all();
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

#[cfg(test)]
mod tests {
    use super::*;

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
