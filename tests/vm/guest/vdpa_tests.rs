// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! VM tests of the vhost-vdpa backend (`src/device/vhost_vdpa.rs`), included by `vmtest.rs`.
//!
//! - `vdpa_net_raw_loopback`: raw-queue mode on `vdpa_sim_net` (device id 1): 10,000 frames sent on
//!   its TX queue (1) come back intact on its RX queue (0), through the kernel's IOTLB path.
//! - `vdpa_teardown_no_mapping`: after reset (status 0 + IOTLB INVALIDATE) the same IOVA range maps
//!   again on the same fd (the kernel answers EEXIST to an overlapping UPDATE), and a closed and
//!   reopened device comes up again and loops frames.
//! - `vdpa_refuses_non_vsock`: opening `vdpa_sim_net` for vsock use fails naming the device type.
//! - `vdpa_vsock_echo_1mib`: our driver over vhost-vdpa on `vdpasim_vsock` (tests/vm/vdpa_sim_vsock)
//!   connects to the echo port of its host side and 1 MiB comes back intact; after shutdown a second
//!   connection echoes; a port without a listener is refused.
//! - `vdpa_vsock_echo_16mib`: 16 MiB full duplex, FNV-1a of what was sent against what came back.
//! - `vdpa_vsock_half_close`: write, shutdown(Write), every echoed byte then EOF, then a write
//!   fails; the device holds unechoed bytes when our SHUTDOWN arrives (it must still send them).
//! - `vdpa_vsock_50_connections`: 50 connections at once, 64 KiB each from its own thread; then
//!   the device's 128-entry table is filled and the next connect is refused.
//! - `vdpa_vsock_cid_change`: guest_cid 3 -> 5 through vdpa_sim_vsock's module parameter, which
//!   fires the config interrupt: the driver's CID follows within 2 s, the open connection is
//!   reset, a new connection works (guest_cid is put back to 3 afterwards).
//! - `vdpa_inspect_cli`: `/bin/vdpa-vsock inspect vhost-vdpa:...` (text and `--json`) on
//!   vdpasim_vsock; on vdpa_sim_net it fails naming device id 1 (net).
//! - `vdpa_sim_vsock_lifecycle_knobs`: the test device's `transport_reset` and `needs_reset`
//!   knobs, rings driven by hand: one event per posted event buffer, a drop counted when none is
//!   posted; NEEDS_RESET with the config interrupt, queues stopped, cleared by the reset.
//! - `vdpa_transport_reset_new_cid`: a migration (guest_cid 3 -> 6 with no config interrupt,
//!   then TRANSPORT_RESET): the driver re-reads guest_cid on the event, a new connection echoes.
//! - `vdpa_transport_reset`, `vdpa_needs_reset_recovery`, `vdpa_surprise_removal` (issue 14):
//!   calls blocked on our driver (an idle read only the driver can end, a transfer's reader and
//!   writer, a writer out of credit, an accept) end with the right error within 1 s of the
//!   event; listeners stay; after a reset or NEEDS_RESET a new connection echoes 1 MiB; after
//!   `vdpa dev del` the del completes and the driver drops promptly.
//! - `vdpa_surprise_removal_cli`: `vdpa dev del` under `/bin/vdpa-vsock connect` with the echo
//!   flowing: the program exits within 2 s, status 1, naming the removal; the del completes.

use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};
use std::{fs, thread};

use vdpa_vsock::device::vhost_vdpa::VhostVdpaDevice;
use vdpa_vsock::device::{DeviceSpec, VsockDevice};
use vdpa_vsock::dma::{DmaOptions, DmaRegion};
use vdpa_vsock::virtq::{BufferDesc, SplitQueue};
use vm_memory::{Bytes, GuestAddress};

use super::{fail, run_cmd, TestResult};

const NET_HDR: usize = 12;
const BUF: usize = 2048;
const BUF_U32: u32 = 2048;
const QSIZE: u16 = 256;

/// Waits up to 5 s for vDPA device `name`'s `/dev/vhost-vdpa-N` node (present once the device is
/// bound to vhost_vdpa and devtmpfs made the node); returns its path.
pub(crate) fn wait_vhost_vdpa_node(name: &str) -> Result<String, super::NotPassed> {
    let dir = format!("/sys/bus/vdpa/devices/{name}");
    let start = Instant::now();
    loop {
        let found = fs::read_dir(&dir).ok().and_then(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| n.starts_with("vhost-vdpa-"))
        });
        if let Some(n) = found {
            let node = format!("/dev/{n}");
            if Path::new(&node).exists() {
                return Ok(node);
            }
        }
        if start.elapsed() > Duration::from_secs(5) {
            return Err(fail(format!("no /dev/vhost-vdpa-N for {name} within 5 s")));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Adds vDPA device `name` on `mgmtdev`, runs `f` with its `/dev/vhost-vdpa-N`, deletes it.
pub(crate) fn with_vdpa_dev(
    mgmtdev: &str,
    name: &str,
    f: impl FnOnce(&str) -> TestResult,
) -> TestResult {
    run_cmd("vdpa", &["dev", "add", "mgmtdev", mgmtdev, "name", name])?;
    let result = (|| {
        let node = wait_vhost_vdpa_node(name)?;
        println!("# {name}: {node}");
        f(&node)
    })();
    let cleanup = run_cmd("vdpa", &["dev", "del", name]);
    result.and(cleanup)
}

fn e(x: impl std::fmt::Display) -> super::NotPassed {
    fail(x)
}

/// A raw net device brought up with rx (0) and tx (1) queues.
struct NetLoop {
    dev: VhostVdpaDevice,
    dma: DmaRegion,
    rx: SplitQueue,
    tx: SplitQueue,
    rx_bufs: Vec<GuestAddress>,
    tx_bufs: Vec<GuestAddress>,
}

impl NetLoop {
    fn up(node: &str) -> Result<Self, super::NotPassed> {
        let mut dev = VhostVdpaDevice::open_raw(node, 1).map_err(e)?;
        let neg = dev.negotiate(0).map_err(e)?;
        println!(
            "# {node}: backend features {:#x}, features {neg:#x}, iova range {:#x}..={:#x}, {} queues",
            dev.backend_features(),
            dev.iova_range().0,
            dev.iova_range().1,
            dev.num_queues()
        );
        let dma = DmaRegion::new(&DmaOptions {
            size: 4 << 20,
            ..dev.dma_options()
        })
        .map_err(e)?;
        dev.map_dma(&dma).map_err(e)?;
        let rx = SplitQueue::new(&dma, QSIZE, false).map_err(e)?;
        let tx = SplitQueue::new(&dma, QSIZE, false).map_err(e)?;
        dev.setup_queue(0, &rx.layout()).map_err(e)?;
        dev.setup_queue(1, &tx.layout()).map_err(e)?;
        dev.activate().map_err(e)?;
        let mut rx_bufs = Vec::new();
        let mut tx_bufs = Vec::new();
        for _ in 0..QSIZE {
            rx_bufs.push(dma.alloc(BUF, 64).map_err(e)?);
            tx_bufs.push(dma.alloc(BUF, 64).map_err(e)?);
        }
        let mut me = NetLoop {
            dev,
            dma,
            rx,
            tx,
            rx_bufs,
            tx_bufs,
        };
        for i in 0..usize::from(QSIZE) {
            me.post_rx(i)?;
        }
        if me.rx.kick_prepare().map_err(e)? {
            me.dev.kick(0).map_err(e)?;
        }
        Ok(me)
    }

    fn post_rx(&mut self, i: usize) -> TestResult {
        let d = BufferDesc {
            addr: self.rx_bufs[i],
            len: BUF_U32,
            writable: true,
        };
        self.rx.add(&[d], i as u64).map_err(e)?;
        Ok(())
    }

    /// Sends `count` frames starting at sequence `seq`, checks each returns intact.
    fn exchange(&mut self, seq: u32, count: u32) -> TestResult {
        let batch = 64u32;
        let mut next = seq;
        let end = seq + count;
        while next < end {
            let n = batch.min(end - next);
            let mut sent = Vec::new();
            for k in 0..n {
                let s = next + k;
                let frame = make_frame(s);
                let slot = (s % u32::from(QSIZE)) as usize;
                let addr = self.tx_bufs[slot];
                self.dma.memory().write_slice(&frame, addr).map_err(e)?;
                let d = BufferDesc {
                    addr,
                    len: u32::try_from(frame.len()).map_err(e)?,
                    writable: false,
                };
                self.tx.add(&[d], u64::from(s)).map_err(e)?;
                sent.push(frame);
            }
            if self.tx.kick_prepare().map_err(e)? {
                self.dev.kick(1).map_err(e)?;
            }
            let mut got = 0usize;
            let mut tx_done = 0u32;
            let deadline = Instant::now() + Duration::from_secs(20);
            while got < sent.len() || tx_done < n {
                let mut progress = false;
                while self.tx.pop_used().map_err(e)?.is_some() {
                    tx_done += 1;
                    progress = true;
                }
                while let Some(u) = self.rx.pop_used().map_err(e)? {
                    progress = true;
                    let i = usize::try_from(u.token).map_err(e)?;
                    let want = &sent[got];
                    if u.len as usize != want.len() {
                        return Err(fail(format!(
                            "frame {}: rx len {} expected {}",
                            next as usize + got,
                            u.len,
                            want.len()
                        )));
                    }
                    let mut buf = vec![0u8; want.len()];
                    self.dma
                        .memory()
                        .read_slice(&mut buf, self.rx_bufs[i])
                        .map_err(e)?;
                    if &buf != want {
                        return Err(fail(format!(
                            "frame {} came back corrupted",
                            next as usize + got
                        )));
                    }
                    got += 1;
                    self.post_rx(i)?;
                }
                if progress {
                    if self.rx.kick_prepare().map_err(e)? {
                        self.dev.kick(0).map_err(e)?;
                    }
                    continue;
                }
                if Instant::now() > deadline {
                    return Err(fail(format!(
                        "timeout: frames {next}..{}: {got} received, {tx_done} tx completed",
                        next + n
                    )));
                }
                // Wait on the call eventfds (either queue).
                let mut fds = [
                    libc::pollfd {
                        fd: std::os::fd::AsRawFd::as_raw_fd(self.dev.call_fd(0).map_err(e)?),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: std::os::fd::AsRawFd::as_raw_fd(self.dev.call_fd(1).map_err(e)?),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
                unsafe { libc::poll(fds.as_mut_ptr(), 2, 50) };
                let _ = self.dev.call_fd(0).map_err(e)?.read();
                let _ = self.dev.call_fd(1).map_err(e)?.read();
            }
            next += n;
        }
        Ok(())
    }
}

/// virtio_net_hdr_v1 (12 zero bytes), broadcast Ethernet header, sequence-dependent payload.
fn make_frame(seq: u32) -> Vec<u8> {
    let payload_len = 46 + (seq as usize * 97) % 1400;
    let mut f = vec![0u8; NET_HDR];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(&seq.to_be_bytes());
    for k in 4..payload_len {
        f.push(
            (seq as usize)
                .wrapping_mul(31)
                .wrapping_add(k * 7)
                .to_le_bytes()[0],
        );
    }
    f
}

pub(crate) fn vdpa_net_raw_loopback() -> TestResult {
    with_vdpa_dev("vdpasim_net", "vdpat0", |node| {
        let mut nl = NetLoop::up(node)?;
        let start = Instant::now();
        nl.exchange(0, 10_000)?;
        println!(
            "# 10000 frames looped back intact in {:.2} s",
            start.elapsed().as_secs_f64()
        );
        nl.dev.reset().map_err(e)?;
        Ok(())
    })
}

pub(crate) fn vdpa_teardown_no_mapping() -> TestResult {
    with_vdpa_dev("vdpasim_net", "vdpat1", |node| {
        let mut nl = NetLoop::up(node)?;
        nl.exchange(0, 100)?;
        nl.dev.reset().map_err(e)?;
        // The same range again on the same fd: EEXIST if the INVALIDATE had not removed it.
        nl.dev
            .map_dma(&nl.dma)
            .map_err(|x| fail(format!("re-map after reset: {x}")))?;
        nl.dev.reset().map_err(e)?;
        drop(nl);
        // Close, reopen, bring up again and loop frames.
        let mut nl = NetLoop::up(node)?;
        nl.exchange(100, 100)?;
        nl.dev.reset().map_err(e)?;
        println!("# reset + re-map on one fd, then close/reopen/bring-up: ok");
        Ok(())
    })
}

pub(crate) fn vdpa_refuses_non_vsock() -> TestResult {
    with_vdpa_dev("vdpasim_net", "vdpat2", |node| {
        let err = VhostVdpaDevice::open(node)
            .err()
            .ok_or_else(|| fail("vdpa_sim_net opened as a vsock device"))?
            .to_string();
        if !err.contains("device id 1 (net), expected 19 (vsock)") {
            return Err(fail(format!("unclear error: {err}")));
        }
        let spec = DeviceSpec::VhostVdpa {
            path: node.to_string(),
        };
        let err2 = spec
            .open()
            .err()
            .ok_or_else(|| fail("DeviceSpec::open accepted a net device"))?
            .to_string();
        if !err2.contains("expected 19 (vsock)") {
            return Err(fail(format!("unclear error from DeviceSpec::open: {err2}")));
        }
        println!("# {err}");
        Ok(())
    })
}

pub(crate) fn vdpa_vsock_echo_1mib() -> TestResult {
    with_vdpa_dev("vdpasim_vsock", "vdpav0", |node| {
        use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
        let dev = VhostVdpaDevice::open(node).map_err(e)?;
        let drv = VsockDriver::from_device(Box::new(dev), DriverConfig::default()).map_err(e)?;
        println!(
            "# driver up on {}, cid {}",
            drv.device_name(),
            drv.local_cid()
        );
        let mut s = drv
            .connect_timeout(VsockAddr::new(2, 1234), Duration::from_secs(10))
            .map_err(e)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let data: Vec<u8> = (0..(1usize << 20))
            .map(|i| (i * 131 + i / 977).to_le_bytes()[0])
            .collect();
        let mut w = s.try_clone()?;
        let d2 = data.clone();
        let writer = thread::spawn(move || w.write_all(&d2));
        let mut back = vec![0u8; data.len()];
        let start = Instant::now();
        s.read_exact(&mut back)?;
        writer
            .join()
            .map_err(|_| fail("writer panicked"))?
            .map_err(e)?;
        if back != data {
            return Err(fail("1 MiB came back corrupted"));
        }
        println!(
            "# 1 MiB echoed intact in {:.2} s",
            start.elapsed().as_secs_f64()
        );
        // SHUTDOWN with both bits is answered with RST: the connection closes, a new one works.
        s.shutdown(std::net::Shutdown::Both)?;
        drop(s);
        let mut s2 = drv
            .connect_timeout(VsockAddr::new(2, 1234), Duration::from_secs(10))
            .map_err(|x| fail(format!("second connection: {x}")))?;
        s2.set_read_timeout(Some(Duration::from_secs(10)))?;
        s2.write_all(b"again")?;
        let mut b = [0u8; 5];
        s2.read_exact(&mut b)?;
        if &b != b"again" {
            return Err(fail("second connection echoed wrong bytes"));
        }
        // A port nobody listens on is refused (REQUEST answered with RST).
        match drv.connect_timeout(VsockAddr::new(2, 4321), Duration::from_secs(10)) {
            Ok(_) => return Err(fail("connect to port 4321 succeeded")),
            Err(x) => println!("# port 4321: {x}"),
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Our driver over vhost-vdpa on vdpasim_vsock, through the public API (VsockDriver)
// ---------------------------------------------------------------------------------------------

/// The echo port of vdpa_sim_vsock's host side.
const SIM_ECHO_PORT: u32 = 1234;
/// vdpa_sim_vsock's connection table (`MAX_CONNS`): one more REQUEST is answered with RST.
const SIM_MAX_CONNS: usize = 128;
/// Where vdpa_sim_vsock takes a new guest_cid at run time.
const SIM_GUEST_CID_PARAM: &str = "/sys/module/vdpa_sim_vsock/parameters/guest_cid";

/// FNV-1a over `data`, continuing from `h` (start with [`FNV_START`]).
fn fnv(data: &[u8], mut h: u64) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// `len` bytes of a pattern that differs per `seed` (so swapped streams are caught).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Our driver on a fresh vdpasim_vsock device named `name`.
fn with_vsock_driver(
    name: &str,
    f: impl FnOnce(&vdpa_vsock::driver::VsockDriver, &str) -> TestResult,
) -> TestResult {
    with_vdpa_dev("vdpasim_vsock", name, |node| {
        use vdpa_vsock::driver::{DriverConfig, VsockDriver};
        let dev = VhostVdpaDevice::open(node).map_err(e)?;
        let drv = VsockDriver::from_device(Box::new(dev), DriverConfig::default()).map_err(e)?;
        f(&drv, node)
    })
}

/// The words of a failure, to wrap them in more context.
fn reason(x: super::NotPassed) -> String {
    match x {
        super::NotPassed::Fail(m) | super::NotPassed::Skip(m) => m,
    }
}

fn connect_echo(
    drv: &vdpa_vsock::driver::VsockDriver,
) -> Result<vdpa_vsock::driver::VsockStream, super::NotPassed> {
    drv.connect_timeout(
        vdpa_vsock::driver::VsockAddr::new(2, SIM_ECHO_PORT),
        Duration::from_secs(10),
    )
    .map_err(|x| fail(format!("connect to 2:{SIM_ECHO_PORT}: {x}")))
}

/// 16 MiB echoed full duplex (a writer thread and this reader), FNV-1a of what was sent (by the
/// writer) against what came back, and the bytes themselves.
pub(crate) fn vdpa_vsock_echo_16mib() -> TestResult {
    with_vsock_driver("vdpav1", |drv, _| {
        const TOTAL: usize = 16 << 20;
        const CHUNK: usize = 64 << 10;
        let mut s = connect_echo(drv)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut w = s.try_clone()?;
        let start = Instant::now();
        let writer = thread::spawn(move || -> io::Result<u64> {
            let mut h = FNV_START;
            for i in 0..TOTAL / CHUNK {
                let chunk = pattern(i as u64, CHUNK);
                h = fnv(&chunk, h);
                w.write_all(&chunk)?;
            }
            Ok(h)
        });
        let mut got = FNV_START;
        let mut buf = vec![0u8; CHUNK];
        for i in 0..TOTAL / CHUNK {
            s.read_exact(&mut buf)
                .map_err(|x| fail(format!("reading chunk {i} of the echo: {x}")))?;
            if buf != pattern(i as u64, CHUNK) {
                return Err(fail(format!(
                    "chunk {i} (offset {}) came back corrupted",
                    i * CHUNK
                )));
            }
            got = fnv(&buf, got);
        }
        let secs = start.elapsed().as_secs_f64();
        let sent = writer
            .join()
            .map_err(|_| fail("writer panicked"))?
            .map_err(|x| fail(format!("writer: {x}")))?;
        if sent != got {
            return Err(fail(format!(
                "FNV-1a of the echo {got:#018x} differs from what was sent {sent:#018x}"
            )));
        }
        println!(
            "# 16 MiB echoed full duplex in {secs:.2} s ({:.1} MiB/s), FNV-1a {got:#018x} both ways",
            16.0 / secs
        );
        Ok(())
    })
}

/// Half-close: write everything, shutdown(Write), then every echoed byte arrives before EOF
/// (vdpa_sim_vsock echoes what it holds, then sends its own SHUTDOWN); a write afterwards fails.
pub(crate) fn vdpa_vsock_half_close() -> TestResult {
    with_vsock_driver("vdpav2", |drv, _| {
        use std::net::Shutdown;
        // Round 0: 300 KiB with nobody reading. Our 256 KiB receive buffer fills, so the device
        // still holds the last 44 KiB (no credit to echo them) when our SHUTDOWN(SEND) arrives:
        // it must echo them anyway once we read, then finish. Round 1: 1 MiB with the reader
        // running (the SHUTDOWN comes behind the last, credit-limited chunk).
        for (round, len, delay) in [(0u64, 300usize << 10, 300u64), (1, 1 << 20, 0)] {
            let mut s = connect_echo(drv)?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            let data = pattern(100 + round, len);
            let sent = fnv(&data, FNV_START);
            let mut w = s.try_clone()?;
            let writer = thread::spawn(move || -> io::Result<()> {
                w.write_all(&data)?;
                w.shutdown(Shutdown::Write)
            });
            thread::sleep(Duration::from_millis(delay));
            let start = Instant::now();
            let mut back = Vec::with_capacity(len);
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = s.read(&mut buf).map_err(|x| {
                    fail(format!(
                        "round {round}: read after {} of {len} echoed bytes: {x}",
                        back.len()
                    ))
                })?;
                if n == 0 {
                    break;
                }
                back.extend_from_slice(&buf[..n]);
                if back.len() > len {
                    return Err(fail(format!(
                        "round {round}: more bytes came back than were sent"
                    )));
                }
            }
            writer
                .join()
                .map_err(|_| fail("writer panicked"))?
                .map_err(|x| fail(format!("round {round}: writer: {x}")))?;
            let got = fnv(&back, FNV_START);
            if back.len() != len || got != sent {
                return Err(fail(format!(
                    "round {round}: EOF after {} of {len} bytes, FNV-1a {got:#x}, sent {sent:#x}",
                    back.len()
                )));
            }
            // EOF stays EOF, and writing after our own shutdown(Write) fails (no hang, no panic).
            if s.read(&mut buf)? != 0 {
                return Err(fail(format!("round {round}: data after EOF")));
            }
            match s.write(b"late") {
                Ok(n) => {
                    return Err(fail(format!(
                        "round {round}: a write after shutdown(Write) took {n} bytes"
                    )))
                }
                Err(x) => println!(
                    "# round {round}: {len} bytes echoed then EOF in {:.2} s; write after: {x} ({:?})",
                    start.elapsed().as_secs_f64(),
                    x.kind()
                ),
            }
        }
        Ok(())
    })
}

/// 50 connections open at once, each echoing 64 KiB (FNV-checked) from its own thread; then the
/// device's table is filled to its 128 and one more connection is refused with RST.
pub(crate) fn vdpa_vsock_50_connections() -> TestResult {
    with_vsock_driver("vdpav3", |drv, _| {
        const CONNS: usize = 50;
        const LEN: usize = 64 << 10;
        const CHUNK: usize = 8 << 10;
        let mut streams = Vec::new();
        for i in 0..CONNS {
            let mut s =
                connect_echo(drv).map_err(|x| fail(format!("connection {i}: {}", reason(x))))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            streams.push(s);
        }
        let start = Instant::now();
        let handles: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut s = s.try_clone();
                thread::spawn(move || -> Result<(), String> {
                    let s = s.as_mut().map_err(|x| format!("clone: {x}"))?;
                    let data = pattern(1000 + i as u64, LEN);
                    let mut back = vec![0u8; LEN];
                    // Lock-step chunks: every connection keeps data in flight at once.
                    for (c, chunk) in data.chunks(CHUNK).enumerate() {
                        s.write_all(chunk)
                            .map_err(|x| format!("write chunk {c}: {x}"))?;
                        s.read_exact(&mut back[c * CHUNK..c * CHUNK + chunk.len()])
                            .map_err(|x| format!("read chunk {c}: {x}"))?;
                    }
                    let (want, got) = (fnv(&data, FNV_START), fnv(&back, FNV_START));
                    if want != got {
                        return Err(format!("FNV-1a {got:#x}, sent {want:#x}"));
                    }
                    Ok(())
                })
            })
            .collect();
        let mut errors = Vec::new();
        for (i, h) in handles.into_iter().enumerate() {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(m)) => errors.push(format!("connection {i}: {m}")),
                Err(_) => errors.push(format!("connection {i}: thread panicked")),
            }
        }
        if !errors.is_empty() {
            return Err(fail(format!(
                "{} of {CONNS} failed: {}",
                errors.len(),
                errors.join("; ")
            )));
        }
        println!(
            "# {CONNS} concurrent connections each echoed {} KiB intact in {:.2} s",
            LEN >> 10,
            start.elapsed().as_secs_f64()
        );
        // Fill the device's table: the 129th REQUEST gets RST (a refused connect, no hang).
        while streams.len() < SIM_MAX_CONNS {
            let n = streams.len();
            streams.push(connect_echo(drv).map_err(|x| {
                fail(format!(
                    "connection {} of {SIM_MAX_CONNS}: {}",
                    n + 1,
                    reason(x)
                ))
            })?);
        }
        match connect_echo(drv) {
            Ok(_) => Err(fail(format!(
                "connection {} accepted: the device holds only {SIM_MAX_CONNS}",
                SIM_MAX_CONNS + 1
            ))),
            Err(x) => {
                let m = reason(x);
                if !m.contains("refused") {
                    return Err(fail(format!(
                        "connection {} failed unclearly: {m}",
                        SIM_MAX_CONNS + 1
                    )));
                }
                println!("# {SIM_MAX_CONNS} connections open; one more: {m}");
                Ok(())
            }
        }
    })
}

/// The config interrupt: guest_cid changes at run time (vdpa_sim_vsock's parameter fires the
/// callback our driver registered with VHOST_VDPA_SET_CONFIG_CALL); the driver takes the new CID
/// within 2 s, the open connection is reset (an error, not a hang), a new connection works.
pub(crate) fn vdpa_vsock_cid_change() -> TestResult {
    let result = with_vsock_driver("vdpav4", |drv, _| {
        if drv.local_cid() != 3 {
            return Err(fail(format!(
                "driver up with CID {}, expected 3",
                drv.local_cid()
            )));
        }
        let mut old = connect_echo(drv)?;
        old.set_read_timeout(Some(Duration::from_secs(5)))?;
        old.write_all(b"before")?;
        let mut b = [0u8; 6];
        old.read_exact(&mut b)?;
        // The module refuses reserved CIDs.
        if fs::write(SIM_GUEST_CID_PARAM, "2").is_ok() {
            return Err(fail("vdpa_sim_vsock took guest_cid 2 (the host's)"));
        }
        let start = Instant::now();
        super::write_sysfs(SIM_GUEST_CID_PARAM, "5")?;
        while drv.local_cid() != 5 {
            if start.elapsed() > Duration::from_secs(2) {
                return Err(fail(format!(
                    "the driver still reports CID {} 2 s after guest_cid became 5",
                    drv.local_cid()
                )));
            }
            thread::sleep(Duration::from_millis(5));
        }
        let noticed = start.elapsed();
        let t = Instant::now();
        match old.read(&mut b) {
            Ok(n) => {
                return Err(fail(format!(
                    "old connection read {n} bytes after the CID change"
                )))
            }
            Err(x)
                if matches!(
                    x.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(fail(format!(
                    "old connection hangs after the CID change: {x}"
                )))
            }
            Err(x) => println!(
                "# CID 3 -> 5 noticed in {:.1} ms; old connection: {x} ({:?}) after {:.1} ms",
                noticed.as_secs_f64() * 1e3,
                x.kind(),
                t.elapsed().as_secs_f64() * 1e3
            ),
        }
        let mut new = connect_echo(drv)
            .map_err(|x| fail(format!("new connection with CID 5: {}", reason(x))))?;
        new.set_read_timeout(Some(Duration::from_secs(10)))?;
        new.write_all(b"after the move")?;
        let mut b2 = [0u8; 14];
        new.read_exact(&mut b2)?;
        if &b2 != b"after the move" {
            return Err(fail("the new connection echoed wrong bytes"));
        }
        Ok(())
    });
    // Later tests (and devices) expect guest_cid 3 again.
    let restore = super::write_sysfs(SIM_GUEST_CID_PARAM, "3");
    result.and(restore)
}

/// `vdpa-vsock inspect vhost-vdpa:/dev/vhost-vdpa-N` (text and `--json`) on vdpasim_vsock shows
/// the device as the driver sees it; on vdpa_sim_net it fails naming the device type.
pub(crate) fn vdpa_inspect_cli() -> TestResult {
    let run = |args: &[&str]| -> Result<(bool, String, String), super::NotPassed> {
        let out = std::process::Command::new("/bin/vdpa-vsock")
            .args(args)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    with_vdpa_dev("vdpasim_vsock", "vdpav5", |node| {
        let spec = format!("vhost-vdpa:{node}");
        let (ok, text, err) = run(&["inspect", &spec])?;
        if !ok {
            return Err(fail(format!("inspect {spec} failed: {err}{text}")));
        }
        // (label, what its line must contain)
        for (label, want) in [
            ("device id:", "19 (vsock)"),
            ("offered:", "VERSION_1"),
            ("backend features:", "IOTLB_MSG_V2"),
            ("status:", "ACKNOWLEDGE"),
            ("guest_cid:", "3"),
            ("queues:", "3"),
            ("  rx ", "max size 256"),
            ("config:", "(guest_cid 3)"),
            ("driver:", "brought up, local CID 3"),
        ] {
            if !text
                .lines()
                .any(|l| l.starts_with(label) && l.contains(want))
            {
                return Err(fail(format!(
                    "inspect output has no {label:?} line with {want:?}:\n{text}"
                )));
            }
        }
        for line in text.lines() {
            println!("# inspect| {line}");
        }
        let (ok, json, err) = run(&["inspect", "--json", &spec])?;
        if !ok {
            return Err(fail(format!("inspect --json failed: {err}")));
        }
        let v: serde_json::Value = serde_json::from_str(&json)
            .map_err(|x| fail(format!("inspect --json: {x}: {json}")))?;
        let checks = [
            (
                "details.device id",
                v["details"]["device id"] == "19 (vsock)",
            ),
            ("guest_cid", v["guest_cid"] == 3),
            ("num_queues", v["num_queues"] == 3),
            ("queues[0].max_size", v["queues"][0]["max_size"] == 256),
            (
                "negotiated VERSION_1",
                v["negotiated"]["names"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|n| n == "VERSION_1")),
            ),
            (
                "details.status",
                v["details"]["status"]
                    .as_str()
                    .is_some_and(|s| s.contains("ACKNOWLEDGE")),
            ),
            (
                "details.backend features",
                v["details"]["backend features"]
                    .as_str()
                    .is_some_and(|s| s.contains("IOTLB_MSG_V2")),
            ),
            ("driver_up", v["driver_up"] == true),
        ];
        for (what, ok) in checks {
            if !ok {
                return Err(fail(format!("inspect --json: {what} wrong in {json}")));
            }
        }
        println!(
            "# inspect --json: {} bytes, all fields as expected",
            json.len()
        );
        Ok(())
    })?;
    with_vdpa_dev("vdpasim_net", "vdpat3", |node| {
        let spec = format!("vhost-vdpa:{node}");
        let (ok, out, err) = run(&["inspect", &spec])?;
        if ok {
            return Err(fail(format!("inspect on vdpa_sim_net succeeded: {out}")));
        }
        let all = format!("{out}{err}");
        if !all.contains("device id 1 (net), expected 19") {
            return Err(fail(format!(
                "inspect on vdpa_sim_net failed unclearly: {all}"
            )));
        }
        println!(
            "# inspect on vdpa_sim_net: {}",
            all.lines()
                .find(|l| l.contains("device id 1"))
                .unwrap_or("")
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Lifecycle (issue 14): vdpa_sim_vsock's transport_reset and needs_reset knobs, device removal
// ---------------------------------------------------------------------------------------------

/// vdpa_sim_vsock's module parameters (write-only knobs and read-only counters).
const SIM_PARAMS: &str = "/sys/module/vdpa_sim_vsock/parameters";
/// The figure of issue 14: blocked calls end within this long of the event.
const LIFECYCLE_BOUND: Duration = Duration::from_secs(1);
/// How long a test waits for an outcome before it reports a hang (so it fails, not the VM).
const HANG_BOUND: Duration = Duration::from_secs(5);

fn sim_param(name: &str) -> String {
    format!("{SIM_PARAMS}/{name}")
}

/// One of vdpa_sim_vsock's counters (`transport_resets_sent`, ...).
fn sim_counter(name: &str) -> Result<u64, super::NotPassed> {
    let v = super::read_trimmed(sim_param(name))
        .map_err(|x| fail(format!("read {}: {x}", sim_param(name))))?;
    v.parse()
        .map_err(|x| fail(format!("{}: {v:?} is not a number: {x}", sim_param(name))))
}

/// Writes 1 to one of vdpa_sim_vsock's knobs (`transport_reset`, `needs_reset`).
fn sim_knob(name: &str) -> TestResult {
    super::write_sysfs(sim_param(name), "1")
}

/// Waits up to `bound` for `cond`, polling every 5 ms (the condition is a counter in sysfs or
/// a value behind a lock, which has nothing to wait on); `false` when it never held.
fn wait_until(bound: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > bound {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Polls `fd` for input up to `timeout`; true when it became readable.
fn poll_in(fd: &vmm_sys_util::eventfd::EventFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(fd),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// The next used element of queue `index`, waiting on its call eventfd up to `timeout`.
fn wait_used(
    dev: &VhostVdpaDevice,
    q: &mut SplitQueue,
    index: u16,
    timeout: Duration,
) -> Result<Option<vdpa_vsock::virtq::UsedElem>, super::NotPassed> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(u) = q.pop_used().map_err(e)? {
            return Ok(Some(u));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        let call = dev.call_fd(index).map_err(e)?;
        poll_in(call, (deadline - now).min(Duration::from_millis(50)));
        let _ = call.read();
    }
}

/// The status byte as vhost-vdpa reports it (VHOST_VDPA_GET_STATUS, through `details`).
fn raw_status(dev: &VhostVdpaDevice) -> String {
    dev.details()
        .into_iter()
        .find(|(k, _)| *k == "status")
        .map_or_else(|| "no status line".to_string(), |(_, v)| v)
}

/// A 44-byte virtio-vsock header (virtio 1.2 section 5.10.6) from our CID 3 to the host's echo
/// port, stream type.
fn vsock_hdr(src_port: u32, op: u16) -> [u8; 44] {
    let mut h = [0u8; 44];
    h[0..8].copy_from_slice(&3u64.to_le_bytes());
    h[8..16].copy_from_slice(&2u64.to_le_bytes());
    h[16..20].copy_from_slice(&src_port.to_le_bytes());
    h[20..24].copy_from_slice(&SIM_ECHO_PORT.to_le_bytes());
    h[28..30].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_VSOCK_TYPE_STREAM
    h[30..32].copy_from_slice(&op.to_le_bytes());
    h[36..40].copy_from_slice(&(64u32 << 10).to_le_bytes()); // buf_alloc
    h
}

/// The three queues of vdpasim_vsock brought up by hand on one vhost-vdpa fd (no VsockDriver).
struct RawVsock {
    dev: VhostVdpaDevice,
    dma: DmaRegion,
    /// rx (0), tx (1), event (2).
    q: Vec<SplitQueue>,
}

impl RawVsock {
    fn up(node: &str) -> Result<Self, super::NotPassed> {
        let mut dev = VhostVdpaDevice::open(node).map_err(e)?;
        if dev.num_queues() < 3 {
            return Err(fail(format!(
                "vdpasim_vsock has {} queues, expected 3 (rx, tx, event)",
                dev.num_queues()
            )));
        }
        dev.negotiate(0).map_err(e)?;
        let dma = DmaRegion::new(&DmaOptions {
            size: 2 << 20,
            ..dev.dma_options()
        })
        .map_err(e)?;
        dev.map_dma(&dma).map_err(e)?;
        let q = (0..3)
            .map(|_| SplitQueue::new(&dma, 64, false))
            .collect::<Result<Vec<_>, _>>()
            .map_err(e)?;
        for (i, queue) in q.iter().enumerate() {
            dev.setup_queue(u16::try_from(i).map_err(e)?, &queue.layout())
                .map_err(e)?;
        }
        dev.activate().map_err(e)?;
        Ok(RawVsock { dev, dma, q })
    }

    /// Posts a writable buffer of `len` bytes filled with 0xff on queue `index`; returns it.
    fn post(&mut self, index: u16, len: u32, token: u64) -> Result<GuestAddress, super::NotPassed> {
        let a = self.dma.alloc(len as usize, 8).map_err(e)?;
        self.dma
            .memory()
            .write_slice(&vec![0xff; len as usize], a)
            .map_err(e)?;
        let d = BufferDesc {
            addr: a,
            len,
            writable: true,
        };
        self.q[usize::from(index)].add(&[d], token).map_err(e)?;
        if self.q[usize::from(index)].kick_prepare().map_err(e)? {
            self.dev.kick(index).map_err(e)?;
        }
        Ok(a)
    }

    /// Sends a header-only packet `op` from `src_port` on the tx queue.
    fn send(&mut self, src_port: u32, op: u16) -> TestResult {
        let a = self.dma.alloc(44, 8).map_err(e)?;
        self.dma
            .memory()
            .write_slice(&vsock_hdr(src_port, op), a)
            .map_err(e)?;
        let d = BufferDesc {
            addr: a,
            len: 44,
            writable: false,
        };
        self.q[1].add(&[d], u64::from(src_port)).map_err(e)?;
        if self.q[1].kick_prepare().map_err(e)? {
            self.dev.kick(1).map_err(e)?;
        }
        Ok(())
    }

    fn wait_used(
        &mut self,
        index: u16,
        timeout: Duration,
    ) -> Result<Option<vdpa_vsock::virtq::UsedElem>, super::NotPassed> {
        wait_used(&self.dev, &mut self.q[usize::from(index)], index, timeout)
    }

    /// The op of the header at `a`.
    fn op_at(&self, a: GuestAddress) -> Result<u16, super::NotPassed> {
        let mut h = [0u8; 44];
        self.dma.memory().read_slice(&mut h, a).map_err(e)?;
        Ok(u16::from_le_bytes([h[30], h[31]]))
    }
}

/// vdpa_sim_vsock's knobs, driven by hand on the rings (no VsockDriver, so this tests the test
/// device itself): 8 posted event buffers receive one TRANSPORT_RESET each (used length 4, id
/// 0, the event queue's interrupt), a 9th with nothing posted is counted as dropped and nothing
/// is used; needs_reset raises the config interrupt and NEEDS_RESET in the status, the device
/// then leaves a REQUEST on the tx ring untouched, and a reset (status 0) clears the bit; a new
/// bring-up (close, open) echoes again.
pub(crate) fn vdpa_sim_vsock_lifecycle_knobs() -> TestResult {
    const EVENTS: u64 = 8;
    const OP_REQUEST: u16 = 1;
    const OP_RESPONSE: u16 = 2;
    with_vdpa_dev("vdpasim_vsock", "vdpav6", |node| {
        let mut raw = RawVsock::up(node)?;
        // The device answers before: REQUEST -> RESPONSE on a posted rx buffer.
        let rx0 = raw.post(0, 4096, 0)?;
        raw.send(40_000, OP_REQUEST)?;
        match raw.wait_used(0, HANG_BOUND)? {
            Some(u) if u.len >= 44 && raw.op_at(rx0)? == OP_RESPONSE => {}
            Some(u) => {
                return Err(fail(format!(
                    "REQUEST answered with op {} (len {}), expected RESPONSE",
                    raw.op_at(rx0)?,
                    u.len
                )))
            }
            None => return Err(fail("no RESPONSE to a REQUEST within 5 s")),
        }
        match raw.wait_used(1, HANG_BOUND)? {
            Some(u) if u.token == 40_000 => {}
            other => {
                return Err(fail(format!(
                    "the REQUEST's tx buffer: used {:?}, expected token 40000",
                    other.map(|u| u.token)
                )))
            }
        }
        let (sent0, dropped0) = (
            sim_counter("transport_resets_sent")?,
            sim_counter("transport_resets_dropped")?,
        );
        let mut ev = Vec::new();
        for k in 0..EVENTS {
            ev.push(raw.post(2, 4, k)?);
        }
        for k in 0..EVENTS {
            sim_knob("transport_reset")?;
            let u = raw.wait_used(2, HANG_BOUND)?.ok_or_else(|| {
                fail(format!(
                    "event {k}: nothing used on the event queue within 5 s (posted {EVENTS})"
                ))
            })?;
            let mut id = [0u8; 4];
            let slot = usize::try_from(u.token).map_err(e)?;
            raw.dma.memory().read_slice(&mut id, ev[slot]).map_err(e)?;
            if u.len != 4 || u32::from_le_bytes(id) != 0 || u.token != k {
                return Err(fail(format!(
                    "event {k}: used len {}, id {:#x}, buffer {} (expected len 4, id 0 = \
                     TRANSPORT_RESET, buffer {k})",
                    u.len,
                    u32::from_le_bytes(id),
                    u.token
                )));
            }
        }
        let sent = sim_counter("transport_resets_sent")?;
        if sent != sent0 + EVENTS {
            return Err(fail(format!(
                "transport_resets_sent went {sent0} -> {sent}, expected +{EVENTS}"
            )));
        }
        // Nothing posted now: the event is dropped, counted, and nothing is used.
        sim_knob("transport_reset")?;
        if !wait_until(HANG_BOUND, || {
            sim_counter("transport_resets_dropped").is_ok_and(|d| d == dropped0 + 1)
        }) {
            return Err(fail(format!(
                "transport_resets_dropped did not go {dropped0} -> {} within 5 s with no event \
                 buffer posted",
                dropped0 + 1
            )));
        }
        if let Some(u) = raw.q[2].pop_used().map_err(e)? {
            return Err(fail(format!(
                "a used event (buffer {}) with no buffer posted",
                u.token
            )));
        }
        println!("# {EVENTS} TRANSPORT_RESET events in {EVENTS} posted buffers; a 9th dropped and counted");

        // needs_reset: the config interrupt, NEEDS_RESET, then nothing is processed.
        let raised0 = sim_counter("needs_reset_raised")?;
        let config = raw
            .dev
            .config_fd()
            .ok_or_else(|| fail("vhost-vdpa device without a config eventfd"))?;
        let _ = config.read();
        sim_knob("needs_reset")?;
        if !poll_in(config, HANG_BOUND) {
            return Err(fail("no config interrupt within 5 s of needs_reset"));
        }
        let status = raw_status(&raw.dev);
        if !status.contains("NEEDS_RESET") || !status.contains("DRIVER_OK") {
            return Err(fail(format!(
                "status after needs_reset: {status}, expected DRIVER_OK and NEEDS_RESET"
            )));
        }
        let raised = sim_counter("needs_reset_raised")?;
        if raised != raised0 + 1 {
            return Err(fail(format!(
                "needs_reset_raised went {raised0} -> {raised}, expected +1"
            )));
        }
        // Stopped: a REQUEST (and a posted rx buffer) stay untouched. Absence has no event to
        // wait on: half a second of nothing is the evidence.
        let _ = raw.post(0, 4096, 1)?;
        raw.send(40_001, OP_REQUEST)?;
        let tx_used = raw.wait_used(1, Duration::from_millis(500))?;
        let rx_used = raw.q[0].pop_used().map_err(e)?;
        if tx_used.is_some() || rx_used.is_some() {
            return Err(fail(format!(
                "the device processed its queues under NEEDS_RESET (tx used {:?}, rx used {:?})",
                tx_used.map(|u| u.token),
                rx_used.map(|u| u.token)
            )));
        }
        // The driver's reset (status 0) clears it.
        raw.dev.reset().map_err(e)?;
        let status = raw_status(&raw.dev);
        if !status.starts_with("0x0 ") {
            return Err(fail(format!("status after reset: {status}, expected 0")));
        }
        println!("# needs_reset: config interrupt, status had NEEDS_RESET, queues stopped; reset: {status}");
        drop(raw);
        // A new bring-up works: our driver on the same device echoes.
        use vdpa_vsock::driver::{DriverConfig, VsockDriver};
        let dev = VhostVdpaDevice::open(node).map_err(e)?;
        let drv = VsockDriver::from_device(Box::new(dev), DriverConfig::default()).map_err(e)?;
        let mut s = connect_echo(&drv)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"after needs_reset")?;
        let mut b = [0u8; 17];
        s.read_exact(&mut b)?;
        if &b != b"after needs_reset" {
            return Err(fail("echo after needs_reset and a new bring-up differs"));
        }
        Ok(())
    })
}

/// How a call that was blocked when the event came ended: which call, when, and with what.
struct Ended {
    what: &'static str,
    at: Instant,
    result: io::Result<usize>,
}

/// Blocked calls, each on its own thread, reporting how they ended.
struct BlockedCalls {
    tx: std::sync::mpsc::Sender<Ended>,
    rx: std::sync::mpsc::Receiver<Ended>,
    count: usize,
}

impl BlockedCalls {
    fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        BlockedCalls { tx, rx, count: 0 }
    }

    /// Runs `call` on a thread; it should block until the event ends it.
    fn spawn(
        &mut self,
        what: &'static str,
        call: impl FnOnce() -> io::Result<usize> + Send + 'static,
    ) {
        let tx = self.tx.clone();
        self.count += 1;
        thread::spawn(move || {
            let result = call();
            let _ = tx.send(Ended {
                what,
                at: Instant::now(),
                result,
            });
        });
    }

    /// Every call's end, waiting at most until `t0 + HANG_BOUND`; each must be an error within
    /// `LIFECYCLE_BOUND` of `t0` that `ok_kind` accepts. Returns a summary for the log.
    fn check(
        self,
        t0: Instant,
        event: &str,
        ok_kind: impl Fn(&io::Error) -> bool,
    ) -> Result<String, super::NotPassed> {
        let mut seen = Vec::new();
        let mut bad = Vec::new();
        for _ in 0..self.count {
            let left = (t0 + HANG_BOUND).saturating_duration_since(Instant::now());
            let Ok(end) = self.rx.recv_timeout(left) else {
                bad.push(format!(
                    "{} of {} calls still blocked {} s after {event}",
                    self.count - seen.len(),
                    self.count,
                    HANG_BOUND.as_secs()
                ));
                break;
            };
            let after = end.at.saturating_duration_since(t0);
            let ms = after.as_secs_f64() * 1e3;
            match &end.result {
                Ok(n) => bad.push(format!(
                    "{}: returned Ok({n}) {ms:.0} ms after {event}",
                    end.what
                )),
                Err(x) if !ok_kind(x) => bad.push(format!(
                    "{}: {x} ({:?}) {ms:.0} ms after {event}: not the expected error",
                    end.what,
                    x.kind()
                )),
                Err(_) if after > LIFECYCLE_BOUND => bad.push(format!(
                    "{}: ended {ms:.0} ms after {event}, more than {} ms",
                    end.what,
                    LIFECYCLE_BOUND.as_millis()
                )),
                Err(_) => {}
            }
            if let Err(x) = &end.result {
                seen.push(format!(
                    "{} {ms:.0} ms {:?} ({})",
                    end.what,
                    x.kind(),
                    error_chain(x)
                ));
            }
        }
        if !bad.is_empty() {
            return Err(fail(format!(
                "{}; ended: [{}]",
                bad.join("; "),
                seen.join("; ")
            )));
        }
        Ok(seen.join("; "))
    }
}

/// Reads until an error; what it read before counts in `got` (the transfer is in flight once it
/// grows). An EOF is a failure (the connection was supposed to end with an error).
fn read_until_error(
    mut s: vdpa_vsock::driver::VsockStream,
    got: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> io::Result<usize> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf)? {
            0 => return Ok(0),
            n => {
                got.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// Writes pattern chunks until an error (at most `limit` bytes: then Ok).
fn write_until_error(
    mut s: vdpa_vsock::driver::VsockStream,
    limit: usize,
    put: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> io::Result<usize> {
    let chunk = pattern(77, 16 << 10);
    let mut done = 0;
    while done < limit {
        s.write_all(&chunk)?;
        done += chunk.len();
        put.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
    }
    Ok(done)
}

type Counter = std::sync::Arc<std::sync::atomic::AtomicUsize>;

fn counter() -> Counter {
    Counter::default()
}

fn load(c: &Counter) -> usize {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

/// The calls of the lifecycle tests, blocked on `drv` before the event: a read on an idle
/// connection (after one echo, nothing more comes: only the driver can end it), a reader and a
/// writer of a transfer in flight (returns once the reader has 256 KiB), and, when `stalled`, a
/// writer nobody reads from (the echo fills our receive buffer, then the device's, and credit
/// runs out).
fn block_calls(
    drv: &vdpa_vsock::driver::VsockDriver,
    calls: &mut BlockedCalls,
    stalled: bool,
) -> TestResult {
    let mut idle = connect_echo(drv)?;
    idle.set_read_timeout(Some(Duration::from_secs(30)))?;
    idle.write_all(b"ping")?;
    let mut b = [0u8; 4];
    idle.read_exact(&mut b)?;
    calls.spawn("idle read", move || idle.read(&mut [0u8; 64]));
    let mut busy = connect_echo(drv)?;
    busy.set_read_timeout(Some(Duration::from_secs(30)))?;
    busy.set_write_timeout(Some(Duration::from_secs(30)))?;
    let w = busy.try_clone()?;
    let (got, put) = (counter(), counter());
    let g = got.clone();
    calls.spawn("busy read", move || read_until_error(busy, g));
    let p = put.clone();
    calls.spawn("busy write", move || write_until_error(w, 1 << 30, p));
    if stalled {
        let mut st = connect_echo(drv)?;
        st.set_write_timeout(Some(Duration::from_secs(30)))?;
        let sp = counter();
        calls.spawn("stalled write", move || write_until_error(st, 1 << 30, sp));
    }
    if !wait_until(Duration::from_secs(20), || load(&got) >= 256 << 10) {
        return Err(fail(format!(
            "the transfer did not get going: {} bytes written, {} echoed within 20 s",
            load(&put),
            load(&got)
        )));
    }
    Ok(())
}

/// 1 MiB echoed full duplex on a new connection, checked by FNV-1a and byte for byte.
fn echo_1mib(drv: &vdpa_vsock::driver::VsockDriver, seed: u64) -> Result<f64, super::NotPassed> {
    const LEN: usize = 1 << 20;
    let mut s = connect_echo(drv)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = s.try_clone()?;
    let data = pattern(seed, LEN);
    let sent = fnv(&data, FNV_START);
    let d2 = data.clone();
    let start = Instant::now();
    let writer = thread::spawn(move || w.write_all(&d2));
    let mut back = vec![0u8; LEN];
    s.read_exact(&mut back)
        .map_err(|x| fail(format!("reading the 1 MiB echo: {x}")))?;
    writer
        .join()
        .map_err(|_| fail("writer panicked"))?
        .map_err(|x| fail(format!("writing 1 MiB: {x}")))?;
    let got = fnv(&back, FNV_START);
    if got != sent || back != data {
        return Err(fail(format!(
            "1 MiB echo differs: FNV-1a {got:#018x}, sent {sent:#018x}"
        )));
    }
    Ok(start.elapsed().as_secs_f64())
}

/// A listener made before the event still holds its port.
fn listener_kept(drv: &vdpa_vsock::driver::VsockDriver, port: u32) -> TestResult {
    match drv.listen(port) {
        Ok(_) => Err(fail(format!(
            "listen({port}) succeeded again: the listener made before was dropped"
        ))),
        Err(x) if x.kind() == io::ErrorKind::AddrInUse => Ok(()),
        Err(x) => Err(fail(format!(
            "listen({port}) again: expected AddrInUse (the old listener holds it), got {x} ({:?})",
            x.kind()
        ))),
    }
}

/// TRANSPORT_RESET mid-transfer (vdpa_sim_vsock's transport_reset): every old connection's
/// blocked call ends with ConnectionReset within 1 s (the idle one can only be ended by the
/// driver's handling of the event: the device drops its side without a packet), the listener
/// stays, the CID stays 3, a new connection echoes 1 MiB; then 9 more resets one after another
/// (more than the 8 event buffers: the driver must repost them), each ending an idle connection
/// the same way, and none dropped by the device for want of a buffer.
pub(crate) fn vdpa_transport_reset() -> TestResult {
    const PORT: u32 = 7000;
    with_vsock_driver("vdpav7", |drv, _| {
        let listener = drv.listen(PORT)?;
        let (sent0, dropped0) = (
            sim_counter("transport_resets_sent")?,
            sim_counter("transport_resets_dropped")?,
        );
        let mut calls = BlockedCalls::new();
        block_calls(drv, &mut calls, false)?;
        let t0 = Instant::now();
        sim_knob("transport_reset")?;
        let seen = calls.check(t0, "transport_reset", |x| {
            x.kind() == io::ErrorKind::ConnectionReset
        })?;
        println!("# transport_reset mid-transfer: {seen}");
        let sent = sim_counter("transport_resets_sent")?;
        if sent != sent0 + 1 {
            return Err(fail(format!(
                "transport_resets_sent {sent0} -> {sent}: the device delivered no event (dropped \
                 {dropped0} -> {}): is an event buffer posted?",
                sim_counter("transport_resets_dropped")?
            )));
        }
        listener_kept(drv, PORT)?;
        if drv.local_cid() != 3 {
            return Err(fail(format!(
                "CID {} after TRANSPORT_RESET, the device's guest_cid is 3",
                drv.local_cid()
            )));
        }
        let secs = echo_1mib(drv, 700)?;
        println!("# new connection after the reset: 1 MiB echoed intact in {secs:.2} s");
        for round in 1..=9u64 {
            let mut calls = BlockedCalls::new();
            let mut idle =
                connect_echo(drv).map_err(|x| fail(format!("round {round}: {}", reason(x))))?;
            idle.set_read_timeout(Some(Duration::from_secs(30)))?;
            idle.write_all(b"ping")?;
            idle.read_exact(&mut [0u8; 4])?;
            calls.spawn("idle read", move || idle.read(&mut [0u8; 64]));
            let t0 = Instant::now();
            sim_knob("transport_reset")?;
            calls
                .check(t0, "transport_reset", |x| {
                    x.kind() == io::ErrorKind::ConnectionReset
                })
                .map_err(|x| fail(format!("reset {}: {}", round + 1, reason(x))))?;
        }
        let (sent, dropped) = (
            sim_counter("transport_resets_sent")?,
            sim_counter("transport_resets_dropped")?,
        );
        if sent != sent0 + 10 || dropped != dropped0 {
            return Err(fail(format!(
                "after 10 resets: sent {sent0} -> {sent}, dropped {dropped0} -> {dropped} \
                 (expected +10 and +0: the driver reposts its event buffers)"
            )));
        }
        let mut s = connect_echo(drv)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"after ten")?;
        let mut b = [0u8; 9];
        s.read_exact(&mut b)?;
        if &b != b"after ten" {
            return Err(fail("echo after ten resets differs"));
        }
        let seen_by_driver = drv.stats().transport_resets;
        if seen_by_driver != 10 {
            return Err(fail(format!(
                "the driver counted {seen_by_driver} TRANSPORT_RESET events, the device sent 10"
            )));
        }
        println!("# 9 more resets: each ended its idle connection within 1 s; none dropped");
        drop(listener);
        Ok(())
    })
}

/// NEEDS_RESET while running (vdpa_sim_vsock's needs_reset: status bit, queues stopped, config
/// interrupt): every old blocked call ends with an error within 1 s (the device sends nothing
/// more, so only the driver ends them), the driver recovers on its own on the same fd (reset,
/// bring-up), the listener stays, a new connection echoes 1 MiB.
pub(crate) fn vdpa_needs_reset_recovery() -> TestResult {
    const PORT: u32 = 7001;
    with_vsock_driver("vdpav8", |drv, _| {
        let listener = drv.listen(PORT)?;
        let raised0 = sim_counter("needs_reset_raised")?;
        let mut calls = BlockedCalls::new();
        block_calls(drv, &mut calls, true)?;
        let t0 = Instant::now();
        sim_knob("needs_reset")?;
        let seen = calls.check(t0, "needs_reset", |x| {
            !matches!(
                x.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            )
        })?;
        println!("# needs_reset mid-transfer: {seen}");
        let raised = sim_counter("needs_reset_raised")?;
        if raised != raised0 + 1 {
            return Err(fail(format!(
                "needs_reset_raised {raised0} -> {raised}: the device was not running?"
            )));
        }
        listener_kept(drv, PORT)?;
        let recoveries = drv.stats().recoveries;
        if recoveries != 1 {
            return Err(fail(format!(
                "the driver counted {recoveries} recoveries after one NEEDS_RESET"
            )));
        }
        let t = Instant::now();
        let secs =
            echo_1mib(drv, 800).map_err(|x| fail(format!("after NEEDS_RESET: {}", reason(x))))?;
        println!(
            "# recovered on its own: a new connection {:.0} ms after the old calls ended, 1 MiB \
             echoed intact in {secs:.2} s",
            (t.elapsed().as_secs_f64() - secs) * 1e3
        );
        if drv.local_cid() != 3 {
            return Err(fail(format!(
                "CID {} after recovery, expected 3",
                drv.local_cid()
            )));
        }
        drop(listener);
        Ok(())
    })
}

/// An error and all its causes, `: `-separated.
fn error_chain(x: &io::Error) -> String {
    let mut s = x.to_string();
    let mut src = std::error::Error::source(x);
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

/// The descriptors of this process still open on `node` (its path reads "<node> (deleted)" once
/// the node is gone).
fn fds_on(node: &str) -> Vec<i32> {
    let Ok(rd) = fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|d| {
            fs::read_link(d.path()).is_ok_and(|t| {
                let t = t.to_string_lossy();
                t == node || t.strip_prefix(node) == Some(" (deleted)")
            })
        })
        .filter_map(|d| d.file_name().to_str()?.parse().ok())
        .collect()
}

/// `vdpa dev del <name>` on its own thread: the receiver gets its outcome, whenever it ends
/// (the kernel blocks it until every fd of the device is closed).
fn spawn_dev_del(name: &str) -> std::sync::mpsc::Receiver<(Instant, Result<(), String>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let name = name.to_string();
    thread::spawn(move || {
        let r = run_cmd("vdpa", &["dev", "del", &name]).map_err(reason);
        let _ = tx.send((Instant::now(), r));
    });
    rx
}

/// `vdpa dev del` while our driver uses the device, a transfer in flight: every blocked call
/// (an idle read, a transfer's reader and writer, a writer out of credit, an accept) ends with
/// ConnectionAborted naming the removal within 1 s of the del starting; the driver gives the
/// device up on its own, so `vdpa dev del` (which the kernel blocks until the fd is closed)
/// completes while the VsockDriver still exists; new calls fail at once; the driver drops
/// promptly. Then the device is added again under the same name and a new driver echoes on it.
pub(crate) fn vdpa_surprise_removal() -> TestResult {
    use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
    const NAME: &str = "vdpav9";
    const PORT: u32 = 7002;
    run_cmd(
        "vdpa",
        &["dev", "add", "mgmtdev", "vdpasim_vsock", "name", NAME],
    )?;
    let node = match wait_vhost_vdpa_node(NAME) {
        Ok(n) => n,
        Err(x) => {
            let _ = run_cmd("vdpa", &["dev", "del", NAME]);
            return Err(x);
        }
    };
    println!("# {NAME}: {node}");
    let mut del = None;
    let mut del_started = false;
    let result = (|| {
        let dev = VhostVdpaDevice::open(&node).map_err(e)?;
        let drv = VsockDriver::from_device(Box::new(dev), DriverConfig::default()).map_err(e)?;
        let listener = drv.listen(PORT)?;
        let mut calls = BlockedCalls::new();
        block_calls(&drv, &mut calls, true)?;
        calls.spawn("accept", move || {
            listener
                .accept_timeout(Some(Duration::from_secs(30)))
                .map(|_| 0)
        });
        let t0 = Instant::now();
        del_started = true;
        let done = del.insert(spawn_dev_del(NAME));
        let seen = calls.check(t0, "vdpa dev del", |x| {
            // DeviceError::Removed says "<device> was removed: <how>".
            x.kind() == io::ErrorKind::ConnectionAborted
                && error_chain(x).contains(" was removed: ")
        })?;
        println!("# vdpa dev del mid-transfer: {seen}");
        // New calls fail at once, naming the removal.
        let t = Instant::now();
        match drv.connect_timeout(VsockAddr::new(2, SIM_ECHO_PORT), HANG_BOUND) {
            Ok(_) => return Err(fail("connect succeeded on a removed device")),
            Err(x) if t.elapsed() > LIFECYCLE_BOUND => {
                return Err(fail(format!(
                    "connect after the removal took {:.0} ms to fail: {x}",
                    t.elapsed().as_secs_f64() * 1e3
                )))
            }
            Err(x) => println!(
                "# connect after the removal: {} ({:?})",
                error_chain(&x),
                x.kind()
            ),
        }
        // The driver closed the device's fds itself: the del finishes with the driver alive.
        let left = (t0 + HANG_BOUND).saturating_duration_since(Instant::now());
        match done.recv_timeout(left) {
            Ok((at, Ok(()))) => println!(
                "# vdpa dev del completed {:.0} ms after it started, the driver still alive",
                at.saturating_duration_since(t0).as_secs_f64() * 1e3
            ),
            Ok((_, Err(m))) => return Err(fail(format!("vdpa dev del failed: {m}"))),
            Err(_) => {
                return Err(fail(format!(
                    "vdpa dev del still blocked {} s after it started: the driver keeps {} fd(s) \
                     on {node} open",
                    HANG_BOUND.as_secs(),
                    fds_on(&node).len()
                )))
            }
        }
        del = None;
        // The driver drops promptly.
        let (tx, rx) = std::sync::mpsc::channel();
        let t = Instant::now();
        thread::spawn(move || {
            drop(drv);
            let _ = tx.send(());
        });
        if rx.recv_timeout(HANG_BOUND).is_err() {
            return Err(fail(format!(
                "dropping the driver took more than {} s after the removal",
                HANG_BOUND.as_secs()
            )));
        }
        println!(
            "# driver dropped in {:.1} ms after the removal",
            t.elapsed().as_secs_f64() * 1e3
        );
        Ok(())
    })();
    // Failed before the del: delete the device here (the driver is gone with the closure).
    if !del_started {
        return result.and(run_cmd("vdpa", &["dev", "del", NAME]));
    }
    // A del that has not finished: the test failed above. Wait for it (bounded); if our own
    // process still holds the node, close those fds so that the boot goes on (the kernel's wait
    // is uninterruptible, and later `vdpa dev add` calls would block behind it).
    if let Some(done) = del {
        if done.recv_timeout(HANG_BOUND).is_err() {
            let fds = fds_on(&node);
            println!(
                "# vdpa dev del still blocked: closing our {} fd(s) on {node}",
                fds.len()
            );
            for fd in fds {
                // SAFETY: the test has failed; these descriptors belong to a driver that did not
                // release the removed device. Closing them is the only way to let the kernel
                // finish the removal; nothing of this test uses them afterwards.
                unsafe { libc::close(fd) };
            }
            if done.recv_timeout(HANG_BOUND).is_err() {
                println!("# vdpa dev del still blocked after that");
            }
        }
    }
    result?;
    // The management device still works: the same name again, a new driver echoes.
    with_vsock_driver(NAME, |drv, _| {
        let mut s = connect_echo(drv)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"re-created")?;
        let mut b = [0u8; 10];
        s.read_exact(&mut b)?;
        if &b != b"re-created" {
            return Err(fail("the re-created device echoed wrong bytes"));
        }
        println!("# {NAME} added again: a new driver echoes");
        Ok(())
    })
}

/// A migration to a host that gives us another CID (vdpa_sim_vsock's migrate_guest_cid: guest_cid
/// 3 -> 6 with no config interrupt, then TRANSPORT_RESET): the blocked read on the old connection
/// ends with ConnectionReset within 1 s, and the driver has re-read guest_cid on the event alone
/// (its CID is 6: the device answers a REQUEST from any other CID with RST, so a new connection
/// that echoes proves it). guest_cid is put back to 3 afterwards.
pub(crate) fn vdpa_transport_reset_new_cid() -> TestResult {
    let result = with_vsock_driver("vdpav10", |drv, _| {
        if drv.local_cid() != 3 {
            return Err(fail(format!(
                "driver up with CID {}, expected 3",
                drv.local_cid()
            )));
        }
        let sent0 = sim_counter("transport_resets_sent")?;
        let mut calls = BlockedCalls::new();
        let mut idle = connect_echo(drv)?;
        idle.set_read_timeout(Some(Duration::from_secs(30)))?;
        idle.write_all(b"ping")?;
        idle.read_exact(&mut [0u8; 4])?;
        calls.spawn("idle read", move || idle.read(&mut [0u8; 64]));
        let t0 = Instant::now();
        super::write_sysfs(sim_param("migrate_guest_cid"), "6")?;
        let seen = calls.check(t0, "migrate_guest_cid", |x| {
            x.kind() == io::ErrorKind::ConnectionReset
        })?;
        let sent = sim_counter("transport_resets_sent")?;
        if sent != sent0 + 1 {
            return Err(fail(format!(
                "transport_resets_sent {sent0} -> {sent}: no event delivered"
            )));
        }
        if drv.local_cid() != 6 {
            return Err(fail(format!(
                "the driver's CID is {} after TRANSPORT_RESET with guest_cid 6: not re-read on \
                 the event",
                drv.local_cid()
            )));
        }
        let mut s = connect_echo(drv)
            .map_err(|x| fail(format!("new connection with CID 6: {}", reason(x))))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"migrated")?;
        let mut b = [0u8; 8];
        s.read_exact(&mut b)?;
        if &b != b"migrated" {
            return Err(fail("the new connection echoed wrong bytes"));
        }
        println!("# migration 3 -> 6: {seen}; the driver took CID 6 from the event, a new connection echoes");
        Ok(())
    });
    let restore = super::write_sysfs(SIM_GUEST_CID_PARAM, "3");
    result.and(restore)
}

/// The removal seen from a program: `/bin/vdpa-vsock connect --device vhost-vdpa:... 2:1234`
/// pipes our stdin to the echo and the echo to our stdout; with the echo flowing, `vdpa dev del`:
/// the program must exit within 2 s of the del starting, with status 1 (an error, not a panic's
/// 101 or a signal) and an error message naming the removal, and the del must complete. Then
/// the device is added again and a new driver echoes on it.
pub(crate) fn vdpa_surprise_removal_cli() -> TestResult {
    use std::process::{Command, Stdio};
    const NAME: &str = "vdpav11";
    const EXIT_BOUND: Duration = Duration::from_secs(2);
    run_cmd(
        "vdpa",
        &["dev", "add", "mgmtdev", "vdpasim_vsock", "name", NAME],
    )?;
    let node = match wait_vhost_vdpa_node(NAME) {
        Ok(n) => n,
        Err(x) => {
            let _ = run_cmd("vdpa", &["dev", "del", NAME]);
            return Err(x);
        }
    };
    let spawned = Command::new("/bin/vdpa-vsock")
        .args(["connect", "--device", &format!("vhost-vdpa:{node}")])
        .arg(format!("2:{SIM_ECHO_PORT}"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(x) => {
            let _ = run_cmd("vdpa", &["dev", "del", NAME]);
            return Err(fail(format!("spawn /bin/vdpa-vsock: {x}")));
        }
    };
    let pid = child.id();
    let (mut stdin, mut stdout, mut stderr) = (
        child.stdin.take().ok_or_else(|| fail("no stdin pipe"))?,
        child.stdout.take().ok_or_else(|| fail("no stdout pipe"))?,
        child.stderr.take().ok_or_else(|| fail("no stderr pipe"))?,
    );
    // Our end of the pipes: feed the echo until the program goes (EPIPE), count what comes back.
    thread::spawn(move || {
        let chunk = pattern(11, 16 << 10);
        while stdin.write_all(&chunk).is_ok() {}
    });
    let echoed = counter();
    let e2 = echoed.clone();
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            e2.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let err_text = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (exit_tx, exit_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = exit_tx.send((child.wait(), Instant::now()));
    });
    let kill = || {
        // SAFETY: kill(2) on the pid of our own child, called only before its exit status came
        // through `exit_rx` (so the waiter has not reaped it, and the pid is still its own).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    };
    let (mut reaped, mut del_started) = (false, false);
    let result = (|| {
        if !wait_until(Duration::from_secs(20), || load(&echoed) >= 256 << 10) {
            return Err(fail(format!(
                "the CLI's echo did not get going: {} bytes back within 20 s",
                load(&echoed)
            )));
        }
        let t0 = Instant::now();
        let del = spawn_dev_del(NAME);
        del_started = true;
        let exit = exit_rx.recv_timeout(HANG_BOUND);
        reaped = exit.is_ok();
        let (status, at) = match exit {
            Ok((Ok(status), at)) => (status, at),
            Ok((Err(x), _)) => return Err(fail(format!("waiting for the CLI: {x}"))),
            Err(_) => {
                kill();
                reaped = exit_rx.recv_timeout(HANG_BOUND).is_ok();
                let _ = del.recv_timeout(HANG_BOUND);
                return Err(fail(format!(
                    "the CLI still runs {} s after vdpa dev del (killed)",
                    HANG_BOUND.as_secs()
                )));
            }
        };
        let exited = at.saturating_duration_since(t0);
        let text = err_text.join().unwrap_or_default();
        let text = text.trim();
        match del.recv_timeout(HANG_BOUND) {
            Ok((_, Ok(()))) => {}
            Ok((_, Err(m))) => return Err(fail(format!("vdpa dev del failed: {m}"))),
            Err(_) => return Err(fail("vdpa dev del still blocked 5 s after the CLI exited")),
        }
        // The program's own last word (log lines may come before it).
        let verdict = text
            .lines()
            .find(|l| l.starts_with("vdpa-vsock: error:"))
            .unwrap_or("");
        if status.code() != Some(1)
            || exited > EXIT_BOUND
            || !verdict.contains(" was removed: ")
            || verdict.matches("removed").count() != 1
        {
            return Err(fail(format!(
                "the CLI exited {:.0} ms after vdpa dev del with {status} and stderr {text:?} \
                 (expected within {} ms, status 1, a `vdpa-vsock: error:` line naming the \
                 removal once)",
                exited.as_secs_f64() * 1e3,
                EXIT_BOUND.as_millis()
            )));
        }
        println!(
            "# vdpa-vsock connect exited {:.0} ms after vdpa dev del, {} echoed bytes before, {status}",
            exited.as_secs_f64() * 1e3,
            load(&echoed)
        );
        for l in text.lines() {
            println!("# stderr| {l}");
        }
        Ok(())
    })();
    // Failed before the del (the echo never flowed): end the program, then delete the device.
    if !reaped {
        kill();
        let _ = exit_rx.recv_timeout(HANG_BOUND);
    }
    if !del_started {
        return result.and(run_cmd("vdpa", &["dev", "del", NAME]));
    }
    result?;
    with_vsock_driver(NAME, |drv, _| {
        let mut s = connect_echo(drv)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"re-created")?;
        let mut b = [0u8; 10];
        s.read_exact(&mut b)?;
        if &b != b"re-created" {
            return Err(fail("the re-created device echoed wrong bytes"));
        }
        Ok(())
    })
}
