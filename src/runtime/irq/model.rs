// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The leader's interrupts under loom (`cfg(loom)` only): a stand-in for [`IrqWait`] with the
//! interface and the semantics the core relies on, over loom's mutex and condition variable
//! instead of eventfds, `poll(2)` and the loop thread's epoll set, so that the model check
//! (`loom_tests.rs`) runs the core's leader hand-off itself.
//!
//! # What it models
//! [`Lines`] is the shared state: the rx and tx interrupt eventfds' counters (raised by the
//! device side, [`Lines::raise`]), whether the loop thread's epoll set watches them, the
//! leader's wake eventfd, and the loop thread's waker and stop eventfds. Every change notifies
//! one condition variable, on which both the leader ([`IrqWait::wait`]) and the loop
//! stand-in ([`Lines::loop_wait`]) sleep.
//! - Level-triggered: a counter stays raised until whoever wakes for it reads it (to zero),
//!   whatever the loop's watch said meanwhile; switching the watch back on with a counter
//!   raised wakes the loop (as `EPOLL_CTL_MOD` re-arms a ready descriptor and wakes
//!   `epoll_wait`).
//! - A wait and its reads are two steps, as `poll` (or `epoll_wait`) and the `read`s after it
//!   are: the wait notes which counters are raised, lets go of the lock, then reads those,
//!   each read taking what is there by then (nothing, when the other side read first: the
//!   real read's `EAGAIN`). The leader reports an interrupt when one was raised at its wait,
//!   whatever its read found, as the real one does; its wake-up counter is read the same way.
//! - The loop's waker (the transport's `wake`) and the interrupts it watches end its wait;
//!   the stop (the model is over) ends it only when nothing else is ready, so that a loop
//!   that has work left does it before it stops.
//!
//! # What it does not
//! - Time: `wait`'s slice is ignored (there is no timeout under loom, as the shim's condition
//!   variable has none), so a leader that nothing wakes sleeps forever: loom reports it as a
//!   deadlock instead of the real 100 ms re-check hiding it.
//! - Failures: `epoll_ctl`, `poll` and the reads never fail here, so the core's paths for
//!   those (back to the condition variable; the core killed) are not exercised; and
//!   [`IrqWait::new`] over real descriptors fails (loom has none): a driver cannot be brought
//!   up under loom, and the models attach [`IrqWait::model`] to a scripted core instead.
//! - `EINTR`, and the interrupt statistic of the loop (only the leader's `taken` is kept).
//! - The config and removal interrupts and the event queue: the loop thread's alone, and not
//!   in the models.

// The core uses the leader's side in every loom build; the device's and the loop's sides (and
// the constructor over `Lines`) are the models' alone.
#![cfg_attr(
    not(test),
    allow(
        dead_code,
        reason = "the device's and the loop's sides are the models'"
    )
)]

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use crate::runtime::sync::{Arc, Condvar, Mutex, MutexGuard};

/// One of the two interrupts a leader waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Line {
    /// The rx queue's used-buffer interrupt.
    Rx,
    /// The tx queue's.
    #[allow(
        dead_code,
        reason = "the scripted device's TX completions are immediate, inside its pump, and \
                  raise no interrupt; the leader waits on both all the same"
    )]
    Tx,
}

impl Line {
    fn index(self) -> usize {
        match self {
            Line::Rx => 0,
            Line::Tx => 1,
        }
    }
}

/// The eventfds' counters and the loop's watch (see the module docs).
#[derive(Debug)]
struct State {
    /// The rx and tx interrupts' counters.
    irq: [u64; 2],
    /// The loop thread's epoll set watches the interrupts.
    loop_watches: bool,
    /// The leader's wake-up counter.
    wake: u64,
    /// The loop thread's waker counter (the transport's `wake`).
    loop_waker: u64,
    /// The loop thread's stop was signalled.
    stop: bool,
}

impl State {
    /// The interrupts raised, as a poll of their eventfds sees them.
    fn raised(&self) -> [bool; 2] {
        self.irq.map(|n| n > 0)
    }
}

/// What the device, the loop stand-in and the leader share: the modelled descriptors.
#[derive(Debug)]
pub(crate) struct Lines {
    state: Mutex<State>,
    /// Notified at every change of `state`.
    changed: Condvar,
}

impl Lines {
    /// No interrupt raised, the loop watching (as after `EventLoop::new`).
    pub(crate) fn new() -> Arc<Lines> {
        Arc::new(Lines {
            state: Mutex::new(State {
                irq: [0; 2],
                loop_watches: true,
                wake: 0,
                loop_waker: 0,
                stop: false,
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change the state and wake every waiter to look at it.
    fn change(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    /// The device signals `line` (writes its eventfd).
    pub(crate) fn raise(&self, line: Line) {
        self.change(|s| s.irq[line.index()] += 1);
    }

    /// The transport's `wake`: the loop thread's waker is written.
    pub(crate) fn wake_loop(&self) {
        self.change(|s| s.loop_waker += 1);
    }

    /// The loop thread's stop is written (the model is over).
    pub(crate) fn stop_loop(&self) {
        self.change(|s| s.stop = true);
    }

    /// Forget the loop's wake-ups so far (the loop stand-in starts after the model's set-up,
    /// which kicked the transport: a real loop would have read its waker by then).
    pub(crate) fn clear_loop_waker(&self) {
        self.lock().loop_waker = 0;
    }

    /// Whether the loop thread watches the interrupts now.
    pub(crate) fn loop_watching(&self) -> bool {
        self.lock().loop_watches
    }

    /// The loop thread's `epoll_wait` (with no timeout: nothing is due) and its reads of
    /// what woke it: sleeps until its waker is written or an interrupt it watches is raised,
    /// then reads those. Returns false when it is stopped with nothing else ready.
    pub(crate) fn loop_wait(&self) -> bool {
        let (waker, irq) = {
            let mut s = self.lock();
            loop {
                let irq = if s.loop_watches {
                    s.raised()
                } else {
                    [false; 2]
                };
                if s.loop_waker > 0 || irq.contains(&true) {
                    break (s.loop_waker > 0, irq);
                }
                if s.stop {
                    return false;
                }
                s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        };
        // The reads, after the wait returned: another thread may have read one first.
        let mut s = self.lock();
        if waker {
            s.loop_waker = 0;
        }
        for (n, ready) in s.irq.iter_mut().zip(irq) {
            if ready {
                *n = 0;
            }
        }
        true
    }
}

/// The stand-in for the interrupts a leader waits on (the real one's interface; see the
/// module docs).
#[derive(Debug)]
pub(crate) struct IrqWait {
    lines: Arc<Lines>,
    /// A leader's wake-ups by an interrupt.
    taken: AtomicU64,
}

impl IrqWait {
    /// The real constructor's signature: there are no descriptors to wait on under loom.
    pub(crate) fn new(
        _epoll: Arc<Epoll>,
        _signals: [(Arc<EventFd>, u64); 2],
        _interrupts: Arc<AtomicU64>,
    ) -> io::Result<IrqWait> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no eventfds under loom: a model attaches IrqWait::model",
        ))
    }

    /// A waiter on `lines`, for a model's core.
    pub(crate) fn model(lines: Arc<Lines>) -> IrqWait {
        IrqWait {
            lines,
            taken: AtomicU64::new(0),
        }
    }

    /// Switch the loop thread's watch of the interrupts off (`false`) or back on (`true`).
    pub(crate) fn loop_watches(&self, on: bool) -> io::Result<()> {
        self.lines.change(|s| s.loop_watches = on);
        Ok(())
    }

    /// Sleep until an interrupt is raised or [`IrqWait::wake`] is called (`_timeout` is
    /// ignored: loom has no clock). Returns whether an interrupt was raised (those raised are
    /// read, so the next wait sleeps again).
    pub(crate) fn wait(&self, _timeout: Duration) -> io::Result<bool> {
        let lines = &self.lines;
        // The poll.
        let (irq, woken) = {
            let mut s = lines.lock();
            while !s.raised().contains(&true) && s.wake == 0 {
                s = lines.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            (s.raised(), s.wake > 0)
        };
        // The reads of what the poll saw ready.
        let mut s = lines.lock();
        for (n, ready) in s.irq.iter_mut().zip(irq) {
            if ready {
                *n = 0;
            }
        }
        if woken {
            s.wake = 0;
        }
        drop(s);
        let fired = irq.contains(&true);
        if fired {
            self.taken.fetch_add(1, Ordering::Relaxed);
        }
        Ok(fired)
    }

    /// Interrupts leaders woke for so far.
    pub(crate) fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// End the leader's wait.
    pub(crate) fn wake(&self) {
        self.lines.change(|s| s.wake += 1);
    }

    /// Forget wake-ups meant for an earlier leader.
    pub(crate) fn clear_wake(&self) {
        self.lines.lock().wake = 0;
    }
}
