// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The kernel's vhost-vsock as the device (`--device vhost-vsock[:PATH],cid=N`).
//!
//! Read `linux/vhost.h` and `drivers/vhost/vsock.c` first. Here the roles are the reverse of a
//! VMM's: our process is the *guest* with CID N, the kernel's vhost-vsock is the device that
//! reads our rings, and the kernel's own AF_VSOCK sockets on CID 2 (the host) are the peer.
//!
//! Bring-up, as [`VhostVsockDevice`] performs it (the driver's call order, see [`super`]):
//!
//! | driver call | ioctls |
//! |---|---|
//! | `open` | reserved CIDs (0, 1, 2, `u32::MAX` and above) refused before anything; open the node `O_RDWR \| O_CLOEXEC`; `VHOST_SET_OWNER`; `VHOST_GET_FEATURES` |
//! | `negotiate` | `VHOST_SET_FEATURES` (VERSION_1 required; EVENT_IDX and SEQPACKET only when offered and wanted) |
//! | `map_dma` | `VHOST_SET_MEM_TABLE` (one region: IOVA base, size, our virtual address); `VHOST_VSOCK_SET_GUEST_CID` |
//! | `setup_queue` (0 rx, 1 tx) | `VHOST_SET_VRING_NUM`, `VHOST_SET_VRING_BASE` 0, `VHOST_SET_VRING_ADDR`, `VHOST_SET_VRING_KICK`, `VHOST_SET_VRING_CALL` |
//! | `activate` | `VHOST_VSOCK_SET_RUNNING` 1 |
//! | `reset`, drop | `VHOST_VSOCK_SET_RUNNING` 0, then close (which frees the CID) |
//!
//! The event queue (2) is not given to the kernel: it is ours to emulate (a transport reset
//! event), so [`VsockDevice::num_queues`] is 2.
//!
//! The DMA region uses [`IovaBase::Identity`]: its IOVAs are our virtual addresses, so the memory
//! table maps them one to one and vhost's address translation is the identity.
//!
//! The ioctls are rust-vmm's `vhost` crate (`VhostBackend` over our own `VhostKernBackend`, since
//! the crate's `vhost_kern::vsock::Vsock` opens only the fixed path `/dev/vhost-vsock`), plus two
//! small wrappers for the vsock-specific SET_GUEST_CID and SET_RUNNING. All of it sits behind the
//! `Sys` seam, so the bring-up order and the error hints are unit-tested without `/dev`.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use vhost::vhost_kern::vhost_binding::{VHOST_VSOCK_SET_GUEST_CID, VHOST_VSOCK_SET_RUNNING};
use vhost::vhost_kern::VhostKernBackend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::ioctl::ioctl_with_ref;

use super::{DeviceError, VsockDevice, RX_QUEUE, TX_QUEUE};
use crate::dma::{DmaOptions, DmaRegion, IovaBase};
use crate::packet::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_VSOCK_F_SEQPACKET};
use crate::virtq::QueueLayout;

/// Largest ring vhost accepts (`VHOST_SET_VRING_NUM` refuses more than 32768... but vhost-vsock
/// buffers are bounded by our DMA region anyway; keep the driver's usual maximum).
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Features the driver may negotiate with vhost-vsock. ACCESS_PLATFORM (the vhost IOTLB) is
/// deliberately not among them: the memory table is the translation.
const NEGOTIABLE: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_VSOCK_F_SEQPACKET);

/// The system calls of this backend: one method per ioctl, a real implementation over the node
/// ([`KernSys`]) and a recording twin in the tests.
pub(crate) trait Sys: Send + fmt::Debug {
    fn set_owner(&mut self) -> io::Result<()>;
    fn get_features(&mut self) -> io::Result<u64>;
    fn set_features(&mut self, features: u64) -> io::Result<()>;
    /// One region: `[guest_phys_addr, +size)` backed by our memory at `userspace_addr`. `mem`
    /// is the same region as vm-memory sees it (used to translate ring addresses).
    fn set_mem_table(&mut self, region: MemRegion, mem: &GuestMemoryMmap<()>) -> io::Result<()>;
    fn set_guest_cid(&mut self, cid: u64) -> io::Result<()>;
    fn set_vring_num(&mut self, index: u16, num: u16) -> io::Result<()>;
    fn set_vring_base(&mut self, index: u16, base: u16) -> io::Result<()>;
    fn set_vring_addr(&mut self, index: u16, layout: &QueueLayout) -> io::Result<()>;
    fn set_vring_kick(&mut self, index: u16, fd: &EventFd) -> io::Result<()>;
    fn set_vring_call(&mut self, index: u16, fd: &EventFd) -> io::Result<()>;
    fn set_running(&mut self, running: bool) -> io::Result<()>;
}

/// The one memory-table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemRegion {
    pub(crate) guest_phys_addr: u64,
    pub(crate) memory_size: u64,
    pub(crate) userspace_addr: u64,
}

/// The real system calls: an open vhost-vsock node.
struct KernSys {
    fd: File,
    /// The DMA region as vm-memory sees it; empty until `set_mem_table`.
    mem: Arc<GuestMemoryMmap<()>>,
}

impl fmt::Debug for KernSys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernSys")
            .field("fd", &self.fd.as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl AsRawFd for KernSys {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl VhostKernBackend for KernSys {
    type AS = Arc<GuestMemoryMmap<()>>;

    fn mem(&self) -> &Self::AS {
        &self.mem
    }
}

/// The vhost crate wraps every OS error; take it back out so callers can match on errno.
fn unwrap_vhost(e: vhost::Error) -> io::Error {
    match e {
        vhost::Error::IoctlError(e) | vhost::Error::IOError(e) | vhost::Error::VhostOpen(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidInput, other.to_string()),
    }
}

impl KernSys {
    fn open(path: &str) -> io::Result<Self> {
        let fd = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Ok(KernSys {
            fd,
            mem: Arc::new(GuestMemoryMmap::default()),
        })
    }
}

impl Sys for KernSys {
    fn set_owner(&mut self) -> io::Result<()> {
        VhostBackend::set_owner(self).map_err(unwrap_vhost)
    }

    fn get_features(&mut self) -> io::Result<u64> {
        VhostBackend::get_features(self).map_err(unwrap_vhost)
    }

    fn set_features(&mut self, features: u64) -> io::Result<()> {
        VhostBackend::set_features(self, features).map_err(unwrap_vhost)
    }

    fn set_mem_table(&mut self, region: MemRegion, mem: &GuestMemoryMmap<()>) -> io::Result<()> {
        self.mem = Arc::new(mem.clone());
        let info = VhostUserMemoryRegionInfo {
            guest_phys_addr: region.guest_phys_addr,
            memory_size: region.memory_size,
            userspace_addr: region.userspace_addr,
            ..Default::default()
        };
        VhostBackend::set_mem_table(self, &[info])
            .map(drop)
            .map_err(unwrap_vhost)
    }

    fn set_guest_cid(&mut self, cid: u64) -> io::Result<()> {
        // SAFETY: `self.fd` is an open vhost-vsock node; VHOST_VSOCK_SET_GUEST_CID is _IOW with a
        // `__u64`, and the kernel only reads the 8 bytes of `cid`, which outlives the call.
        let ret = unsafe { ioctl_with_ref(&self.fd, VHOST_VSOCK_SET_GUEST_CID(), &cid) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_vring_num(&mut self, index: u16, num: u16) -> io::Result<()> {
        VhostBackend::set_vring_num(self, index.into(), num).map_err(unwrap_vhost)
    }

    fn set_vring_base(&mut self, index: u16, base: u16) -> io::Result<()> {
        VhostBackend::set_vring_base(self, index.into(), base).map_err(unwrap_vhost)
    }

    fn set_vring_addr(&mut self, index: u16, layout: &QueueLayout) -> io::Result<()> {
        // The addresses are IOVAs; with `IovaBase::Identity` the crate's translation through
        // `self.mem` maps each to itself.
        let config = VringConfigData {
            queue_max_size: layout.size,
            queue_size: layout.size,
            flags: 0,
            desc_table_addr: layout.desc_table.0,
            used_ring_addr: layout.used_ring.0,
            avail_ring_addr: layout.avail_ring.0,
            log_addr: None,
        };
        VhostBackend::set_vring_addr(self, index.into(), &config).map_err(unwrap_vhost)
    }

    fn set_vring_kick(&mut self, index: u16, fd: &EventFd) -> io::Result<()> {
        VhostBackend::set_vring_kick(self, index.into(), fd).map_err(unwrap_vhost)
    }

    fn set_vring_call(&mut self, index: u16, fd: &EventFd) -> io::Result<()> {
        VhostBackend::set_vring_call(self, index.into(), fd).map_err(unwrap_vhost)
    }

    fn set_running(&mut self, running: bool) -> io::Result<()> {
        let on = libc::c_int::from(running);
        // SAFETY: `self.fd` is an open vhost-vsock node; VHOST_VSOCK_SET_RUNNING is _IOW with an
        // `int`, and the kernel only reads the 4 bytes of `on`, which outlives the call.
        let ret = unsafe { ioctl_with_ref(&self.fd, VHOST_VSOCK_SET_RUNNING(), &on) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Whether `cid` may be a guest's CID: 0 (hypervisor), 1 (local), 2 (host) and `u32::MAX` (any)
/// are reserved, and CIDs are 32-bit in the kernel.
pub fn cid_is_reserved(cid: u64) -> bool {
    cid <= 2 || cid >= u64::from(u32::MAX)
}

/// The error for a failed open of `path`, with what to do about it.
fn open_error(path: &str, e: io::Error) -> DeviceError {
    let hint = match e.raw_os_error() {
        Some(libc::ENOENT) => {
            format!("{path} is missing; load the module: modprobe vhost_vsock")
        }
        Some(libc::EACCES) | Some(libc::EPERM) => format!(
            "permission denied opening {path} (see the udev rule in udev/, group vsock: \
             add yourself to the group, or run as root)"
        ),
        _ => format!("cannot open {path}"),
    };
    DeviceError::hinted("open", hint, e)
}

/// The kernel's vhost-vsock, driven as a device. See the module docs for the bring-up.
#[derive(Debug)]
pub struct VhostVsockDevice {
    path: String,
    cid: u64,
    /// `None` once reset (the node is closed and the CID free again).
    sys: Option<Box<dyn Sys>>,
    offered: u64,
    negotiated: Option<u64>,
    mapped: bool,
    running: bool,
    kick: [EventFd; 2],
    call: [EventFd; 2],
}

impl VhostVsockDevice {
    /// Open `path` (normally [`super::VHOST_VSOCK_PATH`]) as the device of a guest with CID
    /// `cid`: open, SET_OWNER, GET_FEATURES. The CID is claimed later, in `map_dma`.
    pub fn open(path: &str, cid: u64) -> Result<Self, DeviceError> {
        VhostVsockDevice::open_with(path, cid, |p| {
            KernSys::open(p).map(|s| Box::new(s) as Box<dyn Sys>)
        })
    }

    pub(crate) fn open_with(
        path: &str,
        cid: u64,
        open: impl FnOnce(&str) -> io::Result<Box<dyn Sys>>,
    ) -> Result<Self, DeviceError> {
        if cid_is_reserved(cid) {
            return Err(DeviceError::InvalidSpec {
                spec: format!("vhost-vsock:{path},cid={cid}"),
                reason: format!("cid {cid} is reserved: expected 3..{}", u32::MAX - 1),
            });
        }
        let mut sys = open(path).map_err(|e| open_error(path, e))?;
        sys.set_owner().map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EBUSY) {
                format!("{path} already has an owner")
            } else {
                path.to_string()
            };
            DeviceError::hinted("VHOST_SET_OWNER", hint, e)
        })?;
        let offered = sys
            .get_features()
            .map_err(|e| DeviceError::io("VHOST_GET_FEATURES", e))?;
        let efd = || EventFd::new(EFD_NONBLOCK).map_err(|e| DeviceError::io("eventfd", e));
        Ok(VhostVsockDevice {
            path: path.to_string(),
            cid,
            sys: Some(sys),
            offered,
            negotiated: None,
            mapped: false,
            running: false,
            kick: [efd()?, efd()?],
            call: [efd()?, efd()?],
        })
    }

    fn sys(&mut self) -> Result<&mut Box<dyn Sys>, DeviceError> {
        self.sys
            .as_mut()
            .ok_or(DeviceError::NotReady("the vhost-vsock device was reset"))
    }

    fn check_queue(&self, index: u16) -> Result<usize, DeviceError> {
        match index {
            RX_QUEUE | TX_QUEUE => Ok(usize::from(index)),
            _ => Err(DeviceError::NoSuchQueue { index, count: 2 }),
        }
    }

    /// Stop the device and close the node (which frees the CID).
    fn stop(&mut self) -> Result<(), DeviceError> {
        let Some(mut sys) = self.sys.take() else {
            return Ok(());
        };
        let r = if self.running {
            self.running = false;
            sys.set_running(false)
                .map_err(|e| DeviceError::io("VHOST_VSOCK_SET_RUNNING 0", e))
        } else {
            Ok(())
        };
        drop(sys);
        r
    }
}

impl VsockDevice for VhostVsockDevice {
    fn name(&self) -> String {
        format!("vhost-vsock:{},cid={}", self.path, self.cid)
    }

    fn offered_features(&self) -> u64 {
        self.offered & NEGOTIABLE
    }

    fn negotiate(&mut self, features: u64) -> Result<u64, DeviceError> {
        let offered = self.offered;
        if offered & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(DeviceError::MissingFeature {
                name: "VIRTIO_F_VERSION_1",
                bit: VIRTIO_F_VERSION_1,
                offered,
            });
        }
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(DeviceError::Failed(format!(
                "the driver must accept VIRTIO_F_VERSION_1 (bit {VIRTIO_F_VERSION_1}); \
                 it asked for {features:#x}"
            )));
        }
        let features = features & offered & NEGOTIABLE;
        self.sys()?
            .set_features(features)
            .map_err(|e| DeviceError::io("VHOST_SET_FEATURES", e))?;
        self.negotiated = Some(features);
        Ok(features)
    }

    fn guest_cid(&self) -> Result<u64, DeviceError> {
        Ok(self.cid)
    }

    fn num_queues(&self) -> u16 {
        2
    }

    fn max_queue_size(&self, _index: u16) -> u16 {
        MAX_QUEUE_SIZE
    }

    fn details(&self) -> Vec<(&'static str, String)> {
        let state = if self.running {
            "running"
        } else if self.mapped {
            "memory table and CID set"
        } else if self.negotiated.is_some() {
            "features set"
        } else if self.sys.is_some() {
            "owned"
        } else {
            "closed"
        };
        vec![
            (
                "backend",
                "the kernel's vhost-vsock (no device status or config space; rx and tx queues, no event queue)".into(),
            ),
            (
                "vhost features",
                format!(
                    "{:#x} (the ones beyond the virtio bits are vhost's own, not negotiated)",
                    self.offered
                ),
            ),
            ("our CID", format!("{} (given as cid=N)", self.cid)),
            ("state", state.into()),
            ("DMA", "identity-mapped: IOVA = our virtual address (VHOST_SET_MEM_TABLE)".into()),
        ]
    }

    fn dma_options(&self) -> DmaOptions {
        DmaOptions {
            iova: IovaBase::Identity,
            ..DmaOptions::default()
        }
    }

    fn map_dma(&mut self, dma: &DmaRegion) -> Result<(), DeviceError> {
        if self.negotiated.is_none() {
            return Err(DeviceError::NotReady("map_dma before negotiate"));
        }
        let region = MemRegion {
            guest_phys_addr: dma.iova_base(),
            memory_size: dma.size() as u64,
            userspace_addr: dma.host_addr(),
        };
        if region.guest_phys_addr != region.userspace_addr {
            return Err(DeviceError::Failed(format!(
                "vhost-vsock needs an identity-mapped DMA region (IovaBase::Identity), found IOVA \
                 base {:#x} for virtual address {:#x}",
                region.guest_phys_addr, region.userspace_addr
            )));
        }
        let cid = self.cid;
        let sys = self.sys()?;
        sys.set_mem_table(region, dma.memory())
            .map_err(|e| DeviceError::io("VHOST_SET_MEM_TABLE", e))?;
        sys.set_guest_cid(cid).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EADDRINUSE) => format!(
                    "CID {cid} is already in use on this host (another VM or driver has it, or \
                     it is this machine's own CID); pick another with cid=N"
                ),
                Some(libc::EINVAL) => format!("CID {cid} is not a valid guest CID"),
                _ => format!("CID {cid}"),
            };
            DeviceError::hinted("VHOST_VSOCK_SET_GUEST_CID", hint, e)
        })?;
        self.mapped = true;
        Ok(())
    }

    fn setup_queue(&mut self, index: u16, layout: &QueueLayout) -> Result<(), DeviceError> {
        let i = self.check_queue(index)?;
        if !self.mapped {
            return Err(DeviceError::NotReady("setup_queue before map_dma"));
        }
        if layout.size == 0 || !layout.size.is_power_of_two() || layout.size > MAX_QUEUE_SIZE {
            return Err(DeviceError::BadQueueSize {
                size: layout.size,
                max: MAX_QUEUE_SIZE,
            });
        }
        let kick = self.kick[i]
            .try_clone()
            .map_err(|e| DeviceError::io("dup", e))?;
        let call = self.call[i]
            .try_clone()
            .map_err(|e| DeviceError::io("dup", e))?;
        let sys = self.sys()?;
        sys.set_vring_num(index, layout.size)
            .map_err(|e| DeviceError::io("VHOST_SET_VRING_NUM", e))?;
        sys.set_vring_base(index, 0)
            .map_err(|e| DeviceError::io("VHOST_SET_VRING_BASE", e))?;
        sys.set_vring_addr(index, layout)
            .map_err(|e| DeviceError::io("VHOST_SET_VRING_ADDR", e))?;
        sys.set_vring_kick(index, &kick)
            .map_err(|e| DeviceError::io("VHOST_SET_VRING_KICK", e))?;
        sys.set_vring_call(index, &call)
            .map_err(|e| DeviceError::io("VHOST_SET_VRING_CALL", e))?;
        Ok(())
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        self.sys()?
            .set_running(true)
            .map_err(|e| DeviceError::io("VHOST_VSOCK_SET_RUNNING 1", e))?;
        self.running = true;
        Ok(())
    }

    fn kick(&self, index: u16) -> Result<(), DeviceError> {
        let i = self.check_queue(index)?;
        if !self.running {
            return Err(DeviceError::NotReady(
                "kick before activate (or after reset)",
            ));
        }
        self.kick[i]
            .write(1)
            .map_err(|e| DeviceError::io("kick eventfd write", e))
    }

    fn call_fd(&self, index: u16) -> Result<&EventFd, DeviceError> {
        Ok(&self.call[self.check_queue(index)?])
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.stop()
    }
}

impl Drop for VhostVsockDevice {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("{}: stopping on drop: {e}", self.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::GuestAddress;

    use super::*;

    const OFFERED: u64 = 0x3_3d00_0002; // what Debian 6.12's vhost-vsock answers

    /// One recorded system call.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Op {
        Open(String),
        SetOwner,
        GetFeatures,
        SetFeatures(u64),
        SetMemTable(MemRegion),
        SetGuestCid(u64),
        SetVringNum(u16, u16),
        SetVringBase(u16, u16),
        SetVringAddr(u16, u64, u64, u64),
        SetVringKick(u16),
        SetVringCall(u16),
        SetRunning(bool),
        Close,
    }

    type Log = Arc<Mutex<Vec<Op>>>;

    /// The test twin: records every call; fails the named one with an errno.
    #[derive(Debug)]
    struct FakeSys {
        log: Log,
        fail: Option<(&'static str, i32)>,
    }

    impl FakeSys {
        fn rec(&self, name: &'static str, call: Op) -> io::Result<()> {
            self.log.lock().unwrap().push(call);
            match self.fail {
                Some((n, errno)) if n == name => Err(io::Error::from_raw_os_error(errno)),
                _ => Ok(()),
            }
        }
    }

    impl Drop for FakeSys {
        fn drop(&mut self) {
            self.log.lock().unwrap().push(Op::Close);
        }
    }

    impl Sys for FakeSys {
        fn set_owner(&mut self) -> io::Result<()> {
            self.rec("set_owner", Op::SetOwner)
        }
        fn get_features(&mut self) -> io::Result<u64> {
            self.rec("get_features", Op::GetFeatures).map(|()| OFFERED)
        }
        fn set_features(&mut self, f: u64) -> io::Result<()> {
            self.rec("set_features", Op::SetFeatures(f))
        }
        fn set_mem_table(&mut self, r: MemRegion, _: &GuestMemoryMmap<()>) -> io::Result<()> {
            self.rec("set_mem_table", Op::SetMemTable(r))
        }
        fn set_guest_cid(&mut self, cid: u64) -> io::Result<()> {
            self.rec("set_guest_cid", Op::SetGuestCid(cid))
        }
        fn set_vring_num(&mut self, i: u16, n: u16) -> io::Result<()> {
            self.rec("set_vring_num", Op::SetVringNum(i, n))
        }
        fn set_vring_base(&mut self, i: u16, b: u16) -> io::Result<()> {
            self.rec("set_vring_base", Op::SetVringBase(i, b))
        }
        fn set_vring_addr(&mut self, i: u16, l: &QueueLayout) -> io::Result<()> {
            let c = Op::SetVringAddr(i, l.desc_table.0, l.avail_ring.0, l.used_ring.0);
            self.rec("set_vring_addr", c)
        }
        fn set_vring_kick(&mut self, i: u16, _: &EventFd) -> io::Result<()> {
            self.rec("set_vring_kick", Op::SetVringKick(i))
        }
        fn set_vring_call(&mut self, i: u16, _: &EventFd) -> io::Result<()> {
            self.rec("set_vring_call", Op::SetVringCall(i))
        }
        fn set_running(&mut self, on: bool) -> io::Result<()> {
            self.rec("set_running", Op::SetRunning(on))
        }
    }

    #[track_caller]
    fn open_fake(
        cid: u64,
        fail: Option<(&'static str, i32)>,
    ) -> (Result<VhostVsockDevice, DeviceError>, Log) {
        let log = Log::default();
        let l = log.clone();
        let dev = VhostVsockDevice::open_with("/dev/vhost-vsock", cid, move |p| {
            l.lock().unwrap().push(Op::Open(p.into()));
            match fail {
                Some(("open", errno)) => Err(io::Error::from_raw_os_error(errno)),
                _ => Ok(Box::new(FakeSys {
                    log: l.clone(),
                    fail,
                }) as Box<dyn Sys>),
            }
        });
        (dev, log)
    }

    fn layout(base: u64) -> QueueLayout {
        QueueLayout {
            size: 256,
            desc_table: GuestAddress(base),
            avail_ring: GuestAddress(base + 0x1000),
            used_ring: GuestAddress(base + 0x2000),
        }
    }

    fn full_error(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut src = e.source();
        while let Some(c) = src {
            s.push_str(&format!(": {c}"));
            src = c.source();
        }
        s
    }

    fn dma() -> DmaRegion {
        DmaRegion::new(&DmaOptions {
            iova: IovaBase::Identity,
            lock: false,
            ..DmaOptions::default()
        })
        .unwrap()
    }

    #[test]
    fn bring_up_issues_the_ioctls_in_order() {
        let (dev, log) = open_fake(4, None);
        let mut dev = dev.unwrap();
        assert_eq!(dev.num_queues(), 2);
        assert_eq!(dev.dma_options().iova, IovaBase::Identity);
        let offered = dev.offered_features();
        assert_eq!(
            offered,
            (1 << VIRTIO_F_VERSION_1)
                | (1 << VIRTIO_RING_F_EVENT_IDX)
                | (1 << VIRTIO_VSOCK_F_SEQPACKET),
            "ACCESS_PLATFORM and the vhost-only bits are not offered to the driver"
        );
        assert_eq!(dev.negotiate(offered).unwrap(), offered);
        let dma = dma();
        let base = dma.iova_base();
        assert_eq!(base, dma.host_addr());
        dev.map_dma(&dma).unwrap();
        dev.setup_queue(RX_QUEUE, &layout(base)).unwrap();
        dev.setup_queue(TX_QUEUE, &layout(base + 0x4000)).unwrap();
        assert!(matches!(
            dev.setup_queue(2, &layout(base)),
            Err(DeviceError::NoSuchQueue { index: 2, count: 2 })
        ));
        assert!(matches!(dev.kick(RX_QUEUE), Err(DeviceError::NotReady(_))));
        dev.activate().unwrap();
        dev.kick(RX_QUEUE).unwrap();
        assert_eq!(dev.kick[0].read().unwrap(), 1);
        dev.call_fd(TX_QUEUE).unwrap().write(1).unwrap();
        dev.reset().unwrap();
        assert!(matches!(dev.kick(TX_QUEUE), Err(DeviceError::NotReady(_))));
        dev.reset().unwrap(); // idempotent
        drop(dev);

        use Op::*;
        let q = |i: u16, b: u64| {
            vec![
                SetVringNum(i, 256),
                SetVringBase(i, 0),
                SetVringAddr(i, b, b + 0x1000, b + 0x2000),
                SetVringKick(i),
                SetVringCall(i),
            ]
        };
        let mut want = vec![
            Open("/dev/vhost-vsock".into()),
            SetOwner,
            GetFeatures,
            SetFeatures(offered),
            SetMemTable(MemRegion {
                guest_phys_addr: base,
                memory_size: dma.size() as u64,
                userspace_addr: base,
            }),
            SetGuestCid(4),
        ];
        want.extend(q(0, base));
        want.extend(q(1, base + 0x4000));
        want.extend([SetRunning(true), SetRunning(false), Close]);
        assert_eq!(*log.lock().unwrap(), want);
    }

    #[test]
    fn negotiates_only_what_both_sides_want() {
        let (dev, log) = open_fake(3, None);
        let mut dev = dev.unwrap();
        // The driver asks for VERSION_1 and ACCESS_PLATFORM: the latter is dropped.
        let got = dev
            .negotiate((1 << VIRTIO_F_VERSION_1) | (1 << 33))
            .unwrap();
        assert_eq!(got, 1 << VIRTIO_F_VERSION_1);
        assert!(log
            .lock()
            .unwrap()
            .contains(&Op::SetFeatures(1 << VIRTIO_F_VERSION_1)));
        let e = dev.negotiate(1 << VIRTIO_RING_F_EVENT_IDX).unwrap_err();
        assert!(e.to_string().contains("VIRTIO_F_VERSION_1"), "{e}");
    }

    #[test]
    fn drop_without_activate_closes_without_set_running() {
        let (dev, log) = open_fake(5, None);
        drop(dev.unwrap());
        assert_eq!(
            *log.lock().unwrap(),
            vec![
                Op::Open("/dev/vhost-vsock".into()),
                Op::SetOwner,
                Op::GetFeatures,
                Op::Close
            ]
        );
    }

    #[test]
    fn reserved_cids_are_refused_before_any_system_call() {
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::from(u32::MAX) + 1] {
            let (dev, log) = open_fake(cid, None);
            let e = dev.unwrap_err().to_string();
            assert!(e.contains("reserved"), "{cid}: {e}");
            assert!(
                log.lock().unwrap().is_empty(),
                "{cid}: {:?}",
                log.lock().unwrap()
            );
        }
    }

    #[test]
    fn missing_node_says_load_the_module() {
        let (dev, _) = open_fake(4, Some(("open", libc::ENOENT)));
        let e = full_error(&dev.unwrap_err());
        assert!(
            e.contains("/dev/vhost-vsock is missing; load the module: modprobe vhost_vsock"),
            "{e}"
        );
        // The OS error says "No such file" once, after the hint.
        assert_eq!(e.matches("No such file").count(), 1, "{e}");
    }

    #[test]
    fn permission_denied_points_at_the_udev_rule() {
        let (dev, _) = open_fake(4, Some(("open", libc::EACCES)));
        let e = dev.unwrap_err();
        assert!(
            matches!(&e, DeviceError::Hinted { source, .. } if source.raw_os_error() == Some(libc::EACCES))
        );
        let e = full_error(&e);
        assert!(e.contains("permission denied"), "{e}");
        assert!(e.contains("udev/"), "{e}");
        assert!(e.contains("group vsock"), "{e}");
    }

    #[test]
    fn cid_in_use_says_so_and_keeps_the_errno() {
        let (dev, log) = open_fake(4, Some(("set_guest_cid", libc::EADDRINUSE)));
        let mut dev = dev.unwrap();
        dev.negotiate(1 << VIRTIO_F_VERSION_1).unwrap();
        let e = dev.map_dma(&dma()).unwrap_err();
        match &e {
            DeviceError::Hinted { source, .. } => {
                assert_eq!(source.raw_os_error(), Some(libc::EADDRINUSE))
            }
            other => panic!("{other:?}"),
        }
        let s = full_error(&e);
        assert!(s.contains("CID 4 is already in use on this host"), "{s}");
        // Nothing after the failed call.
        assert_eq!(log.lock().unwrap().last(), Some(&Op::SetGuestCid(4)));
        assert!(matches!(
            dev.setup_queue(RX_QUEUE, &layout(0)),
            Err(DeviceError::NotReady(_))
        ));
    }

    #[test]
    fn busy_owner_is_named() {
        let (dev, _) = open_fake(4, Some(("set_owner", libc::EBUSY)));
        let e = full_error(&dev.unwrap_err());
        assert!(e.contains("already has an owner"), "{e}");
    }

    #[test]
    fn order_violations_are_refused() {
        let (dev, _) = open_fake(4, None);
        let mut dev = dev.unwrap();
        assert!(matches!(dev.map_dma(&dma()), Err(DeviceError::NotReady(_))));
        dev.negotiate(1 << VIRTIO_F_VERSION_1).unwrap();
        assert!(matches!(
            dev.setup_queue(RX_QUEUE, &layout(0)),
            Err(DeviceError::NotReady(_))
        ));
        let fixed = DmaRegion::new(&DmaOptions {
            lock: false,
            ..DmaOptions::default()
        })
        .unwrap();
        let e = dev.map_dma(&fixed).unwrap_err().to_string();
        assert!(e.contains("identity-mapped"), "{e}");
    }
}
