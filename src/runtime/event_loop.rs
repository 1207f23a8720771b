// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The event loop: one thread per [`Core`] that sleeps on eventfds and pumps the core's
//! transport. The driver runs one over its device's used-buffer interrupts and config interrupt;
//! the simulated device runs one over the driver's kicks.
//!
//! In busy-poll mode the device is asked not to interrupt; callers that block spin on the rings
//! themselves and the loop thread only wakes every millisecond for timers and unattended traffic.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use vmm_sys_util::eventfd::EventFd;

use super::core::{spin_pause, Core, SpinBudget};
use super::error::TransportError;

/// What a loop thread waits on besides its waker and stop eventfds.
pub(crate) struct LoopFds {
    pub(crate) waker: EventFd,
    pub(crate) stop: EventFd,
    pub(crate) signals: Vec<EventFd>,
    /// Counts the wake-ups by `signals` (the device's used-buffer interrupts, or the driver's
    /// kicks on the sim's side).
    pub(crate) interrupts: Arc<AtomicU64>,
    /// The device's config interrupt: read here, then the transport's `config_changed` runs.
    pub(crate) config: Option<EventFd>,
    /// Longest sleep (busy-poll mode: 1 ms).
    pub(crate) max_sleep: Option<Duration>,
}

/// Transport rounds per hold of the core's lock in the event loop.
const MAX_PUMP_ROUNDS: u32 = 64;

/// In spin mode, rounds between two looks at the eventfds.
const SPIN_ROUNDS_PER_POLL: u32 = 256;

/// A loop's epoll instance with every descriptor of its [`LoopFds`] registered, made before
/// its thread starts: a failure is the bring-up's error, and every descriptor the loop needs
/// is open once the driver (or device) is up, not whenever the thread gets to run.
pub(crate) struct EventLoop {
    epoll: Epoll,
    fds: LoopFds,
}

impl EventLoop {
    /// Create the epoll instance and register `fds` (stop, waker, signals, config; each event's
    /// data is its index in that order).
    pub(crate) fn new(fds: LoopFds) -> std::io::Result<EventLoop> {
        let epoll = Epoll::new()?;
        for (i, fd) in fds.all().iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                std::os::unix::io::AsRawFd::as_raw_fd(*fd),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        Ok(EventLoop { epoll, fds })
    }
}

impl LoopFds {
    /// Every descriptor waited on, in the order of their event data.
    fn all(&self) -> Vec<&EventFd> {
        std::iter::once(&self.stop)
            .chain(std::iter::once(&self.waker))
            .chain(self.signals.iter())
            .chain(self.config.iter())
            .collect()
    }
}

/// Run `core`'s transport until `stop` is signalled: the event loop of the driver and of the
/// simulated device alike.
pub(crate) fn run_loop(core: Arc<Core>, el: EventLoop) {
    let EventLoop { epoll, fds } = el;
    let all = fds.all();
    // Its index in `all`, when present (it is last).
    let config_index = fds.config.as_ref().map(|_| all.len() - 1);
    let mut config_pending = false;
    let mut events = vec![EpollEvent::default(); all.len()];
    // A zero sleep means "spin": look at the eventfds (for the stop signal) only now and then,
    // since an epoll_wait per round costs more than the round itself.
    let spinning = fds.max_sleep == Some(Duration::ZERO);
    let mut spins = 0u32;
    // Spinning: since when nothing moved, and whether we are asleep (out of SPIN_BUDGET, with
    // notifications on) rather than spinning.
    let mut idle_since = Instant::now();
    let mut asleep = false;
    let mut budget = SpinBudget::default();
    loop {
        let (timeout, more) = {
            let mut st = core.lock();
            let now = Instant::now();
            if std::mem::take(&mut config_pending) {
                Core::config_changed_locked(&mut st, now);
            }
            // Pump until nothing moves, so one wake-up drains a whole burst; after
            // MAX_PUMP_ROUNDS let user threads at the lock, then come straight back: work
            // left over may never be signalled again (its eventfd was already consumed).
            let mut more = true;
            for _ in 0..MAX_PUMP_ROUNDS {
                more = Core::pump_locked(&mut st, now);
                if !more {
                    break;
                }
            }
            if st.dead.is_some() {
                return;
            }
            if spinning && asleep {
                // Woken: spin again.
                Core::sleeper_out(&mut st);
                asleep = false;
                idle_since = now;
            }
            if spinning && more {
                if now > idle_since {
                    // Work came while we spun.
                    budget.hit();
                }
                idle_since = now;
            }
            if spinning && !more && now.saturating_duration_since(idle_since) >= budget.get() {
                budget.miss();
                // Idle for the whole budget: sleep on the kicks instead of taking a core from
                // whoever has work; one more pump catches what came before they were on.
                Core::sleeper_in(&mut st);
                asleep = true;
                more = Core::pump_locked(&mut st, now);
            }
            (st.ep.poll_timeout(), more)
        };
        if spinning && !more && !asleep {
            spins = spins.wrapping_add(1);
            if spins % SPIN_ROUNDS_PER_POLL != 0 {
                spin_pause(idle_since.elapsed());
                continue;
            }
        }
        let now = Instant::now();
        let mut sleep = timeout.map(|t| t.saturating_duration_since(now));
        if let Some(max) = fds.max_sleep.filter(|_| !asleep) {
            sleep = Some(sleep.map_or(max, |s| s.min(max)));
        }
        let ms = if more {
            // Only look for the stop signal; the work left over is ours to finish.
            0
        } else {
            sleep.map_or(-1, |d| i32::try_from(d.as_millis()).unwrap_or(i32::MAX))
        };
        let n = match epoll.wait(ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                core.kill(
                    TransportError::EventLoop {
                        op: "epoll_wait",
                        source: e,
                    }
                    .into(),
                );
                return;
            }
        };
        for ev in &events[..n] {
            match usize::try_from(ev.data()) {
                Ok(0) => return,
                Ok(i) => {
                    if let Some(fd) = all.get(i) {
                        let _ = fd.read();
                    }
                    if (2..2 + fds.signals.len()).contains(&i) {
                        fds.interrupts.fetch_add(1, Ordering::Relaxed);
                    }
                    config_pending |= Some(i) == config_index;
                }
                Err(_) => {}
            }
        }
    }
}
