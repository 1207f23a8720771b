// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The driver-level poller (`VsockPoller`) through the public API, over the sim device: edge
//! and level semantics on streams, listeners and seqpacket sockets, a socket dropped while
//! registered, the device's end, and 2,000 sockets on one descriptor.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use common::{checksum, pattern};
use vdpa_vsock::driver::{
    DriverConfig, Interest, Readiness, VsockAddr, VsockDriver, VsockPoller, VsockStream,
};
use vdpa_vsock::sim::{SimConfig, SimHost, ECHO_PORT, SEQPACKET_ECHO_PORT};

/// Longest wait for a condition before it counts as a failure.
const LIMIT: Duration = Duration::from_secs(20);

fn sim() -> (VsockDriver, SimHost) {
    VsockDriver::open_sim(
        SimConfig {
            seqpacket: true,
            ..SimConfig::default()
        },
        DriverConfig::default(),
    )
    .expect("sim")
}

/// Whether `poll(2)` reports the poller's descriptor readable within `ms` milliseconds.
fn readable_within(p: &VsockPoller, ms: i32) -> bool {
    let mut fd = libc::pollfd {
        fd: p.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd that outlives the call; the descriptor is open (borrowed).
    let r = unsafe { libc::poll(&mut fd, 1, ms) };
    assert!(r >= 0, "poll: {}", std::io::Error::last_os_error());
    fd.revents & libc::POLLIN != 0
}

/// Wait (in `poll(2)` on the poller's descriptor, as an event loop does) for events, and
/// return the first batch.
#[track_caller]
fn wait_events(p: &VsockPoller) -> Vec<(u64, Readiness)> {
    let t0 = Instant::now();
    loop {
        assert!(t0.elapsed() < LIMIT, "no event within {LIMIT:?}");
        if readable_within(p, 1000) {
            let mut ev = Vec::new();
            if p.events(&mut ev) > 0 {
                return ev;
            }
        }
    }
}

fn echo(d: &VsockDriver) -> VsockStream {
    let s = d.connect(VsockAddr::new(2, ECHO_PORT)).expect("connect");
    s.set_nonblocking(true).unwrap();
    s
}

#[test]
fn edge_stream_reports_data_once_until_drained() {
    let (d, _host) = sim();
    let p = d.poller().unwrap();
    let mut s = echo(&d);
    p.register(&s, 5, Interest::READABLE.edge()).unwrap();
    assert!(!readable_within(&p, 0), "nothing ready: nothing pending");
    s.write_all(b"ping").unwrap();
    let ev = wait_events(&p);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].0, 5);
    assert!(
        ev[0].1.readable && !ev[0].1.writable,
        "no write interest: {ev:?}"
    );
    assert!(!readable_within(&p, 0), "an edge is reported once");
    let mut b = [0u8; 16];
    assert_eq!(s.read(&mut b).unwrap(), 4);
    assert_eq!(s.read(&mut b).unwrap_err().kind(), ErrorKind::WouldBlock);
    // New data after WouldBlock: a new edge.
    s.write_all(b"pong").unwrap();
    let ev = wait_events(&p);
    assert_eq!((ev.len(), ev[0].0), (1, 5));
    assert_eq!(s.read(&mut b).unwrap(), 4);
    assert_eq!(&b[..4], b"pong");
}

#[test]
fn level_stream_and_listener_report_while_ready() {
    let (d, host) = sim();
    let p = VsockPoller::new().unwrap();
    // A writable stream, level-triggered: reported on every call while writable.
    let s = echo(&d);
    p.register(&s, 1, Interest::WRITABLE).unwrap();
    for _ in 0..3 {
        let ev = wait_events(&p);
        assert_eq!(ev.len(), 1);
        assert!(ev[0].1.writable, "{ev:?}");
    }
    p.deregister(&s).unwrap();
    assert!(!readable_within(&p, 0), "deregistered: nothing pending");
    // A listener with a connection waiting, level-triggered, until it is accepted.
    let l = d.listen(6000).unwrap();
    l.set_nonblocking(true).unwrap();
    p.register(&l, 2, Interest::READABLE).unwrap();
    assert!(!readable_within(&p, 0));
    let _peer = host.connect(6000).unwrap();
    let ev = wait_events(&p);
    assert_eq!((ev[0].0, ev[0].1.readable), (2, true), "{ev:?}");
    let ev = wait_events(&p);
    assert_eq!(ev[0].0, 2, "still reported: not accepted yet");
    let (_srv, _) = l.accept().unwrap();
    assert!(!readable_within(&p, 0), "accepted: no longer ready");
}

#[test]
fn seqpacket_and_reregister() {
    let (d, _host) = sim();
    let p = d.poller().unwrap();
    let s = d
        .connect_seqpacket(VsockAddr::new(2, SEQPACKET_ECHO_PORT))
        .unwrap();
    s.set_nonblocking(true).unwrap();
    p.register(&s, 10, Interest::READABLE.edge()).unwrap();
    assert_eq!(
        p.register(&s, 11, Interest::READABLE).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    let other = VsockPoller::new().unwrap();
    assert_eq!(
        other.deregister(&s).unwrap_err().kind(),
        ErrorKind::NotFound,
        "registered with another poller"
    );
    s.send(b"one message").unwrap();
    let ev = wait_events(&p);
    assert_eq!((ev[0].0, ev[0].1.readable), (10, true));
    // Modify while ready: reported at once with the new token (EPOLL_CTL_MOD).
    p.reregister(&s, 12, Interest::BOTH.edge()).unwrap();
    let ev = wait_events(&p);
    assert_eq!(ev[0].0, 12);
    assert!(ev[0].1.readable && ev[0].1.writable, "{ev:?}");
    let mut b = [0u8; 64];
    assert_eq!(s.recv(&mut b).unwrap(), 11);
}

#[test]
fn a_socket_dropped_while_registered_leaves_the_poller() {
    let (d, _host) = sim();
    let p = d.poller().unwrap();
    let a = echo(&d);
    let b = echo(&d);
    p.register(&a, 1, Interest::WRITABLE).unwrap();
    p.register(&b, 2, Interest::WRITABLE).unwrap();
    let ev = wait_events(&p);
    assert_eq!(ev.len(), 2, "{ev:?}");
    drop(a);
    let ev = wait_events(&p);
    assert_eq!(ev.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2]);
    drop(b);
    assert!(!readable_within(&p, 0), "both gone: nothing pending");
    let mut ev = Vec::new();
    assert_eq!(p.events(&mut ev), 0);
}

#[test]
fn the_device_end_is_an_error_on_every_registered_socket() {
    let (d, _host) = sim();
    let p = d.poller().unwrap();
    let streams: Vec<VsockStream> = (0..20).map(|_| echo(&d)).collect();
    for (i, s) in streams.iter().enumerate() {
        p.register(s, i as u64, Interest::READABLE.edge()).unwrap();
    }
    let l = d.listen(6001).unwrap();
    p.register(&l, 100, Interest::READABLE.edge()).unwrap();
    assert!(!readable_within(&p, 0));
    d.reset_device("test");
    let mut seen = std::collections::BTreeSet::new();
    let t0 = Instant::now();
    while seen.len() < 21 {
        assert!(t0.elapsed() < LIMIT, "errors seen on {seen:?} only");
        for (t, r) in wait_events(&p) {
            assert!(r.error, "{t}: {r:?}");
            seen.insert(t);
        }
    }
    let mut b = [0u8; 4];
    let mut s = &streams[0];
    assert_eq!(
        s.read(&mut b).unwrap_err().kind(),
        ErrorKind::ConnectionAborted
    );
}

/// 2,000 streams on one poller, in one thread, each echoing 16 KiB checksummed, the way
/// an event loop would: the process opens no descriptor per socket.
#[test]
fn two_thousand_sockets_on_one_descriptor() {
    const N: usize = 2000;
    const LEN: usize = 16 * 1024;
    let (d, _host) = sim();
    let p = d.poller().unwrap();
    let fds_before = std::fs::read_dir("/proc/self/fd").unwrap().count();
    struct C {
        s: VsockStream,
        data: Vec<u8>,
        sent: usize,
        got: Vec<u8>,
    }
    let mut conns: Vec<C> = (0..N)
        .map(|i| {
            let s = echo(&d);
            p.register(&s, i as u64, Interest::BOTH.edge()).unwrap();
            C {
                s,
                data: pattern(i as u64, LEN),
                sent: 0,
                got: Vec::new(),
            }
        })
        .collect();
    let fds_after = std::fs::read_dir("/proc/self/fd").unwrap().count();
    assert!(
        fds_after <= fds_before + 2,
        "{N} registered sockets took {} descriptors",
        fds_after - fds_before
    );
    let mut done = 0;
    let t0 = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    while done < N {
        assert!(t0.elapsed() < Duration::from_secs(120), "{done}/{N} done");
        for (t, _) in wait_events(&p) {
            let c = &mut conns[usize::try_from(t).unwrap()];
            // Edge-triggered: work each side until WouldBlock.
            while c.sent < LEN {
                match c.s.write(&c.data[c.sent..]) {
                    Ok(n) => c.sent += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{t}: write: {e}"),
                }
            }
            let before = c.got.len();
            loop {
                match c.s.read(&mut buf) {
                    Ok(0) => panic!("{t}: EOF"),
                    Ok(n) => c.got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{t}: read: {e}"),
                }
            }
            if before < LEN && c.got.len() >= LEN {
                assert_eq!(c.got.len(), LEN, "{t}: more than was sent");
                assert_eq!(
                    checksum(&c.got, 0),
                    checksum(&c.data, 0),
                    "{t}: echo differs"
                );
                done += 1;
            }
        }
    }
    eprintln!(
        "poller: {N} sockets x {LEN} bytes echoed in {:?}",
        t0.elapsed()
    );
}
