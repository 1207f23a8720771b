// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fuzz the whole stack through the public API over the simulated device: a fresh driver per
//! input (optionally on a hostile device or in busy-poll mode), then a short random sequence of
//! socket calls (stream connect/write/read/shutdown/close, seqpacket send/recv, device reset,
//! guest_cid change, TRANSPORT_RESET, NEEDS_RESET, a surprise removal). Every blocking call has a short timeout.
//!
//! Asserts: no panic; no call blocks longer than [`CALL_LIMIT`] (a hang, reported with the call);
//! on a live stream to the echo service every byte read is the next byte written (nothing lost
//! in the middle, duplicated, reordered or corrupted); a seqpacket echo returns each message
//! whole and in order.

#![no_main]

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver, VsockSeqPacket, VsockStream};
use vdpa_vsock::proto;
use vdpa_vsock::sim::{Hostile, SimConfig, DISCARD_PORT, ECHO_PORT, SEQPACKET_ECHO_PORT};

/// Most calls per input: keeps an input's worst case (every call timing out) bounded.
const MAX_CALLS: usize = 24;
/// Timeout of each blocking read and write.
const IO_TIMEOUT: Duration = Duration::from_millis(20);
/// Timeout of each connect.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// A call that takes longer than this is a hang (generous: the machine may be loaded).
const CALL_LIMIT: Duration = Duration::from_secs(5);
/// Largest write or message.
const MAX_LEN: usize = 8 * 1024;
/// Echoed bytes we let pile up unread per connection. Above it we stop sending: with nobody
/// reading, a full window would make the echo (and so our blocking seqpacket send, which has
/// no timeout) wait for ever, as flow control says it must.
const MAX_UNREAD: usize = 32 * 1024;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Mode {
    Normal,
    BusyPoll,
    Hostile(u8),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Call {
    /// Stream to the echo service (0), the discard service (1) or a closed port (2).
    Connect(u8),
    ConnectSeqpacket,
    Write {
        conn: u8,
        len: u16,
        seed: u8,
    },
    Read {
        conn: u8,
        len: u16,
    },
    Shutdown {
        conn: u8,
        how: u8,
    },
    Close {
        conn: u8,
    },
    SeqSend {
        conn: u8,
        len: u16,
        seed: u8,
    },
    SeqRecv {
        conn: u8,
    },
    ResetDevice,
    ChangeCid(u8),
    /// TRANSPORT_RESET on the event queue.
    TransportReset,
    /// NEEDS_RESET: the driver recovers on its own.
    NeedsReset,
    /// A surprise removal: the driver ends for good.
    Unplug,
}

#[derive(Arbitrary, Debug)]
struct Input {
    mode: Mode,
    /// Small windows and send buffers: writes block on credit and time out part-way.
    small: bool,
    calls: Vec<Call>,
}

struct Stream {
    s: VsockStream,
    /// Echo service: bytes written and not read back yet, in order.
    echo: Option<VecDeque<u8>>,
    /// Integrity holds only while the connection is alive and both halves are open.
    checked: bool,
}

struct Seq {
    s: VsockSeqPacket,
    pending: VecDeque<Vec<u8>>,
    unread: usize,
    checked: bool,
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t0 = Instant::now();
    let r = f();
    let took = t0.elapsed();
    assert!(took < CALL_LIMIT, "{what} took {took:?}: a hang");
    r
}

fn run(input: &Input) {
    let hostile = match input.mode {
        Mode::Hostile(h) => Some(match h % 4 {
            0 => Hostile::BogusUsedId,
            1 => Hostile::LenBeyondBuffer,
            2 => Hostile::DuplicateUsed,
            _ => Hostile::UsedIdxJump,
        }),
        _ => None,
    };
    let busy_poll = matches!(input.mode, Mode::BusyPoll);
    let window = if input.small { 4096 } else { 256 * 1024 };
    let sim = SimConfig {
        queue_max: 32,
        max_payload: 4096,
        busy_poll,
        hostile,
        host: proto::Config {
            buf_alloc: window,
            ..proto::Config::default()
        },
        ..SimConfig::default()
    };
    let config = DriverConfig {
        busy_poll,
        queue_size: 32,
        rx_buf_size: 4096 + 44,
        tx_buf_size: 4096 + 44,
        proto: proto::Config {
            buf_alloc: window,
            send_buffer: window as usize,
            ..proto::Config::default()
        },
        ..DriverConfig::default()
    };
    let (driver, host) = timed("open_sim", || VsockDriver::open_sim(sim, config))
        .expect("the simulated device always opens");
    let mut streams: Vec<Stream> = Vec::new();
    let mut seqs: Vec<Seq> = Vec::new();

    for call in input.calls.iter().take(MAX_CALLS) {
        match *call {
            Call::Connect(kind) => {
                let (port, echo) = match kind % 3 {
                    0 => (ECHO_PORT, true),
                    1 => (DISCARD_PORT, false),
                    _ => (4000, false),
                };
                let r = timed("connect", || {
                    driver.connect_timeout(VsockAddr::new(2, port), CONNECT_TIMEOUT)
                });
                if let Ok(mut s) = r {
                    assert!(port != 4000, "connected to a port nobody listens on");
                    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                    streams.push(Stream {
                        s,
                        echo: echo.then(VecDeque::new),
                        checked: true,
                    });
                }
            }
            Call::ConnectSeqpacket => {
                let r = timed("connect_seqpacket", || {
                    driver.connect_seqpacket(VsockAddr::new(2, SEQPACKET_ECHO_PORT))
                });
                if let Ok(mut s) = r {
                    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                    seqs.push(Seq {
                        s,
                        pending: VecDeque::new(),
                        unread: 0,
                        checked: true,
                    });
                }
            }
            Call::Write { conn, len, seed } => {
                let n = streams.len();
                let Some(st) = streams.get_mut(usize::from(conn) % n.max(1)) else {
                    continue;
                };
                if st.echo.as_ref().is_some_and(|e| e.len() > MAX_UNREAD) {
                    continue;
                }
                let data = pattern(seed, usize::from(len) % MAX_LEN + 1);
                match timed("write", || st.s.write(&data)) {
                    Ok(k) => {
                        assert!(k <= data.len());
                        if let Some(e) = st.echo.as_mut() {
                            e.extend(&data[..k]);
                        }
                    }
                    // A write that queued part of its buffer reports the count (tests/
                    // write_timeout.rs): a timeout or WouldBlock means nothing was queued.
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => st.checked = false,
                }
            }
            Call::Read { conn, len } => {
                let n = streams.len();
                let Some(st) = streams.get_mut(usize::from(conn) % n.max(1)) else {
                    continue;
                };
                let mut buf = vec![0u8; usize::from(len) % MAX_LEN + 1];
                match timed("read", || st.s.read(&mut buf)) {
                    Ok(k) => {
                        if let (true, Some(e)) = (st.checked, st.echo.as_mut()) {
                            assert!(k <= e.len(), "read {k} bytes, only {} were echoed", e.len());
                            let want: Vec<u8> = e.drain(..k).collect();
                            assert!(
                                buf[..k] == want[..],
                                "echoed bytes differ from those written"
                            );
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => st.checked = false,
                }
            }
            Call::Shutdown { conn, how } => {
                let n = streams.len();
                let Some(st) = streams.get_mut(usize::from(conn) % n.max(1)) else {
                    continue;
                };
                let how = match how % 3 {
                    0 => Shutdown::Read,
                    1 => Shutdown::Write,
                    _ => Shutdown::Both,
                };
                let _ = timed("shutdown", || st.s.shutdown(how));
                if how != Shutdown::Write {
                    // Data still in flight may be dropped now.
                    st.checked = false;
                }
            }
            Call::Close { conn } => {
                let n = streams.len();
                if n > 0 {
                    let st = streams.swap_remove(usize::from(conn) % n);
                    timed("close", || drop(st));
                }
            }
            Call::SeqSend { conn, len, seed } => {
                let n = seqs.len();
                let Some(sq) = seqs.get_mut(usize::from(conn) % n.max(1)) else {
                    continue;
                };
                if sq.unread > MAX_UNREAD {
                    continue;
                }
                let msg = pattern(seed, usize::from(len) % MAX_LEN);
                match timed("seqpacket send", || sq.s.send(&msg)) {
                    Ok(k) => {
                        assert_eq!(k, msg.len(), "a message is sent whole");
                        sq.unread += msg.len();
                        sq.pending.push_back(msg);
                    }
                    Err(_) => sq.checked = false,
                }
            }
            Call::SeqRecv { conn } => {
                let n = seqs.len();
                let Some(sq) = seqs.get_mut(usize::from(conn) % n.max(1)) else {
                    continue;
                };
                let mut buf = vec![0u8; MAX_LEN];
                match timed("seqpacket recv", || sq.s.recv_full(&mut buf)) {
                    Ok((k, full, _eor)) => {
                        if sq.checked {
                            let want = sq.pending.pop_front();
                            let want = want.as_deref();
                            assert_eq!(
                                Some(&buf[..k]),
                                want,
                                "echoed message differs (full {full})"
                            );
                            assert_eq!(k, full, "no message here is larger than the buffer");
                            sq.unread -= k;
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => sq.checked = false,
                }
            }
            Call::ResetDevice => {
                timed("reset_device", || driver.reset_device("fuzz"));
                streams.iter_mut().for_each(|s| s.checked = false);
                seqs.iter_mut().for_each(|s| s.checked = false);
            }
            Call::TransportReset | Call::NeedsReset | Call::Unplug => {
                let _ = timed("lifecycle event", || match *call {
                    Call::TransportReset => host.transport_reset(),
                    Call::NeedsReset => host.set_needs_reset(),
                    _ => host.unplug(),
                });
                // Every connection ends (and the calls racing the event may see either side).
                streams.iter_mut().for_each(|s| s.checked = false);
                seqs.iter_mut().for_each(|s| s.checked = false);
            }
            Call::ChangeCid(c) => {
                let cid = 3 + u64::from(c % 4);
                let _ = timed("set_guest_cid", || host.set_guest_cid(cid));
                // A new CID resets every connection (the same CID changes nothing, but the
                // reset and its interrupt race with what is in flight: stop checking).
                streams.iter_mut().for_each(|s| s.checked = false);
                seqs.iter_mut().for_each(|s| s.checked = false);
            }
        }
    }
    timed("teardown", || {
        drop(streams);
        drop(seqs);
        drop(host);
        drop(driver);
    });
}

fuzz_target!(|input: Input| {
    run(&input);
});
