//! Per-socket receive buffer sizes (`SO_VM_SOCKETS_BUFFER_SIZE`, `_MIN_SIZE`, `_MAX_SIZE`)
//! over the sim device: the driver's sockets read, the sim host (CID 2) writes as fast as the
//! credit lets it, and the bytes that arrive unread are exactly the buffer size.
#![allow(clippy::cast_possible_truncation)] // Test sizes are small and known.

mod common;
use common::{checksum, pattern};

use std::io::{ErrorKind, Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use vdpa_vsock::driver::{DriverConfig, VsockDriver, VsockListener, VsockStream};
use vdpa_vsock::sim::{SimConfig, SimHost};

/// Longest a wait may take before the test fails.
const STALL: Duration = Duration::from_secs(60);

fn sim_with_host() -> (VsockDriver, SimHost) {
    VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).expect("open sim")
}

/// Wait until `cond` holds (it reads counters that no event announces), failing after
/// [`STALL`].
#[track_caller]
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + STALL;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// The host connects to `l` (a driver listener on `port`) and writes `data` from a thread,
/// then shuts its write side down (our reader sees EOF after the last byte); returns the
/// accepted driver stream and the writer, whose join gives back the host's stream. The host
/// does not close it while we read: a close starts its linger timer, and a reader slower than
/// that (a loaded machine, a sanitizer) would be reset, as Linux resets it.
fn host_writes(
    host: &SimHost,
    l: &VsockListener,
    port: u32,
    data: Vec<u8>,
) -> (VsockStream, thread::JoinHandle<VsockStream>) {
    let mut w = host.connect(port).unwrap();
    let (s, _) = l.accept().unwrap();
    let writer = thread::spawn(move || {
        w.set_write_timeout(Some(STALL)).unwrap();
        w.write_all(&data).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
        w
    });
    (s, writer)
}

/// The writer has sent all the credit allows and heard back that there is no more: it asked
/// for credit (`CREDIT_REQUEST`, sent only at zero credit) and our answer came back (each
/// `CREDIT_UPDATE` it counts). `updates` is how many updates it must have had by then.
#[track_caller]
fn wait_until_the_writer_is_stalled(d: &VsockDriver, host: &SimHost, updates: u64) {
    wait_for("the writer to stall on zero credit", || {
        d.proto_stats().credit_requests_in >= 1 && host.proto_stats().credit_updates_in >= updates
    });
}

/// Bytes buffered unread on `s` (a non-blocking peek of up to 16 MiB).
fn buffered(s: &VsockStream) -> usize {
    peek_into(s, &mut vec![0u8; 16 << 20])
}

/// Bytes buffered unread on `s`, up to `buf.len()` (a non-blocking peek into `buf`).
fn peek_into(s: &VsockStream, buf: &mut [u8]) -> usize {
    s.set_nonblocking(true).unwrap();
    let n = match s.peek(buf) {
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
        Err(e) => panic!("peek: {e}"),
    };
    s.set_nonblocking(false).unwrap();
    n
}

/// Read `s` to the end in `chunk`-byte reads, checking before each that no more than `limit`
/// bytes are buffered; returns what came.
fn read_slowly(s: &mut VsockStream, chunk: usize, limit: usize) -> Vec<u8> {
    s.set_read_timeout(Some(STALL)).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; chunk];
    // One byte more than the limit tells an overrun; allocated once, not per read.
    let mut peeked = vec![0u8; limit + 1];
    loop {
        let queued = peek_into(s, &mut peeked);
        assert!(
            queued <= limit,
            "{queued} bytes buffered, the buffer is {limit}"
        );
        match s.read(&mut buf).unwrap() {
            0 => return got,
            n => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn a_small_buffer_makes_a_fast_writer_wait_for_the_slow_reader() {
    let (d, host) = sim_with_host();
    let l = d.listen(5001).unwrap();
    l.set_buffer_size(4096).unwrap();
    assert_eq!(l.buffer_size().unwrap(), 4096);
    let data = pattern(1, 1 << 20);
    let want = checksum(&data, 0);
    let (mut s, writer) = host_writes(&host, &l, 5001, data);
    assert_eq!(
        s.buffer_size().unwrap(),
        4096,
        "inherited from the listener"
    );
    // Nothing read: exactly the 4 KiB the credit allows arrived, and the writer waits.
    wait_until_the_writer_is_stalled(&d, &host, 1);
    assert_eq!(d.proto_stats().bytes_in, 4096);
    assert_eq!(buffered(&s), 4096);
    // The slow reader: never more than 4 KiB buffered, every byte arrives.
    let got = read_slowly(&mut s, 1000, 4096);
    writer.join().unwrap();
    assert_eq!(got.len(), 1 << 20);
    assert_eq!(checksum(&got, 0), want);
    assert_eq!(host.proto_stats().credit_violations, 0);
    assert_eq!(d.proto_stats().credit_violations, 0);
}

#[test]
fn a_large_buffer_lets_more_through_in_flight() {
    let (d, host) = sim_with_host();
    let l = d.listen(5002).unwrap();
    l.set_buffer_max_size(4 << 20).unwrap();
    l.set_buffer_size(4 << 20).unwrap();
    let data = pattern(2, 6 << 20);
    let want = checksum(&data, 0);
    let (mut s, writer) = host_writes(&host, &l, 5002, data);
    wait_until_the_writer_is_stalled(&d, &host, 1);
    assert_eq!(
        d.proto_stats().bytes_in,
        4 << 20,
        "16 times the default in flight"
    );
    assert_eq!(buffered(&s), 4 << 20);
    let got = read_slowly(&mut s, 1 << 16, 4 << 20);
    writer.join().unwrap();
    assert_eq!(checksum(&got, 0), want);
    assert_eq!(d.proto_stats().credit_violations, 0);
}

#[test]
fn growing_a_live_buffer_lets_a_blocked_writer_go_on_without_a_read() {
    let (d, host) = sim_with_host();
    let l = d.listen(5003).unwrap();
    let data = pattern(3, 2 << 20);
    let want = checksum(&data, 0);
    let (mut s, writer) = host_writes(&host, &l, 5003, data);
    assert_eq!(s.buffer_size().unwrap(), 256 * 1024, "Linux's default");
    wait_until_the_writer_is_stalled(&d, &host, 1);
    assert_eq!(d.proto_stats().bytes_in, 256 * 1024);
    // Above the max: clamped, as Linux clamps; nothing changes.
    s.set_buffer_size(1 << 20).unwrap();
    assert_eq!(s.buffer_size().unwrap(), 256 * 1024);
    // Raise the max, then the size: a CREDIT_UPDATE lets the writer fill the new 1 MiB.
    s.set_buffer_max_size(1 << 20).unwrap();
    s.set_buffer_size(1 << 20).unwrap();
    assert_eq!(s.buffer_size().unwrap(), 1 << 20);
    wait_for("the bytes of the larger window", || {
        d.proto_stats().bytes_in == 1 << 20
    });
    // The writer stalls again at exactly the new size (our third update answers its second
    // request).
    wait_for("the writer to stall again", || {
        d.proto_stats().credit_requests_in >= 2 && host.proto_stats().credit_updates_in >= 3
    });
    assert_eq!(d.proto_stats().bytes_in, 1 << 20);
    assert_eq!(buffered(&s), 1 << 20);
    let got = read_slowly(&mut s, 1 << 16, 1 << 20);
    writer.join().unwrap();
    assert_eq!(checksum(&got, 0), want);
}

#[test]
fn shrinking_a_live_buffer_with_data_queued_loses_nothing() {
    let (d, host) = sim_with_host();
    let l = d.listen(5004).unwrap();
    let data = pattern(4, 1 << 20);
    let want = checksum(&data, 0);
    let (mut s, writer) = host_writes(&host, &l, 5004, data);
    wait_until_the_writer_is_stalled(&d, &host, 1);
    assert_eq!(buffered(&s), 256 * 1024);
    s.set_buffer_size(4096).unwrap();
    assert_eq!(s.buffer_size().unwrap(), 4096);
    // What was granted drains first; after it, never more than the new 4 KiB.
    let mut first = vec![0u8; 256 * 1024];
    s.read_exact(&mut first).unwrap();
    let mut rest = read_slowly(&mut s, 1000, 4096);
    writer.join().unwrap();
    first.append(&mut rest);
    assert_eq!(checksum(&first, 0), want);
    assert_eq!(d.proto_stats().credit_violations, 0);
    assert_eq!(host.proto_stats().credit_violations, 0);
}

#[test]
fn values_are_clamped_as_linux_does_and_a_low_water_mark_above_the_buffer_is_refused() {
    let (d, host) = sim_with_host();
    let l = d.listen(5005).unwrap();
    let _w = host.connect(5005).unwrap();
    let (s, _) = l.accept().unwrap();
    assert_eq!(
        (
            s.buffer_size().unwrap(),
            s.buffer_min_size().unwrap(),
            s.buffer_max_size().unwrap()
        ),
        (256 * 1024, 128, 256 * 1024)
    );
    s.set_buffer_size(1).unwrap();
    assert_eq!(s.buffer_size().unwrap(), 128, "raised to the min");
    s.set_buffer_max_size(1000).unwrap();
    s.set_buffer_min_size(2000).unwrap();
    assert_eq!(s.buffer_size().unwrap(), 1000, "min > max: max wins");
    s.set_buffer_min_size(0).unwrap();
    s.set_buffer_max_size(u64::MAX).unwrap();
    s.set_buffer_size(u64::MAX).unwrap();
    assert_eq!(
        s.buffer_size().unwrap(),
        u64::from(u32::MAX),
        "the header's width"
    );
    // SO_RCVLOWAT is bounded by this connection's buffer, not the driver's default.
    s.set_buffer_size(4096).unwrap();
    let e = s.set_recv_low_water(4097).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    s.set_recv_low_water(4096).unwrap();
    s.set_buffer_max_size(1 << 20).unwrap();
    s.set_buffer_size(1 << 20).unwrap();
    s.set_recv_low_water(300_000).unwrap();
    // The listener's own settings are separate from its connections'.
    assert_eq!(l.buffer_size().unwrap(), 256 * 1024);
}

#[cfg(feature = "tokio")]
#[test]
fn seqpacket_and_tokio_sockets_have_the_same_calls() {
    let (d, host) = sim_with_host();
    // SEQPACKET: inherited from the listener as streams are.
    let l = d.listen_seqpacket(5006).unwrap();
    l.set_buffer_size(8192).unwrap();
    let _peer = host.connect_seqpacket(5006).unwrap();
    let (sp, _) = l.accept_seqpacket().unwrap();
    assert_eq!(sp.buffer_size().unwrap(), 8192);
    sp.set_buffer_min_size(10_000).unwrap();
    assert_eq!(sp.buffer_size().unwrap(), 10_000);
    assert_eq!(sp.buffer_min_size().unwrap(), 10_000);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use vdpa_vsock::tokio::{VsockAddr, VsockListener, VMADDR_CID_ANY};
        let l = VsockListener::bind(&d, VsockAddr::new(VMADDR_CID_ANY, 5007)).unwrap();
        l.set_buffer_max_size(512 * 1024).unwrap();
        l.set_buffer_size(512 * 1024).unwrap();
        assert_eq!(l.buffer_max_size().unwrap(), 512 * 1024);
        let host_side = thread::spawn(move || host.connect(5007).unwrap());
        let (s, _) = tokio::time::timeout(STALL, l.accept())
            .await
            .unwrap()
            .unwrap();
        let _host_stream = host_side.join().unwrap();
        assert_eq!(s.buffer_size().unwrap(), 512 * 1024);
        s.set_buffer_size(4096).unwrap();
        assert_eq!(s.buffer_size().unwrap(), 4096);
        assert_eq!(s.buffer_min_size().unwrap(), 128);
    });
}
