//! The sim device at ring level, through the public API and without the protocol engine on the
#![allow(clippy::cast_possible_truncation)] // Test sizes and counters are small and known.
//! driver side: we build packets in DMA buffers by hand, post them on our driver-side queues, and
//! check what the sim's host side answers.

use std::time::{Duration, Instant};

use vdpa_vsock::device::{VsockDevice, RX_QUEUE, TX_QUEUE};
use vdpa_vsock::dma::DmaRegion;
use vdpa_vsock::packet::{
    Header, Op, SocketType, VsockPacket, PKT_HEADER_SIZE, VIRTIO_F_VERSION_1, VMADDR_CID_HOST,
};
use vdpa_vsock::sim::{SimConfig, SimDevice, ECHO_PORT};
use vdpa_vsock::virtq::{BufferDesc, SplitQueue};
use vm_memory::GuestAddress;

const BUF: u32 = 4096;
const QSIZE: u16 = 64;

struct Rig {
    dev: SimDevice,
    dma: DmaRegion,
    rx: SplitQueue,
    tx: SplitQueue,
    rx_bufs: Vec<GuestAddress>,
    tx_bufs: Vec<GuestAddress>,
    cid: u64,
}

impl Rig {
    fn new() -> Rig {
        let mut dev = SimDevice::new(SimConfig::default());
        dev.negotiate(1 << VIRTIO_F_VERSION_1).unwrap();
        let cid = dev.guest_cid().unwrap();
        let mut opts = dev.dma_options();
        opts.size = 4 << 20;
        let dma = DmaRegion::new(&opts).unwrap();
        dev.map_dma(&dma).unwrap();
        let mut rx = SplitQueue::new(&dma, QSIZE, false).unwrap();
        let tx = SplitQueue::new(&dma, QSIZE, false).unwrap();
        dev.setup_queue(RX_QUEUE, &rx.layout()).unwrap();
        dev.setup_queue(TX_QUEUE, &tx.layout()).unwrap();
        let mut rx_bufs = Vec::new();
        for i in 0..u64::from(QSIZE) {
            let a = dma.alloc(BUF as usize, 64).unwrap();
            rx.add(
                &[BufferDesc {
                    addr: a,
                    len: BUF,
                    writable: true,
                }],
                i,
            )
            .unwrap();
            rx_bufs.push(a);
        }
        let tx_bufs = (0..QSIZE)
            .map(|_| dma.alloc(BUF as usize, 64).unwrap())
            .collect();
        dev.activate().unwrap();
        dev.kick(RX_QUEUE).unwrap();
        Rig {
            dev,
            dma,
            rx,
            tx,
            rx_bufs,
            tx_bufs,
            cid,
        }
    }

    fn send(&mut self, slot: usize, hdr: &Header, payload: &[u8]) {
        let addr = self.tx_bufs[slot];
        let mut pkt = VsockPacket::<()>::from_tx_buffer(self.dma.memory(), addr, BUF).unwrap();
        pkt.set_header(hdr);
        assert_eq!(pkt.write_data(payload).unwrap(), payload.len());
        let len = (PKT_HEADER_SIZE + payload.len()) as u32;
        self.tx
            .add(
                &[BufferDesc {
                    addr,
                    len,
                    writable: false,
                }],
                slot as u64,
            )
            .unwrap();
        self.dev.kick(TX_QUEUE).unwrap();
    }

    /// Wait for the next RX packet; returns its header and payload and reposts the buffer.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            while self.tx.pop_used().unwrap().is_some() {}
            if let Some(u) = self.rx.pop_used().unwrap() {
                let addr = self.rx_bufs[u.token as usize];
                let pkt =
                    VsockPacket::<()>::from_used_rx_buffer(self.dma.memory(), addr, BUF, u.len)
                        .unwrap();
                let mut data = vec![0; pkt.len() as usize];
                pkt.read_data(&mut data).unwrap();
                let hdr = pkt.header();
                drop(pkt);
                self.rx
                    .add(
                        &[BufferDesc {
                            addr,
                            len: BUF,
                            writable: true,
                        }],
                        u.token,
                    )
                    .unwrap();
                self.dev.kick(RX_QUEUE).unwrap();
                return (hdr, data);
            }
            assert!(
                Instant::now() < deadline,
                "no packet from the sim within 10 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn hdr(&self, op: Op, len: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: self.cid,
            dst_cid: VMADDR_CID_HOST,
            src_port: 50_000,
            dst_port: ECHO_PORT,
            len,
            type_: SocketType::Stream as u16,
            op: op as u16,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt,
        }
    }
}

#[test]
fn raw_request_gets_response_and_rw_comes_back_intact() {
    let mut rig = Rig::new();
    let req = rig.hdr(Op::Request, 0, 0);
    rig.send(0, &req, &[]);
    let (resp, _) = rig.recv();
    assert_eq!(
        resp.op,
        Op::Response as u16,
        "expected RESPONSE, got {resp}"
    );
    assert_eq!((resp.src_cid, resp.src_port), (VMADDR_CID_HOST, ECHO_PORT));
    assert_eq!((resp.dst_cid, resp.dst_port), (rig.cid, 50_000));
    assert!(resp.buf_alloc > 0);

    let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
    rig.send(1, &rig.hdr(Op::Rw, payload.len() as u32, 0), &payload);
    let mut echoed = Vec::new();
    while echoed.len() < payload.len() {
        let (h, data) = rig.recv();
        if h.op == Op::Rw as u16 {
            assert_eq!(h.len as usize, data.len());
            echoed.extend_from_slice(&data);
        }
    }
    assert_eq!(echoed, payload);
    assert_eq!(rig.dev.host().stats().protocol_violations, 0);
}

#[test]
fn packet_to_closed_port_gets_rst() {
    let mut rig = Rig::new();
    let mut req = rig.hdr(Op::Request, 0, 0);
    req.dst_port = 4242;
    rig.send(0, &req, &[]);
    let (h, _) = rig.recv();
    assert_eq!(h.op, Op::Rst as u16, "expected RST, got {h}");
}

#[test]
fn wrong_source_cid_is_counted_and_dropped() {
    let mut rig = Rig::new();
    let mut req = rig.hdr(Op::Request, 0, 0);
    req.src_cid = 99;
    rig.send(0, &req, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.dev.host().stats().protocol_violations == 0 {
        assert!(Instant::now() < deadline, "violation not counted");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Nothing comes back for a dropped packet.
    std::thread::sleep(Duration::from_millis(50));
    assert!(rig.rx.pop_used().unwrap().is_none());
}
