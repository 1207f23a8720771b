//! The one-copy data path over the sim device, through the public API: the copy counters, a
//! stalled reader beside busy connections, and threads on separate connections at once.
#![allow(clippy::cast_possible_truncation)] // Test sizes and counters are small and known.

mod common;
use common::{checksum, pattern};

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
use vdpa_vsock::sim::{SimConfig, SimHost, DISCARD_PORT, ECHO_PORT};

fn open() -> (VsockDriver, SimHost) {
    VsockDriver::open_sim(SimConfig::default(), DriverConfig::default()).expect("open sim")
}

/// Wait (bounded) until the sim's discard service has seen `total` bytes.
#[track_caller]
fn wait_discarded(host: &SimHost, total: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while host.stats().discarded_bytes < total {
        assert!(
            Instant::now() < deadline,
            "discard saw {} of {total} bytes",
            host.stats().discarded_bytes
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// 64 MiB each way: every payload byte is copied exactly once on the driver side, caller to DMA
/// on TX and DMA to caller on RX (read from the driver's own counters).
///
/// The sizes make the packets deterministic: the host writes 64 KiB at a time into a 256 KiB
/// send buffer and we read 64 KiB at a time against a 256 KiB `buf_alloc`, so every credit
/// window and so every packet is a whole 64 KiB. No packet is small enough to be merged
/// (GOOD_COPY_LEN), and the connection never holds more than four buffers (its share of the
/// pool is larger), so nothing is copied out of DMA memory before the reader's copy.
#[test]
fn each_payload_byte_is_copied_once_per_direction() {
    const TOTAL: usize = 64 << 20;
    const WRITE: usize = 64 << 10;
    let (driver, host) = open();
    let data = pattern(7, 1 << 20);
    let before = driver.stats();

    // TX: to the discard service.
    let mut s = driver.connect(VsockAddr::new(2, DISCARD_PORT)).unwrap();
    for i in 0..TOTAL / WRITE {
        let off = (i * WRITE) % data.len();
        s.write_all(&data[off..off + WRITE]).unwrap();
    }
    wait_discarded(&host, TOTAL as u64);
    // And none on the sim's side: the discard service's connection is a sink, every byte
    // consumed where the driver put it (issue 12: the sim must not be the bench's bottleneck).
    assert_eq!(host.proto_stats().bytes_sunk, TOTAL as u64);

    // RX: the host writes to our listener.
    let l = driver.listen(6000).unwrap();
    let sender = {
        let data = data.clone();
        thread::spawn(move || {
            let mut h = host.connect(6000).unwrap();
            for i in 0..TOTAL / WRITE {
                let off = (i * WRITE) % data.len();
                h.write_all(&data[off..off + WRITE]).unwrap();
            }
            h
        })
    };
    let (mut r, _) = l.accept().unwrap();
    let mut buf = vec![0u8; WRITE];
    let (mut got, mut sum) = (0usize, 0xcbf2_9ce4_8422_2325u64);
    while got < TOTAL {
        let n = r.read(&mut buf).unwrap();
        assert!(n > 0, "EOF after {got} bytes");
        sum = checksum(&buf[..n], sum);
        got += n;
    }
    let mut want = 0xcbf2_9ce4_8422_2325u64;
    for i in 0..TOTAL / WRITE {
        let off = (i * WRITE) % data.len();
        want = checksum(&data[off..off + WRITE], want);
    }
    assert_eq!(sum, want, "received bytes differ from those sent");
    drop(sender.join().unwrap());

    let after = driver.stats();
    let tx = after.tx_payload_bytes_copied - before.tx_payload_bytes_copied;
    let rx = after.rx_payload_bytes_copied - before.rx_payload_bytes_copied;
    let extra = after.rx_payload_bytes_copied_out - before.rx_payload_bytes_copied_out;
    assert_eq!(tx, TOTAL as u64, "TX: bytes copied by the driver");
    assert_eq!(rx, TOTAL as u64, "RX: bytes copied into callers");
    assert_eq!(
        extra, 0,
        "RX: bytes copied out of DMA memory before the reader's copy"
    );
    assert!(after.tx_packets >= (TOTAL / WRITE) as u64);
}

/// One connection whose reader never reads while 50 others each move 1 MiB through the echo
/// service: the 50 finish (the stalled one cannot starve the RX ring), and the stalled one's
/// data is intact when it is finally read.
#[test]
fn a_stalled_reader_does_not_stop_the_others() {
    const EACH: usize = 1 << 20;
    let (driver, host) = open();
    let l = driver.listen(6001).unwrap();
    let stalled_data = pattern(99, 1 << 20);
    let feeder = {
        let data = stalled_data.clone();
        thread::spawn(move || {
            let mut h = host.connect(6001).unwrap();
            // Blocks once our credit is used up; finishes when we read below.
            h.write_all(&data).unwrap();
            h
        })
    };
    let (mut stalled, _) = l.accept().unwrap();
    // Let the feeder fill the stalled connection's credit.
    thread::sleep(Duration::from_millis(50));

    let driver = std::sync::Arc::new(driver);
    let movers: Vec<_> = (0..50u64)
        .map(|i| {
            let d = driver.clone();
            thread::spawn(move || {
                let s = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
                let mut r = s.try_clone().unwrap();
                let data = pattern(i, EACH);
                let want = checksum(&data, 0);
                let w = thread::spawn(move || {
                    let mut s = s;
                    for c in data.chunks(16 << 10) {
                        s.write_all(c).unwrap();
                    }
                    s
                });
                let mut buf = vec![0u8; 32 << 10];
                let (mut got, mut sum) = (0, 0);
                while got < EACH {
                    let n = r.read(&mut buf).unwrap();
                    assert!(n > 0);
                    sum = checksum(&buf[..n], sum);
                    got += n;
                }
                drop(w.join().unwrap());
                assert_eq!(sum, want, "mover {i}: bytes differ");
            })
        })
        .collect();
    for m in movers {
        m.join().expect("a mover failed");
    }

    let mut got = Vec::with_capacity(stalled_data.len());
    let mut buf = vec![0u8; 64 << 10];
    while got.len() < stalled_data.len() {
        let n = stalled.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got == stalled_data, "the stalled connection's data differ");
    drop(feeder.join().unwrap());
    assert_eq!(driver.proto_stats().credit_violations, 0);
}

/// Eight threads on eight connections at once each move 8 MiB through the echo service; every
/// one finishes with its bytes intact, and the aggregate rate is printed.
#[test]
fn eight_threads_on_eight_connections() {
    const EACH: usize = 8 << 20;
    let (driver, _host) = open();
    let driver = std::sync::Arc::new(driver);
    let start = Instant::now();
    let threads: Vec<_> = (0..8u64)
        .map(|i| {
            let d = driver.clone();
            thread::spawn(move || {
                let s = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
                let mut r = s.try_clone().unwrap();
                let data = pattern(1000 + i, 1 << 20);
                let want = (0..EACH / data.len()).fold(0, |h, _| checksum(&data, h));
                let w = thread::spawn(move || {
                    let mut s = s;
                    for _ in 0..EACH / data.len() {
                        s.write_all(&data).unwrap();
                    }
                    s
                });
                let mut buf = vec![0u8; 64 << 10];
                let (mut got, mut sum) = (0, 0);
                while got < EACH {
                    let n = r.read(&mut buf).unwrap();
                    assert!(n > 0);
                    sum = checksum(&buf[..n], sum);
                    got += n;
                }
                drop(w.join().unwrap());
                assert_eq!(sum, want, "thread {i}: bytes differ");
                start.elapsed()
            })
        })
        .collect();
    let times: Vec<Duration> = threads
        .into_iter()
        .map(|t| t.join().expect("a thread failed"))
        .collect();
    let wall = start.elapsed();
    eprintln!(
        "8 connections x {} MiB echoed in {:.2?} (aggregate {:.2} Gbit/s each way); per thread: {:?}",
        EACH >> 20,
        wall,
        (8 * EACH) as f64 * 8.0 / wall.as_secs_f64() / 1e9,
        times
    );
}

/// Vectored writes and reads over the echo service: every byte back, in order.
#[test]
fn vectored_write_and_read_round_trip() {
    use std::io::{IoSlice, IoSliceMut};
    let (driver, _host) = open();
    let mut s = driver.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
    let parts: Vec<Vec<u8>> = (0..5u64)
        .map(|i| pattern(i, 10_000 + 3_000 * i as usize))
        .collect();
    let total: usize = parts.iter().map(Vec::len).sum();
    let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    assert_eq!(s.write_vectored(&slices).unwrap(), total);
    let want: Vec<u8> = parts.concat();
    let mut got = Vec::new();
    let (mut a, mut b) = (vec![0u8; 7_000], vec![0u8; 9_000]);
    while got.len() < total {
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        let n = s.read_vectored(&mut bufs).unwrap();
        assert!(n > 0, "EOF after {} bytes", got.len());
        let from_a = n.min(a.len());
        got.extend_from_slice(&a[..from_a]);
        got.extend_from_slice(&b[..n - from_a]);
    }
    assert!(got == want, "vectored round trip differs");
}

/// Zero-copy both ways: `send_with` fills DMA memory in place and `recv_with` reads the
/// payload where the device wrote it; the driver's copy counters do not move, and every byte
/// arrives intact.
#[test]
fn zero_copy_send_and_receive_copy_nothing() {
    const TOTAL: usize = 8 << 20;
    let (driver, host) = open();
    let data = pattern(5, TOTAL);
    let before = driver.stats();

    let mut s = driver.connect(VsockAddr::new(2, DISCARD_PORT)).unwrap();
    let mut sent = 0;
    while sent < TOTAL {
        let want = (TOTAL - sent).min(100_000);
        sent += s
            .send_with(want, |bufs| {
                let mut n = 0;
                for b in bufs {
                    let len = b.len().min(want - n);
                    b.copy_from(&data[sent + n..sent + n + len]);
                    n += len;
                }
                n
            })
            .unwrap();
    }
    wait_discarded(&host, TOTAL as u64);

    let l = driver.listen(6002).unwrap();
    let feeder = {
        let data = data.clone();
        thread::spawn(move || {
            let mut h = host.connect(6002).unwrap();
            h.write_all(&data).unwrap();
            h
        })
    };
    let (mut r, _) = l.accept().unwrap();
    let mut got = Vec::with_capacity(TOTAL);
    while got.len() < TOTAL {
        let n = r
            .recv_with(|slices| {
                let mut n = 0;
                for sl in slices {
                    let at = got.len();
                    got.resize(at + sl.len(), 0);
                    sl.copy_to(&mut got[at..]);
                    n += sl.len();
                }
                n
            })
            .unwrap();
        assert!(n > 0, "EOF after {} bytes", got.len());
    }
    assert!(got == data, "zero-copy receive differs");
    drop(feeder.join().unwrap());

    let after = driver.stats();
    assert_eq!(
        after.tx_payload_bytes_copied, before.tx_payload_bytes_copied,
        "send_with copied"
    );
    assert_eq!(
        after.rx_payload_bytes_copied, before.rx_payload_bytes_copied,
        "recv_with copied"
    );
}

/// The sim's counters once its echo has counted `echoed` bytes (bounded wait): the device
/// thread stores them after the pump that delivered the last reply, which the driver may
/// already have read.
#[track_caller]
fn settled_echo(host: &SimHost, echoed: u64) -> vdpa_vsock::sim::SimStats {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = host.stats();
        if s.echoed_bytes >= echoed {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the echo counted {} of {echoed} bytes",
            s.echoed_bytes
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Build item 5: the sim's echo copies each byte once when it keeps up. 64 MiB in lockstep,
/// 64 KiB out then 64 KiB back: every request arrives while nothing is buffered either way,
/// so the device copies it from the driver's TX buffer straight into an RX buffer, and the
/// host's queues never hold it. Then the same through a writer and a reader at once, where
/// replies can wait for the driver's credit: each byte then costs one or two copies, never
/// more, and every byte comes back in order.
#[test]
fn the_echo_copies_each_byte_once_when_it_keeps_up() {
    const MSG: usize = 64 * 1024;
    const TOTAL: usize = 64 << 20;
    let (d, host) = open();
    let mut s = d.connect(VsockAddr::new(2, ECHO_PORT)).unwrap();
    let data = pattern(5, MSG);
    let mut back = vec![0u8; MSG];
    let before = host.stats();
    for _ in 0..TOTAL / MSG {
        s.write_all(&data).unwrap();
        s.read_exact(&mut back).unwrap();
        assert!(back == data, "the echo changed the bytes");
    }
    let after = settled_echo(&host, before.echoed_bytes + TOTAL as u64);
    let echoed = after.echoed_bytes - before.echoed_bytes;
    let copied = after.payload_bytes_copied - before.payload_bytes_copied;
    assert_eq!(echoed, TOTAL as u64, "bytes echoed");
    assert_eq!(
        copied, TOTAL as u64,
        "device-side copies of the echoed bytes"
    );

    // Both ways at once: a writer thread, and this thread reading (the counters read before
    // the writer starts: it may echo a lot before this thread runs again).
    let before = host.stats();
    let writer = {
        let mut w = s.try_clone().unwrap();
        let data = pattern(6, TOTAL);
        thread::spawn(move || {
            for chunk in data.chunks(MSG) {
                w.write_all(chunk).unwrap();
            }
        })
    };
    let mut got = vec![0u8; TOTAL];
    s.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    assert!(
        got == pattern(6, TOTAL),
        "the streamed echo changed or lost bytes"
    );
    let after = settled_echo(&host, before.echoed_bytes + TOTAL as u64);
    let copied = after.payload_bytes_copied - before.payload_bytes_copied;
    assert_eq!(after.echoed_bytes - before.echoed_bytes, TOTAL as u64);
    assert!(
        (TOTAL as u64..=2 * TOTAL as u64).contains(&copied),
        "{copied} device-side copies for {TOTAL} echoed bytes"
    );
    eprintln!(
        "streamed echo: {:.2} device-side copies per byte",
        copied as f64 / TOTAL as f64
    );
}
