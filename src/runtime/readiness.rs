// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Readiness file descriptors: what lets `poll(2)`, `epoll`, mio and tokio's `AsyncFd` wait on a
//! socket of ours as on a kernel socket.
//!
//! # The choice
//! Each socket that is asked for a descriptor (`AsFd`/`AsRawFd`; sockets never asked have none)
//! gets one end of an `AF_UNIX` stream socketpair; the runtime keeps the other end and sets the
//! pair's kernel state so that `poll(2)` on the socket's end reports exactly what the connection
//! is ready for ([`Readiness`], computed by the protocol core as Linux's `vsock_poll` does):
//!
//! | connection | what the runtime does | the descriptor reports |
//! |---|---|---|
//! | data (or a whole seqpacket message, or a connection to accept) waits | a one-byte token sits in the descriptor's receive queue | `POLLIN` |
//! | nothing waits | the token is taken back | no `POLLIN` |
//! | no room to send, or still connecting | filler bytes sent from the descriptor fill its (minimal) send buffer | no `POLLOUT` |
//! | room to send | the filler is drained | `POLLOUT` |
//! | reads will end (peer `SHUTDOWN` send, our receive shutdown) | our end shuts down writing | `POLLIN \| POLLRDHUP` |
//! | hung up (closed, shut down both ways) | our end is closed | `POLLHUP \| POLLIN \| POLLRDHUP \| POLLOUT` |
//! | failed (reset, refused, timed out, device gone) | our end is closed with unread bytes | as hung up, plus `POLLERR` |
//!
//! Why this and not the alternatives:
//! - an **eventfd** is always writable and can never report `POLLHUP` or `POLLERR`: one could
//!   only say "something changed", and every caller would have to register interest and query
//!   the socket afterwards; a plain `poll(2)` loop waiting for `POLLOUT` would spin;
//! - **one epoll descriptor per driver plus a per-socket query** serves an event loop written
//!   for it, but not tokio's `AsyncFd`, mio or `poll(2)` on one socket. Such a loop has it
//!   too, beside these descriptors: the driver-level poller (`poller.rs`), one eventfd for any
//!   number of sockets, for where a descriptor per socket does not fit the limit.
//!
//! A socketpair behaves like the kernel socket it stands for: **level-triggered** under
//! `poll(2)` and level-triggered epoll, with nothing to re-arm (the state is kept true after
//! every call and every packet); under edge-triggered epoll (what mio and tokio use) each
//! change is an edge, and a caller that gets `WouldBlock` waits for the next one, as with any
//! socket. A later `LD_PRELOAD` shim can hand the descriptor to an unmodified program as its
//! socket, and the program's own `poll`/`epoll`/`select` keep working.
//!
//! The costs: two descriptors per polled socket (a kernel socket takes one; raise
//! `RLIMIT_NOFILE` for 10,000 sockets), and one or two system calls when readiness changes
//! (never on a socket nobody asked a descriptor of). The descriptor is for waiting only:
//! reading or writing it breaks its state.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::socket::{
    recv, send, setsockopt, shutdown, socketpair, sockopt, AddressFamily, MsgFlags, Shutdown,
    SockFlag, SockType,
};
use nix::unistd::write;

use crate::proto::Readiness;

/// The smallest send buffer Linux allows (it clamps to `SOCK_MIN_SNDBUF`): a few hundred bytes
/// of filler make the descriptor unwritable.
const MIN_SNDBUF: usize = 1;

/// The filler written per call while stuffing (the send buffer takes a few of them).
const FILLER: [u8; 512] = [0; 512];

/// The descriptor a socket hands out; shared by the socket (for `as_fd`) and the runtime.
pub(crate) type UserFd = Arc<OwnedFd>;

/// One socket's readiness descriptor pair and what it shows now.
#[derive(Debug)]
pub(crate) struct ReadyFd {
    /// The end the socket hands out.
    user: UserFd,
    /// Our end; `None` once the descriptor is hung up for good.
    ours: Option<OwnedFd>,
    /// The token is in the user end's receive queue.
    token: bool,
    /// The user end's send buffer is full of filler.
    stuffed: bool,
    /// Our end has shut down writing (the user end reads end of stream).
    read_closed: bool,
}

impl ReadyFd {
    /// A new pair showing nothing ready (not readable, not writable).
    pub(crate) fn new() -> io::Result<ReadyFd> {
        let (user, ours) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        setsockopt(&user, sockopt::SndBuf, &MIN_SNDBUF).map_err(io::Error::from)?;
        let mut fd = ReadyFd {
            user: Arc::new(user),
            ours: Some(ours),
            token: false,
            stuffed: false,
            read_closed: false,
        };
        fd.set_stuffed(true);
        Ok(fd)
    }

    /// The end the socket hands out.
    pub(crate) fn user(&self) -> UserFd {
        Arc::clone(&self.user)
    }

    /// Make the descriptor show `r`. Failures of the system calls are logged, never fatal: the
    /// socket itself keeps working, only its descriptor may show stale readiness.
    pub(crate) fn show(&mut self, r: Readiness) {
        if self.ours.is_none() {
            return; // hung up: final
        }
        if r.error || r.hangup {
            self.hang_up(r.error);
            return;
        }
        if r.read_closed && !self.read_closed {
            if let Some(ours) = &self.ours {
                if let Err(e) = shutdown(ours.as_raw_fd(), Shutdown::Write) {
                    log::warn!("readiness descriptor: shutdown: {e}");
                }
            }
            self.read_closed = true;
        }
        self.set_token(r.readable && !self.read_closed);
        self.set_stuffed(!r.writable);
    }

    /// Put the token in (readable) or take it back.
    fn set_token(&mut self, on: bool) {
        if on == self.token {
            return;
        }
        let r = match (&self.ours, on) {
            (Some(ours), true) => send(ours.as_raw_fd(), &[1], flags()),
            (Some(_), false) => {
                let mut b = [0u8; 1];
                recv(self.user.as_raw_fd(), &mut b, flags())
            }
            (None, _) => return,
        };
        match r {
            Ok(_) | Err(Errno::EAGAIN) => self.token = on,
            Err(e) => log::warn!("readiness descriptor: token: {e}"),
        }
    }

    /// Fill the user end's send buffer (not writable) or drain it (writable).
    fn set_stuffed(&mut self, on: bool) {
        if on == self.stuffed {
            return;
        }
        let Some(ours) = &self.ours else {
            return;
        };
        let (fd, mut buf) = if on {
            (self.user.as_raw_fd(), None)
        } else {
            (ours.as_raw_fd(), Some([0u8; FILLER.len()]))
        };
        loop {
            let r = match &mut buf {
                None => send(fd, &FILLER, flags()),
                Some(b) => recv(fd, b, flags()),
            };
            match r {
                Ok(0) => break,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    log::warn!("readiness descriptor: filler: {e}");
                    return;
                }
            }
        }
        self.stuffed = on;
    }

    /// Final state: hung up, with `POLLERR` when `error` (our end closed while it holds bytes
    /// the user end sent: the kernel then sets `ECONNRESET` on the user end).
    fn hang_up(&mut self, error: bool) {
        if error && !self.stuffed {
            if let Err(e) = send(self.user.as_raw_fd(), &[0], flags()) {
                log::warn!("readiness descriptor: error mark: {e}");
            }
        } else if !error && self.stuffed {
            self.set_stuffed(false);
        }
        self.ours = None;
        self.stuffed = false;
    }

    /// The descriptor handed out.
    #[cfg(test)]
    fn borrow(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.user.as_fd()
    }
}

/// A socket's notifier for an edge-triggered poller (what the tokio API registers): an
/// eventfd written each time the socket becomes ready for something it was not ready for at
/// the last call or event. One descriptor per socket instead of a pair's two, so 10,000
/// sockets fit a 20,000-descriptor limit; it says *that* something changed, not what (it is
/// always writable and, once written, readable): a waiter wakes, tries its call, and waits for
/// the next edge on `WouldBlock`. Only edge-triggered waiters may use it.
#[derive(Debug)]
pub(crate) struct Notifier {
    fd: UserFd,
    shown: Readiness,
}

impl Notifier {
    #[cfg(feature = "tokio")]
    /// A new notifier, showing nothing ready.
    pub(crate) fn new() -> io::Result<Notifier> {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(io::Error::from)?;
        Ok(Notifier {
            fd: Arc::new(OwnedFd::from(fd)),
            shown: Readiness::default(),
        })
    }

    #[cfg(feature = "tokio")]
    /// The descriptor to register.
    pub(crate) fn user(&self) -> UserFd {
        Arc::clone(&self.fd)
    }

    /// Record `r`; signal an edge if anything in it became ready.
    pub(crate) fn show(&mut self, r: Readiness) {
        let old = self.shown;
        self.shown = r;
        let rose = (r.readable && !old.readable)
            || (r.writable && !old.writable)
            || (r.read_closed && !old.read_closed)
            || (r.hangup && !old.hangup)
            || (r.error && !old.error);
        if rose {
            if let Err(e) = write(&*self.fd, &1u64.to_ne_bytes()) {
                log::warn!("readiness notifier: {e}");
            }
        }
    }
}

fn flags() -> MsgFlags {
    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL
}

/// What `poll(2)` says of `fd` now (no wait), every bit kept (nix's `PollFd` drops a mask
/// with `POLLRDHUP`, which it does not name).
#[cfg(test)]
pub(crate) fn poll_now(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<i16> {
    poll_now_within(fd, 0)
}

/// As [`poll_now`], waiting up to `ms` milliseconds for something to report.
#[cfg(test)]
pub(crate) fn poll_now_within(fd: std::os::fd::BorrowedFd<'_>, ms: i32) -> io::Result<i16> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN | libc::POLLOUT | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd that outlives the call, and `fd` is open (borrowed).
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(p.revents)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `poll(2)` bits, by name.
    struct P;
    impl P {
        const POLLIN: i16 = libc::POLLIN;
        const POLLOUT: i16 = libc::POLLOUT;
        const POLLHUP: i16 = libc::POLLHUP;
        const POLLERR: i16 = libc::POLLERR;
    }
    const POLLRDHUP: i16 = libc::POLLRDHUP;

    fn has(m: i16, bits: i16) -> bool {
        m & bits == bits
    }

    fn ready() -> Readiness {
        Readiness::default()
    }

    fn mask(fd: &ReadyFd) -> i16 {
        poll_now(fd.borrow()).expect("poll")
    }

    #[test]
    fn a_new_descriptor_is_neither_readable_nor_writable() {
        let fd = ReadyFd::new().expect("socketpair");
        assert_eq!(mask(&fd), 0);
    }

    #[test]
    fn readable_and_writable_come_and_go_independently() {
        let mut fd = ReadyFd::new().expect("socketpair");
        fd.show(Readiness {
            writable: true,
            ..ready()
        });
        assert_eq!(mask(&fd), P::POLLOUT);
        fd.show(Readiness {
            writable: true,
            readable: true,
            ..ready()
        });
        assert_eq!(mask(&fd), P::POLLOUT | P::POLLIN);
        fd.show(Readiness {
            readable: true,
            ..ready()
        });
        assert_eq!(mask(&fd), P::POLLIN);
        fd.show(ready());
        assert_eq!(mask(&fd), 0);
        // Again, to be sure a toggle leaves nothing behind.
        for _ in 0..3 {
            fd.show(Readiness {
                writable: true,
                readable: true,
                ..ready()
            });
            assert_eq!(mask(&fd), P::POLLOUT | P::POLLIN);
            fd.show(ready());
            assert_eq!(mask(&fd), 0);
        }
    }

    #[test]
    fn read_closed_is_rdhup_and_stays_readable() {
        let mut fd = ReadyFd::new().expect("socketpair");
        fd.show(Readiness {
            read_closed: true,
            ..ready()
        });
        assert_eq!(mask(&fd), P::POLLIN | POLLRDHUP);
        fd.show(Readiness {
            read_closed: true,
            writable: true,
            ..ready()
        });
        assert_eq!(mask(&fd), P::POLLIN | POLLRDHUP | P::POLLOUT);
    }

    #[test]
    fn hangup_and_error_are_final() {
        let mut fd = ReadyFd::new().expect("socketpair");
        fd.show(Readiness {
            hangup: true,
            ..ready()
        });
        let m = mask(&fd);
        assert!(has(m, P::POLLHUP | P::POLLIN | POLLRDHUP), "{m:?}");
        assert!(!has(m, P::POLLERR), "{m:?}");
        fd.show(Readiness {
            writable: true,
            ..ready()
        });
        assert_eq!(mask(&fd), m, "hung up for good");

        for stuffed_first in [true, false] {
            let mut fd = ReadyFd::new().expect("socketpair");
            if !stuffed_first {
                fd.show(Readiness {
                    writable: true,
                    ..ready()
                });
            }
            fd.show(Readiness {
                error: true,
                ..ready()
            });
            let m = mask(&fd);
            assert!(has(m, P::POLLERR | P::POLLHUP | P::POLLIN), "{m:?}");
        }
    }
}
