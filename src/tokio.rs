// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The async API on tokio (feature `tokio`, on by default): [`VsockStream`], [`VsockListener`]
//! and [`VsockSeqPacket`], shaped as tokio-vsock 0.7's, so that a program moves from the
//! kernel's AF_VSOCK to this driver by changing its `use` lines and saying which driver its
//! sockets live on.
//!
//! Each type wraps the blocking socket of [`crate::driver`] in non-blocking mode inside tokio's
//! [`AsyncFd`]: the socket's readiness descriptor (see the runtime's `readiness.rs`) turns
//! readable, writable, hung up or failed exactly when a kernel socket would, and under tokio's
//! edge-triggered epoll every change is an edge. A call that gets `WouldBlock` clears tokio's
//! readiness and waits for the next edge, as tokio's own sockets do. No task, thread or timer
//! is added per socket: 10,000 sockets on one current-thread runtime are 10,000 registrations
//! in one epoll set (and two descriptors each: raise `RLIMIT_NOFILE`).
//!
//! ```
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use vdpa_vsock::driver::{DriverConfig, VsockDriver};
//! use vdpa_vsock::sim::{SimConfig, ECHO_PORT};
//! use vdpa_vsock::tokio::{VsockAddr, VsockStream, VMADDR_CID_HOST};
//!
//! # fn main() -> std::io::Result<()> {
//! let (driver, _host) = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default())?;
//! let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
//! rt.block_on(async {
//!     let mut s = VsockStream::connect(&driver, VsockAddr::new(VMADDR_CID_HOST, ECHO_PORT)).await?;
//!     s.write_all(b"hello").await?;
//!     let mut back = [0u8; 5];
//!     s.read_exact(&mut back).await?;
//!     assert_eq!(&back, b"hello");
//!     Ok(())
//! })
//! # }
//! ```
//!
//! # Differences from tokio-vsock 0.7, and why
//! - **The driver.** tokio-vsock's sockets live in the kernel, which is implicit; ours live on
//!   a [`VsockDriver`] (one device, its rings and its event loop), so every constructor takes it
//!   first: `VsockStream::connect(&driver, addr)`, `VsockListener::bind(&driver, addr)`. The
//!   sockets hold the driver's core, not the reference: they outlive the borrow (but not the
//!   driver: dropping it ends every socket with an error).
//! - **Addresses.** [`VsockAddr`] is this crate's: `VsockAddr::new(cid, port)` as the `vsock`
//!   crate's, but the CID is a `u64` (the virtio header's width) and `cid`/`port` are public
//!   fields, not methods (`addr.cid` for `addr.cid()`). `VMADDR_CID_ANY`, `_HOST`, `_LOCAL` and
//!   `_HYPERVISOR` are re-exported as tokio-vsock does, as `u64`.
//! - **`VsockListener::bind`** takes a CID of `VMADDR_CID_ANY` or the driver's own CID
//!   (anything else: `AddrNotAvailable`, as Linux's `EADDRNOTAVAIL`), and a real port:
//!   `VMADDR_PORT_ANY` (let the kernel choose) is refused with `InvalidInput`, because the
//!   driver has no call that picks a listening port.
//! - **No raw descriptor conversions.** `AsFd`/`AsRawFd` give the readiness descriptor, for
//!   waiting only; `FromRawFd`, `IntoRawFd` and `From<OwnedFd>`/`Into<OwnedFd>` (tokio-vsock's
//!   way to adopt or hand over a kernel socket) do not exist, since a socket of ours is not a
//!   descriptor. [`VsockStream::new`] / [`VsockListener::new`] adopt a socket of
//!   [`crate::driver`] instead (tokio-vsock's `VsockStream::new(vsock::VsockStream)`);
//!   `poll_accept_std` returns that blocking type.
//! - **`OwnedReadHalf::unsplit`** is kept (it panics on halves of two streams, as
//!   tokio-vsock's), and [`OwnedReadHalf::reunite`] beside it returns an error instead, as
//!   tokio's `TcpStream` halves do. The owned halves share the stream without a lock (reads and
//!   writes of one stream may run at once), where tokio-vsock's go through `tokio::io::split`.
//! - **Additions** tokio-vsock lacks, with tokio's `TcpStream` names: `poll_write_vectored`
//!   with `is_write_vectored() == true` (one transport round for all the buffers),
//!   `take_error`, `readable`/`writable`, `try_read`/`try_write`, and the SEQPACKET types
//!   [`VsockSeqPacket`] and [`VsockSeqPacketListener`].
//! - **Not provided:** the `tonic` (`VsockConnectInfo`) and `axum` integrations behind
//!   tokio-vsock's `tonic0*` / `axum08` features (they would pull those crates in; `Incoming`
//!   is a `futures_core::Stream` of streams, which is what a hand-written `serve` needs).
//! - **Outside a runtime** tokio-vsock panics (tokio's `AsyncFd::new`); ours returns an
//!   `io::Error` when there is no tokio runtime at all (a runtime built without `enable_io`
//!   still panics inside tokio).

use std::future::poll_fn;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use ::tokio::io::unix::AsyncFd;
use ::tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

use crate::driver::socket::buffer_size_methods;
use crate::driver::{self, VsockDriver};
use crate::proto::BufferOption;
use crate::runtime::UserFd;

pub use crate::driver::VsockAddr;
pub use crate::packet::{VMADDR_CID_ANY, VMADDR_CID_HOST, VMADDR_CID_HYPERVISOR, VMADDR_CID_LOCAL};

/// The port that asks the kernel to choose one (`VMADDR_PORT_ANY`): refused by
/// [`VsockListener::bind`].
pub const VMADDR_PORT_ANY: u32 = u32::MAX;

/// The sockets of [`crate::driver`] that [`register`] hands to tokio, with their edge
/// notifiers.
trait Notified {
    /// The socket's edge notifier (see the runtime's `readiness.rs`).
    fn notifier(&self) -> io::Result<UserFd>;
}

impl Notified for driver::VsockStream {
    fn notifier(&self) -> io::Result<UserFd> {
        self.edge_notifier()
    }
}

impl Notified for driver::VsockListener {
    fn notifier(&self) -> io::Result<UserFd> {
        self.edge_notifier()
    }
}

impl Notified for driver::VsockSeqPacket {
    fn notifier(&self) -> io::Result<UserFd> {
        self.edge_notifier()
    }
}

/// A socket and the notifier tokio's reactor waits on for it: an eventfd the runtime writes
/// each time the socket becomes ready for something (one descriptor per socket; the
/// socketpair that [`AsFd`] gives a plain `poll(2)` would take two). Edge-triggered, as tokio
/// registers every descriptor: a task wakes on each edge, tries its call, and on `WouldBlock`
/// clears the readiness and waits for the next edge.
#[derive(Debug)]
struct Registered<T> {
    sock: T,
    notifier: UserFd,
}

impl<T> std::ops::Deref for Registered<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.sock
    }
}

impl<T> AsRawFd for Registered<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.notifier.as_raw_fd()
    }
}

/// Registers `sock`'s edge notifier with the current runtime's reactor for both directions;
/// an error (not tokio's panic) outside a runtime, or when no descriptor is left.
fn register<T: Notified>(sock: T) -> io::Result<AsyncFd<Registered<T>>> {
    if ::tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other(
            "vdpa_vsock::tokio sockets need a tokio runtime: expected to be called inside one (with enable_io), found none",
        ));
    }
    let notifier = sock.notifier()?;
    // SAFETY: `register_with_interest` needs `as_raw_fd()` to be an open descriptor that stays
    // open, refers to the same file description and is returned by every call until the
    // `AsyncFd` is dropped or unwrapped. It is the notifier's eventfd, an `Arc<OwnedFd>` that
    // `Registered` holds (so it cannot close while registered) and never replaces.
    let fd = unsafe {
        AsyncFd::register_with_interest(
            Registered { sock, notifier },
            Interest::READABLE | Interest::WRITABLE,
        )
    };
    Ok(fd?)
}

/// Waits until a non-blocking connect's handshake is over and says how it ended. Writability
/// is only the hint (the notifier's edges are not per direction): `status` decides, and a
/// wake-up while still connecting waits for the next edge.
async fn wait_connected<T>(
    fd: &AsyncFd<Registered<T>>,
    status: impl Fn(&T) -> Option<io::Result<()>>,
) -> io::Result<()> {
    loop {
        let mut guard = fd.writable().await?;
        match status(&guard.get_inner().sock) {
            Some(r) => return r,
            None => guard.clear_ready(),
        }
    }
}

/// Runs `f` once readiness for `interest` is reported; `Pending` after clearing it on
/// `WouldBlock` (the wake-up is the next edge), retried on `Interrupted`.
fn poll_io<T: AsRawFd, R>(
    fd: &AsyncFd<T>,
    cx: &mut Context<'_>,
    interest: Interest,
    mut f: impl FnMut(&T) -> io::Result<R>,
) -> Poll<io::Result<R>> {
    loop {
        let mut guard = if interest.is_writable() {
            ready!(fd.poll_write_ready(cx))?
        } else {
            ready!(fd.poll_read_ready(cx))?
        };
        match guard.try_io(|inner| f(inner.get_ref())) {
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(r) => return Poll::Ready(r),
            Err(_would_block) => continue,
        }
    }
}

/// An async vsock stream connected to a peer (tokio-vsock's `VsockStream`).
///
/// Reads and writes go through [`AsyncRead`]/[`AsyncWrite`] (or through `&VsockStream`'s
/// `poll_*` via [`VsockStream::split`]); dropping the stream closes the connection gracefully.
#[derive(Debug)]
pub struct VsockStream {
    inner: AsyncFd<Registered<driver::VsockStream>>,
}

impl VsockStream {
    /// Adopt a connected socket of [`crate::driver`]: switches it to non-blocking mode and
    /// registers its readiness descriptor with the current runtime.
    pub fn new(connected: driver::VsockStream) -> io::Result<Self> {
        connected.set_nonblocking(true)?;
        Ok(VsockStream {
            inner: register(connected)?,
        })
    }

    /// Open a connection to `addr` on `driver`: the handshake runs while the task waits for
    /// the descriptor to turn writable; then the pending error, if any, is the result
    /// (`ConnectionRefused`, `TimedOut` after the protocol's connect timeout, ...).
    pub async fn connect(driver: &VsockDriver, addr: VsockAddr) -> io::Result<Self> {
        let stream = VsockStream::new(driver.connect_nonblocking(addr)?)?;
        stream.wait_connected().await?;
        Ok(stream)
    }

    /// Waits until the handshake is over, and says how it ended.
    async fn wait_connected(&self) -> io::Result<()> {
        wait_connected(&self.inner, |s| s.connect_status()).await
    }

    /// The local address that this socket is bound to.
    pub fn local_addr(&self) -> io::Result<VsockAddr> {
        self.inner.get_ref().local_addr()
    }

    /// The remote address that this socket is connected to.
    pub fn peer_addr(&self) -> io::Result<VsockAddr> {
        self.inner.get_ref().peer_addr()
    }

    /// Shuts down the read, write, or both halves of this connection.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.get_ref().shutdown(how)
    }

    /// The pending error, taken (`SO_ERROR`): a reset, the device's end. `Ok(None)` when there
    /// is none.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        self.inner.get_ref().take_error()
    }

    buffer_size_methods!();

    fn buffer_get(&self, opt: BufferOption) -> io::Result<u64> {
        self.inner.get_ref().buffer_get(opt)
    }

    fn buffer_set(&self, opt: BufferOption, val: u64) -> io::Result<()> {
        self.inner.get_ref().buffer_set(opt, val)
    }

    /// Waits until the stream may be readable (data, end of stream or an error); a
    /// [`VsockStream::try_read`] may still find nothing, and then waits again.
    pub async fn readable(&self) -> io::Result<()> {
        self.inner.readable().await.map(drop)
    }

    /// Waits until the stream may be writable (room to write, or an error).
    pub async fn writable(&self) -> io::Result<()> {
        self.inner.writable().await.map(drop)
    }

    /// Reads what has arrived without waiting: `WouldBlock` when nothing has (and clears the
    /// readiness [`VsockStream::readable`] saw), `Ok(0)` at end of stream.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner
            .try_io(Interest::READABLE, |s| (&s.sock).read(buf))
    }

    /// Writes what fits without waiting: `WouldBlock` when nothing does.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.inner
            .try_io(Interest::WRITABLE, |s| (&s.sock).write(buf))
    }

    /// Borrowed read and write halves, usable at once (tokio-vsock's `split`).
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        (ReadHalf(self), WriteHalf(self))
    }

    /// Owned read and write halves, for two tasks (tokio-vsock's `into_split`); join them
    /// again with [`OwnedReadHalf::reunite`] or [`OwnedReadHalf::unsplit`].
    pub fn into_split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        let s = Arc::new(self);
        (
            OwnedReadHalf { inner: s.clone() },
            OwnedWriteHalf { inner: s },
        )
    }

    pub(crate) fn poll_read_priv(
        &self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Zeroes only what was never initialized (nothing, for `read(&mut [u8])`).
        let unfilled = buf.initialize_unfilled();
        let n = ready!(poll_io(&self.inner, cx, Interest::READABLE, |s| {
            (&s.sock).read(unfilled)
        }))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }

    pub(crate) fn poll_write_priv(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        poll_io(&self.inner, cx, Interest::WRITABLE, |s| {
            (&s.sock).write(buf)
        })
    }

    pub(crate) fn poll_write_vectored_priv(
        &self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        poll_io(&self.inner, cx, Interest::WRITABLE, |s| {
            (&s.sock).write_vectored(bufs)
        })
    }
}

impl AsFd for VsockStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.get_ref().as_fd()
    }
}

impl AsRawFd for VsockStream {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.poll_read_priv(cx, buf)
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_priv(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored_priv(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Nothing is buffered above the driver: a no-op.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Shuts down the write half (the peer reads end of stream).
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.shutdown(Shutdown::Write))
    }
}

/// The readable half of [`VsockStream::split`].
#[derive(Debug)]
pub struct ReadHalf<'a>(&'a VsockStream);

/// The writable half of [`VsockStream::split`].
#[derive(Debug)]
pub struct WriteHalf<'a>(&'a VsockStream);

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.poll_read_priv(cx, buf)
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_write_priv(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_write_vectored_priv(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Shuts down the stream's write half.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.0.shutdown(Shutdown::Write))
    }
}

/// The readable half of [`VsockStream::into_split`].
#[derive(Debug)]
pub struct OwnedReadHalf {
    inner: Arc<VsockStream>,
}

/// The writable half of [`VsockStream::into_split`]. Dropping it does not shut the stream
/// down (as tokio-vsock's); [`AsyncWriteExt::shutdown`](::tokio::io::AsyncWriteExt::shutdown)
/// does.
#[derive(Debug)]
pub struct OwnedWriteHalf {
    inner: Arc<VsockStream>,
}

/// [`OwnedReadHalf::reunite`] was given halves of two different streams; both come back. No
/// cause.
#[derive(Debug, thiserror::Error)]
#[error("the read and write halves given to reunite come from two different streams")]
pub struct ReuniteError(pub OwnedReadHalf, pub OwnedWriteHalf);

impl OwnedReadHalf {
    /// Whether `other` was split from the same stream.
    pub fn is_pair_of(&self, other: &OwnedWriteHalf) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The stream again, from its two halves; [`ReuniteError`] (holding both) when they come
    /// from two streams.
    pub fn reunite(self, other: OwnedWriteHalf) -> Result<VsockStream, ReuniteError> {
        if !self.is_pair_of(&other) {
            return Err(ReuniteError(self, other));
        }
        drop(other);
        Arc::try_unwrap(self.inner).map_err(|inner| {
            // Unreachable: only the two halves hold the stream, and `other` is gone.
            ReuniteError(
                OwnedReadHalf {
                    inner: inner.clone(),
                },
                OwnedWriteHalf { inner },
            )
        })
    }

    /// The stream again, as tokio-vsock's `unsplit`.
    ///
    /// # Panics
    /// When the halves come from two different streams (as tokio-vsock's); use
    /// [`OwnedReadHalf::reunite`] to get an error instead.
    #[track_caller]
    pub fn unsplit(self, wr: OwnedWriteHalf) -> VsockStream {
        match self.reunite(wr) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    /// The remote address of the stream.
    pub fn peer_addr(&self) -> io::Result<VsockAddr> {
        self.inner.peer_addr()
    }

    /// The local address of the stream.
    pub fn local_addr(&self) -> io::Result<VsockAddr> {
        self.inner.local_addr()
    }
}

impl OwnedWriteHalf {
    /// Whether `other` was split from the same stream.
    pub fn is_pair_of(&self, other: &OwnedReadHalf) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The remote address of the stream.
    pub fn peer_addr(&self) -> io::Result<VsockAddr> {
        self.inner.peer_addr()
    }

    /// The local address of the stream.
    pub fn local_addr(&self) -> io::Result<VsockAddr> {
        self.inner.local_addr()
    }
}

impl AsyncRead for OwnedReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.inner.poll_read_priv(cx, buf)
    }
}

impl AsyncWrite for OwnedWriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write_priv(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_write_vectored_priv(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Shuts down the stream's write half.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.inner.shutdown(Shutdown::Write))
    }
}

/// Checks a listening address against `driver` (see the module docs) and returns its port.
fn listen_port(driver: &VsockDriver, addr: VsockAddr) -> io::Result<u32> {
    let ours = driver.local_cid();
    if addr.cid != VMADDR_CID_ANY && addr.cid != ours {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!(
                "cannot listen on CID {}: expected VMADDR_CID_ANY ({VMADDR_CID_ANY}) or the driver's CID {ours}",
                addr.cid
            ),
        ));
    }
    if addr.port == VMADDR_PORT_ANY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "cannot listen on VMADDR_PORT_ANY: expected a port number (the driver does not choose listening ports)",
        ));
    }
    Ok(addr.port)
}

/// An async listener for streams (tokio-vsock's `VsockListener`).
#[derive(Debug)]
pub struct VsockListener {
    inner: AsyncFd<Registered<driver::VsockListener>>,
}

impl VsockListener {
    /// Adopt a stream listener of [`crate::driver`] (switched to non-blocking mode).
    pub fn new(listener: driver::VsockListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(VsockListener {
            inner: register(listener)?,
        })
    }

    /// Listen on `driver` at `addr`: `addr.cid` is `VMADDR_CID_ANY` or the driver's CID.
    pub fn bind(driver: &VsockDriver, addr: VsockAddr) -> io::Result<Self> {
        VsockListener::new(driver.listen(listen_port(driver, addr)?)?)
    }

    /// Accepts a new incoming connection to this listener.
    pub async fn accept(&self) -> io::Result<(VsockStream, VsockAddr)> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Attempt to accept a connection, registering the task for the next one when none waits.
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(VsockStream, VsockAddr)>> {
        let (s, addr) = ready!(self.poll_accept_std(cx))?;
        Poll::Ready(Ok((VsockStream::new(s)?, addr)))
    }

    /// As [`VsockListener::poll_accept`], returning the socket of [`crate::driver`] (in
    /// non-blocking mode).
    pub fn poll_accept_std(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(driver::VsockStream, VsockAddr)>> {
        poll_io(&self.inner, cx, Interest::READABLE, |l| l.accept())
    }

    /// The local address that this listener is bound to.
    pub fn local_addr(&self) -> io::Result<VsockAddr> {
        self.inner.get_ref().local_addr()
    }

    /// The accepted streams, as a [`futures_core::Stream`] that never ends.
    pub fn incoming(self) -> Incoming {
        Incoming { inner: self }
    }

    buffer_size_methods!();

    fn buffer_get(&self, opt: BufferOption) -> io::Result<u64> {
        self.inner.get_ref().buffer_get(opt)
    }

    fn buffer_set(&self, opt: BufferOption, val: u64) -> io::Result<()> {
        self.inner.get_ref().buffer_set(opt, val)
    }
}

impl AsFd for VsockListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.get_ref().as_fd()
    }
}

impl AsRawFd for VsockListener {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// The stream of [`VsockListener::incoming`].
#[derive(Debug)]
pub struct Incoming {
    inner: VsockListener,
}

impl futures_core::Stream for Incoming {
    type Item = io::Result<VsockStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let (s, _) = ready!(self.inner.poll_accept(cx))?;
        Poll::Ready(Some(Ok(s)))
    }
}

impl AsRawFd for Incoming {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

/// An async SEQPACKET connection: message boundaries are kept (needs the device's
/// VIRTIO_VSOCK_F_SEQPACKET). tokio-vsock has no such type; this one follows tokio's
/// datagram sockets (`send`, `recv`, `poll_send`, `poll_recv`).
#[derive(Debug)]
pub struct VsockSeqPacket {
    inner: AsyncFd<Registered<driver::VsockSeqPacket>>,
}

impl VsockSeqPacket {
    /// Adopt a connected SEQPACKET socket of [`crate::driver`] (switched to non-blocking mode).
    pub fn new(connected: driver::VsockSeqPacket) -> io::Result<Self> {
        connected.set_nonblocking(true)?;
        Ok(VsockSeqPacket {
            inner: register(connected)?,
        })
    }

    /// Open a SEQPACKET connection to `addr` on `driver` (as [`VsockStream::connect`]).
    pub async fn connect(driver: &VsockDriver, addr: VsockAddr) -> io::Result<Self> {
        let s = VsockSeqPacket::new(driver.connect_seqpacket_nonblocking(addr)?)?;
        wait_connected(&s.inner, |s| s.connect_status()).await?;
        Ok(s)
    }

    /// Sends one message whole, waiting for room for all of it; returns its length.
    pub async fn send(&self, msg: &[u8]) -> io::Result<usize> {
        poll_fn(|cx| self.poll_send(cx, msg)).await
    }

    /// Attempt to send one message whole.
    pub fn poll_send(&self, cx: &mut Context<'_>, msg: &[u8]) -> Poll<io::Result<usize>> {
        poll_io(&self.inner, cx, Interest::WRITABLE, |s| s.send(msg))
    }

    /// Receives one message into `buf`: the bytes copied; a longer message is truncated (the
    /// rest dropped, as `MSG_TRUNC`). `Ok(0)` for an empty message or end of stream.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        poll_fn(|cx| self.poll_recv_full(cx, buf))
            .await
            .map(|(n, _, _)| n)
    }

    /// Receives one message: (bytes copied, the message's full length, end-of-record flag).
    pub async fn recv_full(&self, buf: &mut [u8]) -> io::Result<(usize, usize, bool)> {
        poll_fn(|cx| self.poll_recv_full(cx, buf)).await
    }

    /// Attempt to receive one message (see [`VsockSeqPacket::recv_full`]).
    pub fn poll_recv_full(
        &self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<(usize, usize, bool)>> {
        poll_io(&self.inner, cx, Interest::READABLE, |s| s.recv_full(buf))
    }

    /// Shuts down halves of the connection.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.get_ref().shutdown(how)
    }

    /// The remote address.
    pub fn peer_addr(&self) -> io::Result<VsockAddr> {
        self.inner.get_ref().peer_addr()
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<VsockAddr> {
        self.inner.get_ref().local_addr()
    }

    /// The pending error, taken (`SO_ERROR`).
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        self.inner.get_ref().take_error()
    }

    buffer_size_methods!();

    fn buffer_get(&self, opt: BufferOption) -> io::Result<u64> {
        self.inner.get_ref().buffer_get(opt)
    }

    fn buffer_set(&self, opt: BufferOption, val: u64) -> io::Result<()> {
        self.inner.get_ref().buffer_set(opt, val)
    }
}

impl AsFd for VsockSeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.get_ref().as_fd()
    }
}

impl AsRawFd for VsockSeqPacket {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// An async listener for SEQPACKET connections.
#[derive(Debug)]
pub struct VsockSeqPacketListener {
    inner: AsyncFd<Registered<driver::VsockListener>>,
}

impl VsockSeqPacketListener {
    /// Listen for SEQPACKET connections on `driver` at `addr` (as [`VsockListener::bind`]).
    pub fn bind(driver: &VsockDriver, addr: VsockAddr) -> io::Result<Self> {
        let l = driver.listen_seqpacket(listen_port(driver, addr)?)?;
        l.set_nonblocking(true)?;
        Ok(VsockSeqPacketListener {
            inner: register(l)?,
        })
    }

    /// Accepts a new SEQPACKET connection.
    pub async fn accept(&self) -> io::Result<(VsockSeqPacket, VsockAddr)> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }

    buffer_size_methods!();

    fn buffer_get(&self, opt: BufferOption) -> io::Result<u64> {
        self.inner.get_ref().buffer_get(opt)
    }

    fn buffer_set(&self, opt: BufferOption, val: u64) -> io::Result<()> {
        self.inner.get_ref().buffer_set(opt, val)
    }

    /// Attempt to accept a SEQPACKET connection.
    pub fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(VsockSeqPacket, VsockAddr)>> {
        let (s, addr) = ready!(poll_io(&self.inner, cx, Interest::READABLE, |l| {
            l.accept_seqpacket()
        }))?;
        Poll::Ready(Ok((VsockSeqPacket::new(s)?, addr)))
    }

    /// The local address that this listener is bound to.
    pub fn local_addr(&self) -> io::Result<VsockAddr> {
        self.inner.get_ref().local_addr()
    }
}

impl AsFd for VsockSeqPacketListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.get_ref().as_fd()
    }
}

impl AsRawFd for VsockSeqPacketListener {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}
