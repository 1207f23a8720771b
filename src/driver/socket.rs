// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The socket API: `VsockStream`, `VsockListener`, `VsockSeqPacket` and `VsockAddr`.
//!
//! Each socket is a thin handle on a runtime [`Core`] (one protocol endpoint and its waiters,
//! see [`crate::runtime`]) plus the connection or listener id it names; blocking, timeouts and
//! the mapping of protocol errors to `std::io` live in the core.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::packet::{SocketType, VMADDR_PORT_ANY};
use crate::proto::{ConnId, ListenerId, ProtoError};
use crate::runtime::{to_io, Core};
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

/// A connected vsock stream, like `std::os::unix::net::UnixStream`.
///
/// Dropping the last handle (see [`VsockStream::try_clone`]) closes the connection gracefully
/// (SHUTDOWN, then RST after the linger timeout).
#[derive(Debug)]
pub struct VsockStream {
    core: Arc<Core>,
    conn: Arc<ConnHandle>,
    timeouts: Timeouts,
}

/// Closes the connection when the last clone goes.
#[derive(Debug)]
struct ConnHandle {
    core: Arc<Core>,
    id: ConnId,
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.core.close(self.id);
    }
}

impl VsockStream {
    pub(crate) fn from_conn(core: Arc<Core>, id: ConnId) -> Self {
        VsockStream {
            conn: Arc::new(ConnHandle {
                core: core.clone(),
                id,
            }),
            core,
            timeouts: Timeouts::default(),
        }
    }

    pub(crate) fn connect_on(
        core: &Arc<Core>,
        addr: VsockAddr,
        timeout: Option<Duration>,
    ) -> io::Result<Self> {
        let id = core.connect(addr.cid, addr.port, SocketType::Stream, timeout)?;
        Ok(VsockStream::from_conn(core.clone(), id))
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

    /// Another handle to the same connection (for a reader and a writer thread).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(VsockStream {
            core: self.core.clone(),
            conn: self.conn.clone(),
            timeouts: self.timeouts,
        })
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
        let deadline = self.timeouts.write.map(|t| Instant::now() + t);
        self.core.send_with(self.conn.id, max_len, deadline, fill)
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
        let deadline = self.timeouts.read.map(|t| Instant::now() + t);
        self.core.recv_with(self.conn.id, deadline, take)
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let deadline = self.timeouts.read.map(|t| Instant::now() + t);
        self.core.read(self.conn.id, buf, deadline)
    }

    /// Fills the buffers in order from what has arrived, under one hold of the driver's lock.
    fn read_vectored(&mut self, bufs: &mut [io::IoSliceMut<'_>]) -> io::Result<usize> {
        let deadline = self.timeouts.read.map(|t| Instant::now() + t);
        self.core.read_vectored(self.conn.id, bufs, deadline)
    }
}

impl Write for VsockStream {
    /// Queues the whole buffer (blocking for room, up to the write timeout) and returns its
    /// length.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let deadline = self.timeouts.write.map(|t| Instant::now() + t);
        self.core.write(self.conn.id, buf, deadline)
    }

    /// Queues every buffer in order (blocking for room, up to the write timeout), with one
    /// transport round per wait rather than one per buffer; returns the total length.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let deadline = self.timeouts.write.map(|t| Instant::now() + t);
        self.core.write_vectored(self.conn.id, bufs, deadline)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening port, like `std::os::unix::net::UnixListener`.
#[derive(Debug)]
pub struct VsockListener {
    core: Arc<Core>,
    id: ListenerId,
    port: u32,
    ty: SocketType,
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
        })
    }

    pub(crate) fn bind_on(core: &Arc<Core>, port: u32, ty: SocketType) -> io::Result<Self> {
        let (id, port) = core.listen(port, DEFAULT_BACKLOG, ty)?;
        Ok(VsockListener {
            core: core.clone(),
            id,
            port,
            ty,
        })
    }

    /// The port listened on: the one picked when listening on
    /// [`VMADDR_PORT_ANY`](crate::packet::VMADDR_PORT_ANY).
    pub fn port(&self) -> u32 {
        self.port
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
        if self.ty != SocketType::Stream {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "listener is SEQPACKET: use accept_seqpacket",
            ));
        }
        let c = self
            .core
            .accept(self.id, timeout.map(|t| Instant::now() + t))?;
        let s = VsockStream::from_conn(self.core.clone(), c);
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
        let c = self
            .core
            .accept(self.id, timeout.map(|t| Instant::now() + t))?;
        let stream = VsockStream::from_conn(self.core.clone(), c);
        let peer = stream.peer_addr()?;
        Ok((VsockRequest { stream }, peer))
    }

    /// Wait for the next SEQPACKET connection (for a listener made with `listen_seqpacket`).
    pub fn accept_seqpacket(&self) -> io::Result<(VsockSeqPacket, VsockAddr)> {
        let c = self.core.accept(self.id, None)?;
        let s = VsockSeqPacket {
            inner: VsockStream::from_conn(self.core.clone(), c),
        };
        let peer = s.inner.peer_addr()?;
        Ok((s, peer))
    }

    /// An endless iterator of accepted streams.
    pub fn incoming(&self) -> impl Iterator<Item = io::Result<VsockStream>> + '_ {
        std::iter::repeat_with(move || self.accept().map(|(s, _)| s))
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
#[derive(Debug)]
pub struct VsockSeqPacket {
    inner: VsockStream,
}

impl VsockSeqPacket {
    pub(crate) fn connect_on(
        core: &Arc<Core>,
        addr: VsockAddr,
        timeout: Option<Duration>,
    ) -> io::Result<Self> {
        let id = core.connect(addr.cid, addr.port, SocketType::SeqPacket, timeout)?;
        Ok(VsockSeqPacket {
            inner: VsockStream::from_conn(core.clone(), id),
        })
    }

    /// Send one message (blocks until there is room for all of it).
    pub fn send(&self, msg: &[u8]) -> io::Result<usize> {
        self.send_eor(msg, false)
    }

    /// Send one message, marking the end of a record (`MSG_EOR`) when `eor`.
    pub fn send_eor(&self, msg: &[u8], eor: bool) -> io::Result<usize> {
        let deadline = self.inner.timeouts.write.map(|t| Instant::now() + t);
        self.inner
            .core
            .send_msg(self.inner.conn.id, msg, eor, deadline)
    }

    /// Receive one message into `buf`: returns the bytes copied; a longer message is truncated
    /// (the rest is dropped, like `MSG_TRUNC`). Ok(0) for an empty message or EOF.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv_full(buf).map(|(n, _, _)| n)
    }

    /// Receive one message: (bytes copied, the message's full length, EOR flag).
    pub fn recv_full(&self, buf: &mut [u8]) -> io::Result<(usize, usize, bool)> {
        let deadline = self.inner.timeouts.read.map(|t| Instant::now() + t);
        self.inner.core.recv_msg(self.inner.conn.id, buf, deadline)
    }

    /// Shut down halves of the connection.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.shutdown(how)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<VsockAddr> {
        self.inner.peer_addr()
    }

    /// Timeout for blocking receives.
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.inner.set_read_timeout(t)
    }
}
