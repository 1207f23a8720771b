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
