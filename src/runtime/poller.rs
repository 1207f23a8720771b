// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The driver-level poller: one eventfd for any number of sockets, and a per-socket readiness
//! query, for an event loop that serves thousands of sockets (`vdpa-vsock serve`, a later
//! `LD_PRELOAD` shim that emulates `epoll_*`).
//!
//! # Why a third way to show readiness
//! The readiness descriptors (`readiness.rs`) cost one or two descriptors per socket: 10,000
//! vsock sockets beside the 10,000 Unix sockets they are joined to do not fit a 20,000
//! descriptor limit. A poller costs one eventfd in all. A socket registered with it keeps a
//! [`PollReg`] in the core (the third kind of `Shown`, beside the descriptor and the edge
//! notifier): its interest and the readiness last passed on. The core brings it up to date
//! where it brings the descriptors up to date (after every call and every routed event), and
//! hands a change to the poller's [`PollQueue`]: a ready list, as the kernel's epoll keeps,
//! and the eventfd, readable exactly while that list is not empty.
//!
//! # Semantics: epoll's, both triggers
//! The semantics are epoll's, and both of its triggers are offered per registration, because
//! the shim must emulate both (`EPOLLET` or not) and because they are cheap to keep apart:
//! - what is reported is the socket's [`Readiness`] masked by the interest: `readable` and
//!   `read_closed` (`EPOLLIN`, `EPOLLRDHUP`) with read interest, `writable` (`EPOLLOUT`) with
//!   write interest, `hangup` and `error` (`EPOLLHUP`, `EPOLLERR`) always;
//! - **level** ([`Interest::edge`] false): a socket is on the ready list while its masked
//!   readiness is not empty; reporting it leaves it there, so the next call reports it again
//!   while it stays ready (as level-triggered epoll re-checks an item it reported);
//! - **edge** ([`Interest::edge`] true): a socket goes on the list when a flag of its masked
//!   readiness rises (was clear at the last change, is set now); reporting it takes it off.
//!   A caller must then work until `WouldBlock` before it waits again, as with `EPOLLET`;
//! - registering or changing a registration puts the socket on the list if it is ready now
//!   (both triggers), as `EPOLL_CTL_ADD` and `EPOLL_CTL_MOD` do;
//! - an entry whose masked readiness becomes empty before it is reported leaves the list, so
//!   the eventfd is readable only while something is there to report; what is reported is the
//!   readiness at the time of the report, not at the time of the change;
//! - a socket dropped (its last handle) or deregistered leaves the list and the poller; the
//!   end of its driver (device reset, driver dropped) is an `error` on every registered socket.
//!
//! Lock order: a core's lock, then the queue's. [`PollQueue::drain`] takes only the queue's,
//! so a caller may hold none while it calls it.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::proto::Readiness;

/// What a registration waits for, and how (see the module docs of `runtime/poller.rs`: epoll's
/// `EPOLLIN`, `EPOLLOUT` and `EPOLLET`). `hangup` and `error` are reported whatever it says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interest {
    /// Report `readable` and `read_closed`.
    pub readable: bool,
    /// Report `writable`.
    pub writable: bool,
    /// Edge-triggered: report a rise once; level-triggered (`false`): report while ready.
    pub edge: bool,
}

impl Interest {
    /// Read interest, level-triggered.
    pub const READABLE: Interest = Interest {
        readable: true,
        writable: false,
        edge: false,
    };
    /// Write interest, level-triggered.
    pub const WRITABLE: Interest = Interest {
        readable: false,
        writable: true,
        edge: false,
    };
    /// Read and write interest, level-triggered.
    pub const BOTH: Interest = Interest {
        readable: true,
        writable: true,
        edge: false,
    };

    /// The same interest, edge-triggered.
    #[must_use]
    pub const fn edge(self) -> Interest {
        Interest { edge: true, ..self }
    }

    /// The part of `r` this interest reports.
    pub(crate) fn mask(self, r: Readiness) -> Readiness {
        Readiness {
            readable: r.readable && self.readable,
            read_closed: r.read_closed && self.readable,
            writable: r.writable && self.writable,
            hangup: r.hangup,
            error: r.error,
        }
    }
}

/// Whether any flag is set.
fn any(r: Readiness) -> bool {
    r.readable || r.read_closed || r.writable || r.hangup || r.error
}

/// Whether a flag set in `now` was clear in `before`.
fn rose(before: Readiness, now: Readiness) -> bool {
    (now.readable && !before.readable)
        || (now.read_closed && !before.read_closed)
        || (now.writable && !before.writable)
        || (now.hangup && !before.hangup)
        || (now.error && !before.error)
}

/// One registration, as the queue sees it.
#[derive(Debug)]
struct Entry {
    token: u64,
    edge: bool,
    /// The masked readiness, as last passed on by the core.
    now: Readiness,
    /// On the ready list; `seq` names its one valid place there.
    queued: bool,
    seq: u64,
}

#[derive(Debug, Default)]
struct QueueState {
    entries: HashMap<u64, Entry>,
    /// (key, seq) of queued entries, oldest first; a place whose entry is gone, unqueued or
    /// queued again later (another seq) is stale and skipped.
    ready: VecDeque<(u64, u64)>,
    /// Entries queued (the eventfd is readable exactly while this is not 0).
    queued: usize,
    next_key: u64,
    next_seq: u64,
}

/// A poller's ready list and eventfd: shared by the public handle and every registration.
#[derive(Debug)]
pub(crate) struct PollQueue {
    state: Mutex<QueueState>,
    fd: EventFd,
}

impl PollQueue {
    /// A new, empty poller; fails only when no descriptor is left.
    pub(crate) fn new() -> io::Result<Arc<PollQueue>> {
        let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(io::Error::from)?;
        Ok(Arc::new(PollQueue {
            state: Mutex::new(QueueState::default()),
            fd,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // The state is a list and a map, consistent after every statement that changes both.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The eventfd: readable while events are pending.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A new registration showing `now` (already masked); queued if that is not empty.
    pub(crate) fn add(self: &Arc<Self>, token: u64, interest: Interest, now: Readiness) -> PollReg {
        let mut st = self.lock();
        let key = st.next_key;
        st.next_key += 1;
        st.entries.insert(
            key,
            Entry {
                token,
                edge: interest.edge,
                now,
                queued: false,
                seq: 0,
            },
        );
        if any(now) {
            self.enqueue(&mut st, key);
        }
        PollReg {
            queue: Arc::clone(self),
            key,
            interest,
            token,
            last: now,
        }
    }

    /// Put `key` on the ready list (if it is not there).
    fn enqueue(&self, st: &mut QueueState, key: u64) {
        let seq = st.next_seq;
        let Some(e) = st.entries.get_mut(&key) else {
            return;
        };
        if e.queued {
            return;
        }
        e.queued = true;
        e.seq = seq;
        st.next_seq += 1;
        st.ready.push_back((key, seq));
        st.queued += 1;
        if st.queued == 1 {
            self.signal(true);
        }
    }

    /// Take `key` off the ready list (if it is there).
    fn dequeue(&self, st: &mut QueueState, key: u64) {
        let Some(e) = st.entries.get_mut(&key) else {
            return;
        };
        if !e.queued {
            return;
        }
        e.queued = false;
        st.queued -= 1;
        if st.queued == 0 {
            self.signal(false);
        }
        // Stale places are skipped; keep them from piling up under a flapping socket.
        if st.ready.len() > 2 * st.queued + 64 {
            let QueueState { entries, ready, .. } = st;
            ready.retain(|(k, s)| entries.get(k).is_some_and(|e| e.queued && e.seq == *s));
        }
    }

    /// Make the eventfd readable (`on`) or not. A failure is logged: the ready list stays
    /// right, only a waiter may sleep until the next change.
    fn signal(&self, on: bool) {
        let r = if on {
            self.fd.write(1).map(drop)
        } else {
            match self.fd.read() {
                Err(nix::errno::Errno::EAGAIN) => Ok(()),
                r => r.map(drop),
            }
        };
        if let Err(e) = r {
            log::warn!("poller eventfd: {e}");
        }
    }

    /// The masked readiness of `key` changed from `before` to `now`.
    fn update(&self, key: u64, before: Readiness, now: Readiness) {
        let mut st = self.lock();
        let Some(e) = st.entries.get_mut(&key) else {
            return;
        };
        e.now = now;
        let edge = e.edge;
        if !any(now) {
            self.dequeue(&mut st, key);
        } else if !edge || rose(before, now) {
            self.enqueue(&mut st, key);
        }
    }

    /// A registration's token and interest changed; queued if ready now.
    fn modify(&self, key: u64, token: u64, edge: bool, now: Readiness) {
        let mut st = self.lock();
        let Some(e) = st.entries.get_mut(&key) else {
            return;
        };
        e.token = token;
        e.edge = edge;
        e.now = now;
        if any(now) {
            self.enqueue(&mut st, key);
        } else {
            self.dequeue(&mut st, key);
        }
    }

    fn remove(&self, key: u64) {
        let mut st = self.lock();
        self.dequeue(&mut st, key);
        st.entries.remove(&key);
    }

    /// Append what is pending to `out` as (token, readiness), oldest first: edge entries
    /// leave the list, level ones stay. Returns how many were appended.
    pub(crate) fn drain(&self, out: &mut Vec<(u64, Readiness)>) -> usize {
        let mut st = self.lock();
        let mut again = Vec::new();
        let mut n = 0;
        while let Some((key, seq)) = st.ready.pop_front() {
            let Some(e) = st.entries.get_mut(&key) else {
                continue;
            };
            if !e.queued || e.seq != seq {
                continue; // stale place
            }
            out.push((e.token, e.now));
            n += 1;
            if e.edge {
                e.queued = false;
                st.queued -= 1;
            } else {
                again.push((key, seq));
            }
        }
        st.ready.extend(again);
        if st.queued == 0 && n > 0 {
            self.signal(false);
        }
        n
    }
}

/// A socket's registration with a poller, kept in the core (`Shown`); leaves the poller when
/// dropped (the socket closed, or deregistered).
#[derive(Debug)]
pub(crate) struct PollReg {
    queue: Arc<PollQueue>,
    key: u64,
    interest: Interest,
    token: u64,
    /// The masked readiness last passed to the queue.
    last: Readiness,
}

impl PollReg {
    /// The socket is ready for `r` now: pass a change of what the interest reports on.
    pub(crate) fn show(&mut self, r: Readiness) {
        let now = self.interest.mask(r);
        if now == self.last {
            return; // nothing the poller reports changed: no second lock
        }
        let before = std::mem::replace(&mut self.last, now);
        self.queue.update(self.key, before, now);
    }

    /// Whether this registration belongs to `queue`.
    pub(crate) fn is_with(&self, queue: &Arc<PollQueue>) -> bool {
        Arc::ptr_eq(&self.queue, queue)
    }

    /// New token and interest; the socket is ready for `r` now.
    pub(crate) fn modify(&mut self, token: u64, interest: Interest, r: Readiness) {
        self.interest = interest;
        self.token = token;
        self.last = interest.mask(r);
        self.queue.modify(self.key, token, interest.edge, self.last);
    }
}

impl Drop for PollReg {
    fn drop(&mut self) {
        self.queue.remove(self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn r() -> Readiness {
        Readiness::default()
    }
    const READ: Readiness = Readiness {
        readable: true,
        read_closed: false,
        writable: false,
        hangup: false,
        error: false,
    };
    const WRITE: Readiness = Readiness {
        readable: false,
        read_closed: false,
        writable: true,
        hangup: false,
        error: false,
    };
    const RW: Readiness = Readiness {
        readable: true,
        read_closed: false,
        writable: true,
        hangup: false,
        error: false,
    };

    fn drained(q: &PollQueue) -> Vec<(u64, Readiness)> {
        let mut v = Vec::new();
        let n = q.drain(&mut v);
        assert_eq!(n, v.len());
        v
    }

    #[track_caller]
    fn signalled(q: &PollQueue) -> bool {
        let m = super::super::readiness::poll_now(q.fd()).expect("poll");
        m & libc::POLLIN != 0
    }

    #[test]
    fn edge_reports_a_rise_once_and_again_after_a_fall() {
        let q = PollQueue::new().unwrap();
        let mut reg = q.add(7, Interest::BOTH.edge(), r());
        assert!(!signalled(&q));
        assert!(drained(&q).is_empty());
        reg.show(READ);
        assert!(signalled(&q));
        assert_eq!(drained(&q), vec![(7, READ)]);
        assert!(!signalled(&q), "an edge is reported once");
        assert!(drained(&q).is_empty());
        // Still readable, and now writable too: a new flag is a new edge.
        reg.show(RW);
        assert_eq!(drained(&q), vec![(7, RW)]);
        reg.show(RW);
        assert!(drained(&q).is_empty(), "no change, no edge");
        // Falls, then rises again: another edge.
        reg.show(WRITE);
        assert!(drained(&q).is_empty(), "a fall is no edge");
        reg.show(RW);
        assert_eq!(drained(&q), vec![(7, RW)]);
    }

    #[test]
    fn level_reports_while_ready() {
        let q = PollQueue::new().unwrap();
        let mut reg = q.add(1, Interest::READABLE, r());
        reg.show(READ);
        for _ in 0..3 {
            assert!(signalled(&q), "level: still pending");
            assert_eq!(drained(&q), vec![(1, READ)]);
        }
        reg.show(r());
        assert!(!signalled(&q), "no longer ready: off the list");
        assert!(drained(&q).is_empty());
    }

    #[test]
    fn interest_masks_what_is_reported_but_never_hangup_or_error() {
        let q = PollQueue::new().unwrap();
        let mut reg = q.add(1, Interest::READABLE.edge(), r());
        reg.show(WRITE);
        assert!(drained(&q).is_empty(), "no write interest");
        assert!(!signalled(&q));
        let hup = Readiness {
            hangup: true,
            writable: true,
            ..r()
        };
        reg.show(hup);
        assert_eq!(
            drained(&q),
            vec![(
                1,
                Readiness {
                    hangup: true,
                    ..r()
                }
            )]
        );
        let mut w = q.add(2, Interest::WRITABLE, r());
        w.show(Readiness {
            read_closed: true,
            readable: true,
            ..r()
        });
        assert!(drained(&q).is_empty(), "read flags need read interest");
        w.show(Readiness { error: true, ..r() });
        assert_eq!(drained(&q), vec![(2, Readiness { error: true, ..r() })]);
    }

    #[test]
    fn a_rise_that_falls_before_the_report_is_not_reported() {
        let q = PollQueue::new().unwrap();
        let mut reg = q.add(1, Interest::BOTH.edge(), r());
        reg.show(READ);
        assert!(signalled(&q));
        reg.show(r());
        assert!(!signalled(&q), "nothing left to report");
        assert!(drained(&q).is_empty());
        // What is reported is the state at the report.
        reg.show(READ);
        reg.show(RW);
        assert_eq!(drained(&q), vec![(1, RW)]);
    }

    #[test]
    fn registering_or_modifying_a_ready_socket_reports_it() {
        let q = PollQueue::new().unwrap();
        let mut reg = q.add(1, Interest::BOTH.edge(), WRITE);
        assert_eq!(drained(&q), vec![(1, WRITE)]);
        reg.modify(9, Interest::BOTH.edge(), WRITE);
        assert_eq!(drained(&q), vec![(9, WRITE)], "MOD re-arms, new token");
        reg.modify(9, Interest::READABLE.edge(), WRITE);
        assert!(
            drained(&q).is_empty(),
            "nothing of the new interest is ready"
        );
        assert!(!signalled(&q));
    }

    #[test]
    fn a_dropped_registration_leaves_the_list_and_the_eventfd() {
        let q = PollQueue::new().unwrap();
        let mut a = q.add(1, Interest::READABLE, r());
        let mut b = q.add(2, Interest::READABLE, r());
        a.show(READ);
        b.show(READ);
        drop(a);
        assert_eq!(drained(&q), vec![(2, READ)]);
        drop(b);
        assert!(!signalled(&q));
        assert!(drained(&q).is_empty());
        assert!(q.lock().entries.is_empty());
    }

    #[test]
    fn a_flapping_socket_does_not_grow_the_list() {
        let q = PollQueue::new().unwrap();
        let mut reg = q.add(1, Interest::READABLE.edge(), r());
        for _ in 0..10_000 {
            reg.show(READ);
            reg.show(r());
        }
        assert!(q.lock().ready.len() <= 64 + 2, "{}", q.lock().ready.len());
        reg.show(READ);
        assert_eq!(drained(&q), vec![(1, READ)], "reported once");
    }

    /// Through a core: a registration follows the connection, leaves with its socket, and the
    /// core's end is an error on every one still registered.
    #[test]
    fn a_core_shows_changes_drops_and_its_end() {
        use crate::driver::{DriverConfig, VsockAddr, VsockDriver, VsockPoller};
        use crate::sim::{SimConfig, ECHO_PORT};
        let (d, _host) =
            VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).expect("sim");
        let p = VsockPoller::new().unwrap();
        let wait = |p: &VsockPoller| {
            let t0 = std::time::Instant::now();
            loop {
                let mut ev = Vec::new();
                if p.events(&mut ev) > 0 {
                    return ev;
                }
                assert!(
                    t0.elapsed() < std::time::Duration::from_secs(20),
                    "no event"
                );
                let m = super::super::readiness::poll_now_within(p.as_fd(), 1000);
                assert!(m.is_ok(), "{m:?}");
            }
        };
        let a = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
        let b = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
        p.register(&a, 1, Interest::WRITABLE.edge()).unwrap();
        p.register(&b, 2, Interest::READABLE.edge()).unwrap();
        assert_eq!(
            wait(&p),
            vec![(1, WRITE)],
            "registered while writable: reported"
        );
        drop(a);
        (&b).write_all(b"x").unwrap();
        assert_eq!(wait(&p), vec![(2, READ)]);
        d.reset_device("test");
        let ev = wait(&p);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(ev[0].0 == 2 && ev[0].1.error, "{ev:?}");
    }

    #[test]
    fn many_registrations_report_in_order_of_readiness() {
        let q = PollQueue::new().unwrap();
        let mut regs: Vec<PollReg> = (0..10_000)
            .map(|t| q.add(t, Interest::READABLE.edge(), r()))
            .collect();
        for t in (0..10_000).rev().step_by(3) {
            regs[t].show(READ);
        }
        let got: Vec<u64> = drained(&q).into_iter().map(|(t, _)| t).collect();
        let want: Vec<u64> = (0..10_000u64).rev().step_by(3).collect();
        assert_eq!(got, want);
        assert!(!signalled(&q));
    }
}
