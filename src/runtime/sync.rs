// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The runtime's synchronisation primitives: `std`'s in every normal build, `loom`'s when the
//! crate is built with `RUSTFLAGS="--cfg loom"` for the model check (`loom_tests.rs`, run as
//! `tests/README.md` says). Code that blocks or spins takes its primitives from here, so the
//! model check runs the very code the driver runs.
//!
//! What is shimmed, and what is not:
//! - [`Mutex`], [`MutexGuard`], [`Condvar`]: the core's lock, the per-connection condition
//!   variables blocked callers sleep on, and the per-connection writer locks. Under loom,
//!   `Condvar::wait_timeout` never times out (loom does not model time), so the core's
//!   100 ms re-check is gone from the models: a lost wake-up is a deadlock loom reports, not a
//!   stall the safety net hides.
//! - [`atomic`]: the payload pools' free counts, reference counts and in-flight counts
//!   (`storage.rs`), which the unlocked copies touch with the core's lock let go.
//! - [`Arc`] is `std`'s in both builds: a [`Core`](super::Core) is handed out as a
//!   `std::sync::Arc` by the driver, the sockets and the simulated device, and nothing blocks
//!   or spins on a reference count (loom's `Arc` would only add leak checks).
//! - [`spin_loop`], [`yield_now`]: a spinning caller's pause. Under loom both yield to the
//!   model's scheduler, which a spin loop must do for loom to explore it.
//! - [`keep_spinning`]: the busy-poll spin budget. It is wall-clock time (microseconds) in a
//!   normal build; under loom a fixed number of rounds per thread, because loom replays every
//!   schedule and a decision taken on the clock would not replay.
//!
//! The event loop's interrupt counter stays a `std` atomic: it is a statistic (relaxed, read by
//! `DriverStats`), made by the driver, and no decision depends on it. The readiness descriptors
//! share no memory between threads: their state is the kernel's, changed under the core's lock.

#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};

pub(crate) use std::sync::Arc;

use std::time::Duration;

/// Atomic integers and orderings: `std::sync::atomic`, or loom's.
pub(crate) mod atomic {
    #[cfg(not(loom))]
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

    #[cfg(loom)]
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
}

/// One round of a busy wait that has not waited long yet (a CPU hint).
pub(crate) fn spin_loop() {
    #[cfg(not(loom))]
    std::hint::spin_loop();
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// Give the core to another thread.
pub(crate) fn yield_now() {
    #[cfg(not(loom))]
    std::thread::yield_now();
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// Whether a busy-poll caller idle for `idle` may spin another round with `budget`.
#[cfg(not(loom))]
pub(crate) fn keep_spinning(idle: Duration, budget: Duration) -> bool {
    idle < budget
}

/// Spin rounds a busy-poll caller makes under loom before it sleeps (then as many again each
/// time it is woken): one round is enough for loom to interleave the spinner's pumps with
/// everybody else's, and for the models to reach both the spin and the sleep path.
#[cfg(loom)]
pub(crate) const LOOM_SPIN_ROUNDS: u32 = 1;

/// Whether a busy-poll caller may spin another round: under loom, [`LOOM_SPIN_ROUNDS`] rounds
/// in a row on this thread, then no (once; the count starts again). Time is ignored.
#[cfg(loom)]
pub(crate) fn keep_spinning(_idle: Duration, _budget: Duration) -> bool {
    loom::thread_local! {
        static ROUNDS: std::cell::Cell<u32> = std::cell::Cell::new(0);
    }
    ROUNDS.with(|r| {
        if r.get() < LOOM_SPIN_ROUNDS {
            r.set(r.get() + 1);
            true
        } else {
            r.set(0);
            false
        }
    })
}
