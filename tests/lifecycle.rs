// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device's lifecycle over the simulated device (issue 14): TRANSPORT_RESET on the event
//! queue, recovery after NEEDS_RESET and after a device that broke the rules, and a surprise
//! removal. The same on real kernels is in `tests/vm/` (`vdpa_transport_reset`,
//! `vdpa_needs_reset_recovery`, `*_surprise_removal`).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver, VsockStream};
use vdpa_vsock::sim::{Hostile, SimConfig, SimHost, ECHO_PORT};

/// How soon a lifecycle event must end every blocked call (issue 14: within one second).
const BOUND: Duration = Duration::from_secs(1);

/// An error and its causes, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut c = e.source();
    while let Some(x) = c {
        s.push_str(": ");
        s.push_str(&x.to_string());
        c = x.source();
    }
    s
}

fn open(sim: SimConfig, cfg: DriverConfig) -> (VsockDriver, SimHost) {
    VsockDriver::open_sim(sim, cfg).expect("open sim")
}

/// Echo 1 MiB over a new connection and check it comes back intact.
#[track_caller]
fn echo_1mib(d: &VsockDriver) {
    let mut s = d
        .connect_timeout(VsockAddr::new(2, ECHO_PORT), Duration::from_secs(10))
        .expect("a new connection after the event");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let data = common::pattern(7, 1 << 20);
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = thread::spawn(move || w.write_all(&sent));
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).expect("echo of 1 MiB");
    writer.join().unwrap().expect("write 1 MiB");
    assert_eq!(
        common::checksum(&back, 0),
        common::checksum(&data, 0),
        "the echo differs"
    );
}

/// A connection to the echo service with a thread blocked reading it (nothing was written, so
/// nothing comes back). The receiver gets the read's result and when it ended.
fn blocked_reader(
    d: &VsockDriver,
) -> (
    VsockStream,
    mpsc::Receiver<(std::io::Result<usize>, Instant)>,
) {
    let s = d
        .connect_timeout(VsockAddr::new(2, ECHO_PORT), Duration::from_secs(10))
        .expect("connect");
    let mut r = s.try_clone().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        let res = r.read(&mut buf);
        let _ = tx.send((res, Instant::now()));
    });
    // The reader is blocked (or about to be): either way its read must end after the event.
    thread::sleep(Duration::from_millis(50));
    (s, rx)
}

/// Wait for the blocked read's end; it must come within [`BOUND`] of `t0` with an error.
#[track_caller]
fn ended_with(
    rx: &mpsc::Receiver<(std::io::Result<usize>, Instant)>,
    t0: Instant,
) -> std::io::Error {
    let (res, at) = rx
        .recv_timeout(BOUND * 5)
        .expect("the blocked read never ended");
    let took = at.saturating_duration_since(t0);
    assert!(took <= BOUND, "the blocked read ended after {took:?}");
    res.expect_err("the blocked read returned data after the event")
}

#[test]
fn transport_reset_ends_connections_and_keeps_listeners() {
    let (d, host) = open(SimConfig::default(), DriverConfig::default());
    let listener = d.listen(5000).unwrap();
    let (s, rx) = blocked_reader(&d);
    let t0 = Instant::now();
    host.transport_reset().expect("send TRANSPORT_RESET");
    let e = ended_with(&rx, t0);
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    // The error says why.
    assert!(e.to_string().contains("sim sent TRANSPORT_RESET"), "{e}");
    // Writes on the old connection fail too.
    let e = (&s).write(b"x").expect_err("write after the reset");
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    assert_eq!(d.stats().transport_resets, 1);
    // The listener stayed: the host can connect to it and the driver accepts.
    let mut from_host = host
        .connect(5000)
        .expect("host connects to the kept listener");
    let (mut accepted, _) = listener.accept().expect("accept after the reset");
    from_host.write_all(b"hello").unwrap();
    let mut b = [0u8; 5];
    accepted.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    echo_1mib(&d);
    // The event buffer went back on the ring: a second reset arrives too.
    let (_s2, rx2) = blocked_reader(&d);
    let t1 = Instant::now();
    host.transport_reset().expect("a second TRANSPORT_RESET");
    assert_eq!(ended_with(&rx2, t1).kind(), ErrorKind::ConnectionReset);
    assert_eq!(d.stats().transport_resets, 2);
    assert_eq!(
        d.stats().recoveries,
        0,
        "a transport reset is not a recovery"
    );
    echo_1mib(&d);
}

#[test]
fn transport_reset_needs_an_event_queue() {
    let (d, host) = open(
        SimConfig {
            event_queue: false,
            ..SimConfig::default()
        },
        DriverConfig::default(),
    );
    let e = host
        .transport_reset()
        .expect_err("no event queue to send on");
    assert!(e.to_string().contains("no event queue"), "{e}");
    echo_1mib(&d);
}

#[test]
fn needs_reset_is_recovered_from() {
    let (d, host) = open(SimConfig::default(), DriverConfig::default());
    let listener = d.listen(5001).unwrap();
    let (_s, rx) = blocked_reader(&d);
    let t0 = Instant::now();
    host.set_needs_reset().expect("NEEDS_RESET");
    let e = ended_with(&rx, t0);
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    assert!(
        e.to_string().contains("was reset and brought up again"),
        "{e}"
    );
    assert!(
        chain(&e).contains("needs a reset (status"),
        "the cause is not in the chain: {}",
        chain(&e)
    );
    // The driver recovered on its own: same listener, new connections work.
    assert_eq!(d.stats().recoveries, 1);
    let _from_host = host
        .connect(5001)
        .expect("host connects to the kept listener");
    listener.accept().expect("accept after the recovery");
    echo_1mib(&d);
}

#[test]
fn a_device_that_breaks_the_rules_is_reset_and_brought_back() {
    // The hostile device writes one bogus used element (then behaves).
    let (d, _host) = open(
        SimConfig {
            hostile: Some(Hostile::BogusUsedId),
            ..SimConfig::default()
        },
        DriverConfig::default(),
    );
    let t0 = Instant::now();
    let e = d
        .connect_timeout(VsockAddr::new(2, ECHO_PORT), Duration::from_secs(30))
        .expect_err("the connect in flight when the device broke");
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    assert!(chain(&e).contains("rx queue"), "{}", chain(&e));
    assert!(t0.elapsed() < BOUND, "noticed after {:?}", t0.elapsed());
    assert_eq!(d.stats().recoveries, 1);
    echo_1mib(&d);
}

#[test]
fn a_device_that_keeps_failing_is_given_up_on() {
    let (d, host) = open(
        SimConfig::default(),
        DriverConfig {
            recovery_limit: 2,
            ..DriverConfig::default()
        },
    );
    for round in 1..=2 {
        host.set_needs_reset().unwrap();
        let t0 = Instant::now();
        while d.stats().recoveries < round {
            assert!(t0.elapsed() < BOUND, "recovery {round} did not happen");
            thread::sleep(Duration::from_millis(5));
        }
        echo_1mib(&d);
    }
    // The third within the minute is beyond the limit: the driver ends for good.
    let (_s, rx) = blocked_reader(&d);
    let t0 = Instant::now();
    host.set_needs_reset().unwrap();
    let e = ended_with(&rx, t0);
    assert_eq!(e.kind(), ErrorKind::ConnectionAborted, "{e}");
    let e = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionAborted, "{e}");
    assert!(e.to_string().contains("needs a reset"), "{e}");
}

#[test]
fn a_removed_device_ends_every_blocked_call_within_a_second() {
    let (d, host) = open(SimConfig::default(), DriverConfig::default());
    let (_s, rx) = blocked_reader(&d);
    // A connection whose peer is the host: the host must learn it ended.
    let host_listener = host.listen(5003).unwrap();
    let _ours = d.connect(VsockAddr::new(2, 5003)).unwrap();
    let (mut peer, _) = host_listener.accept().unwrap();
    peer.set_read_timeout(Some(BOUND * 5)).unwrap();
    let listener = d.listen(5002).unwrap();
    let (atx, arx) = mpsc::channel();
    thread::spawn(move || {
        let r = listener.accept().map(|_| ());
        let _ = atx.send((r, Instant::now()));
    });
    thread::sleep(Duration::from_millis(50));
    let host_in = host.proto_stats().packets_in;
    let t0 = Instant::now();
    host.unplug().unwrap();
    let e = ended_with(&rx, t0);
    assert_eq!(e.kind(), ErrorKind::ConnectionAborted, "{e}");
    let (r, at) = arx.recv_timeout(BOUND * 5).expect("accept never ended");
    assert!(at.saturating_duration_since(t0) <= BOUND);
    let e = r.expect_err("accept after the removal");
    assert_eq!(e.kind(), ErrorKind::ConnectionAborted, "{e}");
    let e = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap_err();
    assert!(e.to_string().contains("removed"), "{e}");
    // The driver told the peers while the device still carried packets: an RST for each of
    // the two connections reached the host before the device was reset.
    assert!(
        host.proto_stats().packets_in >= host_in + 2,
        "{} packets reached the host after the removal",
        host.proto_stats().packets_in - host_in
    );
    let e = peer
        .read(&mut [0u8; 8])
        .expect_err("the host's end after the removal");
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    // Nothing is brought back, and the driver drops at once.
    assert_eq!(d.stats().recoveries, 0);
    let t1 = Instant::now();
    drop(d);
    assert!(t1.elapsed() < BOUND, "drop took {:?}", t1.elapsed());
}

/// The line the CLI prints for a call that failed with `e` (src/main.rs: `vdpa-vsock: error:`,
/// then anyhow's `{:#}` of the error under the context that names the call).
fn cli_error_line(e: std::io::Error, context: &'static str) -> String {
    format!(
        "vdpa-vsock: error: {:#}",
        anyhow::Error::new(e).context(context)
    )
}

#[test]
fn a_removal_is_named_once_in_the_clis_error_line() {
    let (d, host) = open(SimConfig::default(), DriverConfig::default());
    let (_s, rx) = blocked_reader(&d);
    let t0 = Instant::now();
    host.unplug().unwrap();
    // The blocked call (`vdpa-vsock connect` reading when the device goes) and a later one.
    let read = ended_with(&rx, t0);
    let connect = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap_err();
    for (e, context) in [
        (read, "reading from the vsock stream"),
        (connect, "connecting to 2:7"),
    ] {
        assert_eq!(e.kind(), ErrorKind::ConnectionAborted, "{e}");
        let line = cli_error_line(e, context);
        assert_eq!(line.matches("removed").count(), 1, "{line}");
        assert!(
            line.contains(&format!(
                "{context}: vsock device failed: sim was removed: the kernel asked for it back"
            )),
            "{line}"
        );
    }
}
