// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A model check of the core's synchronisation with [loom]: every interleaving (up to a bound
//! on preemptions) of a few threads that block in the real [`Core`] while a stand-in for the
//! loop thread pumps a scripted device, so that a lost wake-up shows as a deadlock and a
//! broken invariant as a failed assertion, in a schedule loom prints.
//!
//! Built only with `RUSTFLAGS="--cfg loom"` (the shim in `sync.rs` then hands the core loom's
//! `Mutex`, `Condvar` and atomics); how to run it is in `tests/README.md`. Each model is small
//! (two or three threads, a handful of packets) so that the whole suite explores exhaustively
//! within the preemption bound in a few minutes.
//!
//! # What stands in for what
//! - The device is the scripted one of `test_device.rs`: when pumped it swallows what the
//!   endpoint sends and delivers the next step of a script (what a peer would send, a wake-up
//!   with nothing in it, or the device's death), one step per pump, whoever pumps.
//! - The loop thread is a loom thread that takes the core's lock, calls
//!   [`Core::pump_locked`] once and lets go, until the script is delivered (or the core
//!   ended), yielding between rounds. `run_loop` pumps up to 64 rounds per hold of the lock
//!   and sleeps on eventfds in between: one round per hold is a superset of its interleavings,
//!   and its epoll wait cannot be modelled (loom has no file descriptors).
//! - Payload lives on the heap (the sim host's storage), except in the models of the unlocked
//!   copies, which need a driver's DMA pools (a small DMA region mapped per execution).
//! - The leader (`irq.rs`, models `g_*`): under `cfg(loom)` the core's `IrqWait` is the
//!   stand-in of `irq/model.rs` (the rx and tx interrupts as level-triggered counters, the
//!   loop's watch of them, the leader's wake-up, the loop's waker; loom's mutex and condition
//!   variable instead of eventfds, `poll` and epoll). A core made with `Setup::leader` has it
//!   attached, so blocked reads lead exactly as in a driver, and its script is gated: a step is
//!   delivered only once the model's peer (the test's own thread) made it arrive, which then
//!   raises the rx interrupt, as a device writes the used ring and then signals. The loop
//!   thread is then [`leader_loop_thread`], which does what `run_loop` does with those
//!   descriptors: pump, then sleep until its waker or an interrupt it watches (reading it),
//!   and again; the model stops it at the end, and it stops only with nothing left to do. The
//!   older models keep the unconditional pump rounds of [`loop_thread`] and no leader.
//! - Anything a thread changes without the core's lock is a loom object (the gate of arrived
//!   steps is a loom atomic, the interrupts a loom mutex): loom explores the orders of what it
//!   sees, and a std-only handshake between threads would hide schedules (a first version
//!   of the gate behind the device log's std mutex hid the lost wake-ups the `g_` models now
//!   catch).

//! # What loom cannot model, and how the models avoid it
//! - **Time.** loom has no clock and replays every schedule, so no decision may depend on one.
//!   The models use [`Wait::Forever`] and [`Wait::Never`] only (no deadline); under loom a
//!   condition variable's `wait_timeout` never times out, so the core's 100 ms re-check is
//!   gone and a missed notification is a deadlock; the busy-poll spin budget is a count of
//!   rounds (`sync::keep_spinning`). `Instant::now()` is still read for the protocol core's
//!   timers, but no model lives anywhere near the shortest of them (the 2 s connect timeout),
//!   so none fires.
//! - **File descriptors.** The readiness descriptors are real socketpairs and eventfds; their
//!   state is the kernel's and is set under the core's lock, so the models check it with
//!   `poll(2)` after the threads join (or under the lock). The event loop's epoll and the
//!   leader's `poll` are not run: the `g_` models run the stand-in of `irq/model.rs` (whose
//!   module docs say what it leaves out: timeouts, failing system calls, `EINTR`), and the
//!   scripted device raises only the rx interrupt (its TX completions are immediate, inside
//!   the pump, and raise none).
//! - **Bounded exploration.** loom explores every schedule with at most
//!   `LOOM_MAX_PREEMPTIONS` preemptions ([`DEFAULT_PREEMPTIONS`] when unset): a bug that needs
//!   more forced switches than that is not found.
//!
//! [loom]: https://docs.rs/loom

use std::io::ErrorKind;
use std::net::Shutdown;
use std::os::fd::AsFd;

use loom::thread;

use super::*;
use crate::packet::VMADDR_CID_HOST;
use crate::runtime::readiness::poll_now;
use crate::runtime::test_device::{
    log_of, DeviceLog, Rig, Setup, Step, LISTEN_PORT, PEER_CLIENT_PORT, PEER_PORT,
};

/// The preemption bound when `LOOM_MAX_PREEMPTIONS` is not set (`.ci/run` sets the same):
/// the bugs these models found needed none or one; four explores every model in about a
/// minute here, half of it the two-connection leader model (tests/README.md has the counts).
const DEFAULT_PREEMPTIONS: usize = 4;

/// Explore `f` with loom (the bound from `LOOM_MAX_PREEMPTIONS`, else
/// [`DEFAULT_PREEMPTIONS`]); prints how many executions that took.
#[track_caller]
fn model(f: impl Fn() + Sync + Send + 'static) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let at = std::panic::Location::caller();
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(DEFAULT_PREEMPTIONS);
    }
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let t0 = std::time::Instant::now();
    b.check(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        f();
    });
    eprintln!(
        "loom model at line {}: {} executions in {:.1?} (preemption bound {:?})",
        at.line(),
        runs.load(Ordering::Relaxed),
        t0.elapsed(),
        b.preemption_bound
    );
}

/// The loop thread: pump, one round per hold of the lock, until the script is delivered
/// or the core ended. `check` runs under the lock before each round.
fn loop_thread(
    rig: &Rig,
    check: impl Fn(&CoreState, &DeviceLog) + Send + 'static,
) -> thread::JoinHandle<()> {
    let core = rig.core.clone();
    let log = rig.log.clone();
    thread::spawn(move || loop {
        let mut st = core.lock();
        {
            let l = log_of(&log);
            check(&st, &l);
            if l.script.is_empty() || st.dead.is_some() {
                return;
            }
        }
        Core::pump_locked(&mut st, Instant::now());
        drop(st);
        thread::yield_now();
    })
}

/// No check in the loop thread.
fn no_check(_: &CoreState, _: &DeviceLog) {}

fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    thread::spawn(f)
}

#[track_caller]
fn assert_aborted<T: std::fmt::Debug>(r: io::Result<T>, what: &str) {
    match r {
        Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
        r => panic!("{what}: expected the device's death (ConnectionAborted), got {r:?}"),
    }
}

// ----- a. lost wake-ups -----

/// A reader blocked (or about to block) in `read` while the loop thread delivers data always
/// wakes and returns exactly that data.
#[test]
fn a_blocked_read_wakes_when_data_arrives() {
    model(|| {
        let (rig, c) = Setup {
            script: vec![Step::Data(b"ping".to_vec())],
            ..Setup::default()
        }
        .connected();
        let core = rig.core.clone();
        let reader = spawn(move || {
            let mut buf = [0u8; 16];
            let n = core.read(c, &mut buf, Wait::Forever).expect("read");
            buf[..n].to_vec()
        });
        let lp = loop_thread(&rig, no_check);
        assert_eq!(reader.join().unwrap(), b"ping");
        lp.join().unwrap();
        let mut buf = [0u8; 16];
        let r = rig.core.read(c, &mut buf, Wait::Never);
        assert_eq!(
            r.map_err(|e| e.kind()),
            Err(ErrorKind::WouldBlock),
            "data twice"
        );
    });
}

/// A caller blocked in `accept` wakes when the peer's REQUEST arrives.
#[test]
fn a_blocked_accept_wakes_when_a_request_arrives() {
    model(|| {
        let rig = Setup {
            script: vec![Step::Request],
            ..Setup::default()
        }
        .core();
        let (l, _) = rig
            .core
            .listen(LISTEN_PORT, 4, SocketType::Stream)
            .expect("listen");
        let core = rig.core.clone();
        let acceptor = spawn(move || core.accept(l, Wait::Forever));
        let lp = loop_thread(&rig, no_check);
        let c = acceptor.join().unwrap().expect("accept");
        lp.join().unwrap();
        assert_eq!(
            rig.core.peer_addr(c),
            Some((VMADDR_CID_HOST, PEER_CLIENT_PORT))
        );
    });
}

/// A caller blocked in `connect` wakes when the RESPONSE arrives.
#[test]
fn a_blocked_connect_wakes_on_the_response() {
    model(|| {
        let rig = Setup {
            script: vec![Step::Response],
            ..Setup::default()
        }
        .core();
        let core = rig.core.clone();
        let connector = spawn(move || {
            core.connect(
                (VMADDR_CID_HOST, PEER_PORT),
                None,
                SocketType::Stream,
                None,
                false,
            )
        });
        let lp = loop_thread(&rig, no_check);
        let c = connector.join().unwrap().expect("connect");
        lp.join().unwrap();
        assert_eq!(rig.core.peer_addr(c), Some((VMADDR_CID_HOST, PEER_PORT)));
    });
}

/// A write of twice the send buffer to a device that takes each part at once: the room the
/// writer's own kick makes is used at once (nothing else would announce it: the `Writable` the
/// kick raised came before the writer waits).
#[test]
fn a_write_larger_than_the_send_buffer_uses_the_room_its_kick_made() {
    model(|| {
        let (rig, c) = Setup {
            send_buffer: 4,
            ..Setup::default()
        }
        .connected();
        let core = rig.core.clone();
        let writer = spawn(move || core.write(c, b"abcdefgh", Wait::Forever));
        let lp = loop_thread(&rig, no_check);
        assert_eq!(writer.join().unwrap().expect("write"), 8);
        lp.join().unwrap();
        rig.settle();
        assert_eq!(rig.log().received, b"abcdefgh");
    });
}

/// A writer blocked on credit wakes when the peer's CREDIT_UPDATE grants more.
#[test]
fn a_write_blocked_on_credit_wakes_on_a_credit_update() {
    model(|| {
        let (rig, c) = Setup {
            script: vec![Step::Credit(8)],
            peer_buf_alloc: 4,
            send_buffer: 4,
            ..Setup::default()
        }
        .connected();
        let core = rig.core.clone();
        let writer = spawn(move || core.write(c, b"abcdefgh", Wait::Forever));
        let lp = loop_thread(&rig, no_check);
        assert_eq!(writer.join().unwrap().expect("write"), 8);
        lp.join().unwrap();
        rig.settle();
        assert_eq!(rig.log().received, b"abcdefgh");
    });
}

// ----- b. the end of a connection against a blocked read -----

/// The peer's SHUTDOWN ends a blocked read with end of stream.
#[test]
fn b_peer_shutdown_ends_a_blocked_read() {
    model(|| {
        let (rig, c) = Setup {
            script: vec![Step::Shutdown],
            ..Setup::default()
        }
        .connected();
        let core = rig.core.clone();
        let reader = spawn(move || core.read(c, &mut [0u8; 16], Wait::Forever));
        let lp = loop_thread(&rig, no_check);
        assert_eq!(reader.join().unwrap().expect("read"), 0, "end of stream");
        lp.join().unwrap();
    });
}

/// The peer's RST ends a blocked read with ConnectionReset.
#[test]
fn b_peer_reset_ends_a_blocked_read() {
    model(|| {
        let (rig, c) = Setup {
            script: vec![Step::Rst],
            ..Setup::default()
        }
        .connected();
        let core = rig.core.clone();
        let reader = spawn(move || core.read(c, &mut [0u8; 16], Wait::Forever));
        let lp = loop_thread(&rig, no_check);
        let r = reader.join().unwrap();
        assert_eq!(r.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
        lp.join().unwrap();
    });
}

/// Our own `shutdown(Read)` from another thread (a clone of the socket) ends a blocked read
/// with end of stream, as Linux's does.
#[test]
fn b_our_shutdown_ends_a_blocked_read() {
    model(|| {
        let (rig, c) = Setup::default().connected();
        let core = rig.core.clone();
        let reader = spawn(move || core.read(c, &mut [0u8; 16], Wait::Forever));
        rig.core.shutdown(c, Shutdown::Read).expect("shutdown");
        assert_eq!(reader.join().unwrap().expect("read"), 0, "end of stream");
    });
}

/// Our own `shutdown(Write)` from another thread ends a write blocked on credit with
/// BrokenPipe.
#[test]
fn b_our_shutdown_ends_a_blocked_write() {
    model(|| {
        let (rig, c) = Setup {
            peer_buf_alloc: 0,
            send_buffer: 4,
            ..Setup::default()
        }
        .connected();
        let core = rig.core.clone();
        let writer = spawn(move || core.write(c, b"abcdefgh", Wait::Forever));
        rig.core.shutdown(c, Shutdown::Write).expect("shutdown");
        match writer.join().unwrap() {
            // Part of it was queued before the shutdown: a write that queued bytes says so.
            Ok(n) => assert!(n > 0 && n < 8, "{n} bytes"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::BrokenPipe, "{e}"),
        }
    });
}

/// The owner's `close_all` (the driver closing) ends a blocked read with the core's end.
#[test]
fn b_close_all_ends_a_blocked_read() {
    model(|| {
        let (rig, c) = Setup::default().connected();
        let core = rig.core.clone();
        let reader = spawn(move || core.read(c, &mut [0u8; 16], Wait::Forever));
        rig.core.close_all("model");
        assert_aborted(reader.join().unwrap(), "read");
        assert!(rig.log().shut_down);
    });
}

// ----- c. device death against blocked calls -----

fn kill(core: &Core) {
    core.kill(Ended::Reset("model".into()));
}

/// `kill` ends a blocked read with the death error.
#[test]
fn c_kill_ends_a_blocked_read() {
    model(|| {
        let (rig, c) = Setup::default().connected();
        let core = rig.core.clone();
        let reader = spawn(move || core.read(c, &mut [0u8; 16], Wait::Forever));
        kill(&rig.core);
        assert_aborted(reader.join().unwrap(), "read");
        assert!(rig.log().shut_down);
    });
}

/// `kill` ends a write blocked on exhausted credit with the death error.
#[test]
fn c_kill_ends_a_blocked_write() {
    model(|| {
        let (rig, c) = Setup {
            peer_buf_alloc: 0,
            send_buffer: 4,
            ..Setup::default()
        }
        .connected();
        let core = rig.core.clone();
        let writer = spawn(move || core.write(c, b"abcdefgh", Wait::Forever));
        kill(&rig.core);
        assert_aborted(writer.join().unwrap(), "write");
    });
}

/// `kill` ends a blocked accept with the death error.
#[test]
fn c_kill_ends_a_blocked_accept() {
    model(|| {
        let rig = Setup::default().core();
        let (l, _) = rig
            .core
            .listen(LISTEN_PORT, 4, SocketType::Stream)
            .expect("listen");
        let core = rig.core.clone();
        let acceptor = spawn(move || core.accept(l, Wait::Forever));
        kill(&rig.core);
        assert_aborted(acceptor.join().unwrap(), "accept");
    });
}

/// `kill` ends a blocked connect with the death error.
#[test]
fn c_kill_ends_a_blocked_connect() {
    model(|| {
        let rig = Setup::default().core();
        let core = rig.core.clone();
        let connector = spawn(move || {
            core.connect(
                (VMADDR_CID_HOST, PEER_PORT),
                None,
                SocketType::Stream,
                None,
                false,
            )
        });
        kill(&rig.core);
        match connector.join().unwrap() {
            Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
            // Killed before the connect began: it fails at its first look at the core.
            r => panic!("connect: expected ConnectionAborted, got {r:?}"),
        }
    });
}

/// A device that fails while the loop thread pumps it ends a blocked read with the death
/// error, and is never pumped again.
#[test]
fn c_device_failure_ends_a_blocked_read() {
    model(|| {
        let (rig, c) = Setup {
            script: vec![Step::Fail],
            ..Setup::default()
        }
        .connected();
        let core = rig.core.clone();
        let reader = spawn(move || core.read(c, &mut [0u8; 16], Wait::Forever));
        let lp = loop_thread(&rig, no_check);
        assert_aborted(reader.join().unwrap(), "read");
        lp.join().unwrap();
        assert!(rig.log().shut_down);
        assert!(!rig.pump(), "a dead core does not pump");
    });
}

// ----- d. busy-poll -----

/// Busy-poll: notifications are on (polling off) exactly while some caller sleeps.
fn polling_matches_sleepers(st: &CoreState, log: &DeviceLog) {
    assert_eq!(
        log.polling,
        st.sleepers == 0,
        "set_polling({}) with {} sleepers",
        log.polling,
        st.sleepers
    );
}

/// A spinning reader against the loop thread: the data arrives exactly once (whichever thread
/// pumps it in), and the sleepers count and the device's polling mode end where they began.
#[test]
fn d_busy_poll_reader_against_the_loop_thread() {
    model(|| {
        let (rig, c) = Setup {
            // More steps than the reader pumps itself before it first sleeps (one spin round,
            // one pump on the way to sleep): in some schedules the data comes while it sleeps.
            script: vec![Step::Nothing, Step::Nothing, Step::Data(b"pong".to_vec())],
            busy_poll: true,
            ..Setup::default()
        }
        .connected();
        let core = rig.core.clone();
        let reader = spawn(move || {
            let mut buf = [0u8; 16];
            let n = core.read(c, &mut buf, Wait::Forever).expect("read");
            buf[..n].to_vec()
        });
        let lp = loop_thread(&rig, polling_matches_sleepers);
        assert_eq!(reader.join().unwrap(), b"pong");
        lp.join().unwrap();
        let st = rig.core.lock();
        assert_eq!(st.sleepers, 0);
        polling_matches_sleepers(&st, &rig.log());
        drop(st);
        let r = rig.core.read(c, &mut [0u8; 16], Wait::Never);
        assert_eq!(
            r.map_err(|e| e.kind()),
            Err(ErrorKind::WouldBlock),
            "data twice"
        );
    });
}

/// Two spinning readers: the first to sleep turns notifications on, the last to wake turns
/// them off; each byte is read once.
#[test]
fn d_busy_poll_two_readers() {
    model(|| {
        let (rig, c) = Setup {
            script: vec![
                Step::Nothing,
                Step::Nothing,
                Step::Data(b"a".to_vec()),
                Step::Data(b"b".to_vec()),
            ],
            busy_poll: true,
            ..Setup::default()
        }
        .connected();
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let core = rig.core.clone();
                spawn(move || {
                    let mut buf = [0u8; 1];
                    core.read(c, &mut buf, Wait::Forever).expect("read");
                    buf[0]
                })
            })
            .collect();
        let lp = loop_thread(&rig, polling_matches_sleepers);
        let mut got: Vec<u8> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        lp.join().unwrap();
        got.sort_unstable();
        assert_eq!(got, b"ab");
        let st = rig.core.lock();
        assert_eq!(st.sleepers, 0);
        polling_matches_sleepers(&st, &rig.log());
    });
}

// ----- e. readiness -----

/// `poll(2)` bits of a readiness descriptor against what the core says `c` is ready for:
/// a descriptor that misses data (or room) that is there is a bug; one that shows readiness
/// that just went (a caller copying with the lock let go) is allowed only when `exact` is not
/// asked.
#[track_caller]
fn assert_shown(st: &CoreState, c: ConnId, fd: &UserFd, exact: bool) {
    let mask = poll_now(fd.as_fd()).expect("poll");
    let r = Core::readiness(st, Target::Conn(c));
    let readable = mask & libc::POLLIN != 0;
    let writable = mask & libc::POLLOUT != 0;
    if r.readable {
        assert!(
            readable,
            "data waits but the descriptor is not readable ({mask:#x}, {r:?})"
        );
    }
    if r.writable {
        assert!(
            writable,
            "room to send but the descriptor is not writable ({mask:#x}, {r:?})"
        );
    }
    if exact && !(r.read_closed || r.hangup || r.error) {
        assert_eq!(readable, r.readable, "{mask:#x} {r:?}");
        assert_eq!(writable, r.writable, "{mask:#x} {r:?}");
    }
}

/// A descriptor asked for while data arrives shows the data, whichever comes first.
#[test]
fn e_descriptor_made_while_data_arrives_shows_it() {
    model(|| {
        let (rig, c) = Setup {
            script: vec![Step::Data(b"x".to_vec())],
            ..Setup::default()
        }
        .connected();
        let core = rig.core.clone();
        let asker = spawn(move || core.conn_fd(c));
        let lp = loop_thread(&rig, no_check);
        let fd = asker.join().unwrap();
        lp.join().unwrap();
        let st = rig.core.lock();
        assert!(st.ep.readable_bytes(c) == 1);
        assert_shown(&st, c, &fd, true);
    });
}

/// A spurious wake-up against a non-blocking read: the read says WouldBlock and the
/// descriptor still shows exactly what is there (nothing to read, room to write).
#[test]
fn e_spurious_wakeup_then_nonblocking_read_is_harmless() {
    model(|| {
        let (rig, c) = Setup {
            script: vec![Step::Nothing],
            ..Setup::default()
        }
        .connected();
        let fd = rig.core.conn_fd(c);
        let core = rig.core.clone();
        let reader = spawn(move || core.read(c, &mut [0u8; 16], Wait::Never));
        let lp = loop_thread(&rig, no_check);
        let r = reader.join().unwrap();
        assert_eq!(r.map_err(|e| e.kind()), Err(ErrorKind::WouldBlock));
        lp.join().unwrap();
        assert_shown(&rig.core.lock(), c, &fd, true);
    });
}

/// Data arriving while a reader takes what came before: every time anyone holds the lock the
/// descriptor shows the data that waits, and at the end exactly what is left.
#[test]
fn e_descriptor_never_misses_data_against_a_reader() {
    model(|| {
        let (rig, c) = Setup {
            script: vec![Step::Data(b"1".to_vec()), Step::Data(b"2".to_vec())],
            ..Setup::default()
        }
        .connected();
        let fd = rig.core.conn_fd(c);
        let core = rig.core.clone();
        let reader = spawn(move || core.read(c, &mut [0u8; 1], Wait::Forever));
        let check_fd = fd.clone();
        let lp = loop_thread(&rig, move |st, _| assert_shown(st, c, &check_fd, false));
        assert_eq!(reader.join().unwrap().expect("read"), 1);
        lp.join().unwrap();
        let st = rig.core.lock();
        assert_eq!(st.ep.readable_bytes(c), 1);
        assert_shown(&st, c, &fd, true);
    });
}

/// An edge notifier (the tokio API's) made while data arrives signals it: the data counts as
/// an edge whether it came before or after the notifier.
#[cfg(feature = "tokio")]
#[test]
fn e_notifier_made_while_data_arrives_signals_it() {
    model(|| {
        let (rig, c) = Setup {
            script: vec![Step::Data(b"x".to_vec())],
            ..Setup::default()
        }
        .connected();
        let core = rig.core.clone();
        let asker = spawn(move || core.conn_notifier(c).expect("notifier"));
        let lp = loop_thread(&rig, no_check);
        let n = asker.join().unwrap();
        lp.join().unwrap();
        let mut count = [0u8; 8];
        let r = nix::unistd::read(n.as_fd(), &mut count);
        assert_eq!(r, Ok(8), "no edge was signalled");
        assert!(u64::from_ne_bytes(count) >= 1);
    });
}

// ----- f. the unlocked write path -----

/// A pattern per writer.
fn bytes_of(tag: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| tag.wrapping_add(u8::try_from(i % 7).unwrap_or(0)))
        .collect()
}

/// Two writers of 4 KiB on one connection copy into DMA memory with the core's lock let go;
/// against the loop thread pumping, each write's bytes leave whole and in order.
#[test]
fn f_two_unlocked_writers_keep_their_bytes_in_order() {
    const LEN: usize = UNLOCKED_COPY_MIN;
    model(|| {
        let (rig, c) = Setup {
            script: vec![Step::Nothing],
            dma: true,
            ..Setup::default()
        }
        .connected();
        let writers: Vec<_> = [b'A', b'a']
            .into_iter()
            .map(|tag| {
                let core = rig.core.clone();
                spawn(move || core.write(c, &bytes_of(tag, LEN), Wait::Forever))
            })
            .collect();
        let lp = loop_thread(&rig, no_check);
        for w in writers {
            assert_eq!(w.join().unwrap().expect("write"), LEN);
        }
        lp.join().unwrap();
        rig.settle();
        let log = rig.log();
        let (a, b) = (bytes_of(b'A', LEN), bytes_of(b'a', LEN));
        let got = &log.received;
        assert!(
            *got == [&a[..], &b[..]].concat() || *got == [&b[..], &a[..]].concat(),
            "writes interleaved or lost: {} bytes",
            got.len()
        );
    });
}

/// A writer copying with the lock let go against `kill`: the write ends (all queued, or the
/// death error), and the pool gets its chunks back once the connection is gone.
#[test]
fn f_unlocked_writer_against_kill() {
    const LEN: usize = UNLOCKED_COPY_MIN;
    model(|| {
        let (rig, c) = Setup {
            dma: true,
            ..Setup::default()
        }
        .connected();
        let core = rig.core.clone();
        let writer = spawn(move || core.write(c, &bytes_of(b'k', LEN), Wait::Forever));
        kill(&rig.core);
        match writer.join().unwrap() {
            Ok(n) => assert_eq!(n, LEN),
            r => assert_aborted(r, "write"),
        }
    });
}

// ----- g. the leader (`irq.rs`) -----

/// The loop thread of a core with a leader, as `run_loop` is: pump (until a round moves
/// nothing, at most [`MAX_PUMP_ROUNDS`] per hold of the lock, noting the timer it would sleep
/// until), then sleep on the stand-in's descriptors until its waker is written or an interrupt
/// it watches is raised (reading those), and again; it ends with the core, or when the model
/// stops it with nothing left to do.
fn leader_loop_thread(rig: &Rig) -> thread::JoinHandle<()> {
    let core = rig.core.clone();
    let lines = rig.lines();
    thread::spawn(move || loop {
        let more = {
            let mut st = core.lock();
            let more = Core::pump_rounds(&mut st, Instant::now(), MAX_PUMP_ROUNDS);
            if st.dead.is_some() {
                return;
            }
            st.loop_timer = st.ep.poll_timeout();
            more
        };
        // Work left over: the real loop only looks at its descriptors (no wait) and pumps
        // again.
        if !more && !lines.loop_wait() {
            return;
        }
    })
}

/// A read of up to `len` bytes on `c` that may block, from a new thread.
fn reader(rig: &Rig, c: ConnId, len: usize) -> thread::JoinHandle<io::Result<Vec<u8>>> {
    let core = rig.core.clone();
    spawn(move || {
        let mut buf = vec![0u8; len];
        let n = core.read(c, &mut buf, Wait::Forever)?;
        buf.truncate(n);
        Ok(buf)
    })
}

/// The end of a leader model: nobody leads, and the loop thread watches the interrupts again
/// (an interrupt still raised is then the loop's; with the loop stand-in running, it stops
/// only once none is).
#[track_caller]
fn assert_lead_given_back(rig: &Rig) {
    assert!(!rig.core.lock().has_leader(), "the lead was not given back");
    let lines = rig.lines();
    assert!(
        lines.loop_watching(),
        "the loop thread does not watch the interrupts"
    );
}

/// [`model`] for a leader model, which also proves that the leader's path was explored: `f`
/// returns whether it was in that execution (the model says what that means), and some
/// execution must say yes.
#[track_caller]
fn leader_model(f: impl Fn() -> bool + Sync + Send + 'static) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let led = Arc::new(AtomicBool::new(false));
    let seen = led.clone();
    model(move || {
        if f() {
            seen.store(true, Ordering::Relaxed);
        }
    });
    assert!(
        led.load(Ordering::Relaxed),
        "no execution took the leader's path"
    );
}

/// A blocked caller took an interrupt itself.
fn a_caller_took_an_interrupt(rig: &Rig) -> bool {
    let taken = rig.core.lock().caller_interrupts();
    taken > 0
}

/// A caller leads now (read just before another thread ends its wait: a leader that nothing
/// else wakes still leads then).
fn leads(rig: &Rig) -> bool {
    let led = rig.core.lock().has_leader();
    led
}

/// Data the core holds for `c`, read without waiting.
fn left_on(rig: &Rig, c: ConnId) -> Vec<u8> {
    let mut buf = [0u8; 16];
    match rig.core.read(c, &mut buf, Wait::Never) {
        Ok(n) => buf[..n].to_vec(),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Vec::new(),
        Err(e) => panic!("read: {e}"),
    }
}

/// A reader blocks (and leads, in the schedules where it blocks before the reply arrives);
/// the reply arrives with its interrupt, the reader gets it and gives the lead back; a later
/// reply's interrupt is then the loop thread's, and is not lost at the hand-back.
#[test]
fn g_leader_takes_its_reply_and_the_loop_the_next() {
    leader_model(|| {
        let (rig, c) = Setup {
            script: vec![Step::Data(b"ping".to_vec()), Step::Data(b"pong".to_vec())],
            leader: true,
            ..Setup::default()
        }
        .connected();
        let r = reader(&rig, c, 16);
        let lp = leader_loop_thread(&rig);
        rig.arrive();
        assert_eq!(r.join().unwrap().expect("read"), b"ping");
        assert!(!rig.core.lock().has_leader(), "the lead outlived its call");
        rig.arrive();
        rig.lines().stop_loop();
        lp.join().unwrap();
        assert!(rig.log().script.is_empty(), "the later reply was lost");
        assert_eq!(left_on(&rig, c), b"pong");
        assert_lead_given_back(&rig);
        a_caller_took_an_interrupt(&rig)
    });
}

/// Two readers on two connections: one may lead while the other sleeps on its condition
/// variable. Data for the first connection arrives first, then for the second; the test's
/// thread is the peer and then the first reader (three threads: with a fourth for the peer
/// alone, bound 4 did not finish in 7 minutes here). Each reader gets its own: a follower is
/// woken by whoever pumped its data (the leader among them), and a leader whose data comes
/// after the other's is not left asleep; the lead is given back.
#[test]
fn g_leader_and_follower_on_two_connections() {
    leader_model(|| {
        let (rig, c) = Setup {
            script: vec![
                Step::DataOn(0, b"a".to_vec()),
                Step::DataOn(1, b"b".to_vec()),
            ],
            leader: true,
            conns: 2,
            ..Setup::default()
        }
        .connected_all();
        let second = reader(&rig, c[1], 4);
        let lp = leader_loop_thread(&rig);
        rig.arrive();
        rig.arrive();
        let mut buf = [0u8; 4];
        let n = rig.core.read(c[0], &mut buf, Wait::Forever).expect("read");
        assert_eq!(&buf[..n], b"a");
        assert_eq!(second.join().unwrap().expect("read"), b"b");
        rig.lines().stop_loop();
        lp.join().unwrap();
        assert_lead_given_back(&rig);
        a_caller_took_an_interrupt(&rig)
    });
}

/// A leader's wait ended from another thread: our `shutdown(Read)` (end of stream) while it
/// waits on the interrupts; nothing arrives, so only the wake-up can end it. (Each of these
/// three models has an execution where the reader led when the other thread acted.)
#[test]
fn g_our_shutdown_ends_a_leaders_wait() {
    leader_model(|| {
        let (rig, c) = Setup {
            leader: true,
            ..Setup::default()
        }
        .connected();
        let r = reader(&rig, c, 16);
        let led = leads(&rig);
        rig.core.shutdown(c, Shutdown::Read).expect("shutdown");
        assert_eq!(r.join().unwrap().expect("read"), b"", "end of stream");
        assert_lead_given_back(&rig);
        led
    });
}

/// A leader's wait ended by the device's reset from another thread (`kill`): the death error.
#[test]
fn g_kill_ends_a_leaders_wait() {
    leader_model(|| {
        let (rig, c) = Setup {
            leader: true,
            ..Setup::default()
        }
        .connected();
        let r = reader(&rig, c, 16);
        let led = leads(&rig);
        kill(&rig.core);
        assert_aborted(r.join().unwrap(), "read");
        assert_lead_given_back(&rig);
        led
    });
}

/// A leader's wait ended by our `abort` (RST) of its connection from another thread:
/// ConnectionReset.
#[test]
fn g_our_abort_ends_a_leaders_wait() {
    leader_model(|| {
        let (rig, c) = Setup {
            leader: true,
            ..Setup::default()
        }
        .connected();
        let r = reader(&rig, c, 16);
        let led = leads(&rig);
        rig.core.abort(c).expect("abort");
        let got = r.join().unwrap();
        assert_eq!(got.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
        assert_lead_given_back(&rig);
        led
    });
}

/// Two replies arrive back to back while a reader of one byte leads: the second one's
/// interrupt may come while the lead is handed back (after the leader's last pump, before
/// the loop watches again); it is the loop thread's then, and its data is not lost.
#[test]
fn g_an_interrupt_during_the_hand_back_is_the_loops() {
    leader_model(|| {
        let (rig, c) = Setup {
            script: vec![Step::Data(b"1".to_vec()), Step::Data(b"2".to_vec())],
            leader: true,
            ..Setup::default()
        }
        .connected();
        let r = reader(&rig, c, 1);
        let lp = leader_loop_thread(&rig);
        rig.arrive();
        rig.arrive();
        assert_eq!(r.join().unwrap().expect("read"), b"1");
        rig.lines().stop_loop();
        lp.join().unwrap();
        assert!(rig.log().script.is_empty(), "the second reply was lost");
        assert_eq!(left_on(&rig, c), b"2");
        assert_lead_given_back(&rig);
        a_caller_took_an_interrupt(&rig)
    });
}

/// A writer blocked on credit (a call that never leads) while a reader of the same connection
/// leads: the peer's `CREDIT_UPDATE` arrives with its interrupt, and the writer is woken by
/// whoever pumps it (the leader, or the writer's own kick); then the reader's data ends the
/// reader's call. No loop thread: the reader leads for as long as an interrupt can come, so
/// the leader alone handles them (three threads: with the loop stand-in as a fourth, the model
/// is too large for bound 4).
#[test]
fn g_a_writer_blocked_on_credit_is_woken_by_a_leaders_pump() {
    leader_model(|| {
        let (rig, c) = Setup {
            script: vec![Step::Credit(8), Step::Data(b"x".to_vec())],
            peer_buf_alloc: 4,
            send_buffer: 4,
            leader: true,
            ..Setup::default()
        }
        .connected();
        let r = reader(&rig, c, 16);
        // Three send buffers: the first leaves at once on the credit there is, the second waits
        // in the send buffer for credit, the third for room.
        const DATA: &[u8] = b"abcdefghijkl";
        let core = rig.core.clone();
        let w = spawn(move || core.write(c, DATA, Wait::Forever));
        rig.arrive();
        assert_eq!(w.join().unwrap().expect("write"), DATA.len());
        rig.arrive();
        assert_eq!(r.join().unwrap().expect("read"), b"x");
        rig.settle();
        assert_eq!(rig.log().received, DATA);
        assert_lead_given_back(&rig);
        a_caller_took_an_interrupt(&rig)
    });
}
