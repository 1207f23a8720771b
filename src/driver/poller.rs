// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! [`VsockPoller`]: one descriptor that any number of vsock sockets report readiness through,
//! for an event loop that serves thousands of them (the runtime's `poller.rs` has the design
//! and the semantics: epoll's, level- or edge-triggered per registration).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use super::socket::{VsockListener, VsockSeqPacket, VsockStream};
use crate::proto::Readiness;
use crate::runtime::{Core, Interest, PollQueue, Target};

/// A socket a [`VsockPoller`] can watch: [`VsockStream`], [`VsockListener`] and
/// [`VsockSeqPacket`] (sealed).
pub trait Pollable: private_impl::Sealed {}

pub(crate) mod private_impl {
    use super::{Core, Target};
    use std::sync::Arc;

    /// What a registration names: the socket's core and which of its sockets.
    pub trait Sealed {
        #[doc(hidden)]
        fn poll_source(&self) -> super::PollSource<'_>;
    }

    impl super::PollSource<'_> {
        pub(super) fn parts(&self) -> (&Arc<Core>, Target) {
            (self.core, self.target)
        }
    }
}

/// A socket as a poller names it (opaque).
#[derive(Debug)]
#[doc(hidden)]
pub struct PollSource<'a> {
    core: &'a Arc<Core>,
    target: Target,
}

impl<'a> PollSource<'a> {
    pub(crate) fn new(core: &'a Arc<Core>, target: Target) -> Self {
        PollSource { core, target }
    }
}

impl Pollable for VsockStream {}
impl Pollable for VsockListener {}
impl Pollable for VsockSeqPacket {}

/// A driver-level poller: one eventfd, readable while events are pending, for any number of
/// vsock sockets, with no descriptor per socket (10,000 sockets cost one descriptor, where
/// their `AsFd` descriptors would cost 10,000 or 20,000). Put [`AsFd`] in your own
/// epoll/mio/`poll(2)` set beside your kernel sockets; when it is readable, [`VsockPoller::events`]
/// says which registered sockets are ready for what.
///
/// Semantics are epoll's: [`Interest::edge`] chooses edge-triggered (`EPOLLET`: a rise is
/// reported once; work until `WouldBlock` before waiting again) or level-triggered (reported
/// on every call while ready); `hangup` and `error` are reported whatever the interest;
/// registering a socket that is ready now reports it. A socket dropped (its last handle)
/// leaves the poller; its driver's end (device reset, driver dropped) is an `error` on every
/// registered socket. A poller is not tied to one driver: sockets of several drivers (or of
/// the simulated device's host side) may share it. Use the sockets in non-blocking mode.
///
/// ```
/// use vdpa_vsock::driver::{DriverConfig, Interest, VsockAddr, VsockDriver};
/// use vdpa_vsock::sim::{SimConfig, ECHO_PORT};
/// use std::io::Write;
///
/// let (driver, _host) = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default())?;
/// let poller = driver.poller()?;
/// let mut s = driver.connect(VsockAddr::new(2, ECHO_PORT))?;
/// s.set_nonblocking(true)?;
/// poller.register(&s, 42, Interest::READABLE.edge())?;
/// s.write_all(b"ping")?;
/// let mut events = Vec::new();
/// while events.is_empty() {
///     // A real loop sleeps in epoll on `poller.as_fd()` here.
///     poller.events(&mut events);
/// }
/// assert_eq!(events[0].0, 42);
/// assert!(events[0].1.readable);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct VsockPoller {
    queue: Arc<PollQueue>,
}

impl VsockPoller {
    /// A new poller with no socket registered; fails only when no descriptor is left.
    pub fn new() -> io::Result<VsockPoller> {
        Ok(VsockPoller {
            queue: PollQueue::new()?,
        })
    }

    /// Watch `socket` for `interest`, reporting it as `token`. `AlreadyExists` if the socket
    /// is registered with a poller already (one poller per socket, as one epoll item per
    /// descriptor and epoll instance).
    pub fn register<S: Pollable + ?Sized>(
        &self,
        socket: &S,
        token: u64,
        interest: Interest,
    ) -> io::Result<()> {
        let src = socket.poll_source();
        let (core, t) = src.parts();
        core.poll_register(t, &self.queue, token, interest)
    }

    /// Change a registered socket's token and interest (`EPOLL_CTL_MOD`: reported at once if
    /// ready now for the new interest). `NotFound` if it is not registered here.
    pub fn reregister<S: Pollable + ?Sized>(
        &self,
        socket: &S,
        token: u64,
        interest: Interest,
    ) -> io::Result<()> {
        let src = socket.poll_source();
        let (core, t) = src.parts();
        core.poll_reregister(t, &self.queue, token, interest)
    }

    /// Stop watching `socket` (dropping its last handle does this too). `NotFound` if it is not
    /// registered here.
    pub fn deregister<S: Pollable + ?Sized>(&self, socket: &S) -> io::Result<()> {
        let src = socket.poll_source();
        let (core, t) = src.parts();
        core.poll_deregister(t, &self.queue)
    }

    /// Append the pending events to `events` as (token, what the socket is ready for, masked
    /// by its interest), oldest first, and return how many. Never blocks; the descriptor is
    /// readable exactly while this would return something.
    pub fn events(&self, events: &mut Vec<(u64, Readiness)>) -> usize {
        self.queue.drain(events)
    }
}

impl AsFd for VsockPoller {
    /// The eventfd: readable while events are pending. Wait on it; never read or write it.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.queue.fd()
    }
}

impl AsRawFd for VsockPoller {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}
