//! Fuzz the protocol engine: arbitrary sequences of received packets (aimed at live
//! connections or not), user calls, timeouts and transport resets. No panic, and after every
//! step the engine's invariants hold; every RW packet we emit fits the peer credit we had.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vdpa_vsock::packet::{Header, Op, ShutdownFlags, SocketType};
use vdpa_vsock::proto::{Config, ConnId, ConnState, Endpoint, Event, ListenerId};

const LOCAL_CID: u64 = 3;

#[derive(Arbitrary, Debug)]
struct FuzzConfig {
    buf_alloc: u16,
    max_payload: u16,
    send_buffer: u16,
    seqpacket: bool,
    max_connections: u8,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// A packet aimed at something we sent (`target` picks a transmitted header, reversed).
    Reply {
        target: u8,
        op: u8,
        len: u16,
        flags: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
        wrong_type: bool,
        /// Non-zero: a reply buffer of this many bytes is at hand, for an echo to answer at once
        /// (`handle_packet_or_echo_with`).
        echo_room: u16,
    },
    /// Make a connection an echo, or not (`set_echo`).
    SetEcho {
        conn: u8,
        on: bool,
    },
    /// A fully arbitrary packet.
    Raw {
        src_cid: u8,
        dst_local: bool,
        src_port: u16,
        dst_port: u16,
        op: u16,
        type_: u16,
        len: u16,
        flags: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
        len_mismatch: bool,
    },
    Connect {
        port: u8,
        local: Option<u16>,
        seq: bool,
    },
    Listen {
        port: u8,
        backlog: u8,
        seq: bool,
    },
    Unlisten(u8),
    Accept(u8),
    Send {
        conn: u8,
        len: u16,
    },
    Recv {
        conn: u8,
        len: u16,
    },
    SendMsg {
        conn: u8,
        len: u16,
        eor: bool,
    },
    RecvMsg {
        conn: u8,
        len: u16,
    },
    Shutdown {
        conn: u8,
        flags: u8,
    },
    Close(u8),
    Abort(u8),
    Advance {
        millis: u16,
    },
    TransportReset {
        new_cid: bool,
    },
    Transmit {
        room: u16,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    config: FuzzConfig,
    steps: Vec<Step>,
}

struct World {
    ep: Endpoint,
    now: Instant,
    conns: Vec<ConnId>,
    listeners: Vec<ListenerId>,
    sent: Vec<Header>,
    buf: Vec<u8>,
}

fn pick<T: Copy>(v: &[T], i: u8) -> Option<T> {
    (!v.is_empty()).then(|| v[i as usize % v.len()])
}

impl World {
    /// Drain `poll_transmit`, checking every RW against the credit we had before the call.
    fn transmit(&mut self, room: usize) {
        // Worst case: one byte per packet for every byte of every send buffer.
        for _ in 0..(1 << 22) {
            let credit: Vec<(ConnId, Option<u32>)> = self
                .conns
                .iter()
                .map(|&c| (c, self.ep.peer_credit(c).map(|x| x.0)))
                .collect();
            let room = room.min(self.buf.len());
            let Some(h) = self.ep.poll_transmit(self.now, &mut self.buf[..room]) else {
                return;
            };
            assert!(h.len as usize <= room, "payload longer than the buffer");
            assert_eq!(h.src_cid, self.ep.local_cid());
            if h.op == Op::Rw as u16 {
                for &c in &self.conns {
                    // A closed connection keeps its addresses but is off the wire; a new one
                    // may reuse them.
                    if self.ep.state(c) != Some(ConnState::Closed)
                        && self.ep.local_port(c) == Some(h.src_port)
                        && self.ep.peer_addr(c) == Some((h.dst_cid, h.dst_port))
                    {
                        let before = credit.iter().find(|x| x.0 == c).and_then(|x| x.1);
                        if let Some(before) = before {
                            assert!(h.len <= before, "sent {} bytes with credit {before}", h.len);
                        }
                    }
                }
            } else {
                assert_eq!(h.len, 0, "control packet with payload");
            }
            if self.sent.len() >= 64 {
                self.sent.remove(0);
            }
            self.sent.push(h);
            self.check();
        }
        panic!("poll_transmit never returned None");
    }

    fn events(&mut self) {
        while let Some(e) = self.ep.poll_event() {
            match e {
                Event::Incoming(l) => {
                    if let Some(c) = self.ep.accept(l) {
                        self.conns.push(c);
                    }
                }
                Event::Closed(c) => self.conns.retain(|&x| x != c),
                _ => {}
            }
        }
        if self.conns.len() > 256 {
            self.conns.drain(..128);
        }
    }

    fn check(&self) {
        if let Err(e) = self.ep.check_invariants() {
            panic!("invariant broken: {e}");
        }
    }

    fn packet(&mut self, h: Header, payload_len: usize) {
        let payload = vec![0xa5u8; payload_len];
        self.ep.handle_packet(self.now, &h, &payload);
    }

    /// A packet that an echo may answer at once into a reply buffer of `room` bytes: a reply
    /// echoes the whole payload, back to its sender, within the credit we had.
    fn packet_or_echo(&mut self, h: Header, payload_len: usize, room: usize) {
        let payload = vec![0xa5u8; payload_len];
        let credit: Vec<(ConnId, Option<u32>)> = self
            .conns
            .iter()
            .map(|&c| (c, self.ep.peer_credit(c).map(|x| x.0)))
            .collect();
        let ready = self.ep.echo_ready(&h);
        let mut kept = false;
        let reply = self.ep.handle_packet_or_echo_with(
            self.now,
            &h,
            payload_len,
            |rx| {
                kept = true;
                rx.push(&payload);
            },
            room,
            |r| *r,
        );
        let Some(r) = reply else {
            return;
        };
        assert!(ready, "echoed a packet echo_ready refused");
        assert!(!kept, "an echoed packet was also kept");
        assert_eq!((r.op, r.len), (Op::Rw as u16, h.len));
        assert!(r.len as usize <= room, "reply longer than its buffer");
        assert_eq!((r.src_cid, r.src_port), (h.dst_cid, h.dst_port));
        assert_eq!((r.dst_cid, r.dst_port), (h.src_cid, h.src_port));
        for &(c, before) in &credit {
            if self.ep.local_port(c) == Some(r.src_port)
                && self.ep.peer_addr(c) == Some((r.dst_cid, r.dst_port))
            {
                if let Some(before) = before {
                    assert!(
                        r.len <= before,
                        "echoed {} bytes with credit {before}",
                        r.len
                    );
                }
            }
        }
        if self.sent.len() >= 64 {
            self.sent.remove(0);
        }
        self.sent.push(r);
    }

    fn step(&mut self, step: Step) {
        let now = self.now;
        match step {
            Step::Reply {
                target,
                op,
                len,
                flags,
                buf_alloc,
                fwd_cnt,
                wrong_type,
                echo_room,
            } => {
                let Some(t) = pick(&self.sent, target) else {
                    return;
                };
                let op = u16::from(op % 8);
                let len = if op == Op::Rw as u16 {
                    u32::from(len)
                } else {
                    0
                };
                let h = Header {
                    src_cid: t.dst_cid,
                    dst_cid: t.src_cid,
                    src_port: t.dst_port,
                    dst_port: t.src_port,
                    len,
                    type_: if wrong_type { t.type_ ^ 3 } else { t.type_ },
                    op,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                };
                if echo_room > 0 {
                    self.packet_or_echo(h, len as usize, usize::from(echo_room));
                } else {
                    self.packet(h, len as usize);
                }
            }
            Step::SetEcho { conn, on } => {
                if let Some(c) = pick(&self.conns, conn) {
                    let _ = self.ep.set_echo(c, on);
                }
            }
            Step::Raw {
                src_cid,
                dst_local,
                src_port,
                dst_port,
                op,
                type_,
                len,
                flags,
                buf_alloc,
                fwd_cnt,
                len_mismatch,
            } => {
                let h = Header {
                    src_cid: u64::from(src_cid % 4),
                    dst_cid: if dst_local { LOCAL_CID } else { 7 },
                    src_port: u32::from(src_port % 8),
                    dst_port: u32::from(dst_port % 8) + 49152,
                    len: u32::from(len),
                    type_: type_ % 4,
                    op: op % 9,
                    flags,
                    buf_alloc,
                    fwd_cnt,
                };
                let plen = if len_mismatch {
                    usize::from(len / 2)
                } else {
                    usize::from(len)
                };
                self.packet(h, plen);
            }
            Step::Connect { port, local, seq } => {
                let ty = if seq {
                    SocketType::SeqPacket
                } else {
                    SocketType::Stream
                };
                let local = local.map(|p| u32::from(p % 16) + 49152);
                if let Ok(c) = self.ep.connect(now, 2, u32::from(port % 8), local, ty) {
                    self.conns.push(c);
                }
            }
            Step::Listen { port, backlog, seq } => {
                let ty = if seq {
                    SocketType::SeqPacket
                } else {
                    SocketType::Stream
                };
                let port = u32::from(port % 8) + 49152;
                if let Ok(l) = self.ep.listen(port, usize::from(backlog % 4), ty) {
                    self.listeners.push(l);
                }
            }
            Step::Unlisten(i) => {
                if let Some(l) = pick(&self.listeners, i) {
                    self.ep.unlisten(now, l);
                    self.listeners.retain(|&x| x != l);
                }
            }
            Step::Accept(i) => {
                if let Some(l) = pick(&self.listeners, i) {
                    if let Some(c) = self.ep.accept(l) {
                        self.conns.push(c);
                    }
                }
            }
            Step::Send { conn, len } => {
                if let Some(c) = pick(&self.conns, conn) {
                    let data = vec![1u8; usize::from(len)];
                    if let Ok(n) = self.ep.send(now, c, &data) {
                        assert!(n <= data.len());
                    }
                }
            }
            Step::Recv { conn, len } => {
                if let Some(c) = pick(&self.conns, conn) {
                    let mut buf = vec![0u8; usize::from(len)];
                    if let Ok(n) = self.ep.recv(now, c, &mut buf) {
                        assert!(n <= buf.len());
                    }
                }
            }
            Step::SendMsg { conn, len, eor } => {
                if let Some(c) = pick(&self.conns, conn) {
                    let _ = self.ep.send_msg(now, c, &vec![2u8; usize::from(len)], eor);
                }
            }
            Step::RecvMsg { conn, len } => {
                if let Some(c) = pick(&self.conns, conn) {
                    let mut buf = vec![0u8; usize::from(len)];
                    if let Ok((n, full, _)) = self.ep.recv_msg(now, c, &mut buf) {
                        assert!(n <= buf.len() && n <= full);
                    }
                }
            }
            Step::Shutdown { conn, flags } => {
                if let Some(c) = pick(&self.conns, conn) {
                    let _ = self
                        .ep
                        .shutdown(now, c, ShutdownFlags::from_bits(u32::from(flags)));
                }
            }
            Step::Close(i) => {
                if let Some(c) = pick(&self.conns, i) {
                    self.ep.close(now, c);
                }
            }
            Step::Abort(i) => {
                if let Some(c) = pick(&self.conns, i) {
                    self.ep.abort(now, c);
                }
            }
            Step::Advance { millis } => {
                self.now += Duration::from_millis(u64::from(millis) * 4);
                self.ep.handle_timeout(self.now);
                self.ep.handle_timeout(self.now);
                if let Some(t) = self.ep.poll_timeout() {
                    assert!(t > self.now, "expired timer survived handle_timeout");
                }
            }
            Step::TransportReset { new_cid } => {
                self.ep
                    .handle_transport_reset(now, new_cid.then_some(LOCAL_CID));
            }
            Step::Transmit { room } => self.transmit(usize::from(room)),
        }
        self.check();
        self.events();
    }
}

fuzz_target!(|input: Input| {
    let c = &input.config;
    let config = Config {
        local_cid: LOCAL_CID,
        buf_alloc: u32::from(c.buf_alloc),
        max_payload: u32::from(c.max_payload),
        send_buffer: usize::from(c.send_buffer),
        seqpacket: c.seqpacket,
        ephemeral_ports: 49152..=49167,
        max_connections: usize::from(c.max_connections % 32),
        ..Config::default()
    };
    let mut w = World {
        ep: Endpoint::new(config),
        now: Instant::now(),
        conns: Vec::new(),
        listeners: Vec::new(),
        sent: Vec::new(),
        buf: vec![0; 1 << 16],
    };
    for step in input.steps.into_iter().take(512) {
        w.step(step);
    }
    w.transmit(1 << 16);
});
