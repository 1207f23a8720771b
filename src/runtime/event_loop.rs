// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The event loop: one thread per [`Core`] that sleeps on eventfds and pumps the core's
//! transport. The driver runs one over its device's used-buffer interrupts and config interrupt;
//! the simulated device runs one over the driver's kicks.
//!
//! In busy-poll mode the device is asked not to interrupt; callers that block spin on the rings
//! themselves and the loop thread only wakes every millisecond for timers and unattended traffic.

use std::io;
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use vmm_sys_util::eventfd::EventFd;

use super::core::{spin_pause, Core, SpinBudget, SPIN_BUDGET};
use super::error::TransportError;
use super::irq::IrqWait;

/// What a loop thread waits on besides its waker and stop eventfds.
pub(crate) struct LoopFds {
    pub(crate) waker: EventFd,
    pub(crate) stop: EventFd,
    /// Shared: a leader (`irq.rs`) waits on the same descriptors.
    pub(crate) signals: Vec<Arc<EventFd>>,
    /// Counts the wake-ups by `signals` (the device's used-buffer interrupts, or the driver's
    /// kicks on the sim's side).
    pub(crate) interrupts: Arc<AtomicU64>,
    /// The device's config interrupt: read here, then the transport's `config_changed` runs.
    pub(crate) config: Option<EventFd>,
    /// Signalled when the device is being taken away: the transport's `check_device` runs.
    pub(crate) removal: Option<EventFd>,
    /// How often to ask the transport's `check_device` whether the device is still there
    /// (backends whose removal is not signalled).
    pub(crate) presence_check: Option<Duration>,
    /// Longest sleep (busy-poll mode: 1 ms).
    pub(crate) max_sleep: Option<Duration>,
}

/// Transport rounds per hold of the core's lock in the event loop (and by a leader, `irq.rs`).
pub(crate) const MAX_PUMP_ROUNDS: u32 = 64;

/// In spin mode, rounds between two looks at the eventfds.
const SPIN_ROUNDS_PER_POLL: u32 = 256;

/// A loop's epoll instance with every descriptor of its [`LoopFds`] registered, made before
/// its thread starts: a failure is the bring-up's error, and every descriptor the loop needs
/// is open once the driver (or device) is up, not whenever the thread gets to run.
pub(crate) struct EventLoop {
    epoll: Arc<Epoll>,
    fds: LoopFds,
}

impl EventLoop {
    /// Create the epoll instance and register `fds` (stop, waker, signals, config; each event's
    /// data is its index in that order).
    pub(crate) fn new(fds: LoopFds) -> std::io::Result<EventLoop> {
        let epoll = Arc::new(Epoll::new()?);
        for (i, fd) in fds.all().iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                std::os::unix::io::AsRawFd::as_raw_fd(*fd),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        Ok(EventLoop { epoll, fds })
    }

    /// What lets a blocked caller wait on the first two signals itself, as the leader of the
    /// blocked callers (`irq.rs`): the driver's rx and tx interrupts.
    pub(crate) fn irq_wait(&self) -> io::Result<IrqWait> {
        let [rx, tx, ..] = self.fds.signals.as_slice() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a leader waits on two interrupts (rx and tx)",
            ));
        };
        // Their event data: their index in `LoopFds::all`, after stop and waker.
        let signals = [(rx.clone(), 2), (tx.clone(), 3)];
        IrqWait::new(self.epoll.clone(), signals, self.fds.interrupts.clone())
    }

    /// Start the loop's thread, named `name`, over `core`, and return once it runs.
    ///
    /// Why wait: a new thread's start-up is not free. Rust's runtime maps a signal stack for
    /// it (an `mmap` and an `mprotect`, which take the process's `mmap_lock` for writing), and
    /// its first allocation may map a heap. In a process that maps and unmaps a lot (threads
    /// coming and going, large buffers), those calls queue behind the others for a second or
    /// more; a connect made meanwhile has its 2 s protocol timer running while the threads
    /// that would answer it are not yet running (issue 15's connect stall; see
    /// `tests/README.md`). Waiting here moves that delay into bring-up, which has no timer.
    pub(crate) fn spawn(self, name: String, core: Arc<Core>) -> io::Result<JoinHandle<()>> {
        let (ready, started) = mpsc::sync_channel(1);
        #[cfg(test)]
        let delay = tests::START_DELAYS
            .with(|d| d.borrow_mut().pop())
            .unwrap_or_default();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            // Stands in for a start-up stuck behind `mmap_lock` (see the tests below).
            #[cfg(test)]
            std::thread::sleep(delay);
            run_loop(core, self, ready);
        })?;
        if started.recv().is_err() {
            // The sender went away unsent: the thread ended before its loop (a panic).
            let _ = thread.join();
            return Err(io::Error::other(
                "the event-loop thread ended as it started",
            ));
        }
        Ok(thread)
    }
}

impl LoopFds {
    /// Every descriptor waited on, in the order of their event data.
    fn all(&self) -> Vec<&EventFd> {
        std::iter::once(&self.stop)
            .chain(std::iter::once(&self.waker))
            .chain(self.signals.iter().map(|fd| &**fd))
            .chain(self.config.iter())
            .chain(self.removal.iter())
            .collect()
    }
}

/// Run `core`'s transport until `stop` is signalled: the event loop of the driver and of the
/// simulated device alike. `ready` is told once the thread has done its start-up allocations.
fn run_loop(core: Arc<Core>, el: EventLoop, ready: SyncSender<()>) {
    let EventLoop { epoll, fds } = el;
    let all = fds.all();
    // Their indexes in `all`, when present (after the signals).
    let config_index = fds.config.as_ref().map(|_| 2 + fds.signals.len());
    let removal_index = fds
        .removal
        .as_ref()
        .map(|_| 2 + fds.signals.len() + usize::from(fds.config.is_some()));
    let mut config_pending = false;
    let mut removal_pending = false;
    let mut next_presence_check = fds.presence_check.map(|d| Instant::now() + d);
    let mut events = vec![EpollEvent::default(); all.len()];
    // The spawner waits for this; it may already have given up (an error path): no matter.
    let _ = ready.send(());
    drop(ready);
    // A zero sleep means "spin": look at the eventfds (for the stop signal) only now and then,
    // since an epoll_wait per round costs more than the round itself.
    let spinning = fds.max_sleep == Some(Duration::ZERO);
    let mut spins = 0u32;
    // Spinning: since when nothing moved, and whether we are asleep (out of SPIN_BUDGET, with
    // notifications on) rather than spinning.
    let mut idle_since = Instant::now();
    let mut asleep = false;
    // When the spinner last went to sleep.
    let mut slept_at = Instant::now();
    let mut budget = SpinBudget::default();
    loop {
        let (timeout, more) = {
            let mut st = core.lock();
            let now = Instant::now();
            let check_due = next_presence_check.is_some_and(|t| t <= now);
            if check_due || removal_pending {
                if !Core::check_device_locked(&mut st, std::mem::take(&mut removal_pending)) {
                    return;
                }
                next_presence_check = fds.presence_check.map(|d| now + d);
            }
            if std::mem::take(&mut config_pending) {
                Core::config_changed_locked(&mut st, now);
            }
            // Pump until nothing moves, so one wake-up drains a whole burst; after
            // MAX_PUMP_ROUNDS let user threads at the lock, then come straight back: work
            // left over may never be signalled again (its eventfd was already consumed).
            let mut more = Core::pump_rounds(&mut st, now, MAX_PUMP_ROUNDS);
            if st.dead.is_some() {
                return;
            }
            if spinning && asleep {
                // Woken: spin again.
                Core::sleeper_out(&mut st);
                asleep = false;
                idle_since = now;
                if now.saturating_duration_since(slept_at) < SPIN_BUDGET {
                    // The work came soon after we gave up: a spin of the longest budget
                    // would have caught it. Let the budget grow back, or it only shrinks,
                    // every sleep makes the next gap longer (the wake-up is slow), and a
                    // device that polls ends up sleeping at every request.
                    budget.hit();
                }
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
                slept_at = now;
                more = Core::pump_locked(&mut st, now);
            }
            let timeout = st.ep.poll_timeout();
            st.loop_timer = timeout;
            (timeout, more)
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
        if let Some(t) = next_presence_check {
            let until = t.saturating_duration_since(now);
            sleep = Some(sleep.map_or(until, |s| s.min(until)));
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
                    removal_pending |= Some(i) == removal_index;
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::time::{Duration, Instant};

    use crate::driver::{DriverConfig, VsockAddr, VsockDriver};
    use crate::sim::{SimConfig, ECHO_PORT};

    thread_local! {
        /// How long the next event-loop threads spawned from this thread take to start, the
        /// next one last (tests only).
        pub(super) static START_DELAYS: RefCell<Vec<Duration>> = const { RefCell::new(Vec::new()) };
    }

    /// Issue 15's connect stall, made deterministic. Under load a new thread's start-up waited
    /// seconds for `mmap_lock` (Rust maps a signal stack per thread), bring-up returned before
    /// its threads ran, and a connect made then timed out: its 2 s timer ran while the driver's
    /// and the sim's threads were not yet running (tests/README.md, "The connect stall"). Here
    /// start-up takes 1.5 s on purpose for the sim's thread (spawned first) and 1.2 s for the
    /// driver's, and the connect's timer is 1 s: bring-up must absorb the wait, and the connect
    /// must then succeed. Without the wait in `EventLoop::spawn`, bring-up returns at once and
    /// the connect fails with `TimedOut` (the driver's thread starts after the timer ran out,
    /// and before the sim's thread could answer), as in the suite under load.
    #[test]
    fn regression_connect_after_bring_up_does_not_race_thread_start_up() {
        const START: Duration = Duration::from_millis(1500);
        START_DELAYS.with(|d| *d.borrow_mut() = vec![Duration::from_millis(1200), START]);
        let began = Instant::now();
        let opened = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default());
        let unused = START_DELAYS.with(|d| std::mem::take(&mut *d.borrow_mut()));
        assert!(
            unused.is_empty(),
            "bring-up spawned fewer loop threads than expected"
        );
        let (driver, _host) = opened.expect("open sim");
        let took = began.elapsed();
        assert!(
            took >= START,
            "bring-up returned after {took:?}, before its threads ran"
        );
        let mut s = driver
            .connect_timeout(VsockAddr::new(2, ECHO_PORT), Duration::from_secs(1))
            .expect("connect right after bring-up");
        std::io::Write::write_all(&mut s, b"ping").unwrap();
        let mut buf = [0u8; 4];
        std::io::Read::read_exact(&mut s, &mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }
}
