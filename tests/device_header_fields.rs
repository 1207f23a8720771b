//! Every field of the header the device writes into an RX buffer, one test each, through the
//! public protocol API: the test plays the device (and the peer behind it) by handing the
//! driver's endpoint the headers a hostile or confused device could write. Each test checks
//! that the field is validated where `tests/README.md` says, and that a bad value neither
//! reaches the reader nor disturbs the connection it does not belong to.
//!
//! The parser's half of the job (`len` against the used length, the buffer bounds) is proved in
//! `src/packet/tests.rs` (`used_rx_buffer_*`); the ring's half (used id, len, idx) in
//! `src/virtq/tests.rs` (`hostile_device::*`).

use std::time::Instant;

use vdpa_vsock::packet::{Header, Op, SocketType, VMADDR_CID_HOST};
use vdpa_vsock::proto::{Config, ConnId, ConnState, Endpoint, Event};

const GUEST_CID: u64 = 3;
const HOST_PORT: u32 = 1234;
const PEER_BUF_ALLOC: u32 = 1 << 16;

/// The driver's endpoint with one connection established by hand, as the device delivered it.
struct Conn {
    ep: Endpoint,
    id: ConnId,
    local_port: u32,
    now: Instant,
}

impl Conn {
    #[track_caller]
    fn new(ty: SocketType) -> Self {
        let now = Instant::now();
        let mut ep = Endpoint::new(Config {
            local_cid: GUEST_CID,
            seqpacket: true,
            ..Config::default()
        });
        let id = ep
            .connect(now, VMADDR_CID_HOST, HOST_PORT, None, ty)
            .unwrap();
        let req = ep.poll_transmit(now, &mut []).expect("a REQUEST");
        assert_eq!(req.op, Op::Request as u16);
        let mut c = Conn {
            ep,
            id,
            local_port: req.src_port,
            now,
        };
        let resp = Header {
            op: Op::Response as u16,
            ..c.peer_header(ty)
        };
        c.ep.handle_packet(now, &resp, &[]);
        assert_eq!(c.ep.poll_event(), Some(Event::Connected(id)));
        assert_eq!(c.ep.state(id), Some(ConnState::Connected));
        c
    }

    /// A well-formed header from the peer to this connection; tweak it with struct update.
    fn peer_header(&self, ty: SocketType) -> Header {
        Header {
            src_cid: VMADDR_CID_HOST,
            dst_cid: GUEST_CID,
            src_port: HOST_PORT,
            dst_port: self.local_port,
            len: 0,
            type_: ty as u16,
            op: Op::Rw as u16,
            flags: 0,
            buf_alloc: PEER_BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    fn rw(&self, payload: &[u8]) -> Header {
        Header {
            len: u32::try_from(payload.len()).unwrap(),
            ..self.peer_header(SocketType::Stream)
        }
    }

    /// Everything the endpoint wants to transmit now (headers only; payload bytes dropped).
    fn drain_tx(&mut self) -> Vec<Header> {
        let mut buf = vec![0u8; 1 << 16];
        std::iter::from_fn(|| self.ep.poll_transmit(self.now, &mut buf)).collect()
    }

    fn readable(&self) -> usize {
        self.ep.readable_bytes(self.id)
    }

    /// The connection still works: a valid RW arrives intact.
    #[track_caller]
    fn assert_still_delivers(&mut self) {
        let before = self.readable();
        let hdr = self.rw(b"ok");
        self.ep.handle_packet(self.now, &hdr, b"ok");
        assert_eq!(self.readable(), before + 2);
        assert_eq!(self.ep.state(self.id), Some(ConnState::Connected));
    }
}

#[test]
fn dst_cid_that_is_not_ours_is_dropped_and_answered_with_rst() {
    let mut c = Conn::new(SocketType::Stream);
    for dst_cid in [
        0,
        1,
        VMADDR_CID_HOST,
        GUEST_CID + 1,
        u64::from(u32::MAX),
        u64::MAX,
    ] {
        let hdr = Header {
            dst_cid,
            ..c.rw(b"bad")
        };
        c.ep.handle_packet(c.now, &hdr, b"bad");
    }
    assert_eq!(c.ep.stats().dropped_wrong_cid, 6);
    assert_eq!(c.readable(), 0, "never delivered");
    // Answered as Linux answers a packet no socket takes: RST (from our own CID).
    let out = c.drain_tx();
    assert_eq!(out.len(), 6, "{out:?}");
    assert!(
        out.iter()
            .all(|h| h.op == Op::Rst as u16 && h.src_cid == GUEST_CID),
        "{out:?}"
    );
    c.assert_still_delivers();
}

#[test]
fn src_cid_or_src_port_of_another_peer_is_not_this_connection() {
    let mut c = Conn::new(SocketType::Stream);
    let other_cid = Header {
        src_cid: 77,
        ..c.rw(b"bad")
    };
    let other_port = Header {
        src_port: HOST_PORT + 1,
        ..c.rw(b"bad")
    };
    c.ep.handle_packet(c.now, &other_cid, b"bad");
    c.ep.handle_packet(c.now, &other_port, b"bad");
    assert_eq!(c.readable(), 0, "the data did not reach our connection");
    let out = c.drain_tx();
    assert_eq!(out.len(), 2, "each unknown sender gets one RST: {out:?}");
    assert!(out.iter().all(|h| h.op == Op::Rst as u16));
    assert_eq!((out[0].dst_cid, out[0].dst_port), (77, HOST_PORT));
    assert_eq!(
        (out[1].dst_cid, out[1].dst_port),
        (VMADDR_CID_HOST, HOST_PORT + 1)
    );
    c.assert_still_delivers();
}

#[test]
fn dst_port_of_no_connection_gets_rst() {
    let mut c = Conn::new(SocketType::Stream);
    let hdr = Header {
        dst_port: c.local_port + 1,
        ..c.rw(b"bad")
    };
    c.ep.handle_packet(c.now, &hdr, b"bad");
    assert_eq!(c.readable(), 0);
    assert_eq!(c.ep.stats().rst_unknown, 1);
    c.assert_still_delivers();
}

#[test]
fn len_that_disagrees_with_the_payload_or_sits_on_a_control_op_is_dropped() {
    let mut c = Conn::new(SocketType::Stream);
    // The transport hands the endpoint `len` bytes; any other count is refused.
    let short = Header {
        len: 5,
        ..c.rw(b"bad")
    };
    c.ep.handle_packet(c.now, &short, b"bad");
    // Only RW carries a payload.
    for op in [
        Op::CreditUpdate,
        Op::CreditRequest,
        Op::Shutdown,
        Op::Response,
    ] {
        let hdr = Header {
            op: op as u16,
            len: 3,
            ..c.peer_header(SocketType::Stream)
        };
        c.ep.handle_packet(c.now, &hdr, b"bad");
    }
    assert_eq!(c.ep.stats().dropped_invalid, 5);
    assert_eq!(c.readable(), 0);
    c.assert_still_delivers();
}

#[test]
fn type_unknown_or_of_the_other_socket_kind_is_dropped() {
    let mut c = Conn::new(SocketType::Stream);
    for type_ in [0, SocketType::SeqPacket as u16, 3, u16::MAX] {
        let hdr = Header {
            type_,
            ..c.rw(b"bad")
        };
        c.ep.handle_packet(c.now, &hdr, b"bad");
    }
    assert_eq!(c.ep.stats().dropped_invalid, 4);
    assert_eq!(c.readable(), 0);
    c.assert_still_delivers();
}

#[test]
fn seqpacket_type_without_the_feature_is_dropped() {
    let now = Instant::now();
    let mut ep = Endpoint::new(Config {
        local_cid: GUEST_CID,
        seqpacket: false,
        ..Config::default()
    });
    let l = ep.listen(500, 4, SocketType::Stream).unwrap();
    let req = Header {
        src_cid: VMADDR_CID_HOST,
        dst_cid: GUEST_CID,
        src_port: HOST_PORT,
        dst_port: 500,
        type_: SocketType::SeqPacket as u16,
        op: Op::Request as u16,
        buf_alloc: PEER_BUF_ALLOC,
        ..Header::default()
    };
    ep.handle_packet(now, &req, &[]);
    assert_eq!(ep.stats().dropped_invalid, 1);
    assert_eq!(ep.accept(l), None);
}

#[test]
fn op_unknown_is_dropped() {
    let mut c = Conn::new(SocketType::Stream);
    for op in [0, 8, 0x100, u16::MAX] {
        let hdr = Header { op, ..c.rw(b"bad") };
        c.ep.handle_packet(c.now, &hdr, b"bad");
    }
    assert_eq!(c.ep.stats().dropped_invalid, 4);
    assert_eq!(c.readable(), 0);
    assert!(c.drain_tx().is_empty());
    c.assert_still_delivers();
}

#[test]
fn op_request_or_response_on_an_established_connection_is_dropped() {
    let mut c = Conn::new(SocketType::Stream);
    for op in [Op::Request, Op::Response] {
        let hdr = Header {
            op: op as u16,
            ..c.peer_header(SocketType::Stream)
        };
        c.ep.handle_packet(c.now, &hdr, &[]);
    }
    assert_eq!(c.ep.stats().dropped_invalid, 2);
    c.assert_still_delivers();
}

#[test]
fn flags_unknown_bits_are_ignored() {
    let mut c = Conn::new(SocketType::Stream);
    // Stream RW: flags carry nothing.
    let hdr = Header {
        flags: u32::MAX,
        ..c.rw(b"abc")
    };
    c.ep.handle_packet(c.now, &hdr, b"abc");
    assert_eq!(c.readable(), 3);
    // SHUTDOWN with only unknown bits shuts nothing down.
    let shut = Header {
        op: Op::Shutdown as u16,
        flags: !3,
        ..c.peer_header(SocketType::Stream)
    };
    c.ep.handle_packet(c.now, &shut, &[]);
    assert_eq!(c.ep.state(c.id), Some(ConnState::Connected));
    assert_eq!(c.ep.send(c.now, c.id, b"still").unwrap(), 5);
    c.assert_still_delivers();
}

#[test]
fn buf_alloc_bounds_what_we_send() {
    let mut c = Conn::new(SocketType::Stream);
    let small = Header {
        op: Op::CreditUpdate as u16,
        buf_alloc: 10,
        ..c.peer_header(SocketType::Stream)
    };
    c.ep.handle_packet(c.now, &small, &[]);
    c.ep.send(c.now, c.id, &[7; 100]).unwrap();
    assert_eq!(
        rw_sent(&c.drain_tx()),
        10,
        "at most the peer's buf_alloc is in flight"
    );
}

fn rw_sent(out: &[Header]) -> u32 {
    out.iter()
        .filter(|h| h.op == Op::Rw as u16)
        .map(|h| h.len)
        .sum()
}

#[test]
fn fwd_cnt_that_moves_backwards_or_beyond_what_we_sent_is_ignored() {
    let mut c = Conn::new(SocketType::Stream);
    let template = c.peer_header(SocketType::Stream);
    let credit = |fwd_cnt| Header {
        op: Op::CreditUpdate as u16,
        buf_alloc: 1000,
        fwd_cnt,
        ..template
    };
    let first = credit(0);
    c.ep.handle_packet(c.now, &first, &[]);
    c.ep.send(c.now, c.id, &[7; 100]).unwrap();
    assert_eq!(rw_sent(&c.drain_tx()), 100);
    // "Consumed" 10 bytes before the start, and more than we ever sent: if believed, the
    // in-flight count (tx_cnt - fwd_cnt) would be 110, or wrap.
    for fwd_cnt in [u32::MAX - 9, 1000, 101] {
        let bogus = credit(fwd_cnt);
        c.ep.handle_packet(c.now, &bogus, &[]);
    }
    c.ep.send(c.now, c.id, &[8; 1000]).unwrap();
    assert_eq!(
        rw_sent(&c.drain_tx()),
        900,
        "the window is buf_alloc minus the 100 bytes really in flight"
    );
    // An honest fwd_cnt opens it further.
    let honest = credit(600);
    c.ep.handle_packet(c.now, &honest, &[]);
    assert_eq!(rw_sent(&c.drain_tx()), 100);
}

#[test]
fn rw_beyond_our_buf_alloc_resets_the_connection() {
    let mut c = Conn::new(SocketType::Stream);
    let big = vec![1u8; usize::try_from(c.ep.config().buf_alloc).unwrap() + 1];
    let hdr = c.rw(&big);
    c.ep.handle_packet(c.now, &hdr, &big);
    assert_eq!(c.ep.stats().credit_violations, 1);
    assert_eq!(c.ep.poll_event(), Some(Event::Reset(c.id)));
    assert!(c.drain_tx().iter().any(|h| h.op == Op::Rst as u16));
}
