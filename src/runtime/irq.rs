// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A blocked caller that waits on the device's interrupts itself: the leader of the blocked
//! callers (the leader/follower pattern).
//!
//! Without it, a reply costs three thread wake-ups: the device's, then the loop thread's (the
//! interrupt wakes it; it pumps the rings and notifies the reader's condition variable), then
//! the reader's. Linux needs no such hop: its interrupt handler runs in whatever was
//! interrupted and wakes the reader directly. Here one blocked caller at a time, the leader,
//! sleeps on the rx and tx interrupt eventfds itself and pumps the rings when they fire, so a
//! reply wakes the thread that waits for it and nothing else. Meanwhile the loop thread stops
//! watching those two eventfds (their registration in its epoll set is switched off), or both
//! threads would wake for every interrupt and contend for the core's lock. The other blocked
//! callers (followers) sleep on their condition variables as before: whoever pumps notifies
//! them. When the leader's call ends, the loop thread's registration is switched back on; an
//! interrupt that came meanwhile is still counted in its eventfd (level-triggered), so the loop
//! sees it at once.
//!
//! What stays the loop thread's: the event queue, the config and removal interrupts, the waker
//! and the protocol's timers (a leader that sets an earlier timer than the one the loop sleeps
//! until wakes the loop: see `Core::timer_check`). Busy-poll mode has no leader: its callers
//! run the rings themselves.
//!
//! Under `cfg(loom)` (the model check, `loom_tests.rs`) `IrqWait` is a stand-in without file
//! descriptors, made of loom's mutex and condition variable (`irq/model.rs`, whose module docs
//! say what it models and what not); the core runs unchanged over it. This is the only
//! switch: the `IrqWait` below is the normal build's, unchanged.

#[cfg(not(loom))]
use std::io;
#[cfg(not(loom))]
use std::os::fd::{AsRawFd, BorrowedFd};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::Arc;
#[cfg(not(loom))]
use std::time::Duration;

#[cfg(not(loom))]
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
#[cfg(not(loom))]
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
#[cfg(not(loom))]
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[cfg(loom)]
pub(crate) mod model;
#[cfg(loom)]
pub(crate) use self::model::IrqWait;

/// The interrupts a leader waits on, and how it switches the loop thread's watch of them.
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct IrqWait {
    /// The loop thread's epoll set.
    epoll: Arc<Epoll>,
    /// The interrupt eventfds: the very descriptors registered in `epoll` (a registration is
    /// known by its descriptor number, so a duplicate would not do), each with its event data
    /// there: rx and tx. Shared with the loop thread, so they stay open while either needs them.
    signals: [(Arc<EventFd>, u64); 2],
    /// Written to end the leader's wait: its call may be able to complete (someone else
    /// pumped, another thread shut the connection down, the core ended).
    wake: EventFd,
    /// The loop's interrupt counter: a leader's wake-ups by an interrupt count too.
    interrupts: Arc<AtomicU64>,
    /// A leader's wake-ups by an interrupt.
    taken: AtomicU64,
}

#[cfg(not(loom))]
impl IrqWait {
    /// A waiter on `signals` (descriptors registered in `epoll` with the given event data),
    /// counting wake-ups in `interrupts`.
    pub(crate) fn new(
        epoll: Arc<Epoll>,
        signals: [(Arc<EventFd>, u64); 2],
        interrupts: Arc<AtomicU64>,
    ) -> io::Result<IrqWait> {
        Ok(IrqWait {
            epoll,
            signals,
            wake: EventFd::new(EFD_NONBLOCK)?,
            interrupts,
            taken: AtomicU64::new(0),
        })
    }

    /// Switch the loop thread's watch of the interrupts off (`false`) or back on (`true`).
    /// Called under the core's lock, so the switches of successive leaders do not interleave.
    pub(crate) fn loop_watches(&self, on: bool) -> io::Result<()> {
        let events = if on { EventSet::IN } else { EventSet::empty() };
        for (fd, data) in &self.signals {
            self.epoll.ctl(
                ControlOperation::Modify,
                fd.as_raw_fd(),
                EpollEvent::new(events, *data),
            )?;
        }
        Ok(())
    }

    /// Sleep until an interrupt fires, [`IrqWait::wake`] is called, or `timeout` passes.
    /// Returns whether an interrupt fired (its eventfd is read, so the next wait sleeps again).
    pub(crate) fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let poll_fd = |fd: &EventFd| {
            // SAFETY: `fd` is an open eventfd owned by `self` (vmm-sys-util's `EventFd` has no
            // `AsFd`), and the borrow lives only as long as `&self`.
            let fd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
            PollFd::new(fd, PollFlags::POLLIN)
        };
        // On the stack: this is every blocked read's way to sleep.
        let mut fds = [
            poll_fd(&self.signals[0].0),
            poll_fd(&self.signals[1].0),
            poll_fd(&self.wake),
        ];
        // Rounded up: a wait of 0.3 ms must not become a busy loop of zero-length polls.
        let ms = timeout.as_micros().div_ceil(1000);
        let ms = PollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX));
        match poll(&mut fds, ms) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        let ready = fds.map(|p| p.revents().is_some_and(|r| r.intersects(PollFlags::POLLIN)));
        let mut fired = false;
        for ((fd, _), ready) in self.signals.iter().zip(ready) {
            if ready {
                // Non-blocking: the loop thread may have read it first (a leader just taking
                // over); `EAGAIN` then.
                let _ = fd.read();
                fired = true;
            }
        }
        if ready[2] {
            let _ = self.wake.read();
        }
        if fired {
            self.interrupts.fetch_add(1, Ordering::Relaxed);
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
        let _ = self.wake.write(1);
    }

    /// Forget wake-ups meant for an earlier leader.
    pub(crate) fn clear_wake(&self) {
        let _ = self.wake.read();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A waiter on two interrupts registered in a loop's epoll set; the first is returned.
    fn waiter() -> (IrqWait, Arc<Epoll>, Arc<EventFd>) {
        let epoll = Arc::new(Epoll::new().unwrap());
        let irqs = [7, 8].map(|data| {
            let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
            epoll
                .ctl(
                    ControlOperation::Add,
                    irq.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, data),
                )
                .unwrap();
            (irq, data)
        });
        let first = irqs[0].0.clone();
        let w = IrqWait::new(epoll.clone(), irqs, Arc::new(AtomicU64::new(0))).unwrap();
        (w, epoll, first)
    }

    fn loop_sees(epoll: &Epoll) -> usize {
        let mut evs = [EpollEvent::default(); 4];
        epoll.wait(0, &mut evs).unwrap()
    }

    #[test]
    fn an_interrupt_wakes_the_leader_and_not_the_loop_while_it_leads() {
        let (w, epoll, irq) = waiter();
        w.loop_watches(false).unwrap();
        irq.write(1).unwrap();
        assert_eq!(
            loop_sees(&epoll),
            0,
            "the loop saw an interrupt a leader owns"
        );
        assert!(w.wait(Duration::from_secs(5)).unwrap());
        assert_eq!(w.interrupts.load(Ordering::Relaxed), 1);
        // Read: the next wait sleeps its whole timeout.
        let began = Instant::now();
        assert!(!w.wait(Duration::from_millis(30)).unwrap());
        assert!(began.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn an_interrupt_left_when_the_leader_goes_is_the_loops() {
        let (w, epoll, irq) = waiter();
        w.loop_watches(false).unwrap();
        irq.write(1).unwrap();
        w.loop_watches(true).unwrap();
        assert_eq!(
            loop_sees(&epoll),
            1,
            "an interrupt was lost in the hand-back"
        );
    }

    /// Build item 3 of issue 12: a blocked reader is woken by the interrupt of its reply
    /// itself, with no hand-off through the loop thread. The reader blocks first (its lead is
    /// waited for, not slept on); only then does the peer write, so the interrupt of that
    /// write is the reader's to take, whatever the timing.
    #[test]
    fn a_blocked_reader_takes_its_replys_interrupt_itself() {
        use crate::driver::{DriverConfig, VsockDriver};
        use crate::sim::SimConfig;
        use std::io::{Read, Write};

        let (driver, host) =
            VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).unwrap();
        let listener = driver.listen(5000).unwrap();
        let mut peer = host.connect(5000).unwrap();
        let (mut ours, _) = listener.accept().unwrap();
        let before = driver.stats();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 5];
            ours.read_exact(&mut buf).map(|()| buf)
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !driver.core().lock().has_leader() {
            assert!(Instant::now() < deadline, "the reader never led");
            std::thread::yield_now();
        }
        peer.write_all(b"hello").unwrap();
        assert_eq!(&reader.join().unwrap().unwrap(), b"hello");
        let after = driver.stats();
        assert!(
            after.caller_interrupts > before.caller_interrupts,
            "the reply's interrupt went to the loop thread: {before:?} -> {after:?}"
        );
        assert!(
            !driver.core().lock().has_leader(),
            "the lead was not given back"
        );
    }

    #[test]
    fn wake_ends_the_wait_without_an_interrupt_and_clear_forgets_it() {
        let (w, _epoll, _irq) = waiter();
        w.wake();
        let began = Instant::now();
        assert!(!w.wait(Duration::from_secs(5)).unwrap());
        assert!(began.elapsed() < Duration::from_secs(5));
        w.wake();
        w.clear_wake();
        let began = Instant::now();
        assert!(!w.wait(Duration::from_millis(20)).unwrap());
        assert!(began.elapsed() >= Duration::from_millis(20));
    }
}
