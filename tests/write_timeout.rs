//! A blocking stream write that times out must say how much of the buffer it queued: the
//! `std::io::Write::write` contract is "Ok(n): n bytes were written; an error: none were".
//! Found while writing the `runtime` fuzz target (see tests/README.md, "Fuzzing").

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
use vdpa_vsock::proto;
use vdpa_vsock::sim::SimConfig;

const PORT: u32 = 5000;
const WINDOW: u32 = 4096;

/// The host accepts but does not read, with a small receive window, and our send buffer is
/// small: a write of four windows queues some of its bytes, then runs out of room and time.
/// Whatever `write` answers, the peer must then receive exactly the bytes it reported.
#[test]
fn regression_timed_out_write_reports_the_bytes_it_queued() {
    let (driver, host) = VsockDriver::open_sim(
        SimConfig {
            host: proto::Config {
                buf_alloc: WINDOW,
                ..proto::Config::default()
            },
            ..SimConfig::default()
        },
        DriverConfig {
            proto: proto::Config {
                send_buffer: WINDOW as usize,
                ..proto::Config::default()
            },
            ..DriverConfig::default()
        },
    )
    .unwrap();
    let listener = host.listen(PORT).unwrap();
    let mut ours = driver
        .connect_timeout(VsockAddr::new(2, PORT), Duration::from_secs(5))
        .unwrap();
    let (mut theirs, _) = listener
        .accept_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    ours.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    let data = vec![0x5a; 4 * WINDOW as usize];
    let reported = match ours.write(&data) {
        Ok(n) => n,
        Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => 0,
        Err(e) => panic!("unexpected error: {e}"),
    };

    // Now drain the peer: it may get only what `write` reported.
    theirs
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; data.len()];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        match theirs.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => break,
            Err(e) => panic!("host read: {e}"),
        }
    }
    assert_eq!(
        got, reported,
        "write reported {reported} bytes queued, the peer received {got}"
    );
}
