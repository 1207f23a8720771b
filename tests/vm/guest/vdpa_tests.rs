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

use std::io::{Read, Write};
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

/// Adds vDPA device `name` on `mgmtdev`, runs `f` with its `/dev/vhost-vdpa-N`, deletes it.
pub(crate) fn with_vdpa_dev(
    mgmtdev: &str,
    name: &str,
    f: impl FnOnce(&str) -> TestResult,
) -> TestResult {
    run_cmd("vdpa", &["dev", "add", "mgmtdev", mgmtdev, "name", name])?;
    let result = (|| {
        let dir = format!("/sys/bus/vdpa/devices/{name}");
        let start = Instant::now();
        let node = loop {
            let found = fs::read_dir(&dir).ok().and_then(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .find(|n| n.starts_with("vhost-vdpa-"))
            });
            if let Some(n) = found {
                let node = format!("/dev/{n}");
                if Path::new(&node).exists() {
                    break node;
                }
            }
            if start.elapsed() > Duration::from_secs(5) {
                return Err(fail(format!("no /dev/vhost-vdpa-N for {name} within 5 s")));
            }
            thread::sleep(Duration::from_millis(20));
        };
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
        let drv =
            VsockDriver::from_device(Box::new(dev), DriverConfig::default(), None).map_err(e)?;
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
        // SHUTDOWN is answered with RST: the connection closes and a new one works.
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
