//! Non-blocking calls and readiness descriptors over the sim device, through the public API:
//! every `WouldBlock` is followed by a `poll(2)` on the socket's descriptor that wakes at the
//! right moment, and the call then succeeds.

mod common;
use common::{checksum, pattern};

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
use vdpa_vsock::sim::{SimConfig, SimHost, ECHO_PORT, SEQPACKET_ECHO_PORT};

/// The longest a readiness wait may take before the test fails (a hang is a failure).
const STALL: Duration = Duration::from_secs(30);

const IN: i16 = libc::POLLIN;
const OUT: i16 = libc::POLLOUT;
const RDHUP: i16 = libc::POLLRDHUP;
const HUP: i16 = libc::POLLHUP;
const ERR: i16 = libc::POLLERR;

fn sim_with_host() -> (VsockDriver, SimHost) {
    VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).expect("open sim")
}

/// `poll(2)` on one descriptor for `events`, waiting up to `timeout`; the revents.
fn poll_fd(fd: RawFd, events: i16, timeout: Duration) -> i16 {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd that outlives the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    assert!(r >= 0, "poll: {}", std::io::Error::last_os_error());
    p.revents
}

/// What the descriptor says now.
fn now(fd: RawFd) -> i16 {
    poll_fd(fd, IN | OUT | RDHUP, Duration::ZERO)
}

/// Wait until every bit of `want` is set; fails the test after [`STALL`].
fn wait_for(fd: RawFd, want: i16) -> i16 {
    let start = Instant::now();
    loop {
        let r = poll_fd(fd, want, Duration::from_millis(100));
        if r & want == want {
            return r;
        }
        assert!(
            start.elapsed() < STALL,
            "descriptor never showed {want:#x} (has {r:#x})"
        );
    }
}

#[test]
fn read_would_block_then_poll_sees_data_then_read_succeeds() {
    let (d, _host) = sim_with_host();
    let mut s = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
    s.set_nonblocking(true).unwrap();
    let fd = s.as_raw_fd();
    let mut buf = [0u8; 64];
    assert_eq!(s.read(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
    assert_eq!(now(fd) & IN, 0, "nothing to read yet");
    assert_ne!(now(fd) & OUT, 0, "a connected stream with room is writable");
    assert_eq!(s.write(b"ping").unwrap(), 4);
    let r = wait_for(fd, IN);
    assert_eq!(r & (ERR | HUP | RDHUP), 0, "{r:#x}");
    assert_eq!(s.read(&mut buf).unwrap(), 4);
    assert_eq!(&buf[..4], b"ping");
    // Drained: not readable any more (level-triggered, kept true by the runtime).
    assert_eq!(now(fd) & IN, 0);
    assert_eq!(s.read(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
}

#[test]
fn write_would_block_when_the_peer_does_not_read_then_poll_sees_room() {
    let (d, host) = sim_with_host();
    let l = host.listen(6000).unwrap();
    let mut s = d.connect(VsockAddr::new(2, 6000)).unwrap();
    let (mut peer, _) = l.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    let fd = s.as_raw_fd();
    let data = pattern(1, 1 << 20);
    let mut sent = 0;
    // The peer does not read: the peer's credit and our send buffer fill, and a write stops
    // taking bytes; it takes what fits (a partial count), then WouldBlock.
    loop {
        match s.write(&data[sent..]) {
            Ok(n) => {
                assert!(n > 0 && n <= data.len() - sent);
                sent += n;
                assert!(sent < data.len(), "1 MiB fit in the buffers: test is wrong");
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    assert!(sent > 0);
    assert_eq!(now(fd) & OUT, 0, "full: not writable");
    // The peer reads everything so far: room comes back, and POLLOUT with it.
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; sent];
        peer.read_exact(&mut got).unwrap();
        (peer, got)
    });
    wait_for(fd, OUT);
    let (mut peer, got) = reader.join().unwrap();
    assert_eq!(checksum(&got, 0), checksum(&data[..sent], 0));
    // The rest goes, checked end to end.
    let rest = data.len() - sent;
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; rest];
        peer.read_exact(&mut got).unwrap();
        got
    });
    while sent < data.len() {
        match s.write(&data[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                wait_for(fd, OUT);
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    let got = reader.join().unwrap();
    assert_eq!(
        checksum(&got, 0),
        checksum(&data[data.len() - rest..], 0),
        "nothing lost or duplicated across WouldBlock"
    );
}

#[test]
fn accept_would_block_then_poll_sees_the_connection() {
    let (d, host) = sim_with_host();
    let l = d.listen(5100).unwrap();
    l.set_nonblocking(true).unwrap();
    let fd = l.as_raw_fd();
    assert_eq!(l.accept().unwrap_err().kind(), ErrorKind::WouldBlock);
    assert_eq!(now(fd), 0, "a listener with nothing waiting shows nothing");
    let t = std::thread::spawn(move || {
        let mut c = host.connect(5100).unwrap();
        c.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        c.read_exact(&mut b).unwrap();
        b
    });
    wait_for(fd, IN);
    let (mut s, peer) = l.accept().unwrap();
    assert_eq!(peer.cid, 2);
    // Accepted from a non-blocking listener: non-blocking too.
    let sfd = s.as_raw_fd();
    wait_for(sfd, IN);
    let mut b = [0u8; 2];
    assert_eq!(s.read(&mut b).unwrap(), 2);
    assert_eq!(&b, b"hi");
    s.write_all(b"yo").unwrap();
    assert_eq!(&t.join().unwrap(), b"yo");
    assert_eq!(now(fd) & IN, 0, "accepted: nothing waits");
}

#[test]
fn nonblocking_connect_completes_through_writability() {
    let (d, _host) = sim_with_host();
    let mut s = d.connect_nonblocking(VsockAddr::new(2, ECHO_PORT)).unwrap();
    let fd = s.as_raw_fd();
    let r = wait_for(fd, OUT);
    assert_eq!(r & (ERR | HUP), 0, "{r:#x}");
    assert!(s.take_error().unwrap().is_none());
    s.write_all(b"after connect")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut got = Vec::new();
    let mut buf = [0u8; 32];
    while got.len() < 13 {
        match s.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                wait_for(fd, IN);
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(&got, b"after connect");
}

#[test]
fn nonblocking_connect_refused_shows_error_and_take_error_says_why() {
    let (d, _host) = sim_with_host();
    let s = d.connect_nonblocking(VsockAddr::new(2, 4444)).unwrap();
    let r = wait_for(s.as_raw_fd(), ERR);
    assert_ne!(r & HUP, 0, "{r:#x}");
    let e = s.take_error().unwrap().expect("an error");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    assert!(s.take_error().unwrap().is_none(), "taken once");
}

#[test]
fn peer_shutdown_send_is_rdhup_and_end_of_stream() {
    let (d, host) = sim_with_host();
    let l = host.listen(6100).unwrap();
    let mut s = d.connect(VsockAddr::new(2, 6100)).unwrap();
    let (mut peer, _) = l.accept().unwrap();
    s.set_nonblocking(true).unwrap();
    let fd = s.as_raw_fd();
    peer.write_all(b"last words").unwrap();
    peer.shutdown(Shutdown::Write).unwrap();
    let r = wait_for(fd, IN | RDHUP);
    assert_eq!(r & (ERR | HUP), 0, "only one way is shut: {r:#x}");
    let mut buf = [0u8; 32];
    assert_eq!(s.read(&mut buf).unwrap(), 10);
    assert_eq!(s.read(&mut buf).unwrap(), 0, "end of stream");
    // Still readable (end of stream), still writable (our direction is open).
    let r = now(fd);
    assert_eq!(r & (IN | OUT | RDHUP), IN | OUT | RDHUP, "{r:#x}");
    // We shut down too: hung up.
    s.shutdown(Shutdown::Write).unwrap();
    let r = wait_for(fd, HUP);
    assert_eq!(r & ERR, 0, "a clean close is no error: {r:#x}");
}

#[test]
fn transport_reset_shows_error_on_every_descriptor() {
    let (d, host) = sim_with_host();
    let l = d.listen(5200).unwrap();
    let streams: Vec<_> = (0..3)
        .map(|_| d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap())
        .collect();
    for s in &streams {
        s.set_nonblocking(true).unwrap();
        let r = now(s.as_raw_fd());
        assert_eq!(r & (ERR | HUP), 0, "{r:#x}");
    }
    // A new CID: the driver's connections end (ConnectionReset), its listener stays.
    host.set_guest_cid(77).unwrap();
    for mut s in streams {
        let r = wait_for(s.as_raw_fd(), ERR);
        assert_ne!(r & HUP, 0, "{r:#x}");
        let mut b = [0u8; 4];
        assert_eq!(
            s.read(&mut b).unwrap_err().kind(),
            ErrorKind::ConnectionReset
        );
    }
    assert_eq!(now(l.as_raw_fd()) & (ERR | HUP), 0, "the listener lives on");
}

#[test]
fn device_death_wakes_every_poller_with_an_error() {
    let (d, _host) = sim_with_host();
    let l = d.listen(5300).unwrap();
    let s = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
    let (sfd, lfd) = (s.as_raw_fd(), l.as_raw_fd());
    let t = std::thread::spawn(move || {
        let r = poll_fd(sfd, IN, STALL);
        let q = poll_fd(lfd, IN, STALL);
        (r, q)
    });
    std::thread::sleep(Duration::from_millis(50));
    d.reset_device("test");
    let (r, q) = t.join().unwrap();
    assert_ne!(r & ERR, 0, "stream: {r:#x}");
    assert_ne!(r & HUP, 0, "stream: {r:#x}");
    assert_ne!(q & ERR, 0, "listener: {q:#x}");
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let e = (&s).read(&mut b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionAborted, "{e}");
}

#[test]
fn seqpacket_nonblocking_send_and_recv() {
    let (d, _host) = VsockDriver::open_sim(
        SimConfig {
            seqpacket: true,
            ..SimConfig::default()
        },
        DriverConfig::default(),
    )
    .unwrap();
    let s = d
        .connect_seqpacket(VsockAddr::new(2, SEQPACKET_ECHO_PORT))
        .unwrap();
    s.set_nonblocking(true).unwrap();
    let fd = s.as_raw_fd();
    let mut buf = [0u8; 256];
    assert_eq!(s.recv(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
    for len in [0usize, 1, 200] {
        let msg = pattern(len as u64, len);
        assert_eq!(s.send(&msg).unwrap(), len);
        wait_for(fd, IN);
        let (n, full, _) = s.recv_full(&mut buf).unwrap();
        assert_eq!((n, full), (len, len));
        assert_eq!(&buf[..n], &msg[..]);
        assert_eq!(s.recv(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
    }
}

#[test]
fn blocking_write_that_times_out_reports_what_it_queued() {
    let (d, host) = sim_with_host();
    let l = host.listen(6200).unwrap();
    let mut s = d.connect(VsockAddr::new(2, 6200)).unwrap();
    let (_peer, _) = l.accept().unwrap();
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let data = vec![5u8; 4 << 20];
    // More than the buffers hold and a peer that never reads: the write queues part of it,
    // then times out; it must say how much, not TimedOut (a retry would duplicate bytes).
    let n = s.write(&data).unwrap();
    assert!(n > 0 && n < data.len(), "queued {n}");
    let e = s.write(&data).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "nothing more fits: {e}");
}

#[test]
fn peek_sees_data_without_consuming_it() {
    let (d, _host) = sim_with_host();
    let mut s = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(s.peek(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
    s.write_all(b"peekaboo").unwrap();
    wait_for(s.as_raw_fd(), IN);
    assert_eq!(s.peek(&mut buf[..4]).unwrap(), 4);
    assert_eq!(&buf[..4], b"peek");
    assert_eq!(s.peek(&mut buf).unwrap(), 8, "still all there");
    assert_ne!(now(s.as_raw_fd()) & IN, 0, "peeking leaves it readable");
    assert_eq!(s.read(&mut buf).unwrap(), 8);
    assert_eq!(&buf[..8], b"peekaboo");
    assert_eq!(now(s.as_raw_fd()) & IN, 0);
}

#[test]
fn receive_low_water_mark_holds_readability_and_blocking_reads() {
    let (d, host) = sim_with_host();
    let l = host.listen(6300).unwrap();
    let mut s = d.connect(VsockAddr::new(2, 6300)).unwrap();
    let (mut peer, _) = l.accept().unwrap();
    let too_big = s.set_recv_low_water(16 << 20).unwrap_err();
    assert_eq!(too_big.kind(), ErrorKind::InvalidInput, "{too_big}");
    s.set_recv_low_water(1000).unwrap();
    let fd = s.as_raw_fd();
    peer.write_all(&[1u8; 600]).unwrap();
    // 600 bytes arrive, but the mark is 1000: not readable, and a blocking read waits.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(now(fd) & IN, 0, "below the mark");
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 2000];
    let t0 = Instant::now();
    let n = s.read(&mut buf).unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "it waited for the mark"
    );
    assert_eq!(n, 600, "then, timed out, took what had arrived (as Linux)");
    // Above the mark: readable, and the read returns at once.
    peer.write_all(&[2u8; 1200]).unwrap();
    wait_for(fd, IN);
    assert_eq!(s.read(&mut buf).unwrap(), 1200);
    // A non-blocking read takes what there is, mark or not.
    peer.write_all(&[3u8; 10]).unwrap();
    s.set_nonblocking(true).unwrap();
    let t0 = Instant::now();
    let n = loop {
        match s.read(&mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(t0.elapsed() < STALL);
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(n, 10);
    // End of stream ends the wait below the mark too.
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(None).unwrap();
    peer.write_all(&[4u8; 5]).unwrap();
    peer.shutdown(Shutdown::Write).unwrap();
    let mut got = 0;
    loop {
        match s.read(&mut buf).unwrap() {
            0 => break,
            n => got += n,
        }
    }
    assert_eq!(got, 5);
}

#[test]
fn a_write_that_finds_the_tx_pool_empty_shows_unwritable_until_chunks_return() {
    // One 64 KiB chunk for every connection: a writer whose peer does not read holds it.
    let (d, host) = VsockDriver::open_sim(
        SimConfig::default(),
        DriverConfig {
            tx_pool_size: 64 * 1024,
            ..DriverConfig::default()
        },
    )
    .unwrap();
    let l = host.listen(6400).unwrap();
    let a = d.connect(VsockAddr::new(2, 6400)).unwrap();
    let (mut peer_a, _) = l.accept().unwrap();
    let b = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
    for s in [&a, &b] {
        s.set_nonblocking(true).unwrap();
    }
    // `a` fills the pool (its peer's window takes the rest until nobody reads).
    let big = vec![7u8; 1 << 20];
    let mut sent_a = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(500) {
        match (&a).write(&big) {
            Ok(n) => sent_a += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("{e}"),
        }
    }
    let bfd = b.as_raw_fd();
    let e = (&b).write(&[1u8; 4096]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock, "the pool is empty");
    assert_eq!(
        now(bfd) & OUT,
        0,
        "room in b's send buffer, but no memory: not writable (else a poller spins or misses the edge)"
    );
    // a's peer reads: chunks come back, and b turns writable.
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; sent_a];
        peer_a.read_exact(&mut got).unwrap();
    });
    wait_for(bfd, OUT);
    assert_eq!((&b).write(&[1u8; 4096]).unwrap(), 4096);
    reader.join().unwrap();
}
