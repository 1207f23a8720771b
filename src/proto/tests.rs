//! Two endpoints wired back to back on a virtual clock: A is the guest (CID 3), B the host
//! (CID 2). Grouped by phase: handshake, data and credit, close, reset, ports, seqpacket.

use super::*;
use crate::packet::{Op, VMADDR_CID_HOST};

/// A shutdown of the sending direction only (`shutdown(Write)`).
const SEND: ShutdownFlags = ShutdownFlags {
    receive: false,
    send: true,
};

const GUEST_CID: u64 = 3;
const PORT: u32 = 1234;

fn cfg(cid: u64) -> Config {
    Config {
        local_cid: cid,
        ..Config::default()
    }
}

/// Which endpoint sent a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    A,
    B,
}

struct Pair {
    a: Endpoint,
    b: Endpoint,
    now: Instant,
    /// Every packet moved, in order.
    log: Vec<(Side, Header)>,
    buf: Vec<u8>,
}

/// A deterministic byte pattern, position-dependent so reordering or loss shows.
fn pattern(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| u8::try_from(i.wrapping_mul(7).wrapping_add(i >> 8) % 251).unwrap())
        .collect()
}

/// A header template from `src` to `dst`; tweak fields with struct update syntax.
fn tmpl(src: (u64, u32), dst: (u64, u32), op: Op) -> Header {
    Header {
        src_cid: src.0,
        dst_cid: dst.0,
        src_port: src.1,
        dst_port: dst.1,
        len: 0,
        type_: SocketType::Stream as u16,
        op: op as u16,
        flags: 0,
        buf_alloc: DEFAULT_BUF_ALLOC,
        fwd_cnt: 0,
    }
}

impl Pair {
    fn new() -> Self {
        Self::with(cfg(GUEST_CID), cfg(VMADDR_CID_HOST))
    }

    fn with(a: Config, b: Config) -> Self {
        Pair {
            a: Endpoint::new(a),
            b: Endpoint::new(b),
            now: Instant::now(),
            log: Vec::new(),
            buf: vec![0; 1 << 20],
        }
    }

    fn ep(&mut self, side: Side) -> &mut Endpoint {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    /// Drain `from`'s transmit queue; deliver to the other side if `deliver`.
    #[track_caller]
    fn pump(&mut self, from: Side, deliver: bool) -> Vec<Header> {
        let mut out = Vec::new();
        let now = self.now;
        loop {
            let mut buf = std::mem::take(&mut self.buf);
            let h = self.ep(from).poll_transmit(now, &mut buf);
            let Some(h) = h else {
                self.buf = buf;
                break;
            };
            assert!(h.len as usize <= buf.len());
            if h.op == Op::Rw as u16 {
                assert!(h.len > 0 || h.type_ == SocketType::SeqPacket as u16);
            }
            self.log.push((from, h));
            if deliver {
                let to = if from == Side::A { Side::B } else { Side::A };
                self.ep(to).handle_packet(now, &h, &buf[..h.len as usize]);
            }
            self.buf = buf;
            out.push(h);
            self.check();
        }
        out
    }

    /// Shuttle packets both ways until both are quiet; returns the number moved.
    #[track_caller]
    fn shuttle(&mut self) -> usize {
        let mut total = 0;
        loop {
            let n = self.pump(Side::A, true).len() + self.pump(Side::B, true).len();
            if n == 0 {
                return total;
            }
            total += n;
        }
    }

    #[track_caller]
    fn check(&self) {
        for ep in [&self.a, &self.b] {
            if let Err(e) = ep.check_invariants() {
                panic!("invariant broken: {e}");
            }
        }
    }

    fn events(&mut self, side: Side) -> Vec<Event> {
        std::iter::from_fn(|| self.ep(side).poll_event()).collect()
    }

    /// B listens on `PORT`, A connects; returns (A's conn, B's accepted conn, listener).
    #[track_caller]
    fn establish(&mut self, ty: SocketType) -> (ConnId, ConnId, ListenerId) {
        let l = self.b.listen(PORT, 16, ty).unwrap();
        let ca = self
            .a
            .connect(self.now, VMADDR_CID_HOST, PORT, None, ty)
            .unwrap();
        self.shuttle();
        assert!(self.events(Side::A).contains(&Event::Connected(ca)));
        assert!(self.events(Side::B).contains(&Event::Incoming(l)));
        let cb = self.b.accept(l).expect("accepted connection");
        (ca, cb, l)
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
    }

    fn count(&self, side: Side, op: Op) -> usize {
        self.log
            .iter()
            .filter(|(s, h)| *s == side && h.op == op as u16)
            .count()
    }

    /// Read everything available on `c` (stream).
    #[track_caller]
    fn read_all(&mut self, side: Side, c: ConnId) -> Vec<u8> {
        let now = self.now;
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = self.ep(side).recv(now, c, &mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    /// Stream `total` bytes from `from`'s `cf` to the other side's `ct`, reading `read_chunk`
    /// bytes per round; checks credit safety on the way and returns what arrived.
    #[track_caller]
    fn transfer(
        &mut self,
        from: Side,
        cf: ConnId,
        ct: ConnId,
        total: usize,
        read_chunk: usize,
    ) -> Vec<u8> {
        let to = if from == Side::A { Side::B } else { Side::A };
        let data = pattern(0, total);
        let (mut sent, mut got) = (0, Vec::with_capacity(total));
        let mut rbuf = vec![0u8; read_chunk];
        let mut rounds = 0;
        while got.len() < total {
            rounds += 1;
            assert!(
                rounds < 1_000_000,
                "transfer stalled at {} of {total}",
                got.len()
            );
            let now = self.now;
            if sent < total {
                sent += self.ep(from).send(now, cf, &data[sent..]).unwrap();
            }
            self.shuttle();
            let buf_alloc = self.ep(to).config().buf_alloc as usize;
            assert!(self.ep(to).readable_bytes(ct) <= buf_alloc);
            match self.ep(to).recv(now, ct, &mut rbuf) {
                Ok(n) => got.extend_from_slice(&rbuf[..n]),
                Err(ProtoError::WouldBlock) => {}
                Err(e) => panic!("recv: {e}"),
            }
            self.shuttle();
        }
        assert_eq!(got, data, "data corrupted in transfer");
        assert_eq!(self.a.stats().credit_violations, 0);
        assert_eq!(self.b.stats().credit_violations, 0);
        got
    }
}

// ----- handshake -----

#[test]
fn handshake_and_echo() {
    let mut p = Pair::new();
    let (ca, cb, _) = p.establish(SocketType::Stream);
    assert_eq!(p.a.state(ca), Some(ConnState::Connected));
    assert_eq!(p.b.state(cb), Some(ConnState::Connected));
    assert_eq!(
        p.b.peer_addr(cb),
        Some((GUEST_CID, p.a.local_port(ca).unwrap()))
    );
    assert_eq!(p.a.peer_addr(ca), Some((VMADDR_CID_HOST, PORT)));
    assert!(DEFAULT_EPHEMERAL_PORTS.contains(&p.a.local_port(ca).unwrap()));
    assert_eq!(p.count(Side::A, Op::Request), 1);
    assert_eq!(p.count(Side::B, Op::Response), 1);

    let now = p.now;
    assert_eq!(p.a.send(now, ca, b"ping").unwrap(), 4);
    p.shuttle();
    assert_eq!(p.events(Side::B), vec![Event::Readable(cb)]);
    assert_eq!(p.read_all(Side::B, cb), b"ping");
    assert_eq!(p.b.send(now, cb, b"pong").unwrap(), 4);
    p.shuttle();
    assert_eq!(p.read_all(Side::A, ca), b"pong");
    assert_eq!(p.a.recv(now, ca, &mut [0; 4]), Err(ProtoError::WouldBlock));
    assert_eq!(ConnState::Connected.to_string(), "connected");
}

#[test]
fn relay_echoes_what_arrived_credits_it_and_stops_at_the_send_buffer_and_the_end() {
    let mut cfg_b = cfg(VMADDR_CID_HOST);
    cfg_b.send_buffer = 1000;
    let mut p = Pair::with(cfg(GUEST_CID), cfg_b);
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    assert_eq!(p.b.relay(now, cb, usize::MAX), Err(ProtoError::WouldBlock));
    assert_eq!(p.a.send(now, ca, &pattern(0, 1200)).unwrap(), 1200);
    p.shuttle();
    // At most `max`, then up to the send buffer (1000), then nothing until it drains.
    assert_eq!(p.b.relay(now, cb, 100), Ok(Some(100)));
    assert_eq!(p.b.relay(now, cb, usize::MAX), Ok(Some(900)));
    assert_eq!(p.b.relay(now, cb, usize::MAX), Ok(Some(0)));
    assert_eq!(p.b.readable_bytes(cb), 200, "what was relayed is consumed");
    p.shuttle();
    assert_eq!(p.b.relay(now, cb, usize::MAX), Ok(Some(200)));
    p.shuttle();
    assert_eq!(
        p.read_all(Side::A, ca),
        pattern(0, 1200),
        "all back, in order"
    );
    p.a.shutdown(now, ca, SEND).unwrap();
    p.shuttle();
    assert_eq!(p.b.relay(now, cb, usize::MAX), Ok(None), "end of stream");
    p.check();
}

#[test]
fn an_echo_answers_a_packet_at_once_only_while_it_can_send_all_of_it_first() {
    let mut cfg_a = cfg(GUEST_CID);
    cfg_a.buf_alloc = 1000;
    let mut p = Pair::with(cfg_a, cfg(VMADDR_CID_HOST));
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    let mut buf = vec![0u8; 4096];
    let mut next = |p: &mut Pair, n: usize| {
        assert_eq!(p.a.send(now, ca, &pattern(0, n)).unwrap(), n);
        let h = p.a.poll_transmit(now, &mut buf).expect("A's RW");
        (h, buf[..n].to_vec())
    };
    // Not an echo: never answered at once.
    let (h, data) = next(&mut p, 300);
    assert!(!p.b.echo_ready(&h));
    assert_eq!(p.b.set_echo(cb, true), Ok(()));
    assert!(p.b.echo_ready(&h));
    p.b.set_echo(cb, false).unwrap();
    let r =
        p.b.handle_packet_or_echo_with(now, &h, 300, |rx| rx.push(&data), 4096, |r| *r);
    assert_eq!(r, None);
    assert_eq!(
        p.read_all(Side::B, cb),
        data,
        "kept for the reader as usual"
    );
    p.shuttle();

    // An echo with room for the whole reply: received, read, written and sent at once.
    p.b.set_echo(cb, true).unwrap();
    let _ = p.events(Side::B);
    let (h, data) = next(&mut p, 300);
    let before = p.b.stats();
    let mut kept = false;
    let reply =
        p.b.handle_packet_or_echo_with(now, &h, 300, |_| kept = true, 300, |r| *r)
            .expect("echoed at once");
    assert!(!kept, "the payload never entered the receive queue");
    assert_eq!((reply.op, reply.len), (Op::Rw as u16, 300));
    assert_eq!((reply.src_port, reply.dst_port), (h.dst_port, h.src_port));
    assert_eq!(reply.fwd_cnt, 600, "the reply credits what it echoed");
    assert_eq!(p.b.readable_bytes(cb), 0);
    assert!(!p.events(Side::B).contains(&Event::Readable(cb)));
    let after = p.b.stats();
    assert_eq!(after.bytes_echoed - before.bytes_echoed, 300);
    assert_eq!(after.bytes_out - before.bytes_out, 300);
    assert_eq!(after.packets_out - before.packets_out, 1);
    // The device delivers the reply with the request's bytes.
    p.a.handle_packet(now, &reply, &data);
    p.check();
    assert_eq!(p.read_all(Side::A, ca), data);
    p.shuttle();

    // A reply buffer too small for the payload: kept, then relayed by the owner.
    let (h, data) = next(&mut p, 300);
    let r =
        p.b.handle_packet_or_echo_with(now, &h, 300, |rx| rx.push(&data), 299, |r| *r);
    assert_eq!(r, None);
    assert_eq!(p.b.readable_bytes(cb), 300);
    // Something buffered: the next packet must queue behind it, not overtake it.
    let (h2, data2) = next(&mut p, 100);
    assert!(!p.b.echo_ready(&h2));
    let r =
        p.b.handle_packet_or_echo_with(now, &h2, 100, |rx| rx.push(&data2), 4096, |r| *r);
    assert_eq!(r, None);
    assert_eq!(p.b.relay(now, cb, usize::MAX), Ok(Some(400)));
    p.shuttle();
    let mut want = data.clone();
    want.extend_from_slice(&data2);
    assert_eq!(p.read_all(Side::A, ca), want, "in order");

    // More than A's credit lets B send (A's buffer is 1000 bytes and A reads nothing now):
    // three replies at once, then the fourth packet is kept.
    for _ in 0..3 {
        let (h, data) = next(&mut p, 300);
        let reply =
            p.b.handle_packet_or_echo_with(now, &h, 300, |_| {}, 4096, |r| *r);
        p.a.handle_packet(now, &reply.expect("within A's credit"), &data);
    }
    let (h, data) = next(&mut p, 300);
    assert!(!p.b.echo_ready(&h));
    let r =
        p.b.handle_packet_or_echo_with(now, &h, 300, |rx| rx.push(&data), 4096, |r| *r);
    assert_eq!(r, None);
    p.check();
    assert_eq!(p.read_all(Side::A, ca).len(), 900);
    assert_eq!(p.b.relay(now, cb, usize::MAX), Ok(Some(300)));
    p.shuttle();
    assert_eq!(p.read_all(Side::A, ca), data);

    // SEQPACKET has no echo.
    let mut p = Pair::with(seq_cfg(GUEST_CID), seq_cfg(VMADDR_CID_HOST));
    let (_, cb, _) = p.establish(SocketType::SeqPacket);
    assert!(p.b.set_echo(cb, true).is_err());
}

#[test]
fn refused_connect_without_listener() {
    let mut p = Pair::new();
    let now = p.now;
    let ca =
        p.a.connect(now, VMADDR_CID_HOST, 9999, None, SocketType::Stream)
            .unwrap();
    assert_eq!(p.a.state(ca), Some(ConnState::Connecting));
    assert_eq!(p.a.send(now, ca, b"x"), Err(ProtoError::NotConnected));
    p.shuttle();
    assert_eq!(
        p.events(Side::A),
        vec![Event::ConnectFailed(ca, ProtoError::ConnectionRefused)]
    );
    assert_eq!(p.b.stats().rst_unknown, 1);
    assert_eq!(p.a.state(ca), Some(ConnState::Closed));
    assert_eq!(p.a.send(now, ca, b"x"), Err(ProtoError::ConnectionRefused));
    // The refused connection sent nothing back in answer to the RST.
    assert_eq!(p.count(Side::A, Op::Rst), 0);
    p.a.close(now, ca);
    assert_eq!(p.events(Side::A), vec![Event::Closed(ca)]);
    assert_eq!(p.a.state(ca), None);
}

#[test]
fn connect_timeout_sends_rst() {
    let mut p = Pair::new();
    let t0 = p.now;
    let ca =
        p.a.connect(t0, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
    let sent = p.pump(Side::A, false); // the REQUEST is lost
    assert_eq!(sent.len(), 1);
    assert_eq!(p.a.poll_timeout(), Some(t0 + DEFAULT_CONNECT_TIMEOUT));
    p.advance(DEFAULT_CONNECT_TIMEOUT - Duration::from_millis(1));
    assert!(p.events(Side::A).is_empty());
    p.advance(Duration::from_millis(1));
    assert_eq!(
        p.events(Side::A),
        vec![Event::ConnectFailed(ca, ProtoError::TimedOut)]
    );
    let rst = p.pump(Side::A, false);
    assert_eq!(rst.len(), 1);
    assert_eq!(rst[0].op, Op::Rst as u16);
    // Idempotent.
    p.advance(Duration::ZERO);
    assert!(p.events(Side::A).is_empty());
    assert!(p.pump(Side::A, false).is_empty());
    assert_eq!(p.a.poll_timeout(), None);
    assert_eq!(p.a.stats().connect_timeouts, 1);
}

#[test]
fn a_connect_answered_with_anything_but_response_or_rst_is_reset() {
    // Linux's `virtio_transport_recv_connecting`: RST, and the connect fails with EPROTO; the
    // INVALID op (0) is ignored.
    for op in [
        Op::Rw as u16,
        Op::CreditUpdate as u16,
        Op::Shutdown as u16,
        99,
        0,
    ] {
        let mut p = Pair::new();
        let now = p.now;
        let ca =
            p.a.connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
                .unwrap();
        let req = p.pump(Side::A, false);
        assert_eq!(req.len(), 1);
        let mut reply = tmpl(
            (VMADDR_CID_HOST, PORT),
            (GUEST_CID, req[0].src_port),
            Op::Response,
        );
        reply.op = op;
        p.a.handle_packet(now, &reply, &[]);
        if op == 0 {
            assert!(p.events(Side::A).is_empty(), "op 0");
            assert_eq!(p.a.state(ca), Some(ConnState::Connecting));
            continue;
        }
        assert_eq!(
            p.events(Side::A),
            vec![Event::ConnectFailed(ca, ProtoError::Protocol { op })],
            "op {op}"
        );
        let out = p.pump(Side::A, false);
        assert_eq!(out.len(), 1, "op {op}");
        assert_eq!(out[0].op, Op::Rst as u16, "op {op}");
        assert_eq!(
            p.a.poll_timeout(),
            None,
            "op {op}: the connect timer was left"
        );
    }
}

#[test]
fn connect_with_a_timeout_longer_than_the_default_is_honoured() {
    let mut p = Pair::new();
    let t0 = p.now;
    let long = DEFAULT_CONNECT_TIMEOUT * 5;
    let ca =
        p.a.connect_with_timeout(t0, VMADDR_CID_HOST, PORT, None, SocketType::Stream, long)
            .unwrap();
    assert_eq!(p.pump(Side::A, false).len(), 1); // the REQUEST is lost
    assert_eq!(p.a.poll_timeout(), Some(t0 + long));
    p.advance(DEFAULT_CONNECT_TIMEOUT * 2);
    assert!(p.events(Side::A).is_empty(), "not cut to the default");
    assert_eq!(p.a.state(ca), Some(ConnState::Connecting));
    p.advance(long - DEFAULT_CONNECT_TIMEOUT * 2);
    assert_eq!(
        p.events(Side::A),
        vec![Event::ConnectFailed(ca, ProtoError::TimedOut)]
    );
    // A timeout too long for the clock means none: no timer, no panic.
    let cb =
        p.a.connect_with_timeout(
            p.now,
            VMADDR_CID_HOST,
            PORT,
            None,
            SocketType::Stream,
            Duration::MAX,
        )
        .unwrap();
    assert_eq!(p.a.state(cb), Some(ConnState::Connecting));
}

#[test]
fn readiness_follows_the_connection() {
    let mut p = Pair::new();
    let l = p.b.listen(PORT, 4, SocketType::Stream).unwrap();
    let ca =
        p.a.connect(p.now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
    let r = p.a.readiness(ca);
    assert!(
        !r.readable && !r.writable && !r.hangup && !r.error,
        "connecting: {r:?}"
    );
    p.shuttle();
    let cb = p.b.accept(l).unwrap();
    let r = p.a.readiness(ca);
    assert!(
        r.writable && !r.readable && !r.read_closed,
        "connected: {r:?}"
    );
    p.b.send(p.now, cb, b"data").unwrap();
    p.b.shutdown(p.now, cb, SEND).unwrap();
    p.shuttle();
    let r = p.a.readiness(ca);
    assert!(
        r.readable && r.read_closed && !r.hangup,
        "peer shut down sending: {r:?}"
    );
    p.a.shutdown(p.now, ca, SEND).unwrap();
    p.shuttle();
    let r = p.a.readiness(ca);
    assert!(r.hangup && !r.error, "both ways shut: {r:?}");
    let cc =
        p.a.connect(p.now, VMADDR_CID_HOST, PORT + 1, None, SocketType::Stream)
            .unwrap();
    p.shuttle();
    let r = p.a.readiness(cc);
    assert!(r.error && r.hangup, "refused: {r:?}");
}

#[test]
fn backlog_full_gets_rst() {
    let mut p = Pair::new();
    let l = p.b.listen(PORT, 1, SocketType::Stream).unwrap();
    let now = p.now;
    let c1 =
        p.a.connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
    let c2 =
        p.a.connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
    p.shuttle();
    let ev = p.events(Side::A);
    assert!(ev.contains(&Event::Connected(c1)));
    assert!(ev.contains(&Event::ConnectFailed(c2, ProtoError::ConnectionRefused)));
    assert_eq!(p.b.stats().backlog_full, 1);
    assert!(p.b.accept(l).is_some());
    assert!(p.b.accept(l).is_none());
    // Room again after accept.
    let c3 =
        p.a.connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
    p.shuttle();
    assert!(p.events(Side::A).contains(&Event::Connected(c3)));
}

#[test]
fn listen_on_port_any_picks_a_free_port() {
    use crate::packet::VMADDR_PORT_ANY;
    let mut p = Pair::with(
        cfg(GUEST_CID),
        Config {
            ephemeral_ports: 50000..=50002,
            ..cfg(VMADDR_CID_HOST)
        },
    );
    let now = p.now;
    // A connection holds the first port of the range: listen skips it.
    let held =
        p.b.connect(now, GUEST_CID, 9, None, SocketType::Stream)
            .unwrap();
    assert_eq!(p.b.local_port(held), Some(50000));
    let l1 = p.b.listen(VMADDR_PORT_ANY, 4, SocketType::Stream).unwrap();
    let l2 = p.b.listen(VMADDR_PORT_ANY, 4, SocketType::Stream).unwrap();
    assert_eq!(p.b.listener_port(l1), Some(50001));
    assert_eq!(p.b.listener_port(l2), Some(50002));
    // The range is used up: a clear error, nothing listens on VMADDR_PORT_ANY itself.
    assert_eq!(
        p.b.listen(VMADDR_PORT_ANY, 4, SocketType::Stream),
        Err(ProtoError::PortsExhausted {
            start: 50000,
            end: 50002
        })
    );
    // The picked port takes connections like any other.
    let ca =
        p.a.connect(now, VMADDR_CID_HOST, 50001, None, SocketType::Stream)
            .unwrap();
    p.shuttle();
    assert!(p.events(Side::A).contains(&Event::Connected(ca)));
    assert!(p.b.accept(l1).is_some());
    // Ports come back: 50000 when its connection was refused (the shuttle above), 50002
    // when its listener goes; the cursor wraps to the first.
    p.b.unlisten(now, l2);
    assert_eq!(p.b.listener_port(l2), None);
    let l3 = p.b.listen(VMADDR_PORT_ANY, 4, SocketType::Stream).unwrap();
    let l4 = p.b.listen(VMADDR_PORT_ANY, 4, SocketType::Stream).unwrap();
    assert_eq!(p.b.listener_port(l3), Some(50000));
    assert_eq!(p.b.listener_port(l4), Some(50002));
}

#[test]
fn streams_off_refuses_stream_sockets_and_answers_their_packets_with_rst() {
    let mut p = Pair::with(
        cfg(GUEST_CID),
        Config {
            stream: false,
            seqpacket: true,
            ..cfg(VMADDR_CID_HOST)
        },
    );
    let now = p.now;
    for e in [
        p.b.listen(PORT, 1, SocketType::Stream).unwrap_err(),
        p.b.connect(now, GUEST_CID, 1, None, SocketType::Stream)
            .unwrap_err(),
    ] {
        assert!(matches!(e, ProtoError::InvalidInput(m) if m.contains("NO_IMPLIED_STREAM")));
    }
    p.b.listen(PORT, 1, SocketType::SeqPacket).unwrap();
    let req = tmpl((GUEST_CID, 6000), (VMADDR_CID_HOST, PORT), Op::Request);
    p.b.handle_packet(now, &req, &[]);
    let out = p.pump(Side::B, false);
    assert_eq!(out.len(), 1);
    assert_rst_answers(&out[0], &req, VMADDR_CID_HOST);
}

#[test]
fn listen_any_port_holds_requests_until_answered() {
    let mut p = Pair::new();
    let now = p.now;
    let any = p.b.listen_any_port(8, SocketType::Stream).unwrap();
    assert_eq!(p.b.listener_port(any), Some(crate::packet::VMADDR_PORT_ANY));
    assert!(p.b.listen_any_port(8, SocketType::Stream).is_err());
    // A port with a listener of its own is not the any-port listener's.
    let own = p.b.listen(PORT, 8, SocketType::Stream).unwrap();
    let c_own =
        p.a.connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
    // Two REQUESTs to ports nobody listens on: held, nothing answered.
    let c1 =
        p.a.connect(now, VMADDR_CID_HOST, 7001, None, SocketType::Stream)
            .unwrap();
    let c2 =
        p.a.connect(now, VMADDR_CID_HOST, 7002, None, SocketType::Stream)
            .unwrap();
    p.shuttle();
    assert!(p.events(Side::A).contains(&Event::Connected(c_own)));
    assert_eq!(p.a.state(c1), Some(ConnState::Connecting));
    assert_eq!(p.a.state(c2), Some(ConnState::Connecting));
    assert!(p.b.accept(own).is_some());
    let h1 = p.b.accept(any).unwrap();
    let h2 = p.b.accept(any).unwrap();
    assert_eq!(p.b.local_port(h1), Some(7001));
    assert!(p.b.is_held(h1) && p.b.is_held(h2));
    // Data written before the answer waits for it.
    assert_eq!(p.b.send(now, h1, b"hi").unwrap(), 2);
    assert!(p.pump(Side::B, false).is_empty());
    // Accept one: RESPONSE, then the data. Refuse the other: RST, the peer's connect refused.
    p.b.answer(now, h1, true).unwrap();
    p.b.answer(now, h2, false).unwrap();
    assert_eq!(
        p.b.answer(now, h1, true),
        Err(ProtoError::InvalidInput(
            "answer: the connection is not a held REQUEST (listen_any_port)"
        ))
    );
    p.shuttle();
    let a_events = p.events(Side::A);
    assert!(a_events.contains(&Event::Connected(c1)), "{a_events:?}");
    assert!(
        a_events.contains(&Event::ConnectFailed(c2, ProtoError::ConnectionRefused)),
        "{a_events:?}"
    );
    assert_eq!(p.read_all(Side::A, c1), b"hi");
    assert_eq!(p.b.state(h2), None);
    // Closing a held connection refuses it too.
    let c3 =
        p.a.connect(now, VMADDR_CID_HOST, 7003, None, SocketType::Stream)
            .unwrap();
    p.shuttle();
    let h3 = p.b.accept(any).unwrap();
    p.b.close(now, h3);
    p.shuttle();
    assert!(p
        .events(Side::A)
        .contains(&Event::ConnectFailed(c3, ProtoError::ConnectionRefused)));
    // A port held by our own connect is not taken; without the listener, RST as before.
    let mine =
        p.b.connect(now, GUEST_CID, 9, Some(7100), SocketType::Stream)
            .unwrap();
    let stray = tmpl((GUEST_CID, 8000), (VMADDR_CID_HOST, 7100), Op::Request);
    p.b.handle_packet(now, &stray, &[]);
    let out = p.pump(Side::B, false);
    assert!(out
        .iter()
        .any(|h| h.op == Op::Rst as u16 && h.dst_port == 8000));
    let _ = mine;
    p.b.unlisten(now, any);
    let c4 =
        p.a.connect(now, VMADDR_CID_HOST, 7004, None, SocketType::Stream)
            .unwrap();
    p.shuttle();
    assert!(p
        .events(Side::A)
        .contains(&Event::ConnectFailed(c4, ProtoError::ConnectionRefused)));
    p.b.check_invariants().unwrap();
}

#[test]
fn listen_twice_is_addr_in_use() {
    let mut p = Pair::new();
    p.b.listen(PORT, 1, SocketType::Stream).unwrap();
    assert_eq!(
        p.b.listen(PORT, 1, SocketType::Stream),
        Err(ProtoError::AddrInUse { port: PORT })
    );
    assert!(matches!(
        p.b.listen(1, 1, SocketType::SeqPacket),
        Err(ProtoError::InvalidInput(_))
    ));
}

#[test]
fn unlisten_resets_pending() {
    let mut p = Pair::new();
    let l = p.b.listen(PORT, 4, SocketType::Stream).unwrap();
    let now = p.now;
    let ca =
        p.a.connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
    p.shuttle();
    p.events(Side::A);
    p.b.unlisten(now, l);
    p.shuttle();
    assert_eq!(p.events(Side::A), vec![Event::Reset(ca)]);
    assert_eq!(p.a.send(now, ca, b"x"), Err(ProtoError::ConnectionReset));
    assert_eq!(p.b.accept(l), None);
}

// ----- data and credit -----

#[test]
fn coalesces_small_writes() {
    let mut p = Pair::new();
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    let data = pattern(0, 1000);
    for b in &data {
        assert_eq!(p.a.send(now, ca, std::slice::from_ref(b)).unwrap(), 1);
    }
    p.shuttle();
    assert_eq!(
        p.count(Side::A, Op::Rw),
        1,
        "1000 one-byte sends, one packet"
    );
    assert_eq!(p.read_all(Side::B, cb), data);
}

#[test]
fn slow_reader_blocks_writer_without_overrun() {
    let b_cfg = Config {
        buf_alloc: 64 * 1024,
        ..cfg(VMADDR_CID_HOST)
    };
    let mut p = Pair::with(cfg(GUEST_CID), b_cfg);
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    // Fill: the writer may buffer send_buffer bytes plus the peer's credit, never more.
    let data = pattern(0, 1 << 20);
    let mut sent = 0;
    loop {
        let n = p.a.send(now, ca, &data[sent..]).unwrap();
        p.shuttle();
        if n == 0 {
            break;
        }
        sent += n;
    }
    assert_eq!(sent, DEFAULT_SEND_BUFFER + 64 * 1024);
    assert_eq!(p.b.readable_bytes(cb), 64 * 1024);
    assert_eq!(p.a.peer_credit(ca), Some((0, 64 * 1024)));
    assert_eq!(p.b.stats().credit_violations, 0);
    // Blocked: the writer asked for credit once, nothing else moves.
    assert_eq!(p.count(Side::A, Op::CreditRequest), 1);
    assert_eq!(p.shuttle(), 0);
    // The slow reader drains in small steps; the writer is told when it may write again.
    let mut got = Vec::new();
    let mut buf = [0u8; 3000];
    let mut writable = 0;
    while got.len() < data.len() {
        match p.b.recv(now, cb, &mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(ProtoError::WouldBlock) => {}
            Err(e) => panic!("{e}"),
        }
        p.shuttle();
        for e in p.events(Side::A) {
            if e == Event::Writable(ca) {
                writable += 1;
            }
        }
        if sent < data.len() {
            sent += p.a.send(now, ca, &data[sent..]).unwrap();
        }
        assert!(p.b.readable_bytes(cb) <= 64 * 1024);
        p.shuttle();
    }
    assert_eq!(got, data);
    assert!(writable >= 1);
    assert_eq!(p.b.stats().credit_violations, 0);
    // Credit updates were batched, not one per read.
    assert!(p.count(Side::B, Op::CreditUpdate) < (1 << 20) / 3000 / 2);
}

#[test]
fn credit_request_answered_with_credit_update() {
    let b_cfg = Config {
        buf_alloc: 4096,
        ..cfg(VMADDR_CID_HOST)
    };
    let mut p = Pair::with(cfg(GUEST_CID), b_cfg);
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    assert_eq!(p.a.send(now, ca, &pattern(0, 10_000)).unwrap(), 10_000);
    p.shuttle();
    assert_eq!(p.b.readable_bytes(cb), 4096);
    assert_eq!(p.count(Side::A, Op::CreditRequest), 1);
    assert_eq!(p.count(Side::B, Op::CreditUpdate), 1);
    assert_eq!(p.shuttle(), 0, "no credit request storm");
    let got = p.read_all(Side::B, cb);
    assert_eq!(got.len(), 4096);
    p.shuttle();
    assert_eq!(p.b.readable_bytes(cb), 4096);

    // A hand-crafted CREDIT_REQUEST gets a CREDIT_UPDATE with our fwd_cnt.
    let before = p.count(Side::B, Op::CreditUpdate);
    let port = p.a.local_port(ca).unwrap();
    let req = tmpl(
        (GUEST_CID, port),
        (VMADDR_CID_HOST, PORT),
        Op::CreditRequest,
    );
    p.b.handle_packet(
        now,
        &Header {
            fwd_cnt: 8192,
            ..req
        },
        &[],
    );
    let out = p.pump(Side::B, false);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].op, Op::CreditUpdate as u16);
    assert_eq!(out[0].buf_alloc, 4096);
    assert_eq!(out[0].fwd_cnt, 4096);
    assert_eq!(p.count(Side::B, Op::CreditUpdate), before + 1);
}

#[test]
fn peer_credit_overrun_is_reset() {
    let b_cfg = Config {
        buf_alloc: 4096,
        ..cfg(VMADDR_CID_HOST)
    };
    let mut p = Pair::with(cfg(GUEST_CID), b_cfg);
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    let port = p.a.local_port(ca).unwrap();
    let rw = tmpl((GUEST_CID, port), (VMADDR_CID_HOST, PORT), Op::Rw);
    let payload = pattern(0, 4097);
    p.b.handle_packet(now, &Header { len: 4097, ..rw }, &payload);
    assert_eq!(p.b.stats().credit_violations, 1);
    assert_eq!(p.events(Side::B), vec![Event::Reset(cb)]);
    assert_eq!(p.b.state(cb), Some(ConnState::Closed));
    assert_eq!(p.b.readable_bytes(cb), 0);
    p.shuttle();
    assert_eq!(p.events(Side::A), vec![Event::Reset(ca)]);
    assert_eq!(
        p.b.recv(now, cb, &mut [0; 8]),
        Err(ProtoError::ConnectionReset)
    );
}

#[test]
fn counters_wrap_past_u32_max() {
    let mut p = Pair::new();
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let start = u32::MAX - 100_000;
    for (ep, c) in [(&mut p.a, ca), (&mut p.b, cb)] {
        ep.conns.get_mut(&c).unwrap().credit.preset_counters(start);
    }
    p.transfer(Side::A, ca, cb, 3 << 20, 50_000);
    p.transfer(Side::B, cb, ca, 3 << 20, 70_000);
    let a = &p.a.conns[&ca].credit;
    assert!(a.tx_cnt.0 < start, "tx_cnt wrapped");
    assert_eq!(a.tx_cnt.0, start.wrapping_add(3 << 20));
    assert_eq!(a.fwd_cnt.0, start.wrapping_add(3 << 20));
    assert_eq!(a.in_flight(), 0);
}

// ----- receive buffer size (SO_VM_SOCKETS_BUFFER_SIZE, _MIN_SIZE, _MAX_SIZE) -----

/// Every header `side` sent on its connection with local port `port`, in order.
fn sent_on(p: &Pair, side: Side, port: u32) -> Vec<Header> {
    p.log
        .iter()
        .filter(|(s, h)| *s == side && h.src_port == port)
        .map(|(_, h)| *h)
        .collect()
}

/// The right edge each header advertises (`fwd_cnt + buf_alloc`, free-running) never moves
/// back: what the peer was allowed to send stays allowed.
#[track_caller]
fn assert_edge_never_moves_back(headers: &[Header]) {
    for w in headers.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let edge_a = a.fwd_cnt.wrapping_add(a.buf_alloc);
        let edge_b = b.fwd_cnt.wrapping_add(b.buf_alloc);
        assert!(
            i32::try_from(edge_b.wrapping_sub(edge_a)).is_ok(),
            "edge moved back: {a:?} then {b:?}"
        );
    }
}

#[test]
fn buffer_defaults_are_linuxs_around_the_configured_size() {
    let mut p = Pair::new();
    let (ca, cb, l) = p.establish(SocketType::Stream);
    let linux = BufferSize {
        size: 256 * 1024,
        min: 128,
        max: 256 * 1024,
    };
    assert_eq!(p.a.buffer(ca), Some(linux));
    assert_eq!(p.b.buffer(cb), Some(linux));
    assert_eq!(p.b.listener_buffer(l), Some(linux));
    assert_eq!(
        BufferSize::with_default_size(1 << 20),
        BufferSize {
            size: 1 << 20,
            min: 128,
            max: 1 << 20
        }
    );
    assert_eq!(
        BufferSize::with_default_size(64),
        BufferSize {
            size: 64,
            min: 64,
            max: 256 * 1024
        }
    );
    assert_eq!(p.a.buffer(ConnId(999)), None);
    assert_eq!(
        p.a.set_buffer(ConnId(999), BufferOption::Size, 4096),
        Err(ProtoError::UnknownConnection)
    );
}

#[test]
fn growing_the_buffer_is_advertised_at_once_and_bounds_what_arrives() {
    let mut p = Pair::new();
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    let port_b = p.b.local_port(cb).unwrap();
    // Above the default max: clamped to it, nothing changes, nothing is sent.
    let b = p.b.set_buffer(cb, BufferOption::Size, 1 << 20).unwrap();
    assert_eq!(b.size, 256 * 1024);
    assert!(p.pump(Side::B, false).is_empty(), "no change, no update");
    // Raise the max, then the size: one CREDIT_UPDATE with the new buf_alloc.
    p.b.set_buffer(cb, BufferOption::MaxSize, 1 << 20).unwrap();
    assert!(p.pump(Side::B, false).is_empty(), "the size did not change");
    let b = p.b.set_buffer(cb, BufferOption::Size, 1 << 20).unwrap();
    assert_eq!(b.size, 1 << 20);
    let out = p.pump(Side::B, true);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].op, Op::CreditUpdate as u16);
    assert_eq!(out[0].buf_alloc, 1 << 20);
    assert_eq!(p.a.peer_credit(ca), Some((1 << 20, 0)));
    // A writer with a large send buffer fills exactly the new window.
    let data = pattern(0, 3 << 20);
    let mut sent = 0;
    for _ in 0..64 {
        sent += p.a.send(now, ca, &data[sent..]).unwrap();
        p.shuttle();
    }
    assert_eq!(p.b.readable_bytes(cb), 1 << 20);
    assert_eq!(p.a.peer_credit(ca), Some((0, 1 << 20)));
    assert_eq!(p.b.stats().credit_violations, 0);
    assert_eq!(p.read_all(Side::B, cb), data[..1 << 20]);
    assert_edge_never_moves_back(&sent_on(&p, Side::B, port_b));
}

#[test]
fn shrinking_with_data_queued_never_takes_back_granted_credit() {
    let mut p = Pair::new();
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    let port_b = p.b.local_port(cb).unwrap();
    let data = pattern(0, 1 << 20);
    assert_eq!(p.a.send(now, ca, &data[..200 * 1024]).unwrap(), 200 * 1024);
    p.shuttle();
    assert_eq!(p.b.readable_bytes(cb), 200 * 1024);
    assert_eq!(p.a.peer_credit(ca), Some((56 * 1024, 200 * 1024)));
    // Shrink to 4 KiB with 200 KiB queued: the 56 KiB the writer was granted stay granted.
    let b = p.b.set_buffer(cb, BufferOption::Size, 4096).unwrap();
    assert_eq!(b.size, 4096);
    assert!(
        p.pump(Side::B, false).is_empty(),
        "nothing to advertise yet"
    );
    let mut sent = 200 * 1024;
    sent += p.a.send(now, ca, &data[sent..]).unwrap();
    p.shuttle();
    assert_eq!(
        p.b.readable_bytes(cb),
        256 * 1024,
        "the old grant is honoured"
    );
    assert_eq!(p.b.stats().credit_violations, 0);
    assert_eq!(p.a.peer_credit(ca), Some((0, 256 * 1024)));
    // The reader takes 100 KiB: 156 KiB are still buffered, above the new size, so an update
    // would grant nothing and none goes out; a packet that does go out (the answer to a
    // CREDIT_REQUEST) grants nothing either.
    let mut buf = vec![0u8; 100 * 1024];
    assert_eq!(p.b.recv(now, cb, &mut buf), Ok(100 * 1024));
    assert!(
        p.pump(Side::B, true).is_empty(),
        "no update that grants nothing"
    );
    let port_a = p.a.local_port(ca).unwrap();
    let req = tmpl(
        (GUEST_CID, port_a),
        (VMADDR_CID_HOST, PORT),
        Op::CreditRequest,
    );
    p.b.handle_packet(now, &Header { fwd_cnt: 0, ..req }, &[]);
    let out = p.pump(Side::B, true);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].op, Op::CreditUpdate as u16);
    assert_eq!((out[0].buf_alloc, out[0].fwd_cnt), (156 * 1024, 100 * 1024));
    assert_eq!(p.a.peer_credit(ca), Some((0, 156 * 1024)));
    p.shuttle();
    assert_eq!(
        p.b.readable_bytes(cb),
        156 * 1024,
        "no new credit was given"
    );
    // Drained: from now on the window is the new 4 KiB.
    let mut got = buf;
    got.extend(p.read_all(Side::B, cb));
    assert_eq!(got, data[..256 * 1024]);
    let out = p.pump(Side::B, true);
    assert_eq!(out.last().unwrap().buf_alloc, 4096);
    assert_eq!(p.a.peer_credit(ca).unwrap().0, 4096);
    for _ in 0..8 {
        sent += p.a.send(now, ca, &data[sent..]).unwrap();
        p.shuttle();
        assert!(p.b.readable_bytes(cb) <= 4096);
    }
    assert_eq!(p.b.readable_bytes(cb), 4096);
    assert_eq!(p.b.stats().credit_violations, 0);
    assert_edge_never_moves_back(&sent_on(&p, Side::B, port_b));
}

#[test]
fn a_peer_beyond_a_shrunken_window_is_still_reset() {
    let mut p = Pair::new();
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    // Drain the default grant first, so the 4 KiB window is in force and advertised.
    p.b.set_buffer(cb, BufferOption::Size, 4096).unwrap();
    let data = pattern(0, 256 * 1024);
    assert_eq!(p.a.send(now, ca, &data).unwrap(), 256 * 1024);
    p.shuttle();
    assert_eq!(p.read_all(Side::B, cb).len(), 256 * 1024);
    let out = p.pump(Side::B, true);
    assert_eq!(out.last().unwrap().buf_alloc, 4096);
    // A hand-crafted packet one byte beyond it resets the connection.
    let port = p.a.local_port(ca).unwrap();
    let rw = tmpl((GUEST_CID, port), (VMADDR_CID_HOST, PORT), Op::Rw);
    p.b.handle_packet(
        now,
        &Header {
            len: 4097,
            fwd_cnt: 0,
            ..rw
        },
        &pattern(0, 4097),
    );
    assert_eq!(p.b.stats().credit_violations, 1);
    assert_eq!(p.b.state(cb), Some(ConnState::Closed));
}

#[test]
fn a_size_set_before_the_request_goes_out_is_in_the_request() {
    let mut p = Pair::new();
    let l = p.b.listen(PORT, 4, SocketType::Stream).unwrap();
    let ca =
        p.a.connect(p.now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
    p.a.set_buffer(ca, BufferOption::Size, 8192).unwrap();
    let out = p.pump(Side::A, true);
    assert_eq!(out.len(), 1, "one REQUEST, no separate update");
    assert_eq!(out[0].op, Op::Request as u16);
    assert_eq!(out[0].buf_alloc, 8192);
    p.shuttle();
    let cb = p.b.accept(l).unwrap();
    assert_eq!(p.b.peer_credit(cb), Some((8192, 0)));
}

#[test]
fn a_listeners_buffer_is_inherited_by_what_it_takes_in() {
    let mut p = Pair::new();
    let l = p.b.listen(PORT, 4, SocketType::Stream).unwrap();
    p.b.set_listener_buffer(l, BufferOption::MaxSize, 1 << 20)
        .unwrap();
    let lb =
        p.b.set_listener_buffer(l, BufferOption::Size, 1 << 20)
            .unwrap();
    let want = BufferSize {
        size: 1 << 20,
        min: 128,
        max: 1 << 20,
    };
    assert_eq!(lb, want);
    let c1 =
        p.a.connect(p.now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
    p.shuttle();
    // Changed after the first REQUEST came in: the first keeps what it inherited.
    p.b.set_listener_buffer(l, BufferOption::Size, 8192)
        .unwrap();
    let c2 =
        p.a.connect(p.now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
    p.shuttle();
    let b1 = p.b.accept(l).unwrap();
    let b2 = p.b.accept(l).unwrap();
    assert_eq!(p.b.buffer(b1), Some(want));
    assert_eq!(p.b.buffer(b2), Some(BufferSize { size: 8192, ..want }));
    // The RESPONSE carried each: the connecting side sees it as credit.
    assert_eq!(p.a.peer_credit(c1), Some((1 << 20, 0)));
    assert_eq!(p.a.peer_credit(c2), Some((8192, 0)));
    assert_eq!(
        p.b.set_listener_buffer(ListenerId(99), BufferOption::Size, 1),
        Err(ProtoError::InvalidInput("unknown listener"))
    );
}

// ----- shutdown and close -----

#[test]
fn half_close_send_then_other_direction() {
    let mut p = Pair::new();
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    let send_only = SEND;
    p.a.send(now, ca, b"last words").unwrap();
    p.a.shutdown(now, ca, send_only).unwrap();
    assert_eq!(p.a.send(now, ca, b"more"), Err(ProtoError::BrokenPipe));
    p.shuttle();
    // SHUTDOWN follows the data.
    let ops: Vec<u16> = p
        .log
        .iter()
        .filter(|(s, _)| *s == Side::A)
        .map(|(_, h)| h.op)
        .collect();
    assert_eq!(&ops[ops.len() - 2..], &[Op::Rw as u16, Op::Shutdown as u16]);
    assert!(p
        .events(Side::B)
        .contains(&Event::PeerShutdown(cb, send_only)));
    assert_eq!(
        p.b.state(cb),
        Some(ConnState::PeerClosed {
            no_more_rx: true,
            no_more_tx: false
        })
    );
    assert_eq!(p.read_all(Side::B, cb), b"last words");
    assert_eq!(p.b.recv(now, cb, &mut [0; 8]), Ok(0), "EOF after drain");
    // The other direction still works.
    p.b.send(now, cb, b"reply").unwrap();
    p.shuttle();
    assert_eq!(p.read_all(Side::A, ca), b"reply");
    // B half-closes too: neither side has seen both flags, nobody resets.
    p.b.shutdown(now, cb, send_only).unwrap();
    p.shuttle();
    assert!(p
        .events(Side::A)
        .contains(&Event::PeerShutdown(ca, send_only)));
    assert_eq!(p.a.recv(now, ca, &mut [0; 8]), Ok(0));
    assert_eq!(p.count(Side::A, Op::Rst) + p.count(Side::B, Op::Rst), 0);
    // close: A sends SHUTDOWN(both), B has now seen both flags and answers RST.
    p.a.close(now, ca);
    assert_eq!(p.a.state(ca), Some(ConnState::Closing));
    p.shuttle();
    assert_eq!(p.count(Side::B, Op::Rst), 1);
    assert_eq!(p.events(Side::A), vec![Event::Closed(ca)]);
    assert_eq!(p.a.state(ca), None);
    assert_eq!(p.b.state(cb), Some(ConnState::Closed));
    assert_eq!(p.b.recv(now, cb, &mut [0; 8]), Ok(0));
    p.b.close(now, cb);
    assert_eq!(p.events(Side::B).last(), Some(&Event::Closed(cb)));
    assert_eq!(p.a.poll_timeout(), None);
}

#[test]
fn shutdown_after_the_peer_closed_is_accepted_as_linux_does() {
    let mut p = Pair::new();
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    // B closes first: SHUTDOWN both ways, A answers RST and the connection is closed.
    p.b.close(now, cb);
    p.shuttle();
    assert_eq!(p.a.state(ca), Some(ConnState::Closed));
    let before = p.log.len();
    let write = SEND;
    assert_eq!(p.a.shutdown(now, ca, write), Ok(()));
    assert_eq!(p.shuttle(), 0, "nothing goes on the wire");
    assert_eq!(p.log.len(), before);
    // A connect that never succeeded still says why.
    let c =
        p.a.connect(now, VMADDR_CID_HOST, 9999, None, SocketType::Stream)
            .unwrap();
    p.shuttle();
    assert_eq!(
        p.a.shutdown(now, c, write),
        Err(ProtoError::ConnectionRefused)
    );
}

#[test]
fn half_close_receive() {
    let mut p = Pair::new();
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    let recv_only = ShutdownFlags {
        receive: true,
        send: false,
    };
    p.b.shutdown(now, cb, recv_only).unwrap();
    assert_eq!(p.b.recv(now, cb, &mut [0; 8]), Ok(0));
    p.shuttle();
    assert!(p
        .events(Side::A)
        .contains(&Event::PeerShutdown(ca, recv_only)));
    assert_eq!(
        p.a.state(ca),
        Some(ConnState::PeerClosed {
            no_more_rx: false,
            no_more_tx: true
        })
    );
    assert_eq!(p.a.send(now, ca, b"x"), Err(ProtoError::BrokenPipe));
    assert_eq!(p.a.writable_bytes(ca), 0);
    // B can still send.
    p.b.send(now, cb, b"still here").unwrap();
    p.shuttle();
    assert_eq!(p.read_all(Side::A, ca), b"still here");
}

#[test]
fn close_with_responsive_peer_finishes_early() {
    let mut p = Pair::new();
    let (ca, _cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    p.a.close(now, ca);
    p.shuttle();
    // B saw both flags with nothing unread and reset; A's linger ends at once.
    assert_eq!(p.events(Side::A), vec![Event::Closed(ca)]);
    assert_eq!(p.a.stats().close_timeouts, 0);
}

#[test]
fn close_with_data_unread_waits_for_the_peers_close() {
    // Linux's `virtio_transport_recv_connected`: a SHUTDOWN of both directions is answered
    // with RST at once only when nothing is left to read; otherwise the answer is the
    // reader's own close.
    let mut p = Pair::new();
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    p.a.send(now, ca, b"bye").unwrap();
    p.a.close(now, ca);
    p.shuttle();
    assert!(p.events(Side::A).is_empty(), "A stopped lingering early");
    assert_eq!(p.a.state(ca), Some(ConnState::Closing));
    assert_eq!(p.read_all(Side::B, cb), b"bye");
    assert_eq!(p.b.recv(now, cb, &mut [0; 8]), Ok(0));
    assert!(p.b.send(now, cb, b"x").is_err(), "B wrote to a closed peer");
    p.b.close(now, cb);
    p.shuttle();
    assert_eq!(p.events(Side::A), vec![Event::Closed(ca)]);
    assert_eq!(p.a.state(ca), None);
    assert_eq!(p.a.stats().close_timeouts, 0);
}

#[test]
fn close_before_accept_with_data_unread_waits_for_the_accepters_close() {
    // The same rule for a connection still in the listener's queue: the data stays for the
    // accepter, and so does the answer.
    let mut p = Pair::new();
    let l = p.b.listen(PORT, 16, SocketType::Stream).unwrap();
    let now = p.now;
    let ca =
        p.a.connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
    p.shuttle();
    assert!(p.events(Side::A).contains(&Event::Connected(ca)));
    p.a.send(now, ca, b"early").unwrap();
    p.a.close(now, ca);
    p.shuttle();
    assert!(p.events(Side::A).is_empty(), "A stopped lingering early");
    let cb =
        p.b.accept(l)
            .expect("the connection is still there to accept");
    assert_eq!(p.read_all(Side::B, cb), b"early");
    assert_eq!(p.b.recv(now, cb, &mut [0; 8]), Ok(0));
    p.b.close(now, cb);
    p.shuttle();
    assert!(p.events(Side::A).contains(&Event::Closed(ca)));
    assert_eq!(p.a.stats().close_timeouts, 0);
}

#[test]
fn close_linger_then_rst() {
    let mut p = Pair::new();
    let (ca, _cb, _) = p.establish(SocketType::Stream);
    let t = p.now;
    p.a.close(t, ca);
    let out = p.pump(Side::A, false); // the peer is deaf
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].op, Op::Shutdown as u16);
    assert_eq!(out[0].flags, VIRTIO_VSOCK_SHUTDOWN_BOTH);
    assert_eq!(p.a.poll_timeout(), Some(t + DEFAULT_CLOSE_TIMEOUT));
    p.advance(DEFAULT_CLOSE_TIMEOUT - Duration::from_millis(1));
    assert!(p.events(Side::A).is_empty());
    assert!(p.pump(Side::A, false).is_empty());
    p.advance(Duration::from_millis(1));
    assert_eq!(p.events(Side::A), vec![Event::Closed(ca)]);
    let out = p.pump(Side::A, false);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].op, Op::Rst as u16);
    assert_eq!(p.a.state(ca), None);
    assert_eq!(p.a.stats().close_timeouts, 1);
}

const VIRTIO_VSOCK_SHUTDOWN_BOTH: u32 =
    crate::packet::VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE | crate::packet::VIRTIO_VSOCK_SHUTDOWN_F_SEND;

#[test]
fn abort_sends_rst() {
    let mut p = Pair::new();
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    p.a.abort(now, ca);
    assert_eq!(p.events(Side::A), vec![Event::Closed(ca)]);
    p.shuttle();
    assert_eq!(p.events(Side::B), vec![Event::Reset(cb)]);
    assert_eq!(p.b.send(now, cb, b"x"), Err(ProtoError::ConnectionReset));
}

// ----- resets and unknown connections -----

#[test]
fn rst_for_unknown_connection_but_not_for_rst() {
    let mut p = Pair::new();
    let now = p.now;
    let rw = tmpl((GUEST_CID, 5000), (VMADDR_CID_HOST, 77), Op::Rw);
    p.b.handle_packet(now, &Header { len: 3, ..rw }, b"abc");
    let out = p.pump(Side::B, false);
    assert_eq!(out.len(), 1);
    let rst = out[0];
    assert_eq!(rst.op, Op::Rst as u16);
    assert_eq!((rst.src_cid, rst.src_port), (VMADDR_CID_HOST, 77));
    assert_eq!((rst.dst_cid, rst.dst_port), (GUEST_CID, 5000));
    assert_eq!(p.b.stats().rst_unknown, 1);
    // Never RST an RST.
    p.b.handle_packet(
        now,
        &Header {
            op: Op::Rst as u16,
            ..rw
        },
        &[],
    );
    assert!(p.pump(Side::B, false).is_empty());
}

/// The `RST` that answers `hdr` when nothing takes it: from our CID, ports swapped, type
/// copied (Linux's `virtio_transport_reset_no_sock`).
#[track_caller]
fn assert_rst_answers(rst: &Header, hdr: &Header, local_cid: u64) {
    assert_eq!(rst.op, Op::Rst as u16);
    assert_eq!((rst.src_cid, rst.src_port), (local_cid, hdr.dst_port));
    assert_eq!((rst.dst_cid, rst.dst_port), (hdr.src_cid, hdr.src_port));
    assert_eq!(rst.type_, hdr.type_);
    assert_eq!((rst.len, rst.flags), (0, 0));
}

#[test]
fn wrong_dst_cid_is_answered_with_rst_and_not_delivered() {
    let mut p = Pair::new();
    let now = p.now;
    let (ca, cb, _l) = p.establish(SocketType::Stream);
    // A packet for the live connection's ports but another CID never reaches it.
    let local = p.a.local_port(ca).unwrap();
    let rw = Header {
        len: 3,
        ..tmpl((GUEST_CID, local), (99, PORT), Op::Rw)
    };
    p.b.handle_packet(now, &rw, b"abc");
    let out = p.pump(Side::B, false);
    assert_eq!(out.len(), 1);
    assert_rst_answers(&out[0], &rw, VMADDR_CID_HOST);
    assert_eq!(p.b.stats().dropped_wrong_cid, 1);
    assert_eq!(p.b.stats().rst_unknown, 1);
    assert_eq!(p.b.state(cb), Some(ConnState::Connected));
    assert_eq!(p.b.recv(now, cb, &mut [0; 4]), Err(ProtoError::WouldBlock));
    // A REQUEST to a listening port with another CID is refused, not accepted.
    let req = tmpl((GUEST_CID, 6000), (99, PORT), Op::Request);
    p.b.handle_packet(now, &req, &[]);
    let out = p.pump(Side::B, false);
    assert_eq!(out.len(), 1);
    assert_rst_answers(&out[0], &req, VMADDR_CID_HOST);
    assert!(p.events(Side::B).is_empty());
    // Never an RST for an RST, whatever its address.
    let rst = tmpl((GUEST_CID, local), (99, PORT), Op::Rst);
    p.b.handle_packet(now, &rst, &[]);
    assert!(p.pump(Side::B, false).is_empty());
    assert_eq!(p.b.stats().dropped_wrong_cid, 3);
    assert_eq!(p.b.stats().rst_unknown, 2);
    assert_eq!(p.b.state(cb), Some(ConnState::Connected));
    let _ = ca;
}

#[test]
fn unknown_type_is_answered_with_rst_but_not_an_rst() {
    let mut p = Pair::new();
    let now = p.now;
    let (_ca, cb, _l) = p.establish(SocketType::Stream);
    for op in [Op::Request, Op::Rw, Op::Shutdown, Op::CreditRequest] {
        let hdr = Header {
            type_: 9,
            ..tmpl((GUEST_CID, 7000), (VMADDR_CID_HOST, PORT), op)
        };
        p.b.handle_packet(now, &hdr, &[]);
        let out = p.pump(Side::B, false);
        assert_eq!(out.len(), 1, "{op}");
        assert_rst_answers(&out[0], &hdr, VMADDR_CID_HOST);
    }
    let rst = Header {
        type_: 9,
        ..tmpl((GUEST_CID, 7000), (VMADDR_CID_HOST, PORT), Op::Rst)
    };
    p.b.handle_packet(now, &rst, &[]);
    assert!(p.pump(Side::B, false).is_empty());
    assert_eq!(p.b.stats().dropped_invalid, 5);
    assert_eq!(p.b.stats().rst_unknown, 4);
    assert_eq!(p.b.state(cb), Some(ConnState::Connected));
}

#[test]
fn mismatched_type_is_answered_with_rst_and_the_connection_kept() {
    let mut p = Pair::new();
    let now = p.now;
    let (ca, cb, _l) = p.establish(SocketType::Stream);
    let local = p.a.local_port(ca).unwrap();
    // Seqpacket is not negotiated on B, and the connection is a stream: RST, nothing else.
    let hdr = Header {
        type_: SocketType::SeqPacket as u16,
        ..tmpl(
            (GUEST_CID, local),
            (VMADDR_CID_HOST, PORT),
            Op::CreditRequest,
        )
    };
    p.b.handle_packet(now, &hdr, &[]);
    let out = p.pump(Side::B, false);
    assert_eq!(out.len(), 1);
    assert_rst_answers(&out[0], &hdr, VMADDR_CID_HOST);
    assert_eq!(p.b.state(cb), Some(ConnState::Connected));
    assert_eq!(p.b.stats().dropped_invalid, 1);
}

#[test]
fn unknown_op_gets_rst_only_outside_a_connection() {
    let mut p = Pair::new();
    let now = p.now;
    let (ca, cb, _l) = p.establish(SocketType::Stream);
    let local = p.a.local_port(ca).unwrap();
    // On a live connection an unknown op is ignored (Linux's recv_connected: -EINVAL).
    let on_conn = Header {
        op: 42,
        ..tmpl((GUEST_CID, local), (VMADDR_CID_HOST, PORT), Op::Rw)
    };
    p.b.handle_packet(now, &on_conn, &[]);
    assert!(p.pump(Side::B, false).is_empty());
    // For no connection (a listener's port, or nothing) it is answered with RST.
    for port in [PORT, 4321] {
        let stray = Header {
            op: 42,
            ..tmpl((GUEST_CID, 8000), (VMADDR_CID_HOST, port), Op::Rw)
        };
        p.b.handle_packet(now, &stray, &[]);
        let out = p.pump(Side::B, false);
        assert_eq!(out.len(), 1);
        assert_rst_answers(&out[0], &stray, VMADDR_CID_HOST);
    }
    assert_eq!(p.b.stats().dropped_invalid, 3);
    assert_eq!(p.b.state(cb), Some(ConnState::Connected));
}

#[test]
fn malformed_len_is_dropped_silently() {
    let mut p = Pair::new();
    let now = p.now;
    let rw = Header {
        len: 3,
        ..tmpl((GUEST_CID, 5000), (VMADDR_CID_HOST, 77), Op::Rw)
    };
    p.b.handle_packet(now, &rw, b"ab");
    p.b.handle_packet(
        now,
        &Header {
            op: Op::Request as u16,
            ..rw
        },
        b"abc",
    );
    assert!(p.pump(Side::B, false).is_empty());
    assert_eq!(p.b.stats().dropped_invalid, 2);
}

#[test]
fn connect_refuses_a_cid_wider_than_32_bits_before_sending() {
    let mut p = Pair::new();
    let now = p.now;
    for cid in [u64::from(u32::MAX) + 1, 99_999_999_999, u64::MAX] {
        let e =
            p.a.connect(now, cid, 1, None, SocketType::Stream)
                .unwrap_err();
        assert_eq!(e, ProtoError::InvalidCid { cid });
        assert!(e.to_string().contains(&cid.to_string()), "{e}");
    }
    assert!(p.pump(Side::A, false).is_empty());
    // The widest CID that fits (VMADDR_CID_ANY) is accepted, as Linux's connect does.
    let c =
        p.a.connect(
            now,
            crate::packet::VMADDR_CID_ANY,
            1,
            None,
            SocketType::Stream,
        )
        .unwrap();
    assert_eq!(p.a.state(c), Some(ConnState::Connecting));
}

#[test]
fn unknown_rst_queue_is_bounded() {
    let mut p = Pair::new();
    let now = p.now;
    for port in 0..u32::try_from(MAX_PENDING_UNKNOWN_RST + 10).unwrap() {
        let rw = tmpl((GUEST_CID, port), (VMADDR_CID_HOST, 77), Op::CreditUpdate);
        p.b.handle_packet(now, &rw, &[]);
    }
    assert_eq!(p.pump(Side::B, false).len(), MAX_PENDING_UNKNOWN_RST);
    assert_eq!(p.b.stats().rst_dropped, 10);
}

#[test]
fn transport_reset_resets_everything_keeps_listeners() {
    let mut p = Pair::new();
    let (ca, _cb, _) = p.establish(SocketType::Stream);
    let la = p.a.listen(4000, 4, SocketType::Stream).unwrap();
    let now = p.now;
    let pending =
        p.a.connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
    p.a.handle_transport_reset(now, Some(7));
    assert_eq!(p.a.local_cid(), 7);
    let ev = p.events(Side::A);
    assert!(ev.contains(&Event::Reset(ca)));
    assert!(ev.contains(&Event::ConnectFailed(pending, ProtoError::ConnectionReset)));
    assert!(
        p.pump(Side::A, false).is_empty(),
        "nothing sent on transport reset"
    );
    assert_eq!(
        p.a.recv(now, ca, &mut [0; 4]),
        Err(ProtoError::ConnectionReset)
    );
    // The listener survived and answers on the new CID.
    let cb2 = p.b.connect(now, 7, 4000, None, SocketType::Stream).unwrap();
    p.shuttle();
    assert!(p.events(Side::B).contains(&Event::Connected(cb2)));
    assert!(p.a.accept(la).is_some());
}

// ----- ports -----

#[test]
fn ephemeral_ports_exhausted() {
    let a_cfg = Config {
        ephemeral_ports: 50000..=50003,
        ..cfg(GUEST_CID)
    };
    let mut p = Pair::with(a_cfg, cfg(VMADDR_CID_HOST));
    p.b.listen(PORT, 16, SocketType::Stream).unwrap();
    p.a.listen(50001, 1, SocketType::Stream).unwrap();
    let now = p.now;
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(
            p.a.connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
                .unwrap(),
        );
    }
    let mut ports: Vec<u32> = conns.iter().map(|&c| p.a.local_port(c).unwrap()).collect();
    ports.sort();
    assert_eq!(ports, vec![50000, 50002, 50003]);
    assert_eq!(
        p.a.connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream),
        Err(ProtoError::PortsExhausted {
            start: 50000,
            end: 50003
        })
    );
    // An explicit port in use is refused too.
    assert_eq!(
        p.a.connect(now, VMADDR_CID_HOST, PORT, Some(50002), SocketType::Stream),
        Err(ProtoError::AddrInUse { port: 50002 })
    );
    // Freeing one makes it available again (the cursor wraps).
    p.a.abort(now, conns[1]);
    let c =
        p.a.connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
    assert_eq!(p.a.local_port(c), Some(ports[1]));
}

#[test]
fn too_many_connections() {
    let a_cfg = Config {
        max_connections: 2,
        ..cfg(GUEST_CID)
    };
    let mut p = Pair::with(a_cfg, cfg(VMADDR_CID_HOST));
    let now = p.now;
    for _ in 0..2 {
        p.a.connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
    }
    assert_eq!(
        p.a.connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream),
        Err(ProtoError::TooManyConnections { max: 2 })
    );
}

// ----- seqpacket -----

fn seq_cfg(cid: u64) -> Config {
    Config {
        seqpacket: true,
        buf_alloc: 2 << 20,
        send_buffer: 2 << 20,
        ..cfg(cid)
    }
}

#[test]
fn seqpacket_preserves_boundaries_1b_to_1mib() {
    let mut p = Pair::with(seq_cfg(GUEST_CID), seq_cfg(VMADDR_CID_HOST));
    let (ca, cb, _) = p.establish(SocketType::SeqPacket);
    let now = p.now;
    let sizes = [1usize, 2, 100, 4095, 65_536, 65_537, 300_000, 1 << 20, 0, 7];
    for (i, &len) in sizes.iter().enumerate() {
        p.a.send_msg(now, ca, &pattern(i, len), i % 2 == 0).unwrap();
    }
    p.shuttle();
    let mut buf = vec![0u8; 1 << 20];
    for (i, &len) in sizes.iter().enumerate() {
        let (copied, full, eor) = p.b.recv_msg(now, cb, &mut buf).unwrap();
        assert_eq!((copied, full, eor), (len, len, i % 2 == 0), "message {i}");
        assert_eq!(&buf[..len], &pattern(i, len)[..]);
        p.shuttle();
    }
    assert_eq!(p.b.recv_msg(now, cb, &mut buf), Err(ProtoError::WouldBlock));
    // 1 MiB is split into max_payload packets, only the last with EOM.
    let rw: Vec<&Header> = p
        .log
        .iter()
        .filter(|(s, h)| *s == Side::A && h.op == Op::Rw as u16)
        .map(|(_, h)| h)
        .collect();
    assert!(rw.iter().all(|h| h.len <= DEFAULT_MAX_PAYLOAD));
    let eoms = rw
        .iter()
        .filter(|h| h.flags & crate::packet::VIRTIO_VSOCK_SEQ_EOM != 0)
        .count();
    assert_eq!(eoms, sizes.len());
    assert_eq!(p.b.stats().credit_violations, 0);
}

#[test]
fn seqpacket_truncates_and_limits() {
    let mut p = Pair::with(seq_cfg(GUEST_CID), seq_cfg(VMADDR_CID_HOST));
    let (ca, cb, _) = p.establish(SocketType::SeqPacket);
    let now = p.now;
    p.a.send_msg(now, ca, &pattern(0, 1000), false).unwrap();
    p.a.send_msg(now, ca, b"next", true).unwrap();
    p.shuttle();
    let mut small = [0u8; 10];
    assert_eq!(p.b.recv_msg(now, cb, &mut small), Ok((10, 1000, false)));
    assert_eq!(&small[..], &pattern(0, 10)[..]);
    assert_eq!(p.b.recv_msg(now, cb, &mut small), Ok((4, 4, true)));
    assert_eq!(&small[..4], b"next");
    assert_eq!(p.b.readable_bytes(cb), 0);
    assert!(matches!(
        p.a.send_msg(now, ca, &vec![0; (2 << 20) + 1], false),
        Err(ProtoError::MessageTooLarge { .. })
    ));
    assert!(matches!(
        p.a.send(now, ca, b"x"),
        Err(ProtoError::InvalidInput(_))
    ));
    // EOF after the peer shuts down sending.
    p.a.shutdown(now, ca, SEND).unwrap();
    p.shuttle();
    assert_eq!(p.b.recv_msg(now, cb, &mut small), Ok((0, 0, false)));
}

#[test]
fn seqpacket_send_buffer_full_would_block() {
    let a_cfg = Config {
        send_buffer: 100_000,
        ..seq_cfg(GUEST_CID)
    };
    let b_cfg = Config {
        buf_alloc: 100_000,
        ..seq_cfg(VMADDR_CID_HOST)
    };
    let mut p = Pair::with(a_cfg, b_cfg);
    let (ca, cb, _) = p.establish(SocketType::SeqPacket);
    let now = p.now;
    let msg = pattern(0, 60_000);
    let mut sent = 0;
    while sent < 6 {
        match p.a.send_msg(now, ca, &msg, false) {
            Ok(()) => sent += 1,
            Err(ProtoError::WouldBlock) => {
                p.shuttle();
                let mut buf = vec![0; 60_000];
                let (n, full, _) = p.b.recv_msg(now, cb, &mut buf).unwrap();
                assert_eq!((n, full), (60_000, 60_000));
                assert_eq!(buf, msg);
            }
            Err(e) => panic!("{e}"),
        }
        p.shuttle();
        assert!(p.b.readable_bytes(cb) <= 100_000);
    }
    assert_eq!(p.b.stats().credit_violations, 0);
}

/// From the chaos soak (`tests/chaos.rs`): a SEQPACKET receiver whose buffer is full of a
/// small complete message and the head of a big one. Reading the small one frees less than a
/// quarter of the buffer while bytes stay buffered, so no CREDIT_UPDATE went out; the sender,
/// at zero credit, had asked once (and been answered while still at zero), so it never asked
/// again: the big message's tail never came (a read timeout, or the RST of the close's linger).
#[test]
fn regression_seqpacket_credit_freed_by_a_small_message_is_announced() {
    let small_cfg = |cid| Config {
        seqpacket: true,
        buf_alloc: 256 * 1024,
        send_buffer: 256 * 1024,
        ..cfg(cid)
    };
    let mut p = Pair::with(small_cfg(GUEST_CID), small_cfg(VMADDR_CID_HOST));
    let (ca, cb, _) = p.establish(SocketType::SeqPacket);
    let now = p.now;
    let small = pattern(0, 10_000);
    let big = pattern(1, 256 * 1024);
    p.a.send_msg(now, ca, &small, false).unwrap();
    p.shuttle();
    p.a.send_msg(now, ca, &big, true).unwrap();
    p.shuttle();
    // B's buffer is full: the small message and all but 10,000 bytes of the big one.
    assert_eq!(p.b.readable_bytes(cb), 256 * 1024);
    let mut buf = vec![0u8; 256 * 1024];
    assert_eq!(p.b.recv_msg(now, cb, &mut buf), Ok((10_000, 10_000, false)));
    assert_eq!(&buf[..10_000], &small[..]);
    p.shuttle();
    assert_eq!(
        p.b.recv_msg(now, cb, &mut buf),
        Ok((256 * 1024, 256 * 1024, true)),
        "the big message's tail must arrive once the small one is read"
    );
    assert_eq!(buf, big);
    assert_eq!(p.b.stats().credit_violations, 0);
}

// ----- fuzz regressions and odds and ends -----

/// From fuzzing: a one-byte payload buffer still drains a full send buffer (one byte per
/// packet) and control packets are not starved.
#[test]
fn regression_one_byte_payload_buffer() {
    let mut p = Pair::new();
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    let data = pattern(0, 5000);
    assert_eq!(p.a.send(now, ca, &data).unwrap(), 5000);
    let mut one = [0u8; 1];
    let mut n = 0;
    while let Some(h) = p.a.poll_transmit(now, &mut one) {
        assert_eq!(h.len, 1);
        p.b.handle_packet(now, &h, &one);
        n += 1;
    }
    assert_eq!(n, 5000);
    p.shuttle();
    assert_eq!(p.read_all(Side::B, cb), data);
    // An empty payload buffer: no RW, but control packets still go out.
    p.a.send(now, ca, b"x").unwrap();
    p.a.shutdown(
        now,
        ca,
        ShutdownFlags {
            receive: true,
            send: false,
        },
    )
    .unwrap();
    let h =
        p.a.poll_transmit(now, &mut [])
            .expect("SHUTDOWN(receive) despite no room");
    assert_eq!(h.op, Op::Shutdown as u16);
    assert!(p.a.poll_transmit(now, &mut []).is_none());
}

#[test]
fn states_display_in_spec_words() {
    let shown: Vec<String> = [
        ConnState::Connecting,
        ConnState::Connected,
        ConnState::PeerClosed {
            no_more_rx: true,
            no_more_tx: false,
        },
        ConnState::Closing,
        ConnState::Closed,
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    assert_eq!(
        shown[2],
        "peer closed (no more rx: true, no more tx: false)"
    );
    assert_eq!(ConnId(4).to_string(), "conn#4");
    assert_eq!(ListenerId(1).to_string(), "listener#1");
    assert_eq!(
        ProtoError::PortsExhausted { start: 1, end: 2 }.to_string(),
        "no free ephemeral port in 1..=2"
    );
}

#[test]
fn data_after_close_is_discarded_but_credited() {
    let mut p = Pair::new();
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    p.a.close(now, ca);
    // B sends before it learns of the close.
    p.b.send(now, cb, &pattern(0, 1000)).unwrap();
    p.pump(Side::B, true);
    assert_eq!(p.a.stats().rx_discarded, 1000);
    p.shuttle();
    assert_eq!(p.events(Side::A), vec![Event::Closed(ca)]);
}

/// From fuzzing: a connection that timed out is off the wire, so its port may be reused by a
/// new `connect` while the old `ConnId` is still held; the two never mix.
#[test]
fn regression_port_reused_while_closed_conn_held() {
    let mut p = Pair::new();
    p.b.listen(PORT, 4, SocketType::Stream).unwrap();
    let now = p.now;
    let old =
        p.a.connect(now, VMADDR_CID_HOST, PORT, Some(49152), SocketType::Stream)
            .unwrap();
    let _ = p.pump(Side::A, false); // REQUEST lost
    p.advance(DEFAULT_CONNECT_TIMEOUT);
    let _ = p.pump(Side::A, false); // RST lost too
    assert_eq!(p.a.state(old), Some(ConnState::Closed));
    let new =
        p.a.connect(p.now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
    assert_eq!(p.a.local_port(new), Some(49152));
    p.shuttle();
    assert!(p.events(Side::A).contains(&Event::Connected(new)));
    p.a.send(p.now, new, b"fresh").unwrap();
    p.shuttle();
    assert_eq!(p.a.state(old), Some(ConnState::Closed));
    assert_eq!(p.a.send(p.now, old, b"x"), Err(ProtoError::TimedOut));
    assert_eq!(p.a.peer_credit(old), Some((0, 0)));
}

#[test]
fn peer_counters_not_starting_at_zero() {
    let mut p = Pair::new();
    let l = p.b.listen(PORT, 4, SocketType::Stream).unwrap();
    let now = p.now;
    // A peer whose fwd_cnt starts at 1000 connects to B.
    let req = tmpl((GUEST_CID, 6000), (VMADDR_CID_HOST, PORT), Op::Request);
    p.b.handle_packet(
        now,
        &Header {
            buf_alloc: 10,
            fwd_cnt: 1000,
            ..req
        },
        &[],
    );
    let _ = p.pump(Side::B, false);
    let cb = p.b.accept(l).unwrap();
    assert_eq!(p.b.peer_credit(cb), Some((10, 0)));
    assert_eq!(p.b.send(now, cb, &[7; 30]).unwrap(), 30);
    let out = p.pump(Side::B, false);
    assert_eq!(out.iter().map(|h| h.len).sum::<u32>(), 10);
    // The peer consumed 10: its fwd_cnt moves to 1010 and 10 more may go.
    let upd = tmpl((GUEST_CID, 6000), (VMADDR_CID_HOST, PORT), Op::CreditUpdate);
    p.b.handle_packet(
        now,
        &Header {
            buf_alloc: 10,
            fwd_cnt: 1010,
            ..upd
        },
        &[],
    );
    assert_eq!(p.b.peer_credit(cb), Some((10, 0)));
    let out = p.pump(Side::B, false);
    assert_eq!(out[0].len, 10);
}

/// A CREDIT_REQUEST is answered with an explicit CREDIT_UPDATE even when data packets (which
/// carry fwd_cnt too) go out first: vhost-device-vsock 0.3.0 resumes reading its host socket
/// only on an explicit CREDIT_UPDATE, and a full-duplex transfer stalled without it.
#[test]
fn credit_request_answered_explicitly_despite_piggybacked_data() {
    let mut p = Pair::with(cfg(GUEST_CID), cfg(VMADDR_CID_HOST));
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    assert_eq!(p.b.send(now, cb, &pattern(0, 1000)).unwrap(), 1000);
    let port = p.a.local_port(ca).unwrap();
    let req = tmpl(
        (GUEST_CID, port),
        (VMADDR_CID_HOST, PORT),
        Op::CreditRequest,
    );
    p.b.handle_packet(now, &req, &[]);
    let out = p.pump(Side::B, false);
    assert!(
        out.iter().any(|h| h.op == Op::Rw as u16),
        "the queued data goes out: {out:?}"
    );
    assert!(
        out.iter().any(|h| h.op == Op::CreditUpdate as u16),
        "and an explicit CREDIT_UPDATE answers the request: {out:?}"
    );
}

#[test]
fn ephemeral_first_starts_the_search_and_wraps() {
    let a_cfg = Config {
        ephemeral_ports: 50000..=50003,
        ephemeral_first: Some(50002),
        ..cfg(GUEST_CID)
    };
    let mut p = Pair::with(a_cfg, cfg(VMADDR_CID_HOST));
    p.b.listen(PORT, 16, SocketType::Stream).unwrap();
    let now = p.now;
    let ports: Vec<u32> = (0..4)
        .map(|_| {
            let c =
                p.a.connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
                    .unwrap();
            p.a.local_port(c).unwrap()
        })
        .collect();
    assert_eq!(ports, vec![50002, 50003, 50000, 50001]);
    // Outside the range it is ignored: the search starts at the range's beginning.
    let mut q = Endpoint::new(Config {
        ephemeral_ports: 50000..=50003,
        ephemeral_first: Some(7),
        ..cfg(GUEST_CID)
    });
    let c = q
        .connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
        .unwrap();
    assert_eq!(q.local_port(c), Some(50000));
}

// ----- timers at scale -----

#[test]
fn timers_fire_in_order_exactly_once_with_many_connections() {
    const N: u64 = 10_000;
    let mut a = Endpoint::new(cfg(GUEST_CID));
    let t0 = Instant::now();
    // Deadlines in an order unrelated to the ConnIds: connection i connects at t0 + perm(i) ms.
    let perm = |i: u64| (i * 7_919) % N;
    let mut deadline = HashMap::new();
    for i in 0..N {
        let at = t0 + Duration::from_millis(perm(i));
        let c = a
            .connect(at, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap();
        deadline.insert(c, at + DEFAULT_CONNECT_TIMEOUT);
    }
    let mut buf = [0u8; 64];
    while a.poll_transmit(t0, &mut buf).is_some() {} // every REQUEST is lost
                                                     // A tenth is closed or aborted before its deadline: they must never time out.
    let mut gone = Vec::new();
    for (k, (&c, _)) in deadline.iter().enumerate().filter(|(k, _)| k % 10 == 0) {
        if k % 20 == 0 {
            a.close(t0, c);
        } else {
            a.abort(t0, c);
        }
        gone.push(c);
    }
    for c in &gone {
        deadline.remove(c);
    }
    assert!(std::iter::from_fn(|| a.poll_event()).all(|e| matches!(e, Event::Closed(_))));
    a.check_invariants().unwrap();

    let mut fired = Vec::new();
    let mut last = t0;
    // Several instants, some of them repeated (idempotent) and one before any deadline.
    for ms in [
        0, 1_999, 2_000, 2_000, 4_321, 4_321, 7_000, 11_999, 12_000, 12_000,
    ] {
        let now = t0 + Duration::from_millis(ms);
        a.handle_timeout(now);
        let mut batch = Vec::new();
        while let Some(ev) = a.poll_event() {
            match ev {
                Event::ConnectFailed(c, ProtoError::TimedOut) => batch.push(c),
                other => panic!("unexpected event {other:?}"),
            }
        }
        for &c in &batch {
            let d = deadline[&c];
            assert!(d <= now, "{c} fired at {now:?} before its deadline {d:?}");
            assert!(
                d > last || fired.is_empty(),
                "{c} should have fired earlier"
            );
        }
        fired.extend(batch);
        // What is left is exactly what has not expired yet.
        let next = deadline
            .iter()
            .filter(|(c, _)| !fired.contains(c))
            .map(|(_, &d)| d)
            .min();
        assert_eq!(a.poll_timeout(), next);
        a.check_invariants().unwrap();
        last = now;
    }
    assert_eq!(fired.len(), deadline.len(), "every deadline fires");
    let mut unique = fired.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), fired.len(), "a deadline fired twice");
    // In deadline order (ties in ConnId order).
    let keys: Vec<(Instant, ConnId)> = fired.iter().map(|&c| (deadline[&c], c)).collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "fired out of order");
    assert_eq!(a.stats().connect_timeouts, deadline.len() as u64);
    assert_eq!(a.poll_timeout(), None);
    // One RST for each timed-out connect (plus one per aborted/closed one, sent before).
    let mut rst = 0u64;
    while let Some(h) = a.poll_transmit(t0, &mut buf) {
        assert_eq!(h.op, Op::Rst as u16);
        rst += 1;
    }
    assert_eq!(rst, N);
}

#[test]
fn poll_timeout_follows_close_abort_and_connected() {
    let mut p = Pair::new();
    let t0 = p.now;
    let l = p.b.listen(PORT, 16, SocketType::Stream).unwrap();
    let connect = |p: &mut Pair, at: Instant| {
        p.a.connect(at, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
            .unwrap()
    };
    let c1 = connect(&mut p, t0);
    let c2 = connect(&mut p, t0 + Duration::from_millis(10));
    let c3 = connect(&mut p, t0 + Duration::from_millis(20));
    let c4 = connect(&mut p, t0 + Duration::from_millis(30));
    assert_eq!(p.a.poll_timeout(), Some(t0 + DEFAULT_CONNECT_TIMEOUT));
    // abort removes the earliest deadline.
    p.a.abort(t0, c1);
    let at = |ms| Some(t0 + Duration::from_millis(ms) + DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(p.a.poll_timeout(), at(10));
    // close while connecting removes it too.
    p.a.close(t0, c2);
    assert_eq!(p.a.poll_timeout(), at(20));
    // The handshake completing (RESPONSE) removes the connect deadlines.
    p.shuttle();
    let ev = p.events(Side::A);
    assert!(ev.contains(&Event::Connected(c3)) && ev.contains(&Event::Connected(c4)));
    assert_eq!(p.a.poll_timeout(), None);
    let c5 = p.b.accept(l).unwrap(); // c3's peer
    let _c6 = p.b.accept(l).unwrap();
    // A refused connect (the peer's RST) removes its deadline.
    let c7 =
        p.a.connect(t0, VMADDR_CID_HOST, PORT + 1, None, SocketType::Stream)
            .unwrap();
    assert_eq!(p.a.poll_timeout(), Some(t0 + DEFAULT_CONNECT_TIMEOUT));
    p.shuttle();
    assert_eq!(
        p.events(Side::A),
        vec![Event::ConnectFailed(c7, ProtoError::ConnectionRefused)]
    );
    assert_eq!(p.a.poll_timeout(), None);
    // close of an established connection arms the linger; the peer's answer disarms it.
    let t1 = t0 + Duration::from_secs(1);
    p.now = t1;
    p.a.close(t1, c3);
    assert_eq!(p.a.poll_timeout(), Some(t1 + DEFAULT_CLOSE_TIMEOUT));
    p.pump(Side::A, true); // SHUTDOWN reaches B, which answers RST
    p.b.close(t1, c5);
    p.shuttle();
    assert!(p.events(Side::A).contains(&Event::Closed(c3)));
    assert_eq!(p.a.poll_timeout(), None);
    assert_eq!(p.a.stats().connect_timeouts + p.a.stats().close_timeouts, 0);
    p.check();
}

#[test]
fn accept_queue_is_fifo_and_drops_a_reset_connection() {
    let mut p = Pair::new();
    let now = p.now;
    let l = p.b.listen(PORT, 16, SocketType::Stream).unwrap();
    let ca: Vec<ConnId> = (0..3)
        .map(|_| {
            p.a.connect(now, VMADDR_CID_HOST, PORT, None, SocketType::Stream)
                .unwrap()
        })
        .collect();
    p.shuttle();
    p.a.abort(now, ca[1]); // its RST takes it out of B's accept queue
    p.shuttle();
    let first = p.b.accept(l).unwrap();
    let third = p.b.accept(l).unwrap();
    assert_eq!(p.b.accept(l), None);
    assert_eq!(
        p.b.peer_addr(first).unwrap().1,
        p.a.local_port(ca[0]).unwrap()
    );
    assert_eq!(
        p.b.peer_addr(third).unwrap().1,
        p.a.local_port(ca[2]).unwrap()
    );
}

#[test]
fn writable_when_one_packet_empties_a_full_send_buffer() {
    let a_cfg = Config {
        send_buffer: 1000,
        ..cfg(GUEST_CID)
    };
    let mut p = Pair::with(a_cfg, cfg(VMADDR_CID_HOST));
    let (ca, _cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    assert_eq!(p.a.send(now, ca, &pattern(0, 1000)), Ok(1000));
    assert_eq!(p.a.send(now, ca, b"more"), Ok(0)); // full: Writable is owed
    let out = p.pump(Side::A, true);
    assert_eq!(out.iter().map(|h| h.len).collect::<Vec<_>>(), vec![1000]);
    assert_eq!(p.events(Side::A), vec![Event::Writable(ca)]);
}

/// From the chaos soak (`tests/chaos.rs`): a connection whose send buffer is full waits for
/// room, not for storage. Storage coming back (another connection's packets completing, the
/// owner calls `storage_freed`) used to take its `Writable` away: the event went out while the
/// buffer was still full (its readiness showed not writable), and when the buffer drained no
/// event followed, so a non-blocking writer polling its descriptor waited forever.
#[test]
fn regression_storage_freed_leaves_a_full_send_buffer_waiting_for_room() {
    let a_cfg = Config {
        send_buffer: 1000,
        ..cfg(GUEST_CID)
    };
    let mut p = Pair::with(a_cfg, cfg(VMADDR_CID_HOST));
    let (ca, _cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    assert_eq!(p.a.send(now, ca, &pattern(0, 1000)), Ok(1000));
    assert_eq!(p.a.send(now, ca, b"more"), Ok(0)); // full: Writable is owed
    p.a.storage_freed();
    assert_eq!(
        p.events(Side::A),
        vec![],
        "storage is not what it waits for"
    );
    assert!(!p.a.readiness(ca).writable);
    p.pump(Side::A, true);
    assert_eq!(p.events(Side::A), vec![Event::Writable(ca)]);
    assert!(p.a.readiness(ca).writable);
}

#[test]
fn poll_ready_names_the_connections_of_events() {
    let mut p = Pair::new();
    assert_eq!(p.b.poll_ready(), None); // not tracked: nothing queues
    p.b.track_ready();
    let (ca, cb, _) = p.establish(SocketType::Stream);
    assert_eq!(p.b.poll_ready(), None); // Incoming names a listener, not a connection
    let now = p.now;
    p.a.send(now, ca, b"ping").unwrap();
    p.shuttle();
    assert_eq!(p.events(Side::B), vec![Event::Readable(cb)]);
    assert_eq!(p.b.poll_ready(), Some(cb));
    assert_eq!(p.b.poll_ready(), None);
    p.a.abort(now, ca);
    p.shuttle();
    p.b.close(now, cb);
    assert_eq!(p.events(Side::B), vec![Event::Reset(cb), Event::Closed(cb)]);
    assert_eq!(p.b.poll_ready(), Some(cb));
    assert_eq!(p.b.poll_ready(), Some(cb));
    assert_eq!(p.b.poll_ready(), None);
}

#[test]
fn ephemeral_ports_follow_the_cursor_walk_under_churn() {
    let (start, end) = (50_000u32, 50_063u32);
    let mut a = Endpoint::new(Config {
        ephemeral_ports: start..=end,
        ..cfg(GUEST_CID)
    });
    // The reference: walk from the cursor over the ports in use, wrapping.
    let mut used: HashMap<u32, ConnId> = HashMap::new();
    let mut cursor = start;
    let mut x = 12_345u64;
    let t = Instant::now();
    for step in 0..5_000 {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        if (x >> 33) % 3 != 0 || used.is_empty() {
            let expect = (0..=end - start)
                .map(|i| start + (cursor - start + i) % (end - start + 1))
                .find(|p| !used.contains_key(p));
            match a.connect(t, VMADDR_CID_HOST, PORT, None, SocketType::Stream) {
                Ok(c) => {
                    let p = a.local_port(c).unwrap();
                    assert_eq!(Some(p), expect, "step {step}");
                    used.insert(p, c);
                    cursor = if p == end { start } else { p + 1 };
                }
                Err(e) => {
                    assert_eq!(expect, None, "step {step}: {e}");
                    assert_eq!(e, ProtoError::PortsExhausted { start, end });
                }
            }
        } else {
            let mut ports: Vec<u32> = used.keys().copied().collect();
            ports.sort_unstable();
            let p = ports[usize::try_from(x >> 40).unwrap() % ports.len()];
            a.abort(t, used.remove(&p).unwrap());
        }
        a.check_invariants().unwrap();
    }
}

#[test]
fn a_sink_consumes_on_arrival_and_still_sees_the_end() {
    let mut p = Pair::new();
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    p.a.send(now, ca, b"queued before").unwrap();
    p.shuttle();
    // Turning the sink on consumes what is queued.
    p.b.set_sink(cb, true).unwrap();
    assert_eq!(p.b.readable_bytes(cb), 0);
    let _ = p.events(Side::B); // the Readable of what came before
    let big = vec![5u8; 3 * DEFAULT_BUF_ALLOC as usize];
    let mut sent = 0;
    // More than one window: only credit the sink hands back lets it all through.
    for _ in 0..64 {
        if sent < big.len() {
            sent += p.a.send(now, ca, &big[sent..]).unwrap_or(0);
        }
        p.shuttle();
    }
    assert_eq!(sent, big.len());
    assert_eq!(p.b.readable_bytes(cb), 0, "a sink queued payload");
    assert_eq!(p.b.stats().bytes_sunk, (13 + big.len()) as u64);
    assert!(p
        .events(Side::B)
        .iter()
        .all(|e| !matches!(e, Event::Readable(_))));
    let send_only = SEND;
    p.a.shutdown(now, ca, send_only).unwrap();
    p.shuttle();
    assert_eq!(p.b.discard(now, cb, usize::MAX), Ok(0), "the end of stream");
    let mut q = Pair::with(seq_cfg(GUEST_CID), seq_cfg(VMADDR_CID_HOST));
    let (_, sb, _) = q.establish(SocketType::SeqPacket);
    assert!(q.b.set_sink(sb, true).is_err(), "a seqpacket sink");
}

#[test]
fn regression_a_reset_drops_seqpacket_boundaries_with_the_bytes() {
    // The chaos soak (CI, seed 2492208564553648616) read a whole message of the right length
    // but wrong bytes after a surprise removal: the removal resets every connection, and the
    // reset cleared the unread bytes but left the message boundaries, so the next recv_msg
    // handed out a message whose bytes were gone.
    let mut p = Pair::with(seq_cfg(GUEST_CID), seq_cfg(VMADDR_CID_HOST));
    let (ca, cb, _) = p.establish(SocketType::SeqPacket);
    let now = p.now;
    p.a.send_msg(now, ca, &[1u8; 1000], true).unwrap();
    p.a.send_msg(now, ca, &[2u8; 2000], true).unwrap();
    p.shuttle();
    assert_eq!(p.b.readable_bytes(cb), 3000);
    p.b.reset(now, cb);
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        p.b.recv_msg(now, cb, &mut buf),
        Err(ProtoError::ConnectionReset)
    );
}

// ----- the states and their transitions -----

#[test]
fn states_change_only_along_the_protocols_transitions() {
    use conn::{Answer, CloseError, Shutdowns, State};
    let none = ShutdownFlags::default();
    let connecting = State::Connecting {
        deadline: None,
        request_owed: true,
    };
    let established = |answer| State::Established {
        answer,
        shut: Shutdowns::default(),
        sent: none,
    };
    let closing = State::Closing {
        deadline: None,
        peer: none,
        sent: none,
        response_owed: false,
    };
    let closed = connecting.closed(Some(CloseError::Refused));
    let all = [
        connecting.clone(),
        established(Answer::Done),
        established(Answer::Owed),
        established(Answer::Held),
        closing.clone(),
        closed.clone(),
    ];
    // By index in `all`: a connect ends in Established (the peer's RESPONSE, nothing left
    // to answer) or Closed; an established connection in Closing or Closed; Closing in
    // Closed (a connection closed while it waited to be accepted); Closed in nothing.
    let allowed = [
        (0, 1),
        (0, 5),
        (1, 4),
        (1, 5),
        (2, 4),
        (2, 5),
        (3, 4),
        (3, 5),
        (4, 5),
    ];
    for (i, from) in all.iter().enumerate() {
        for (j, to) in all.iter().enumerate() {
            let want = allowed.contains(&(i, j));
            assert_eq!(from.may_become(to), want, "{from:?} -> {to:?}");
        }
    }
    // What Closed keeps of the state it came from: the shutdowns (reads answer by them) and
    // an unanswered hold (`answer` still takes it).
    let shut = Shutdowns {
        local: ShutdownFlags {
            receive: true,
            send: false,
        },
        peer: SEND,
    };
    let held = State::Established {
        answer: Answer::Held,
        shut,
        sent: none,
    };
    assert_eq!(
        held.closed(None),
        State::Closed {
            error: None,
            shut,
            held: true
        }
    );
    assert_eq!(
        closing.closed(None).shutdowns().local.bits(),
        VIRTIO_VSOCK_SHUTDOWN_BOTH
    );
    assert_eq!(
        held.public(),
        ConnState::PeerClosed {
            no_more_rx: true,
            no_more_tx: false
        }
    );
}

#[test]
fn a_held_request_reset_before_the_answer_can_still_be_answered() {
    let mut p = Pair::new();
    let now = p.now;
    let any = p.b.listen_any_port(8, SocketType::Stream).unwrap();
    let ca =
        p.a.connect(now, VMADDR_CID_HOST, 7001, None, SocketType::Stream)
            .unwrap();
    p.shuttle();
    let cb = p.b.accept(any).unwrap();
    assert!(p.b.is_held(cb));
    // The peer gives up (RST) before the owner answered.
    p.a.abort(now, ca);
    p.shuttle();
    assert_eq!(p.b.state(cb), Some(ConnState::Closed));
    assert!(p.b.is_held(cb), "the hold outlives the connection");
    assert_eq!(p.b.answer(now, cb, true), Ok(()));
    assert!(!p.b.is_held(cb));
    assert!(
        p.pump(Side::B, false).is_empty(),
        "nothing goes out once closed"
    );
    assert_eq!(
        p.b.recv(now, cb, &mut [0; 8]),
        Err(ProtoError::ConnectionReset)
    );
    p.b.close(now, cb);
    assert!(p.events(Side::B).contains(&Event::Closed(cb)));
    assert_eq!(p.b.state(cb), None);
}

#[test]
fn a_close_timeout_too_long_for_an_instant_lingers_without_panicking() {
    let mut p = Pair::with(
        Config {
            close_timeout: Duration::MAX,
            ..cfg(GUEST_CID)
        },
        cfg(VMADDR_CID_HOST),
    );
    let (ca, cb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    // B keeps data unread, so it answers A's SHUTDOWN only when it closes.
    p.a.send(now, ca, b"unread").unwrap();
    p.a.close(now, ca);
    p.shuttle();
    assert_eq!(p.a.state(ca), Some(ConnState::Closing));
    assert_eq!(p.a.poll_timeout(), None, "no deadline an Instant can hold");
    p.advance(DEFAULT_CLOSE_TIMEOUT * 1000);
    assert_eq!(p.a.state(ca), Some(ConnState::Closing));
    p.b.close(p.now, cb);
    p.shuttle();
    assert_eq!(p.events(Side::A), vec![Event::Closed(ca)]);
    assert_eq!(p.a.state(ca), None);
}

#[test]
fn message_boundaries_cost_a_connection_nothing_until_it_carries_a_message() {
    let mut p = Pair::with(seq_cfg(GUEST_CID), seq_cfg(VMADDR_CID_HOST));
    let (sa, sb, _) = p.establish(SocketType::Stream);
    let now = p.now;
    p.a.send(now, sa, b"stream bytes").unwrap();
    p.shuttle();
    assert_eq!(p.read_all(Side::B, sb), b"stream bytes");
    assert!(p.a.conns[&sa].msgs().is_none() && p.b.conns[&sb].msgs().is_none());
    p.b.unlisten(now, p.b.listener_ids()[0]);
    let (qa, qb, _) = p.establish(SocketType::SeqPacket);
    assert!(p.a.conns[&qa].msgs().is_none() && p.b.conns[&qb].msgs().is_none());
    p.a.send_msg(now, qa, b"one message", true).unwrap();
    assert!(p.a.conns[&qa].msgs().is_some());
    p.shuttle();
    let mut buf = [0u8; 32];
    assert_eq!(p.b.recv_msg(now, qb, &mut buf), Ok((11, 11, true)));
    assert_eq!(&buf[..11], b"one message");
    assert!(p.b.conns[&qb].msgs().is_some());
}
