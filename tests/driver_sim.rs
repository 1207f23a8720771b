//! The socket API over the sim device, end to end through the public API.
#![allow(clippy::cast_possible_truncation)] // Test sizes and counters are small and known.

mod common;
use common::{checksum, pattern};

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vdpa_vsock::device::DeviceSpec;
use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
use vdpa_vsock::sim::{Hostile, SimConfig, SimHost, DISCARD_PORT, ECHO_PORT, SEQPACKET_ECHO_PORT};

/// Longest a blocking call may wait in these tests before the test fails.
const STALL: Duration = Duration::from_secs(60);

fn sim() -> VsockDriver {
    VsockDriver::open(&DeviceSpec::Sim).expect("open sim")
}

/// The sim with the handle on its host side (CID 2).
fn sim_with_host() -> (VsockDriver, SimHost) {
    VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).expect("open sim")
}

#[test]
fn echo_round_trip() {
    let d = sim();
    assert_eq!(d.local_cid(), 3);
    let mut s = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
    assert_eq!(s.peer_addr().unwrap(), VsockAddr::new(2, ECHO_PORT));
    s.write_all(b"hello vsock").unwrap();
    let mut buf = [0u8; 11];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello vsock");
}

#[test]
fn connect_to_closed_port_is_refused() {
    let d = sim();
    let e = d.connect(VsockAddr::new(2, 4444)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
}

#[test]
fn connect_to_a_cid_wider_than_32_bits_fails_at_once() {
    let d = sim();
    let t = Instant::now();
    let e = d.connect(VsockAddr::new(99_999_999_999, 1)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("99999999999"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // The parser refuses it too, naming the CID; VMADDR_CID_ANY is the widest that fits.
    let e = "99999999999:1".parse::<VsockAddr>().unwrap_err();
    assert!(e.contains("99999999999") && e.contains("32 bits"), "{e}");
    assert_eq!(
        "4294967295:1".parse::<VsockAddr>(),
        Ok(VsockAddr::new(0xFFFF_FFFF, 1))
    );
}

#[test]
fn listen_on_port_any_reports_the_port_picked() {
    let (d, host) = sim_with_host();
    let l = d.listen(vdpa_vsock::packet::VMADDR_PORT_ANY).unwrap();
    let port = l.port();
    assert_ne!(port, vdpa_vsock::packet::VMADDR_PORT_ANY);
    let l2 = d.listen(vdpa_vsock::packet::VMADDR_PORT_ANY).unwrap();
    assert_ne!(l2.port(), port);
    assert_eq!(d.listen(port).unwrap_err().kind(), ErrorKind::AddrInUse);
    let t = thread::spawn(move || {
        let mut s = host.connect(port).unwrap();
        s.write_all(b"any port").unwrap();
    });
    let (mut s, _) = l.accept().unwrap();
    let mut got = [0u8; 8];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"any port");
    t.join().unwrap();
}

#[test]
fn host_connects_to_our_listener() {
    let (d, host) = sim_with_host();
    let l = d.listen(5000).unwrap();
    assert_eq!(d.listen(5000).unwrap_err().kind(), ErrorKind::AddrInUse);
    let t = thread::spawn(move || {
        let mut s = host.connect(5000).unwrap();
        s.write_all(b"from the host").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        back
    });
    let (mut s, peer) = l.accept().unwrap();
    assert_eq!(peer.cid, 2);
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"from the host");
    s.write_all(b"reply").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(t.join().unwrap(), b"reply");
}

#[test]
fn half_close_then_read_eof_and_write_broken_pipe() {
    let d = sim();
    let mut s = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
    s.write_all(b"abc").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"abc");
    let e = s.write(b"more").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BrokenPipe, "{e}");
}

#[test]
fn many_concurrent_connections_checksummed() {
    const CONNS: usize = 1000;
    const BYTES: usize = 1 << 20;
    let (d, host) = sim_with_host();
    let d = Arc::new(d);
    let mut streams = Vec::new();
    for _ in 0..CONNS {
        let mut s = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
        // A stall must fail the test, not hang it.
        s.set_read_timeout(Some(STALL)).unwrap();
        s.set_write_timeout(Some(STALL)).unwrap();
        streams.push(s);
    }
    let mut handles = Vec::new();
    for (i, s) in streams.into_iter().enumerate() {
        let mut w = s.try_clone().unwrap();
        let mut r = s;
        let writer = thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let data = pattern(i as u64, BYTES);
                for chunk in data.chunks(64 * 1024) {
                    w.write_all(chunk).unwrap();
                }
                checksum(&data, 0xcbf2_9ce4_8422_2325)
            })
            .unwrap();
        let reader = thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                let mut h = 0xcbf2_9ce4_8422_2325;
                let mut got = 0;
                while got < BYTES {
                    let n = r.read(&mut buf[..(BYTES - got).min(16 * 1024)]).unwrap();
                    assert!(n > 0, "early EOF after {got} bytes");
                    h = checksum(&buf[..n], h);
                    got += n;
                }
                h
            })
            .unwrap();
        handles.push((writer, reader));
    }
    for (w, r) in handles {
        assert_eq!(
            w.join().unwrap(),
            r.join().unwrap(),
            "a stream came back altered"
        );
    }
    assert_eq!(host.stats().protocol_violations, 0);
    assert_eq!(host.proto_stats().credit_violations, 0);
}

#[test]
fn slow_reader_never_sees_credit_overrun() {
    let (d, host) = sim_with_host();
    let l = host.listen(6000).unwrap();
    let writer = {
        let mut s = d.connect(VsockAddr::new(2, 6000)).unwrap();
        thread::spawn(move || {
            let data = pattern(7, 4 << 20);
            s.write_all(&data).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            checksum(&data, 0)
        })
    };
    let (mut r, _) = l.accept().unwrap();
    let mut h = 0;
    let mut buf = [0u8; 4096];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h = checksum(&buf[..n], h);
        total += n;
        if total % (256 * 1024) < 4096 {
            thread::sleep(Duration::from_millis(2));
        }
    }
    assert_eq!(total, 4 << 20);
    assert_eq!(writer.join().unwrap(), h);
    assert_eq!(host.proto_stats().credit_violations, 0);
    assert_eq!(d.proto_stats().credit_violations, 0);
}

#[test]
fn seqpacket_boundaries_preserved() {
    // As with Linux's SO_VM_SOCKETS_BUFFER_SIZE, a message must fit the peer's buffer: 2 MiB here.
    let big = |mut c: vdpa_vsock::proto::Config| {
        c.buf_alloc = 2 << 20;
        c.send_buffer = 2 << 20;
        c
    };
    let (d, _host) = VsockDriver::open_sim(
        SimConfig {
            host: big(Default::default()),
            ..SimConfig::default()
        },
        DriverConfig {
            proto: big(Default::default()),
            ..DriverConfig::default()
        },
    )
    .unwrap();
    let s = d
        .connect_seqpacket(VsockAddr::new(2, SEQPACKET_ECHO_PORT))
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for size in [
        1usize,
        2,
        43,
        44,
        4096,
        65_535,
        65_536,
        65_537,
        300_000,
        1 << 20,
    ] {
        let msg = pattern(size as u64, size);
        assert_eq!(s.send(&msg).unwrap(), size);
        let (n, full, _eor) = s.recv_full(&mut buf).unwrap();
        assert_eq!((n, full), (size, size), "message of {size} bytes");
        assert_eq!(&buf[..n], &msg[..]);
    }
    // Two messages back to back stay two messages.
    s.send(b"one").unwrap();
    s.send(b"two!").unwrap();
    assert_eq!(s.recv(&mut buf).unwrap(), 3);
    assert_eq!(s.recv(&mut buf).unwrap(), 4);
    // A short buffer truncates (MSG_TRUNC) and reports the full length.
    s.send(&[9u8; 100]).unwrap();
    let (n, full, _) = s.recv_full(&mut buf[..10]).unwrap();
    assert_eq!((n, full), (10, 100));
}

#[test]
fn device_reset_mid_transfer_ends_every_stream() {
    let d = Arc::new(sim());
    let mut workers = Vec::new();
    for _ in 0..8 {
        let mut s = d.connect(VsockAddr::new(2, DISCARD_PORT)).unwrap();
        workers.push(thread::spawn(move || {
            let chunk = vec![1u8; 64 * 1024];
            loop {
                if let Err(e) = s.write_all(&chunk) {
                    return e;
                }
            }
        }));
    }
    let mut r = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
    let reader = thread::spawn(move || {
        let mut b = [0u8; 16];
        r.read(&mut b).unwrap_err()
    });
    thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    d.reset_device("test");
    for w in workers {
        let e = w.join().unwrap();
        assert_eq!(e.kind(), ErrorKind::ConnectionAborted, "{e}");
    }
    let e = reader.join().unwrap();
    assert_eq!(e.kind(), ErrorKind::ConnectionAborted, "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "streams took {:?} to end",
        t0.elapsed()
    );
    assert!(d.connect(VsockAddr::new(2, ECHO_PORT)).is_err());
}

#[test]
fn listener_accepts_under_load() {
    let (d, host) = sim_with_host();
    let l = d.listen(7000).unwrap();
    // Background load on the same device.
    let mut load = d.connect(VsockAddr::new(2, DISCARD_PORT)).unwrap();
    let loader = thread::spawn(move || {
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..200 {
            load.write_all(&chunk).unwrap();
        }
    });
    let clients: Vec<_> = (0..50)
        .map(|i| {
            let host = host.clone();
            thread::spawn(move || {
                let mut s = host.connect(7000).unwrap();
                s.write_all(&[i as u8; 10]).unwrap();
            })
        })
        .collect();
    let mut seen = [false; 50];
    for _ in 0..50 {
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 10];
        s.read_exact(&mut b).unwrap();
        seen[b[0] as usize] = true;
    }
    assert!(seen.iter().all(|&x| x));
    for c in clients {
        c.join().unwrap();
    }
    loader.join().unwrap();
}

#[track_caller]
fn hostile_device_breaks_cleanly(h: Hostile) {
    // Recovery off: the first device error is final (recovery is `tests/lifecycle.rs`'s).
    let (d, _host) = VsockDriver::open_sim(
        SimConfig {
            hostile: Some(h),
            ..SimConfig::default()
        },
        DriverConfig {
            recovery_limit: 0,
            ..DriverConfig::default()
        },
    )
    .unwrap();
    // The first RX delivery (the RESPONSE) is bogus: the connect must fail at once, not hang,
    // panic, or wait for its timer. (The timer is long so that a lost notification shows: the
    // hostile mode once published its entries without notifying, and a quarter of these
    // connects ended only when the 2 s connect timer woke the driver.)
    let t0 = Instant::now();
    let e = d
        .connect_timeout(VsockAddr::new(2, ECHO_PORT), Duration::from_secs(30))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionAborted, "{h:?}: {e}");
    assert!(e.to_string().contains("rx queue"), "{h:?}: {e}");
    // What the queue found survives as the cause, not only as text.
    let cause = std::error::Error::source(&e).map(|c| c.to_string());
    assert!(
        cause.as_deref().is_some_and(|c| c.contains("virtqueue")),
        "{h:?}: {e}: cause {cause:?}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "{h:?}: noticed after {:?}",
        t0.elapsed()
    );
    // And the driver stays dead, with the same clear error.
    let e = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionAborted, "{h:?}: {e}");
}

#[test]
fn hostile_bogus_used_id() {
    hostile_device_breaks_cleanly(Hostile::BogusUsedId);
}

#[test]
fn hostile_len_beyond_buffer() {
    hostile_device_breaks_cleanly(Hostile::LenBeyondBuffer);
}

#[test]
fn hostile_duplicate_used() {
    hostile_device_breaks_cleanly(Hostile::DuplicateUsed);
}

#[test]
fn hostile_used_idx_jump() {
    hostile_device_breaks_cleanly(Hostile::UsedIdxJump);
}

#[test]
fn busy_poll_mode_echoes() {
    let (d, _host) = VsockDriver::open_sim(
        SimConfig {
            busy_poll: true,
            ..SimConfig::default()
        },
        DriverConfig {
            busy_poll: true,
            ..DriverConfig::default()
        },
    )
    .unwrap();
    let mut s = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
    for i in 0..1000u32 {
        s.write_all(&i.to_le_bytes()).unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), i);
    }
}

#[test]
fn bad_device_specs_fail_clearly() {
    let e = "vhost-vdpa:relative"
        .parse::<DeviceSpec>()
        .unwrap_err()
        .to_string();
    assert!(e.contains("absolute path"), "{e}");
    let e = VsockDriver::open(&"vfio:0000:03:00.0".parse().unwrap()).unwrap_err();
    assert!(format!("{e:#}").contains("device vfio:0000:03:00.0"), "{e}");
}

#[test]
fn bad_driver_config_is_refused_with_reason() {
    for (cfg, needle) in [
        (
            DriverConfig {
                rx_buf_size: 44,
                ..DriverConfig::default()
            },
            "rx_buf_size",
        ),
        (
            DriverConfig {
                tx_buf_size: 0,
                ..DriverConfig::default()
            },
            "tx_buf_size",
        ),
        (
            DriverConfig {
                queue_size: 100,
                ..DriverConfig::default()
            },
            "power of two",
        ),
    ] {
        let e = VsockDriver::open_sim(SimConfig::default(), cfg).unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
    }
}

#[test]
fn auto_without_devices_says_what_it_tried() {
    let candidates = vdpa_vsock::device::auto_candidates();
    if !candidates.is_empty() {
        eprintln!("skipped: this machine has vsock device candidates ({candidates:?}); auto is tested in the VM");
        return;
    }
    let e = VsockDriver::open(&DeviceSpec::Auto).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("no usable vsock device found"), "{msg}");
    assert!(msg.contains("no /dev/vhost-vsock"), "{msg}");
    assert!(msg.contains("--device sim"), "{msg}");
    assert_eq!(std::io::Error::from(e).kind(), ErrorKind::NotFound);
}

/// The sim's config interrupt: a new guest_cid reaches the driver through `config_fd`, resets the
/// open connection (an error, not a hang) and new connections use the new CID.
#[test]
fn guest_cid_change_resets_connections_and_moves_the_cid() {
    let (d, host) = sim_with_host();
    assert_eq!(d.local_cid(), 3);
    let mut old = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
    old.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    old.read_exact(&mut buf).unwrap();
    old.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    host.set_guest_cid(7).unwrap();
    let start = Instant::now();
    while d.local_cid() != 7 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the driver still has CID {} after 2 s",
            d.local_cid()
        );
        thread::sleep(Duration::from_millis(5));
    }
    let e = old.read(&mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    assert!(old.write_all(b"after").is_err());

    let mut new = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
    new.write_all(b"after").unwrap();
    let mut b5 = [0u8; 5];
    new.read_exact(&mut b5).unwrap();
    assert_eq!(&b5, b"after");
    // The host reaches the driver at its new CID.
    let l = d.listen(5000).unwrap();
    let mut from_host = host.connect(5000).unwrap();
    let (mut accepted, peer) = l.accept().unwrap();
    assert_eq!(peer.cid, 2);
    from_host.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    accepted.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"x");
}

/// A device that changes guest_cid to something no guest may have (2 is the host) is broken:
/// the driver stops with an error that says so, instead of taking the CID.
#[test]
fn guest_cid_change_to_a_reserved_cid_stops_the_driver() {
    let (d, host) = sim_with_host();
    host.set_guest_cid(2).unwrap();
    let start = Instant::now();
    let err = loop {
        match d.connect(VsockAddr::new(2, ECHO_PORT)) {
            Err(e) if e.to_string().contains("not a guest CID") => break e,
            r => {
                assert!(
                    start.elapsed() < Duration::from_secs(2),
                    "no clear error 2 s after guest_cid became 2: {r:?}"
                );
                thread::sleep(Duration::from_millis(5));
            }
        }
    };
    assert!(err.to_string().contains("from 3 to 2"), "{err}");
    assert_eq!(d.local_cid(), 3);
}

/// A device whose config says a CID no guest may have is refused at bring-up, with the reason.
#[test]
fn reserved_guest_cid_at_bring_up_is_refused() {
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 32] {
        let err = VsockDriver::open_sim(
            SimConfig {
                guest_cid: cid,
                ..SimConfig::default()
            },
            DriverConfig::default(),
        )
        .expect_err("a reserved guest_cid must be refused");
        let msg = format!(
            "{err}: {}",
            std::error::Error::source(&err)
                .map(|s| s.to_string())
                .unwrap_or_default()
        );
        assert!(msg.contains(&format!("guest_cid is {cid}")), "{msg}");
        assert!(msg.contains("not a guest CID"), "{msg}");
    }
}

#[test]
fn dropping_the_driver_sends_what_was_written_first() {
    // The host's small receive window keeps most of our send buffer waiting for credit when
    // the driver goes: only a drain that waits for the reader gets it there.
    let mut sim = SimConfig::default();
    sim.host.buf_alloc = 16 * 1024;
    let (d, host) = VsockDriver::open_sim(sim, DriverConfig::default()).expect("open sim");
    let l = host.listen(7100).unwrap();
    let data = pattern(71, 2 << 20);
    let want = checksum(&data, 0);
    let reader = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut got = Vec::with_capacity(2 << 20);
        let mut buf = vec![0u8; 1 << 16];
        // Read to the end: EOF after the driver's SHUTDOWN, or the reset of the device that
        // follows it (what arrived before is read first either way).
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    // A slow reader: the driver's send queue is still full when it is dropped.
                    thread::sleep(Duration::from_millis(1));
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!("host read: {e}"),
            }
        }
        got
    });
    let mut s = d.connect(VsockAddr::new(2, 7100)).unwrap();
    s.write_all(&data).unwrap();
    // Most of it is still queued in the driver (send buffer and TX pool) when both go.
    drop(s);
    let t0 = Instant::now();
    drop(d);
    assert!(
        t0.elapsed() < vdpa_vsock::driver::DEFAULT_DRAIN_TIMEOUT + Duration::from_secs(1),
        "the drain is bounded"
    );
    let got = reader.join().unwrap();
    assert_eq!(got.len(), data.len(), "every byte written arrived");
    assert_eq!(checksum(&got, 0), want);
}

#[test]
fn dropping_the_driver_is_bounded_when_a_peer_never_answers() {
    let (d, host) = sim_with_host();
    let l = host.listen(7200).unwrap();
    let s = d.connect(VsockAddr::new(2, 7200)).unwrap();
    let (_peer, _) = l.accept().unwrap();
    // The peer's unread data keeps it from answering our SHUTDOWN with RST.
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let _ = w.write(&vec![1u8; 1 << 20]);
    let t0 = Instant::now();
    drop(d);
    let took = t0.elapsed();
    assert!(
        took < vdpa_vsock::driver::DEFAULT_DRAIN_TIMEOUT + Duration::from_secs(1),
        "{took:?}"
    );
    // The stream outlived its driver: its calls fail clearly.
    let e = (&s).write(b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionAborted, "{e}");
}

#[test]
fn flush_returns_once_the_device_has_every_byte() {
    let mut sim = SimConfig::default();
    sim.host.buf_alloc = 64 * 1024;
    let (d, host) = VsockDriver::open_sim(sim, DriverConfig::default()).expect("open sim");
    let l = host.listen(7300).unwrap();
    let mut s = d.connect(VsockAddr::new(2, 7300)).unwrap();
    let (mut peer, _) = l.accept().unwrap();
    let data = pattern(73, 200 * 1024);
    s.write_all(&data).unwrap();
    // The peer reads nothing yet: its 64 KiB window holds the rest here.
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let e = s.flush().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    s.set_nonblocking(true).unwrap();
    assert_eq!(s.flush().unwrap_err().kind(), ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    let reader = thread::spawn(move || {
        let mut got = vec![0u8; 200 * 1024];
        peer.read_exact(&mut got).unwrap();
        (peer, got)
    });
    s.set_write_timeout(Some(STALL)).unwrap();
    s.flush().unwrap();
    // Every byte is past the device: the host endpoint has accepted all of it.
    assert_eq!(host.proto_stats().bytes_in, data.len() as u64);
    assert_eq!(
        d.stats().tx_chunks_in_use,
        0,
        "no payload left in the TX pool"
    );
    let (_peer, got) = reader.join().unwrap();
    assert_eq!(checksum(&got, 0), checksum(&data, 0));
}

#[test]
fn wanted_features_accept_every_socket_type_bit_offered() {
    use vdpa_vsock::driver::{stream_negotiated, wanted_features};
    const STREAM: u64 = 1 << vdpa_vsock::packet::VIRTIO_VSOCK_F_STREAM;
    const SEQ: u64 = 1 << vdpa_vsock::packet::VIRTIO_VSOCK_F_SEQPACKET;
    const NIS: u64 = 1 << vdpa_vsock::packet::VIRTIO_VSOCK_F_NO_IMPLIED_STREAM;
    const V1: u64 = 1 << vdpa_vsock::packet::VIRTIO_F_VERSION_1;
    for offered in [0, STREAM, SEQ, NIS, STREAM | SEQ, STREAM | NIS, SEQ | NIS] {
        let offered = offered | V1;
        assert_eq!(wanted_features(offered), offered, "{offered:#x}");
    }
    // virtio 1.2 5.10.3.1: streams unless NO_IMPLIED_STREAM is negotiated without STREAM.
    for (negotiated, streams) in [
        (0, true),
        (SEQ, true),
        (STREAM, true),
        (STREAM | NIS, true),
        (SEQ | NIS, false),
        (NIS, false),
    ] {
        assert_eq!(stream_negotiated(negotiated), streams, "{negotiated:#x}");
    }
}

#[test]
fn no_implied_stream_without_stream_leaves_only_seqpacket() {
    let (d, _host) = VsockDriver::open_sim(
        SimConfig {
            stream: false,
            no_implied_stream: true,
            ..SimConfig::default()
        },
        DriverConfig::default(),
    )
    .unwrap();
    let e = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("NO_IMPLIED_STREAM"), "{e}");
    assert_eq!(d.listen(5000).unwrap_err().kind(), ErrorKind::InvalidInput);
    let s = d
        .connect_seqpacket(VsockAddr::new(2, SEQPACKET_ECHO_PORT))
        .unwrap();
    s.send(b"still here").unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(s.recv(&mut buf).unwrap(), 10);
    // Without NO_IMPLIED_STREAM, streams are implied even when STREAM is not offered.
    let (d, _host) = VsockDriver::open_sim(
        SimConfig {
            stream: false,
            no_implied_stream: false,
            ..SimConfig::default()
        },
        DriverConfig::default(),
    )
    .unwrap();
    let mut s = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
    s.write_all(b"implied").unwrap();
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"implied");
}

#[test]
fn a_device_without_any_socket_type_is_refused_at_bring_up() {
    let e = VsockDriver::open_sim(
        SimConfig {
            stream: false,
            seqpacket: false,
            no_implied_stream: true,
            ..SimConfig::default()
        },
        DriverConfig::default(),
    )
    .unwrap_err();
    let mut chain = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        chain += &format!(": {c}");
        cause = c.source();
    }
    assert!(chain.contains("no socket type"), "{chain}");
}

#[test]
fn listen_any_port_hands_requests_over_unanswered() {
    let (d, host) = sim_with_host();
    let l = d.listen_any_port().unwrap();
    assert_eq!(l.port(), vdpa_vsock::packet::VMADDR_PORT_ANY);
    assert!(
        d.listen_any_port().is_err(),
        "one listener on every port at a time"
    );
    let host = Arc::new(host);
    let h = host.clone();
    let refused = thread::spawn(move || h.connect(6000).map(|_| ()).unwrap_err().kind());
    let (req, peer) = l.accept_request(Some(STALL)).unwrap();
    assert_eq!((req.local_port().unwrap(), peer.cid), (6000, 2));
    req.refuse();
    assert_eq!(refused.join().unwrap(), ErrorKind::ConnectionRefused);
    // Accepted: the host's connect completes and data flows.
    let h = host.clone();
    let accepted = thread::spawn(move || {
        let mut s = h.connect(6001).unwrap();
        s.write_all(b"via any port").unwrap();
    });
    let (req, _) = l.accept_request(Some(STALL)).unwrap();
    assert_eq!(req.local_port().unwrap(), 6001);
    let mut s = req.accept().unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"via any port");
    accepted.join().unwrap();
    // A plain listener on a port still takes precedence, and a plain listener refuses
    // accept_request.
    let own = d.listen(6002).unwrap();
    assert_eq!(
        own.accept_request(None).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    let h = host.clone();
    let t = thread::spawn(move || h.connect(6002).map(|_| ()));
    let (_s, _) = own.accept().unwrap();
    t.join().unwrap().unwrap();
}

/// Issue 14: a connect timeout of any length is honoured. The sim drops what is not addressed
/// to its host (CID 2), so a REQUEST to CID 5 is never answered: the connect must end with
/// TimedOut after the 5 s asked, not at the protocol's 2 s default.
#[test]
fn a_connect_with_a_5_s_timeout_waits_5_s() {
    const ASKED: Duration = Duration::from_secs(5);
    let (d, host) = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).unwrap();
    let t0 = Instant::now();
    let e = d
        .connect_timeout(VsockAddr::new(5, ECHO_PORT), ASKED)
        .expect_err("nobody answers at CID 5");
    let took = t0.elapsed();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(took >= ASKED, "gave up after {took:?}");
    assert!(took < ASKED + Duration::from_secs(2), "took {took:?}");
    assert!(
        host.stats().protocol_violations >= 1,
        "the REQUEST reached the host"
    );
    assert_eq!(d.proto_stats().connect_timeouts, 1);
}

/// `DriverStats::connections` counts the streams the driver holds: each one connected, and
/// none once they are closed and the peer is done with them.
#[test]
fn stats_count_the_connections_held() {
    let d = sim();
    assert_eq!(d.stats().connections, 0);
    let streams: Vec<_> = (0..10)
        .map(|_| d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap())
        .collect();
    assert_eq!(d.stats().connections, 10);
    drop(streams);
    let deadline = Instant::now() + STALL;
    while d.stats().connections > 0 {
        assert!(
            Instant::now() < deadline,
            "{} connections still held",
            d.stats().connections
        );
        thread::sleep(Duration::from_millis(1));
    }
}
