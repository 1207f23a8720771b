// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The socket API: `VsockStream`, `VsockListener`, `VsockSeqPacket` and `VsockAddr`.
//!
//! Each socket is a thin handle on a runtime [`Core`] (one protocol endpoint and its waiters,
//! see [`crate::runtime`]) plus the connection or listener id it names; blocking, timeouts and
//! the mapping of protocol errors to `std::io` live in the core.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::poller::{private_impl, PollSource};
use crate::packet::{SocketType, VMADDR_PORT_ANY};
use crate::proto::{BufferOption, ConnId, ListenerId, ProtoError};
use crate::runtime::{to_io, Core, Target, UserFd, Wait};
use vm_memory::VolatileSlice;

/// A vsock address: context id and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VsockAddr {
    /// Context id.
    pub cid: u64,
    /// Port.
    pub port: u32,
}

impl VsockAddr {
    /// An address.
    pub fn new(cid: u64, port: u32) -> Self {
        VsockAddr { cid, port }
    }
}

impl std::fmt::Display for VsockAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.cid, self.port)
    }
}

impl std::str::FromStr for VsockAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (c, p) = s
            .split_once(':')
            .ok_or_else(|| format!("expected CID:PORT, found {s:?}"))?;
        let cid = c.parse().map_err(|_| format!("bad CID {c:?} in {s:?}"))?;
        if !crate::packet::cid_fits(cid) {
            return Err(format!(
                "CID {cid} in {s:?} does not fit in 32 bits: expected at most 4294967295 (VMADDR_CID_ANY)"
            ));
        }
        Ok(VsockAddr {
            cid,
            port: p.parse().map_err(|_| format!("bad port {p:?} in {s:?}"))?,
        })
    }
}

/// Per-socket blocking-call timeouts.
#[derive(Debug, Default, Clone, Copy)]
struct Timeouts {
    read: Option<Duration>,
    write: Option<Duration>,
}

/// The six receive buffer calls of an AF_VSOCK socket (`SO_VM_SOCKETS_BUFFER_SIZE`,
/// `_MIN_SIZE`, `_MAX_SIZE`, get and set), on a type with `buffer_get(opt)` and
/// `buffer_set(opt, val)`: one text for every socket type here and in the tokio API.
macro_rules! buffer_size_methods {
    () => {
        /// The receive buffer size (`getsockopt(SO_VM_SOCKETS_BUFFER_SIZE)`): the `buf_alloc`
        /// this socket advertises to its peer, the most the peer may have sent and we not yet
        /// read. A listener's is what the connections it accepts start with.
        pub fn buffer_size(&self) -> std::io::Result<u64> {
            self.buffer_get($crate::proto::BufferOption::Size)
        }

        /// Set the receive buffer size (`setsockopt(SO_VM_SOCKETS_BUFFER_SIZE)`), as Linux
        /// does (`vsock_update_buffer_size`, 6.12): the value is clamped, never refused: up to
        /// [`buffer_min_size`](Self::buffer_min_size), then down to
        /// [`buffer_max_size`](Self::buffer_max_size) (by default 256 KiB, as Linux's, or the
        /// driver's default size if that is larger: raise the max first to go above it), then
        /// to `u32::MAX`, the header's width; [`buffer_size`](Self::buffer_size) says what is
        /// in force (see [`BufferSize`](crate::proto::BufferSize)). A large buffer costs
        /// memory only as data arrives unread: past a connection's share of the RX pool, the
        /// payload is copied out of the pool to the heap, so the pool does not bound it.
        ///
        /// On a connection a larger size is advertised at once (a `CREDIT_UPDATE`, as Linux
        /// sends); a smaller one takes effect as the reader consumes what the peer was
        /// already allowed to send, so the peer is never given less room than promised and
        /// never reset for using it. On a listener, connections it accepts from then on
        /// start with it (as a Linux child socket inherits its listener's). There is no
        /// unconnected socket to set it on before `connect`: the `REQUEST` carries the
        /// driver's default (`DriverConfig::proto.buf_alloc`), so a smaller size set right
        /// after connecting applies once that first grant is used.
        pub fn set_buffer_size(&self, size: u64) -> std::io::Result<()> {
            self.buffer_set($crate::proto::BufferOption::Size, size)
        }

        /// The lower bound of the receive buffer size
        /// (`getsockopt(SO_VM_SOCKETS_BUFFER_MIN_SIZE)`; 128 bytes by default, as Linux's).
        pub fn buffer_min_size(&self) -> std::io::Result<u64> {
            self.buffer_get($crate::proto::BufferOption::MinSize)
        }

        /// Set the lower bound (`setsockopt(SO_VM_SOCKETS_BUFFER_MIN_SIZE)`): stored as
        /// given, and the size clamped again (see [`set_buffer_size`](Self::set_buffer_size)).
        pub fn set_buffer_min_size(&self, min: u64) -> std::io::Result<()> {
            self.buffer_set($crate::proto::BufferOption::MinSize, min)
        }

        /// The upper bound of the receive buffer size
        /// (`getsockopt(SO_VM_SOCKETS_BUFFER_MAX_SIZE)`; 256 KiB by default, as Linux's).
        pub fn buffer_max_size(&self) -> std::io::Result<u64> {
            self.buffer_get($crate::proto::BufferOption::MaxSize)
        }

        /// Set the upper bound (`setsockopt(SO_VM_SOCKETS_BUFFER_MAX_SIZE)`): stored as
        /// given, and the size clamped again (see [`set_buffer_size`](Self::set_buffer_size)).
        pub fn set_buffer_max_size(&self, max: u64) -> std::io::Result<()> {
            self.buffer_set($crate::proto::BufferOption::MaxSize, max)
        }
    };
}
#[cfg(feature = "tokio")]
pub(crate) use buffer_size_methods;

/// A connected vsock stream, like `std::os::unix::net::UnixStream`.
///
/// Dropping the last handle (see [`VsockStream::try_clone`]) closes the connection gracefully
/// (SHUTDOWN, then RST after the linger timeout).
///
/// # Non-blocking use and readiness
/// [`VsockStream::set_nonblocking`] makes every call return `WouldBlock` instead of waiting
/// (a write then queues what fits and returns that count). The stream's file descriptor
/// ([`AsFd`]/[`AsRawFd`], made on first use) is for `poll(2)`, epoll, mio or tokio's
/// `AsyncFd` to wait on: it reports `POLLIN` while data (or end of stream) waits, `POLLOUT`
/// while a write would queue something, `POLLRDHUP` once the peer shut down sending, `POLLHUP`
/// when closed both ways and `POLLERR` after a reset, a refused or timed-out connect or the
/// device's end; level-triggered, nothing to re-arm (see the runtime's `readiness.rs`). Wait on
/// it, never read or write it.
#[derive(Debug)]
pub struct VsockStream {
    core: Arc<Core>,
    conn: Arc<ConnHandle>,
    timeouts: Timeouts,
}

/// What the clones of one socket share; closes the connection when the last clone goes.
#[derive(Debug)]
struct ConnHandle {
    core: Arc<Core>,
    id: ConnId,
    /// Calls return `WouldBlock` instead of waiting (shared by clones, as `O_NONBLOCK` is by
    /// duplicated descriptors).
    nonblocking: AtomicBool,
    /// The readiness descriptor, made on first use.
    fd: OnceLock<UserFd>,
    /// `SO_LINGER`: how long the last close waits for the peer's answer (see
    /// [`VsockStream::set_linger`]).
    linger: std::sync::Mutex<Option<Duration>>,
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        let linger = *self.linger.lock().unwrap_or_else(|p| p.into_inner());
        match linger.filter(|t| !t.is_zero() && !self.nonblocking()) {
            Some(t) => self.core.close_linger(self.id, t),
            None => self.core.close(self.id),
        }
    }
}

impl ConnHandle {
    fn new(core: &Arc<Core>, id: ConnId, nonblocking: bool) -> ConnHandle {
        ConnHandle {
            core: core.clone(),
            id,
            nonblocking: AtomicBool::new(nonblocking),
            fd: OnceLock::new(),
            linger: std::sync::Mutex::new(None),
        }
    }

    fn nonblocking(&self) -> bool {
        self.nonblocking.load(Ordering::Relaxed)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.get_or_init(|| self.core.conn_fd(self.id)).as_fd()
    }
}

impl VsockStream {
    fn from_handle(conn: Arc<ConnHandle>) -> Self {
        VsockStream {
            core: conn.core.clone(),
            conn,
            timeouts: Timeouts::default(),
        }
    }

    /// Connect (see [`Core::connect`]): blocking, or returning at once with the handshake in
    /// progress when `nonblocking`.
    pub(crate) fn connect_on(
        core: &Arc<Core>,
        addr: VsockAddr,
        opts: ConnectOpts,
    ) -> io::Result<Self> {
        let id = core.connect(
            (addr.cid, addr.port),
            opts.local_port,
            SocketType::Stream,
            opts.timeout,
            opts.nonblocking,
        )?;
        Ok(VsockStream::from_handle(Arc::new(ConnHandle::new(
            core,
            id,
            opts.nonblocking,
        ))))
    }

    fn read_wait(&self) -> Wait {
        Wait::new(self.conn.nonblocking(), self.timeouts.read)
    }

    fn write_wait(&self) -> Wait {
        Wait::new(self.conn.nonblocking(), self.timeouts.write)
    }

    /// Our address (local CID, local port).
    pub fn local_addr(&self) -> io::Result<VsockAddr> {
        self.core
            .local_addr(self.conn.id)
            .map(|(cid, port)| VsockAddr::new(cid, port))
            .ok_or_else(|| to_io(ProtoError::NotConnected))
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<VsockAddr> {
        self.core
            .peer_addr(self.conn.id)
            .map(|(cid, port)| VsockAddr::new(cid, port))
            .ok_or_else(|| to_io(ProtoError::NotConnected))
    }

    /// Shut down the read, write or both halves (VIRTIO_VSOCK_OP_SHUTDOWN).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.core.shutdown(self.conn.id, how)
    }

    /// Timeout for blocking reads (`None`: wait forever).
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        if t == Some(Duration::ZERO) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "zero timeout"));
        }
        self.timeouts.read = t;
        Ok(())
    }

    /// Timeout for blocking writes (`None`: wait forever).
    pub fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        if t == Some(Duration::ZERO) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "zero timeout"));
        }
        self.timeouts.write = t;
        Ok(())
    }

    /// Non-blocking mode on or off, for this stream and its clones (as `O_NONBLOCK`): reads,
    /// writes, `send_with`/`recv_with` and `peek` return `WouldBlock` instead of waiting, and a
    /// write queues what fits and returns that count.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.conn.nonblocking.store(nonblocking, Ordering::Relaxed);
        Ok(())
    }

    /// Read what has arrived without consuming it (`MSG_PEEK`): waits like `read` (up to the
    /// read timeout; `WouldBlock` in non-blocking mode); `Ok(0)` at end of stream.
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.core.peek(self.conn.id, buf, self.read_wait())
    }

    /// `SO_LINGER`, as Linux's vsock has it: with `Some(t)`, dropping the last clone of this
    /// stream (in blocking mode) waits until the peer has answered the close (what was written
    /// was sent, then SHUTDOWN, then the peer's RST or SHUTDOWN), or `t` passes, or the
    /// device ends. `None` (the default) or a zero duration: the drop returns at once and the
    /// close goes on in the background (Linux's 8 s linger, then RST). Unlike TCP's, a zero
    /// linger does not reset the connection: use [`VsockStream::abort`] for that.
    pub fn set_linger(&self, linger: Option<Duration>) -> io::Result<()> {
        *self.conn.linger.lock().unwrap_or_else(|p| p.into_inner()) = linger;
        Ok(())
    }

    /// The linger set by [`VsockStream::set_linger`].
    pub fn linger(&self) -> io::Result<Option<Duration>> {
        Ok(*self.conn.linger.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reset the connection now (RST): what is queued in both directions is dropped, later
    /// reads and writes on every clone fail with `ConnectionReset`, and the peer's end is
    /// reset too (what TCP programs get from `SO_LINGER` 0, which vsock does not have).
    pub fn abort(&self) -> io::Result<()> {
        self.core.abort(self.conn.id)
    }

    /// The receive low-water mark (`SO_RCVLOWAT`): a blocking read waits until at least
    /// `bytes` (or the buffer's length, if smaller) have arrived, or the stream ends; the
    /// descriptor reports `POLLIN` only then. A non-blocking read still returns what there is.
    /// At most the receive buffer (`InvalidInput` otherwise); 0 and 1 mean any data.
    pub fn set_recv_low_water(&self, bytes: usize) -> io::Result<()> {
        self.core.set_rcvlowat(self.conn.id, bytes)
    }

    /// The pending error, taken (as `SO_ERROR`): why a non-blocking connect failed, or the
    /// device's end. `Ok(None)` when there is none (a connect still in progress included).
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        Ok(self.core.take_error(self.conn.id))
    }

    /// Another handle to the same connection (for a reader and a writer thread).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(VsockStream {
            core: self.core.clone(),
            conn: self.conn.clone(),
            timeouts: self.timeouts,
        })
    }

    buffer_size_methods!();

    pub(crate) fn buffer_get(&self, opt: BufferOption) -> io::Result<u64> {
        self.core.buffer(self.conn.id).map(|b| b.get(opt))
    }

    pub(crate) fn buffer_set(&self, opt: BufferOption, val: u64) -> io::Result<()> {
        self.core.set_buffer(self.conn.id, opt, val).map(drop)
    }
}

/// How [`VsockStream::connect_on`] connects.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ConnectOpts {
    /// The handshake's timeout (the protocol's default when `None`).
    pub(crate) timeout: Option<Duration>,
    /// Our port (an ephemeral one when `None`).
    pub(crate) local_port: Option<u32>,
    /// Return at once, the handshake in progress.
    pub(crate) nonblocking: bool,
}

/// For the tokio API.
#[cfg(feature = "tokio")]
impl VsockStream {
    /// The edge notifier the tokio API registers (see the runtime's `readiness.rs`).
    pub(crate) fn edge_notifier(&self) -> io::Result<UserFd> {
        self.core.conn_notifier(self.conn.id)
    }

    /// How a non-blocking connect ended: `None` while the handshake is in progress.
    pub(crate) fn connect_status(&self) -> Option<io::Result<()>> {
        self.core.connect_status(self.conn.id)
    }
}

impl AsFd for VsockStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.fd()
    }
}

impl AsRawFd for VsockStream {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl VsockStream {
    /// Zero-copy send: waits (up to the write timeout) for room in the send buffer, then `fill`
    /// gets up to `max_len` bytes of the connection's send memory (DMA memory the device reads
    /// the packets from, as one or more slices in order), writes the payload there and returns
    /// how many bytes, from the first slice on, it wrote; those are sent. Returns that count.
    /// No byte is copied by the driver. Fewer slices (or less room) than asked come when the
    /// send buffer or the TX pool is nearly full.
    ///
    /// `fill` runs while the driver's lock is held: keep it short, and make no call on this
    /// driver from inside it (that would deadlock).
    ///
    /// ```
    /// use std::io::Read;
    /// use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
    /// use vdpa_vsock::sim::{SimConfig, ECHO_PORT};
    /// use vm_memory::Bytes;
    ///
    /// let (driver, _host) = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default())?;
    /// let mut s = driver.connect(VsockAddr::new(2, ECHO_PORT))?;
    /// let n = s.send_with(4, |bufs| {
    ///     bufs[0].write_slice(b"ping", 0).expect("4 bytes of room");
    ///     4
    /// })?;
    /// assert_eq!(n, 4);
    /// let mut back = [0u8; 4];
    /// s.read_exact(&mut back)?;
    /// assert_eq!(&back, b"ping");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn send_with(
        &mut self,
        max_len: usize,
        fill: impl FnOnce(&[VolatileSlice<'_>]) -> usize,
    ) -> io::Result<usize> {
        self.core
            .send_with(self.conn.id, max_len, self.write_wait(), fill)
    }

    /// Zero-copy receive: waits (up to the read timeout) for data, then `take` sees the
    /// received payload where the device wrote it (one or more slices of DMA memory, in order)
    /// and returns how many bytes, from the first slice on, it consumed; those are released
    /// (their buffers go back to the ring) and credited to the peer. Returns that count; `Ok(0)`
    /// at end of stream, without calling `take`. No byte is copied by the driver (payloads of
    /// at most 128 bytes, which are merged on arrival, excepted).
    ///
    /// `take` runs while the driver's lock is held: keep it short, and make no call on this
    /// driver from inside it (that would deadlock).
    ///
    /// ```
    /// use std::io::Write;
    /// use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
    /// use vdpa_vsock::sim::{SimConfig, ECHO_PORT};
    ///
    /// let (driver, _host) = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default())?;
    /// let mut s = driver.connect(VsockAddr::new(2, ECHO_PORT))?;
    /// s.write_all(&[7u8; 1000])?;
    /// let mut sum = 0u64;
    /// let mut got = 0;
    /// while got < 1000 {
    ///     got += s.recv_with(|slices| {
    ///         let mut n = 0;
    ///         for sl in slices {
    ///             let mut chunk = vec![0u8; sl.len()];
    ///             sl.copy_to(&mut chunk[..]);
    ///             sum += chunk.iter().map(|&b| u64::from(b)).sum::<u64>();
    ///             n += sl.len();
    ///         }
    ///         n
    ///     })?;
    /// }
    /// assert_eq!(sum, 7000);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn recv_with(
        &mut self,
        take: impl FnOnce(&[VolatileSlice<'_>]) -> usize,
    ) -> io::Result<usize> {
        self.core.recv_with(self.conn.id, self.read_wait(), take)
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }

    /// Fills the buffers in order from what has arrived, under one hold of the driver's lock.
    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        (&*self).read_vectored(bufs)
    }
}

/// Reads through a shared reference, as `&UnixStream` does (a reader and a writer may share
/// one stream).
impl Read for &VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.core.read(self.conn.id, buf, self.read_wait())
    }

    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        self.core
            .read_vectored(self.conn.id, bufs, self.read_wait())
    }
}

impl Write for VsockStream {
    /// Queues the whole buffer (blocking for room, up to the write timeout) and returns its
    /// length; in non-blocking mode, or when the timeout passes after part of it was queued,
    /// returns how much was queued.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    /// Queues every buffer in order (blocking for room, up to the write timeout), with one
    /// transport round per wait rather than one per buffer; returns the total length (or, as
    /// `write`, what was queued).
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&*self).write_vectored(bufs)
    }

    /// Waits until every byte written has left: handed to the device and its descriptors
    /// returned (up to the write timeout; `WouldBlock` in non-blocking mode). A peer that grants
    /// no credit keeps bytes here: then the timeout says so. Fails if the connection is reset.
    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}

/// Writes through a shared reference, as `&UnixStream` does.
impl Write for &VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.core.write(self.conn.id, buf, self.write_wait())
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.core
            .write_vectored(self.conn.id, bufs, self.write_wait())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.core.flush(self.conn.id, self.write_wait())
    }
}

/// A listening port, like `std::os::unix::net::UnixListener`.
///
/// Non-blocking mode and the readiness descriptor work as for [`VsockStream`]: the descriptor
/// reports `POLLIN` while a connection waits to be accepted (`POLLERR`/`POLLHUP` after the
/// device's end).
#[derive(Debug)]
pub struct VsockListener {
    core: Arc<Core>,
    id: ListenerId,
    port: u32,
    ty: SocketType,
    nonblocking: AtomicBool,
    fd: OnceLock<UserFd>,
}

/// Default listen backlog.
pub const DEFAULT_BACKLOG: usize = 128;

impl VsockListener {
    pub(crate) fn bind_any_on(core: &Arc<Core>, ty: SocketType) -> io::Result<Self> {
        let id = core.listen_any_port(DEFAULT_BACKLOG, ty)?;
        Ok(VsockListener {
            core: core.clone(),
            id,
            port: VMADDR_PORT_ANY,
            ty,
            nonblocking: AtomicBool::new(false),
            fd: OnceLock::new(),
        })
    }

    pub(crate) fn bind_on(
        core: &Arc<Core>,
        port: u32,
        backlog: usize,
        ty: SocketType,
    ) -> io::Result<Self> {
        let (id, port) = core.listen(port, backlog, ty)?;
        Ok(VsockListener {
            core: core.clone(),
            id,
            port,
            ty,
            nonblocking: AtomicBool::new(false),
            fd: OnceLock::new(),
        })
    }

    /// The port listened on: the one picked when listening on
    /// [`VMADDR_PORT_ANY`](crate::packet::VMADDR_PORT_ANY).
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Our address (local CID, the port listened on).
    pub fn local_addr(&self) -> io::Result<VsockAddr> {
        Ok(VsockAddr::new(self.core.local_cid(), self.port))
    }

    /// Non-blocking mode on or off: `accept` returns `WouldBlock` instead of waiting, and the
    /// streams it returns start in non-blocking mode too (as `accept4(SOCK_NONBLOCK)`).
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.nonblocking.store(nonblocking, Ordering::Relaxed);
        Ok(())
    }

    fn accept_conn(&self, ty: SocketType, timeout: Option<Duration>) -> io::Result<ConnHandle> {
        if self.ty != ty {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                match self.ty {
                    SocketType::Stream => "listener is STREAM: use accept",
                    SocketType::SeqPacket => "listener is SEQPACKET: use accept_seqpacket",
                },
            ));
        }
        let nonblocking = self.nonblocking.load(Ordering::Relaxed);
        let c = self.core.accept(self.id, Wait::new(nonblocking, timeout))?;
        Ok(ConnHandle::new(&self.core, c, nonblocking))
    }

    /// Wait for the next established connection.
    pub fn accept(&self) -> io::Result<(VsockStream, VsockAddr)> {
        self.accept_timeout(None)
    }

    /// Like [`VsockListener::accept`], giving up after `timeout`.
    pub fn accept_timeout(
        &self,
        timeout: Option<Duration>,
    ) -> io::Result<(VsockStream, VsockAddr)> {
        let conn = self.accept_conn(SocketType::Stream, timeout)?;
        let c = conn.id;
        let s = VsockStream::from_handle(Arc::new(conn));
        if self.port == VMADDR_PORT_ANY {
            // A listener on every port: take the request at once.
            self.core.answer(c, true)?;
        }
        let peer = s.peer_addr()?;
        Ok((s, peer))
    }

    /// For a listener on every port ([`crate::driver::VsockDriver::listen_any_port`]): the next
    /// connection request, not answered yet, so that the caller can decide by its port whether
    /// to accept it ([`VsockRequest::accept`]) or refuse it with `RST` ([`VsockRequest::refuse`],
    /// or drop it), as Firecracker's muxer does.
    pub fn accept_request(
        &self,
        timeout: Option<Duration>,
    ) -> io::Result<(VsockRequest, VsockAddr)> {
        if self.port != VMADDR_PORT_ANY || self.ty != SocketType::Stream {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "accept_request needs a stream listener made by listen_any_port",
            ));
        }
        let nonblocking = self.nonblocking.load(Ordering::Relaxed);
        let c = self.core.accept(self.id, Wait::new(nonblocking, timeout))?;
        let stream =
            VsockStream::from_handle(Arc::new(ConnHandle::new(&self.core, c, nonblocking)));
        let peer = stream.peer_addr()?;
        Ok((VsockRequest { stream }, peer))
    }

    /// Wait for the next SEQPACKET connection (for a listener made with `listen_seqpacket`).
    pub fn accept_seqpacket(&self) -> io::Result<(VsockSeqPacket, VsockAddr)> {
        let conn = self.accept_conn(SocketType::SeqPacket, None)?;
        let s = VsockSeqPacket {
            inner: VsockStream::from_handle(Arc::new(conn)),
        };
        let peer = s.inner.peer_addr()?;
        Ok((s, peer))
    }

    /// An endless iterator of accepted streams.
    pub fn incoming(&self) -> impl Iterator<Item = io::Result<VsockStream>> + '_ {
        std::iter::repeat_with(move || self.accept().map(|(s, _)| s))
    }

    buffer_size_methods!();

    pub(crate) fn buffer_get(&self, opt: BufferOption) -> io::Result<u64> {
        self.core.listener_buffer(self.id).map(|b| b.get(opt))
    }

    pub(crate) fn buffer_set(&self, opt: BufferOption, val: u64) -> io::Result<()> {
        self.core.set_listener_buffer(self.id, opt, val).map(drop)
    }
}

/// For the tokio API.
#[cfg(feature = "tokio")]
impl VsockListener {
    /// The edge notifier the tokio API registers.
    pub(crate) fn edge_notifier(&self) -> io::Result<UserFd> {
        self.core.listener_notifier(self.id)
    }
}

impl AsFd for VsockListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd
            .get_or_init(|| self.core.listener_fd(self.id))
            .as_fd()
    }
}

impl AsRawFd for VsockListener {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// A connection request to some port, taken by a listener on every port and not answered
/// yet: the peer waits in its `connect` until [`VsockRequest::accept`] or
/// [`VsockRequest::refuse`]. Dropping it refuses it.
#[derive(Debug)]
pub struct VsockRequest {
    stream: VsockStream,
}

impl VsockRequest {
    /// The port the peer asked for.
    pub fn local_port(&self) -> io::Result<u32> {
        self.stream.local_addr().map(|a| a.port)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<VsockAddr> {
        self.stream.peer_addr()
    }

    /// Answer `RESPONSE`: the connection is established.
    pub fn accept(self) -> io::Result<VsockStream> {
        self.stream.core.answer(self.stream.conn.id, true)?;
        Ok(self.stream)
    }

    /// Answer `RST`: the peer's connect is refused, as if nothing listened on the port.
    pub fn refuse(self) {
        let _ = self.stream.core.answer(self.stream.conn.id, false);
    }
}

impl Drop for VsockListener {
    fn drop(&mut self) {
        self.core.unlisten(self.id);
    }
}

/// A SEQPACKET connection: message boundaries are preserved.
///
/// Non-blocking mode and the readiness descriptor work as for [`VsockStream`]; `POLLIN` means
/// a whole message waits.
#[derive(Debug)]
pub struct VsockSeqPacket {
    inner: VsockStream,
}

impl VsockSeqPacket {
    pub(crate) fn connect_on(
        core: &Arc<Core>,
        addr: VsockAddr,
        opts: ConnectOpts,
    ) -> io::Result<Self> {
        let id = core.connect(
            (addr.cid, addr.port),
            opts.local_port,
            SocketType::SeqPacket,
            opts.timeout,
            opts.nonblocking,
        )?;
        Ok(VsockSeqPacket {
            inner: VsockStream::from_handle(Arc::new(ConnHandle::new(core, id, opts.nonblocking))),
        })
    }

    /// Send one message (blocks until there is room for all of it; `WouldBlock` in
    /// non-blocking mode).
    pub fn send(&self, msg: &[u8]) -> io::Result<usize> {
        self.send_eor(msg, false)
    }

    /// Send one message, marking the end of a record (`MSG_EOR`) when `eor`.
    pub fn send_eor(&self, msg: &[u8], eor: bool) -> io::Result<usize> {
        self.inner
            .core
            .send_msg(self.inner.conn.id, msg, eor, self.inner.write_wait())
    }

    /// Receive one message into `buf`: returns the bytes copied; a longer message is truncated
    /// (the rest is dropped, like `MSG_TRUNC`). Ok(0) for an empty message or EOF.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv_full(buf).map(|(n, _, _)| n)
    }

    /// Receive one message: (bytes copied, the message's full length, EOR flag).
    pub fn recv_full(&self, buf: &mut [u8]) -> io::Result<(usize, usize, bool)> {
        self.inner
            .core
            .recv_msg(self.inner.conn.id, buf, self.inner.read_wait())
    }

    /// Shut down halves of the connection.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.shutdown(how)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<VsockAddr> {
        self.inner.peer_addr()
    }

    /// Our address.
    pub fn local_addr(&self) -> io::Result<VsockAddr> {
        self.inner.local_addr()
    }

    /// Timeout for blocking receives.
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(t)
    }

    /// Timeout for blocking sends.
    pub fn set_write_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_write_timeout(t)
    }

    /// Non-blocking mode on or off (see [`VsockStream::set_nonblocking`]).
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.inner.set_nonblocking(nonblocking)
    }

    /// The pending error, taken (see [`VsockStream::take_error`]).
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        self.inner.take_error()
    }

    buffer_size_methods!();

    pub(crate) fn buffer_get(&self, opt: BufferOption) -> io::Result<u64> {
        self.inner.buffer_get(opt)
    }

    pub(crate) fn buffer_set(&self, opt: BufferOption, val: u64) -> io::Result<()> {
        self.inner.buffer_set(opt, val)
    }
}

/// For the tokio API.
#[cfg(feature = "tokio")]
impl VsockSeqPacket {
    /// The edge notifier the tokio API registers.
    pub(crate) fn edge_notifier(&self) -> io::Result<UserFd> {
        self.inner.edge_notifier()
    }

    /// How a non-blocking connect ended: `None` while the handshake is in progress.
    pub(crate) fn connect_status(&self) -> Option<io::Result<()>> {
        self.inner.connect_status()
    }
}

impl AsFd for VsockSeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl AsRawFd for VsockSeqPacket {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

impl private_impl::Sealed for VsockStream {
    fn poll_source(&self) -> PollSource<'_> {
        PollSource::new(&self.core, Target::Conn(self.conn.id))
    }
}

impl private_impl::Sealed for VsockSeqPacket {
    fn poll_source(&self) -> PollSource<'_> {
        self.inner.poll_source()
    }
}

impl private_impl::Sealed for VsockListener {
    fn poll_source(&self) -> PollSource<'_> {
        PollSource::new(&self.core, Target::Listener(self.id))
    }
}
