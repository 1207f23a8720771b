// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! VM tests of the vhost-vsock backend: our driver is a vsock guest with CID [`OUR_CID`] on the
//! guest kernel's `/dev/vhost-vsock`, and the guest kernel's own AF_VSOCK sockets are the host
//! (CID 2). (The guest kernel is itself CID 3 through the virtio-vsock PCI function, so 3 is
//! taken: vhost-vsock refuses a CID that is a local one.)
//!
//! Included from `vmtest.rs`; the rows are in its `TESTS` table.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vdpa_vsock::device::{DeviceSpec, VHOST_VSOCK_PATH};
use vdpa_vsock::driver::{VsockAddr, VsockDriver, VsockStream};

use super::{fail, skip, TestResult, SOCKADDR_VM_LEN, VSOCK_FAMILY};

/// Our driver's CID.
const OUR_CID: u64 = 4;
/// The kernel side's CID as our driver sees it.
const HOST_CID: u64 = 2;
/// Bytes each way in the bulk test.
const BULK_BYTES: usize = 64 << 20;
/// Connections in the concurrency test, and bytes each echoes.
const CONNS: usize = 100;
const CONN_BYTES: usize = 64 << 10;
/// No single step of a test waits longer than this.
const TIMEOUT: Duration = Duration::from_secs(60);

fn open_driver() -> Result<VsockDriver, super::NotPassed> {
    if !std::path::Path::new(VHOST_VSOCK_PATH).exists() {
        return Err(skip(format!("{VHOST_VSOCK_PATH} is absent")));
    }
    let spec = DeviceSpec::VhostVsock {
        path: VHOST_VSOCK_PATH.into(),
        cid: OUR_CID,
    };
    VsockDriver::open(&spec).map_err(|e| fail(format!("open {spec}: {}", chain(&e))))
}

/// An error and all its causes, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

/// FNV-1a, 64-bit: the checksum both ends compute.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Deterministic test data: block `k` of 64 KiB, different for every `k` and `seed`.
fn block(seed: u64, k: usize, out: &mut [u8]) {
    let mut x = seed ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in out.chunks_mut(8) {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// Writes `len` bytes of `block(seed, ..)` data; returns their checksum.
pub(crate) fn send_pattern(w: &mut impl Write, seed: u64, len: usize) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let mut sum = Fnv::new();
    let mut sent = 0;
    let mut k = 0;
    while sent < len {
        let n = buf.len().min(len - sent);
        block(seed, k, &mut buf[..n]);
        sum.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        sent += n;
        k += 1;
    }
    Ok(sum.0)
}

/// Reads exactly `len` bytes; returns their checksum.
pub(crate) fn recv_checksum(r: &mut impl Read, len: usize) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let mut sum = Fnv::new();
    let mut got = 0;
    while got < len {
        let want = buf.len().min(len - got);
        match r.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {got} of {len} bytes"),
                ))
            }
            Ok(n) => {
                sum.update(&buf[..n]);
                got += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("after {got} bytes: {e}"))),
        }
    }
    Ok(sum.0)
}

/// A kernel AF_VSOCK stream listener on VMADDR_CID_ANY:`port`.
pub(crate) fn kernel_listen(port: u32) -> io::Result<OwnedFd> {
    kernel_listen_ty(port, libc::SOCK_STREAM)
}

/// Accepts one connection within `TIMEOUT`; returns it and the peer's CID.
pub(crate) fn kernel_accept(listener: &OwnedFd) -> io::Result<(UnixStream, u32)> {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(TIMEOUT.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r == 0 {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "accept timed out"));
    }
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    let mut len = SOCKADDR_VM_LEN;
    // SAFETY: `addr`/`len` are valid for writes of a sockaddr_vm for the duration of the call.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            (&raw mut addr).cast(),
            &mut len,
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let s = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    Ok((s, addr.svm_cid))
}

fn timed(stream: &mut VsockStream) -> io::Result<()> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))
}

fn join<T>(h: thread::JoinHandle<io::Result<T>>, what: &str) -> Result<T, super::NotPassed> {
    h.join()
        .map_err(|_| fail(format!("{what}: thread panicked")))?
        .map_err(|e| fail(format!("{what}: {e}")))
}

/// Bulk both ways: `len` bytes each way, checksums compared; `wrong` corrupts the expectation.
fn bulk(port: u32, len: usize, wrong: bool) -> TestResult {
    let drv = open_driver()?;
    let listener = kernel_listen(port)?;
    let kernel = thread::spawn(move || -> io::Result<(u64, u64, u32)> {
        let (mut s, peer) = kernel_accept(&listener)?;
        let mut w = s.try_clone()?;
        let tx = thread::spawn(move || send_pattern(&mut w, 2, len));
        let rx = recv_checksum(&mut s, len)?;
        let tx = tx
            .join()
            .map_err(|_| io::Error::other("writer panicked"))??;
        Ok((rx, tx, peer))
    });
    let start = Instant::now();
    let mut ours = drv
        .connect_timeout(VsockAddr::new(HOST_CID, port), TIMEOUT)
        .map_err(|e| fail(format!("connect to {HOST_CID}:{port}: {e}")))?;
    timed(&mut ours)?;
    let mut w = ours.try_clone()?;
    let tx = thread::spawn(move || send_pattern(&mut w, 1, len));
    let our_rx = recv_checksum(&mut ours, len).map_err(|e| fail(format!("our read: {e}")))?;
    let our_tx = join(tx, "our writer")?;
    let (kernel_rx, kernel_tx, peer) = join(kernel, "kernel side")?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "# {} MiB each way in {secs:.2} s ({:.1} MiB/s each way); kernel saw peer CID {peer}",
        len >> 20,
        len as f64 / (1 << 20) as f64 / secs
    );
    if u64::from(peer) != OUR_CID {
        return Err(fail(format!(
            "kernel saw peer CID {peer}, expected {OUR_CID}"
        )));
    }
    let expect_kernel_rx = if wrong { our_tx ^ 1 } else { our_tx };
    if kernel_rx != expect_kernel_rx {
        return Err(fail(format!(
            "us -> kernel: checksum {kernel_rx:#018x} received, {expect_kernel_rx:#018x} expected"
        )));
    }
    if our_rx != kernel_tx {
        return Err(fail(format!(
            "kernel -> us: checksum {our_rx:#018x} received, {kernel_tx:#018x} sent"
        )));
    }
    Ok(())
}

/// (a) Our connect to a kernel AF_VSOCK listener; 64 MiB each way with FNV-1a checksums.
pub(super) fn vhost_vsock_bulk_to_kernel() -> TestResult {
    bulk(5000, BULK_BYTES, false)
}

/// (g) Like (a), small, against a deliberately wrong checksum: must FAIL (run it by name).
pub(super) fn vhost_vsock_wrong_checksum_must_fail() -> TestResult {
    bulk(5001, 1 << 20, true)
}

/// (b) A kernel AF_VSOCK client connects to our listener on CID 4; 1 MiB echoed.
pub(super) fn vhost_vsock_kernel_connects_to_us() -> TestResult {
    const PORT: u32 = 6000;
    const LEN: usize = 1 << 20;
    let drv = open_driver()?;
    let listener = drv.listen(PORT)?;
    let client = thread::spawn(move || -> io::Result<(u64, u64)> {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "CIDs are 32-bit in AF_VSOCK"
        )]
        let mut s = super::vsock_connect(OUR_CID as u32, PORT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        let mut w = s.try_clone()?;
        let tx = thread::spawn(move || send_pattern(&mut w, 3, LEN));
        let rx = recv_checksum(&mut s, LEN)?;
        let tx = tx
            .join()
            .map_err(|_| io::Error::other("writer panicked"))??;
        Ok((tx, rx))
    });
    let (mut conn, peer) = listener
        .accept_timeout(Some(TIMEOUT))
        .map_err(|e| fail(format!("accept: {e}")))?;
    timed(&mut conn)?;
    if peer.cid != HOST_CID {
        return Err(fail(format!("peer {peer}: expected CID {HOST_CID}")));
    }
    // Echo.
    let mut buf = vec![0u8; 64 << 10];
    let mut done = 0;
    while done < LEN {
        let n = conn
            .read(&mut buf)
            .map_err(|e| fail(format!("echo read after {done}: {e}")))?;
        if n == 0 {
            return Err(fail(format!("EOF after {done} of {LEN} bytes")));
        }
        conn.write_all(&buf[..n])?;
        done += n;
    }
    let (tx, rx) = join(client, "kernel client")?;
    if tx != rx {
        return Err(fail(format!("echo checksum {rx:#018x}, sent {tx:#018x}")));
    }
    println!("# kernel client -> {OUR_CID}:{PORT}, {LEN} bytes echoed, peer {peer}");
    Ok(())
}

/// (c) No listener on the kernel side: connect fails with ConnectionRefused.
pub(super) fn vhost_vsock_connect_refused() -> TestResult {
    let drv = open_driver()?;
    match drv.connect_timeout(VsockAddr::new(HOST_CID, 6999), TIMEOUT) {
        Ok(_) => Err(fail("connect to 2:6999 (nobody listening) succeeded")),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            println!("# connect to 2:6999: {e}");
            Ok(())
        }
        Err(e) => Err(fail(format!(
            "connect to 2:6999: expected ConnectionRefused, got {:?}: {e}",
            e.kind()
        ))),
    }
}

/// (d) 100 concurrent connections, each echoing 64 KiB through a kernel echo server.
pub(super) fn vhost_vsock_concurrent_echo() -> TestResult {
    const PORT: u32 = 5002;
    let drv = open_driver()?;
    let listener = kernel_listen(PORT)?;
    let server = thread::spawn(move || -> io::Result<()> {
        let mut workers = Vec::new();
        for _ in 0..CONNS {
            let (mut s, _) = kernel_accept(&listener)?;
            workers.push(thread::spawn(move || -> io::Result<()> {
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    let n = s.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    s.write_all(&buf[..n])?;
                }
            }));
        }
        for w in workers {
            w.join()
                .map_err(|_| io::Error::other("echo worker panicked"))??;
        }
        Ok(())
    });
    let start = Instant::now();
    let drv = &drv;
    let results: Vec<Result<(), String>> = thread::scope(|scope| {
        let hs: Vec<_> = (0..CONNS)
            .map(|i| {
                scope.spawn(move || -> Result<(), String> {
                    let mut s = drv
                        .connect_timeout(VsockAddr::new(HOST_CID, PORT), TIMEOUT)
                        .map_err(|e| format!("conn {i}: connect: {e}"))?;
                    timed(&mut s).map_err(|e| e.to_string())?;
                    let mut w = s.try_clone().map_err(|e| e.to_string())?;
                    let tx =
                        thread::spawn(move || send_pattern(&mut w, 100 + i as u64, CONN_BYTES));
                    let rx = recv_checksum(&mut s, CONN_BYTES)
                        .map_err(|e| format!("conn {i}: read: {e}"))?;
                    let tx = tx
                        .join()
                        .map_err(|_| format!("conn {i}: writer panicked"))?
                        .map_err(|e| format!("conn {i}: write: {e}"))?;
                    if tx != rx {
                        return Err(format!("conn {i}: echo checksum differs"));
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect()
    });
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if !errors.is_empty() {
        return Err(fail(format!(
            "{} of {CONNS} connections failed; first: {}",
            errors.len(),
            errors[0]
        )));
    }
    join(server, "kernel echo server")?;
    println!(
        "# {CONNS} connections x {} KiB echoed in {:.2} s",
        CONN_BYTES >> 10,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// (e) The kernel side closes mid-stream: it reads 100 bytes of the many we are still writing,
/// sends 10 000 bytes and closes. Our reads see those bytes, then EOF (or a reset), and our writer
/// fails instead of hanging.
pub(super) fn vhost_vsock_kernel_closes_mid_stream() -> TestResult {
    const PORT: u32 = 5003;
    const SENT: usize = 10_000;
    /// Far more than the kernel's receive buffer (256 KiB): the writer is mid-stream at the close.
    const OFFERED: usize = 16 << 20;
    let drv = open_driver()?;
    let listener = kernel_listen(PORT)?;
    let kernel = thread::spawn(move || -> io::Result<()> {
        let (mut s, _) = kernel_accept(&listener)?;
        let mut buf = [0u8; 100];
        s.read_exact(&mut buf)?;
        s.write_all(&[7u8; SENT])?;
        Ok(()) // dropped: closed with our unread bytes still queued
    });
    let mut ours = drv
        .connect_timeout(VsockAddr::new(HOST_CID, PORT), TIMEOUT)
        .map_err(|e| fail(format!("connect: {e}")))?;
    timed(&mut ours)?;
    let mut w = ours.try_clone()?;
    let writer = thread::spawn(move || send_pattern(&mut w, 5, OFFERED));
    join(kernel, "kernel side")?;
    let mut got = 0;
    let mut buf = [0u8; 4096];
    let end = loop {
        match ours.read(&mut buf) {
            Ok(0) => break "EOF".to_string(),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break format!("reset ({e})"),
            Err(e) => return Err(fail(format!("read after {got} bytes: {e:?}"))),
        }
    };
    if got != SENT {
        return Err(fail(format!(
            "read {got} bytes before {end}, the kernel sent {SENT}"
        )));
    }
    let written = writer.join().map_err(|_| fail("writer thread panicked"))?;
    let write_end = match written {
        Ok(_) => {
            return Err(fail(format!(
                "all {OFFERED} bytes written to a closed peer"
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => {
            return Err(fail(format!("writer hung until its timeout: {e}")))
        }
        Err(e) => e,
    };
    println!("# read {got} of {SENT} bytes, then {end}; the writer stopped with: {write_end}");
    Ok(())
}

/// (f) A second driver with the same CID is refused with EADDRINUSE and the hint; so is CID 3,
/// this guest's own CID.
pub(super) fn vhost_vsock_cid_in_use() -> TestResult {
    let first = open_driver()?;
    for (cid, what) in [(OUR_CID, "a second driver"), (3, "the guest's own CID")] {
        let spec = DeviceSpec::VhostVsock {
            path: VHOST_VSOCK_PATH.into(),
            cid,
        };
        let e = match VsockDriver::open(&spec) {
            Ok(_) => return Err(fail(format!("{what}: open with CID {cid} succeeded"))),
            Err(e) => e,
        };
        let msg = chain(&e);
        let mut errno = None;
        let mut src: Option<&dyn std::error::Error> = Some(&e);
        while let Some(c) = src {
            if let Some(io) = c.downcast_ref::<io::Error>() {
                errno = errno.or(io.raw_os_error());
            }
            src = c.source();
        }
        if errno != Some(libc::EADDRINUSE) {
            return Err(fail(format!(
                "{what}: expected EADDRINUSE, got {errno:?}: {msg}"
            )));
        }
        let hint = format!("CID {cid} is already in use on this host");
        if !msg.contains(&hint) {
            return Err(fail(format!("{what}: message lacks {hint:?}: {msg}")));
        }
        println!("# {what}: {msg}");
    }
    drop(first);
    // The CID is free again once the first driver is gone.
    drop(open_driver()?);
    Ok(())
}

/// A kernel AF_VSOCK listener of socket type `ty` (SOCK_STREAM or SOCK_SEQPACKET).
fn kernel_listen_ty(port: u32, ty: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = VSOCK_FAMILY;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    // SAFETY: `addr` is a valid sockaddr_vm of SOCKADDR_VM_LEN bytes for the call.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), SOCKADDR_VM_LEN) } < 0 {
        return Err(io::Error::other(format!(
            "bind vsock port {port}: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Half-close both ways: (1) we shut down our write half, the kernel reads to EOF and answers;
/// (2) the kernel shuts down its write half, we read to EOF and answer.
pub(super) fn vhost_vsock_half_close() -> TestResult {
    const PORT: u32 = 5004;
    let drv = open_driver()?;
    let listener = kernel_listen(PORT)?;
    let kernel = thread::spawn(move || -> io::Result<Vec<u8>> {
        let (mut s, _) = kernel_accept(&listener)?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        s.write_all(b"answer after your EOF")?;
        s.shutdown(std::net::Shutdown::Write)?;
        let (mut s2, _) = kernel_accept(&listener)?;
        s2.write_all(b"kernel speaks first")?;
        s2.shutdown(std::net::Shutdown::Write)?;
        let mut reply = Vec::new();
        s2.read_to_end(&mut reply)?;
        got.push(b'|');
        got.extend(reply);
        Ok(got)
    });
    let connect = || {
        let mut s = drv
            .connect_timeout(VsockAddr::new(HOST_CID, PORT), TIMEOUT)
            .map_err(|e| fail(format!("connect: {e}")))?;
        timed(&mut s)?;
        Ok::<_, super::NotPassed>(s)
    };
    // (1) Our write half first.
    let mut a = connect()?;
    a.write_all(b"we speak first")?;
    a.shutdown(std::net::Shutdown::Write)?;
    let mut back = Vec::new();
    a.read_to_end(&mut back)
        .map_err(|e| fail(format!("read after our shutdown: {e}")))?;
    if back != b"answer after your EOF" {
        return Err(fail(format!(
            "got {:?} after our shutdown",
            String::from_utf8_lossy(&back)
        )));
    }
    match a.write(b"x") {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        other => {
            return Err(fail(format!(
                "write after shutdown(Write): expected BrokenPipe, got {other:?}"
            )))
        }
    }
    // (2) The kernel's write half first.
    let mut b = connect()?;
    let mut first = Vec::new();
    b.read_to_end(&mut first)
        .map_err(|e| fail(format!("read to the kernel's EOF: {e}")))?;
    if first != b"kernel speaks first" {
        return Err(fail(format!(
            "got {:?} before EOF",
            String::from_utf8_lossy(&first)
        )));
    }
    b.write_all(b"we answer after your EOF")
        .map_err(|e| fail(format!("write after the kernel's shutdown(SHUT_WR): {e}")))?;
    b.shutdown(std::net::Shutdown::Write)?;
    let got = join(kernel, "kernel side")?;
    if got != b"we speak first|we answer after your EOF" {
        return Err(fail(format!(
            "kernel got {:?}",
            String::from_utf8_lossy(&got)
        )));
    }
    Ok(())
}

/// SEQPACKET against the kernel's SOCK_SEQPACKET: every message comes back whole, one per recv.
pub(super) fn vhost_vsock_seqpacket_boundaries() -> TestResult {
    const PORT: u32 = 5005;
    const SIZES: [usize; 8] = [1, 2, 44, 4096, 65_536, 65_537, 100_000, 200_000];
    let drv = open_driver()?;
    let listener = kernel_listen_ty(PORT, libc::SOCK_SEQPACKET)?;
    let kernel = thread::spawn(move || -> io::Result<Vec<usize>> {
        let (mut s, _) = kernel_accept(&listener)?;
        let mut buf = vec![0u8; 256 << 10];
        let mut seen = Vec::new();
        for _ in 0..SIZES.len() {
            // One read(2) on a SOCK_SEQPACKET socket returns exactly one message.
            let n = s.read(&mut buf)?;
            seen.push(n);
            s.write_all(&buf[..n])?;
        }
        Ok(seen)
    });
    let s = drv
        .connect_seqpacket(VsockAddr::new(HOST_CID, PORT))
        .map_err(|e| fail(format!("seqpacket connect: {e}")))?;
    let mut back = vec![0u8; 256 << 10];
    for (i, &size) in SIZES.iter().enumerate() {
        let mut msg = vec![0u8; size];
        block(50 + i as u64, 0, &mut msg);
        s.send(&msg)
            .map_err(|e| fail(format!("send {size} B: {e}")))?;
        let (n, full, _) = s
            .recv_full(&mut back)
            .map_err(|e| fail(format!("recv after {size} B: {e}")))?;
        if (n, full) != (size, size) || back[..n] != msg[..] {
            return Err(fail(format!(
                "message {i}: sent {size} B, got {n} of {full} B{}",
                if n == size {
                    " with different bytes"
                } else {
                    ""
                }
            )));
        }
    }
    let seen = join(kernel, "kernel side")?;
    if seen != SIZES {
        return Err(fail(format!(
            "kernel saw message sizes {seen:?}, sent {SIZES:?}"
        )));
    }
    println!(
        "# {} SEQPACKET messages of 1 B..200 KB kept their boundaries both ways",
        SIZES.len()
    );
    Ok(())
}

/// Discards `len` bytes from a kernel socket; returns when all arrived.
fn kernel_sink(mut s: UnixStream, len: usize) -> io::Result<()> {
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0;
    while got < len {
        match s.read(&mut buf)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {got} of {len} bytes"),
                ))
            }
            n => got += n,
        }
    }
    Ok(())
}

/// Throughput of 64 KiB writes in the same boot: our driver over vhost-vsock into a kernel
/// socket, and the kernel's own AF_VSOCK over vsock_loopback. Emulated numbers; the ratio counts.
pub(super) fn vhost_vsock_throughput_vs_loopback() -> TestResult {
    const LEN: usize = 32 << 20;
    let chunk = vec![0x5au8; 64 << 10];
    let drv = open_driver()?;

    let listener = kernel_listen(5006)?;
    let sink = thread::spawn(move || kernel_sink(kernel_accept(&listener)?.0, LEN));
    let mut ours = drv
        .connect_timeout(VsockAddr::new(HOST_CID, 5006), TIMEOUT)
        .map_err(|e| fail(format!("connect: {e}")))?;
    timed(&mut ours)?;
    let t0 = Instant::now();
    for _ in 0..LEN / chunk.len() {
        ours.write_all(&chunk)?;
    }
    join(sink, "kernel sink (ours)")?;
    let ours_mibs = (LEN >> 20) as f64 / t0.elapsed().as_secs_f64();

    let listener = kernel_listen(5007)?;
    let sink = thread::spawn(move || kernel_sink(kernel_accept(&listener)?.0, LEN));
    let mut lo = super::vsock_connect(libc::VMADDR_CID_LOCAL, 5007)
        .map_err(|e| fail(format!("vsock_loopback connect: {e}")))?;
    lo.set_write_timeout(Some(TIMEOUT))?;
    let t0 = Instant::now();
    for _ in 0..LEN / chunk.len() {
        lo.write_all(&chunk)?;
    }
    join(sink, "kernel sink (loopback)")?;
    let lo_mibs = (LEN >> 20) as f64 / t0.elapsed().as_secs_f64();
    println!(
        "# throughput, 64 KiB writes, {} MiB: vdpa-vsock over vhost-vsock {ours_mibs:.1} MiB/s, \
         kernel AF_VSOCK over vsock_loopback {lo_mibs:.1} MiB/s, ratio {:.2}",
        LEN >> 20,
        ours_mibs / lo_mibs
    );
    Ok(())
}

/// `auto` falls back to vhost-vsock (no vsock vDPA device, no vfio-bound function here) and
/// skips the CIDs in use: 3 is the guest kernel's own, so it must land on another one.
pub(super) fn vhost_vsock_auto() -> TestResult {
    if !std::path::Path::new(VHOST_VSOCK_PATH).exists() {
        return Err(skip(format!("{VHOST_VSOCK_PATH} is absent")));
    }
    let drv =
        VsockDriver::open(&DeviceSpec::Auto).map_err(|e| fail(format!("auto: {}", chain(&e))))?;
    println!(
        "# auto chose {} with CID {}",
        drv.device_name(),
        drv.local_cid()
    );
    if drv.local_cid() == 3 {
        return Err(fail("auto took CID 3, the guest kernel's own"));
    }
    let listener = kernel_listen(5008)?;
    let kernel = thread::spawn(move || -> io::Result<Vec<u8>> {
        let (mut s, _) = kernel_accept(&listener)?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        Ok(got)
    });
    let mut s = drv
        .connect_timeout(VsockAddr::new(HOST_CID, 5008), TIMEOUT)
        .map_err(|e| fail(format!("connect over auto: {e}")))?;
    s.write_all(b"auto works")?;
    s.shutdown(std::net::Shutdown::Write)?;
    let got = join(kernel, "kernel side")?;
    if got != b"auto works" {
        return Err(fail(format!(
            "kernel got {:?}",
            String::from_utf8_lossy(&got)
        )));
    }
    Ok(())
}

/// A kernel AF_VSOCK service on `port` until `stop`: every accepted connection gets its own
/// thread running `handle`. Woken for the stop by a connection of our own over vsock_loopback.
fn kernel_service(
    port: u32,
    stop: Arc<AtomicBool>,
    handle: fn(UnixStream) -> io::Result<()>,
) -> io::Result<thread::JoinHandle<()>> {
    let listener = kernel_listen(port)?;
    Ok(thread::spawn(move || loop {
        match kernel_accept(&listener) {
            Ok(_) if stop.load(Ordering::Acquire) => break,
            Ok((s, _)) => {
                // Idle streams of the scale rows stay quiet for as long as the run takes.
                let _ = s.set_read_timeout(None);
                thread::spawn(move || handle(s));
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut && !stop.load(Ordering::Acquire) => {}
            Err(e) => {
                if !stop.load(Ordering::Acquire) {
                    println!("# kernel service on port {port}: {e}");
                }
                break;
            }
        }
    }))
}

/// The sink `bench --peer` expects: read and discard to EOF, then close.
fn kernel_discard(mut s: UnixStream) -> io::Result<()> {
    io::copy(&mut s, &mut io::sink())?;
    Ok(())
}

/// The echo `bench --peer` expects: every byte back, until EOF.
fn kernel_echo(s: UnixStream) -> io::Result<()> {
    let mut w = s.try_clone()?;
    let mut r = s;
    io::copy(&mut r, &mut w)?;
    Ok(())
}

/// The value of the row `workload`, `transport` in `bench`'s table.
fn bench_value(table: &str, workload: &str, transport: &str) -> Option<f64> {
    table.lines().find_map(|l| {
        let rest = l.strip_prefix(workload)?.trim_start();
        let rest = rest.strip_prefix(transport)?;
        if !rest.starts_with(' ') {
            return None;
        }
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// `vdpa-vsock bench --device vhost-vsock,cid=4 --peer 2:5010,5011`, the CLI as a user runs it,
/// against a kernel AF_VSOCK sink and echo in this guest (the host end of vhost-vsock): exit 0,
/// and every vdpa-vsock row (one-way, 16 connections, ping-pong both modes, scale) positive.
pub(super) fn vhost_vsock_bench_cli() -> TestResult {
    const SINK_PORT: u32 = 5010;
    const ECHO_PORT: u32 = 5011;
    const CLI: &str = "/bin/vdpa-vsock";
    const RUN_TIMEOUT: Duration = Duration::from_secs(240);
    if !std::path::Path::new(VHOST_VSOCK_PATH).exists() {
        return Err(skip(format!("{VHOST_VSOCK_PATH} is absent")));
    }
    if !std::path::Path::new(CLI).exists() {
        return Err(skip(format!("{CLI} is absent")));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let services = [
        (
            SINK_PORT,
            kernel_service(SINK_PORT, stop.clone(), kernel_discard)?,
        ),
        (
            ECHO_PORT,
            kernel_service(ECHO_PORT, stop.clone(), kernel_echo)?,
        ),
    ];
    let peer = format!("{HOST_CID}:{SINK_PORT},{ECHO_PORT}");
    let child = std::process::Command::new(CLI)
        .args(["bench", "--device", &format!("vhost-vsock,cid={OUR_CID}")])
        .args([
            "--peer",
            &peer,
            "--bytes",
            "8388608",
            "--round-trips",
            "200",
        ])
        .args(["--scale", "10,50", "--scale-ops", "50"])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let t0 = Instant::now();
    let out = rx.recv_timeout(RUN_TIMEOUT);
    if out.is_err() {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    stop.store(true, Ordering::Release);
    for (port, service) in services {
        // Wake the accept; the service sees `stop` and ends (and its listener closes).
        let _ = super::vsock_connect(libc::VMADDR_CID_LOCAL, port);
        let _ = service.join();
    }
    let out = out.map_err(|_| {
        fail(format!(
            "bench did not finish within {} s",
            RUN_TIMEOUT.as_secs()
        ))
    })??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for l in stdout.lines() {
        println!("# bench: {l}");
    }
    if !out.status.success() {
        return Err(fail(format!(
            "bench exited with {}: {}",
            out.status,
            stderr.trim()
        )));
    }
    let ours = "vdpa-vsock vhost-vsock";
    let mut missing = Vec::new();
    for (workload, transport) in [
        ("one-way 64KiB writes", ours.to_string()),
        ("one-way 64KiB writes, 16 conns", ours.to_string()),
        ("ping-pong 64B", format!("{ours} eventfd")),
        ("ping-pong 64B", format!("{ours} busy-poll")),
        ("connect+close, 10 open", ours.to_string()),
        ("echo 1B rtt, 10 open", ours.to_string()),
        ("connect+close, 50 open", ours.to_string()),
        ("echo 1B rtt, 50 open", ours.to_string()),
    ] {
        match bench_value(&stdout, workload, &transport) {
            Some(v) if v > 0.0 => {}
            other => missing.push(format!("{workload} / {transport}: {other:?}")),
        }
    }
    if !missing.is_empty() {
        return Err(fail(format!(
            "rows missing or not positive: {}",
            missing.join("; ")
        )));
    }
    println!(
        "# bench on vhost-vsock took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Clean close: our driver writes 1 MiB (checksummed pattern) to a kernel AF_VSOCK listener and
/// at once drops the stream and then the driver. The drop must deliver what was written (the
/// drain of `DriverConfig::drain_timeout`) and close the connection as `close` does: the
/// kernel reads all 1 MiB intact, then EOF (read returns 0, not a reset), within 20 s.
pub(super) fn vhost_vsock_clean_close() -> TestResult {
    const PORT: u32 = 5012;
    const LEN: usize = 1 << 20;
    const READ_BOUND: Duration = Duration::from_secs(20);
    let drv = open_driver()?;
    let listener = kernel_listen(PORT)?;
    let kernel = thread::spawn(move || -> io::Result<(u64, Instant)> {
        let (mut s, _) = kernel_accept(&listener)?;
        s.set_read_timeout(Some(READ_BOUND))?;
        let sum = recv_checksum(&mut s, LEN)?;
        let mut more = [0u8; 4096];
        match s.read(&mut more) {
            Ok(0) => Ok((sum, Instant::now())),
            Ok(n) => Err(io::Error::other(format!(
                "{n} bytes more than the {LEN} written"
            ))),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("after all {LEN} bytes, no EOF: {e}"),
            )),
        }
    });
    let mut ours = drv
        .connect_timeout(VsockAddr::new(HOST_CID, PORT), TIMEOUT)
        .map_err(|e| fail(format!("connect to {HOST_CID}:{PORT}: {e}")))?;
    timed(&mut ours)?;
    let sent = send_pattern(&mut ours, 9, LEN).map_err(|e| fail(format!("write: {e}")))?;
    let t0 = Instant::now();
    drop(ours);
    drop(drv);
    let dropped = t0.elapsed();
    let (got, eof) = join(kernel, "kernel reader")?;
    if got != sent {
        return Err(fail(format!(
            "the kernel read 1 MiB with FNV-1a {got:#018x}, we wrote {sent:#018x}"
        )));
    }
    println!(
        "# dropped stream and driver in {:.1} ms; the kernel had all {LEN} bytes intact and EOF \
         {:.1} ms after the drop began",
        dropped.as_secs_f64() * 1e3,
        eof.saturating_duration_since(t0).as_secs_f64() * 1e3
    );
    Ok(())
}
