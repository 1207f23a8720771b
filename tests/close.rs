// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Closing a stream (issue 14, clean close): `SO_LINGER` as Linux's vsock has it, and an abort.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
use vdpa_vsock::sim::SimConfig;

const PORT: u32 = 6000;

#[test]
fn a_lingering_close_returns_once_the_peer_has_everything() {
    let (d, host) = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).unwrap();
    let l = host.listen(PORT).unwrap();
    let data = common::pattern(3, 64 * 1024);
    let got = Arc::new(AtomicUsize::new(0));
    let seen = got.clone();
    let want = common::checksum(&data, 0);
    const SLOW: Duration = Duration::from_millis(300);
    // When the reader starts its slow sleep: during our connect, before the drop's clock.
    let (slept, slept_at) = std::sync::mpsc::channel();
    let reader = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        // Slow to read: our SHUTDOWN finds data unread, so the answer (as Linux's) waits for
        // this side's close, and so must the lingering drop.
        slept.send(Instant::now()).unwrap();
        thread::sleep(SLOW);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        assert_eq!(common::checksum(&all, 0), want, "the host's bytes differ");
        seen.store(all.len(), Ordering::SeqCst);
        // Dropping `s` answers the driver's SHUTDOWN.
    });
    let mut s = d.connect(VsockAddr::new(2, PORT)).unwrap();
    s.write_all(&data).unwrap();
    s.set_linger(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(s.linger().unwrap(), Some(Duration::from_secs(5)));
    let t0 = Instant::now();
    drop(s);
    let returned = Instant::now();
    let took = returned - t0;
    assert_eq!(
        got.load(Ordering::SeqCst),
        data.len(),
        "the drop returned after {took:?}, before the peer had read everything and closed"
    );
    // The reader's sleep began before `t0` (it accepted during our connect): measured from
    // there, the drop outlasted it. (From `t0` it may be short of SLOW by the time the write
    // took: 299.35 ms under load once.)
    let slept_at = slept_at.recv().unwrap();
    assert!(
        returned >= slept_at + SLOW,
        "returned {:?} after the reader began its {SLOW:?} sleep",
        returned - slept_at
    );
    assert!(
        took < Duration::from_secs(5),
        "the linger ran out ({took:?})"
    );
    reader.join().unwrap();
}

#[test]
fn a_lingering_close_gives_up_after_its_time() {
    let (d, host) = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).unwrap();
    let l = host.listen(PORT).unwrap();
    let mut s = d.connect(VsockAddr::new(2, PORT)).unwrap();
    // The host accepts and never reads: with data unread it does not answer the SHUTDOWN.
    let (_held, _) = l.accept().unwrap();
    s.write_all(&[7u8; 1024]).unwrap();
    let linger = Duration::from_millis(300);
    s.set_linger(Some(linger)).unwrap();
    let t0 = Instant::now();
    drop(s);
    let took = t0.elapsed();
    assert!(took >= linger, "returned after {took:?}, before the linger");
    // Well before the protocol's own 8 s linger would have ended it.
    assert!(took < Duration::from_secs(5), "returned after {took:?}");
}

#[test]
fn without_a_linger_the_drop_returns_at_once() {
    let (d, host) = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).unwrap();
    let l = host.listen(PORT).unwrap();
    let mut s = d.connect(VsockAddr::new(2, PORT)).unwrap();
    let (_held, _) = l.accept().unwrap();
    s.write_all(&[7u8; 1024]).unwrap();
    let t0 = Instant::now();
    drop(s);
    assert!(
        t0.elapsed() < Duration::from_millis(200),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn abort_resets_both_ends() {
    let (d, host) = VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).unwrap();
    let l = host.listen(PORT).unwrap();
    let mut s = d.connect(VsockAddr::new(2, PORT)).unwrap();
    let (mut peer, _) = l.accept().unwrap();
    peer.write_all(b"unread").unwrap();
    s.abort().unwrap();
    let mut b = [0u8; 16];
    let e = s.read(&mut b).expect_err("read after abort");
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    let e = s.write(b"x").expect_err("write after abort");
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let e = peer
        .read(&mut b)
        .expect_err("the peer's read after our RST");
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
}
