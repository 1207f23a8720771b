// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The vhost-vdpa backend: a vDPA device through its `/dev/vhost-vdpa-N` character device.
//!
//! Bring-up (see `linux/vhost.h`, `drivers/vhost/vdpa.c`):
//! SET_OWNER; VDPA_GET_DEVICE_ID (19 for vsock, or what [`VhostVdpaDevice::open_raw`] was told);
//! GET/SET_BACKEND_FEATURES (IOTLB_MSG_V2 required, IOTLB_BATCH when offered);
//! VDPA_SET_CONFIG_CALL (an eventfd for the config interrupt, wired before the config is first
//! read so no `guest_cid` change can slip between; a kernel without it only costs the
//! notification, see [`VsockDevice::config_fd`]); status reset (0),
//! ACKNOWLEDGE, DRIVER; GET_FEATURES / SET_FEATURES / FEATURES_OK (re-read and checked);
//! VDPA_GET_CONFIG (`guest_cid`); VDPA_GET_IOVA_RANGE (where the DMA region goes);
//! VDPA_GET_VRING_NUM; v2 IOTLB UPDATE messages written to the fd for the DMA region (between
//! BATCH_BEGIN / BATCH_END when batching was acked); per queue SET_VRING_NUM / BASE / ADDR (IOVAs) /
//! KICK / CALL and VDPA_SET_VRING_ENABLE; DRIVER_OK. Teardown: status 0, IOTLB INVALIDATE.
//! Recovery: status 0, IOTLB INVALIDATE, then the bring-up again (the queues keep their kick and
//! call eventfds). Removal is not signalled by the kernel (`vdpa dev del` deletes the node, then
//! waits for the last descriptor to close), so the driver polls [`VsockDevice::check_present`].
//!
//! Every system call goes through the small [`VdpaSys`] seam, so the IOTLB message encoding and
//! the status state machine are unit-tested with a recording double (see the tests below).
//!
//! What of rust-vmm's `vhost` crate is used: its kernel ABI bindings (`vhost_binding`: ioctl
//! numbers, `vhost_vring_*` structs, IOTLB constants). Not used: `VhostKernVdpa` itself, because
//! (a) its `set_vring_addr` translates ring addresses through a `GuestAddressSpace` to host
//! virtual addresses, which is wrong here (with IOTLB the rings are given as IOVAs), (b) it has no
//! IOTLB batching API, and (c) its `set_group_asid` issues the wrong ioctl. The IOTLB v2 message is
//! encoded by hand into the 72-byte `struct vhost_msg_v2` layout of `linux/vhost_types.h`
//! (checked against the crate's `vhost_msg_v2` in a unit test).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use vhost::vhost_kern::vhost_binding as vb;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ref};

use super::{DeviceError, VsockDevice};
use crate::dma::{DmaOptions, DmaRegion, IovaBase, PAGE_SIZE};
use crate::virtq::QueueLayout;

/// virtio device id of a vsock device.
pub const VIRTIO_ID_VSOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
/// virtio device id of a network device.
pub const VIRTIO_ID_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;

/// Device status bits (virtio 1.2 section 2.1).
pub use super::status;

/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = crate::packet::VIRTIO_F_VERSION_1;
/// `VIRTIO_F_ACCESS_PLATFORM`.
pub const F_ACCESS_PLATFORM: u64 = crate::packet::VIRTIO_F_ACCESS_PLATFORM;

/// Backend feature bit: v2 IOTLB messages (`VHOST_BACKEND_F_IOTLB_MSG_V2`).
pub const BACKEND_F_IOTLB_MSG_V2: u64 = 1 << vb::VHOST_BACKEND_F_IOTLB_MSG_V2;
/// Backend feature bit: IOTLB batching (`VHOST_BACKEND_F_IOTLB_BATCH`).
pub const BACKEND_F_IOTLB_BATCH: u64 = 1 << vb::VHOST_BACKEND_F_IOTLB_BATCH;

/// Size of `struct vhost_msg_v2` (linux/vhost_types.h): `__u32 type; __u32 asid;` then a
/// 64-byte union whose `struct vhost_iotlb_msg` is `__u64 iova, size, uaddr; __u8 perm, type;`.
pub const VHOST_MSG_V2_SIZE: usize = std::mem::size_of::<vb::vhost_msg_v2>();
const _: () = assert!(
    VHOST_MSG_V2_SIZE == 72,
    "the kernel's struct vhost_msg_v2 is 72 bytes"
);

/// `VHOST_ACCESS_RW` (linux/vhost_types.h).
pub const VHOST_ACCESS_RW: u8 = vb::VHOST_ACCESS_RW;

/// Encodes one v2 IOTLB message (`struct vhost_msg_v2` with `type = VHOST_IOTLB_MSG_V2`).
pub fn encode_iotlb_v2(
    asid: u32,
    msg_type: u8,
    iova: u64,
    size: u64,
    uaddr: u64,
    perm: u8,
) -> [u8; VHOST_MSG_V2_SIZE] {
    let mut b = [0u8; VHOST_MSG_V2_SIZE];
    b[0..4].copy_from_slice(&vb::VHOST_IOTLB_MSG_V2.to_ne_bytes());
    b[4..8].copy_from_slice(&asid.to_ne_bytes());
    b[8..16].copy_from_slice(&iova.to_ne_bytes());
    b[16..24].copy_from_slice(&size.to_ne_bytes());
    b[24..32].copy_from_slice(&uaddr.to_ne_bytes());
    b[32] = perm;
    b[33] = msg_type;
    b
}

/// The device-id names used in error messages.
pub fn device_type_name(id: u32) -> &'static str {
    match id {
        1 => "net",
        2 => "block",
        3 => "console",
        4 => "entropy",
        5 => "balloon",
        8 => "scsi",
        9 => "9p",
        16 => "gpu",
        18 => "input",
        19 => "vsock",
        26 => "fs",
        _ => "unknown",
    }
}

/// The system calls of the backend: the real one is [`KernelVdpa`]; tests use a recording double.
/// Queue indexes are `u32` as in `struct vhost_vring_state`.
pub trait VdpaSys: Send + fmt::Debug {
    /// VHOST_SET_OWNER.
    fn set_owner(&self) -> io::Result<()>;
    /// VHOST_VDPA_GET_DEVICE_ID.
    fn get_device_id(&self) -> io::Result<u32>;
    /// VHOST_GET_BACKEND_FEATURES.
    fn get_backend_features(&self) -> io::Result<u64>;
    /// VHOST_SET_BACKEND_FEATURES.
    fn set_backend_features(&self, features: u64) -> io::Result<()>;
    /// VHOST_GET_FEATURES.
    fn get_features(&self) -> io::Result<u64>;
    /// VHOST_SET_FEATURES.
    fn set_features(&self, features: u64) -> io::Result<()>;
    /// VHOST_VDPA_GET_STATUS.
    fn get_status(&self) -> io::Result<u8>;
    /// VHOST_VDPA_SET_STATUS.
    fn set_status(&self, status: u8) -> io::Result<()>;
    /// VHOST_VDPA_GET_CONFIG of `buf.len()` bytes at `offset`.
    fn get_config(&self, offset: u32, buf: &mut [u8]) -> io::Result<()>;
    /// VHOST_VDPA_GET_CONFIG_SIZE.
    fn get_config_size(&self) -> io::Result<u32>;
    /// VHOST_VDPA_SET_CONFIG_CALL: the eventfd signalled on a config change.
    fn set_config_call(&self, fd: RawFd) -> io::Result<()>;
    /// VHOST_VDPA_GET_IOVA_RANGE: (first, last), inclusive.
    fn get_iova_range(&self) -> io::Result<(u64, u64)>;
    /// VHOST_VDPA_GET_VRING_NUM.
    fn get_vring_num(&self) -> io::Result<u16>;
    /// VHOST_VDPA_GET_VQS_COUNT.
    fn get_vqs_count(&self) -> io::Result<u32>;
    /// VHOST_SET_VRING_NUM.
    fn set_vring_num(&self, index: u32, num: u32) -> io::Result<()>;
    /// VHOST_SET_VRING_BASE.
    fn set_vring_base(&self, index: u32, base: u32) -> io::Result<()>;
    /// VHOST_SET_VRING_ADDR with IOVAs.
    fn set_vring_addr(&self, index: u32, desc: u64, avail: u64, used: u64) -> io::Result<()>;
    /// VHOST_SET_VRING_KICK.
    fn set_vring_kick(&self, index: u32, fd: RawFd) -> io::Result<()>;
    /// VHOST_SET_VRING_CALL.
    fn set_vring_call(&self, index: u32, fd: RawFd) -> io::Result<()>;
    /// VHOST_VDPA_SET_VRING_ENABLE.
    fn set_vring_enable(&self, index: u32, enable: bool) -> io::Result<()>;
    /// write(2) of one IOTLB message to the device fd.
    fn write_msg(&self, msg: &[u8; VHOST_MSG_V2_SIZE]) -> io::Result<()>;
}

/// The real system calls on an open `/dev/vhost-vdpa-N`.
#[derive(Debug)]
pub struct KernelVdpa {
    file: File,
}

fn rc(r: i32) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl KernelVdpa {
    /// Opens the node read-write, close-on-exec.
    pub fn open(path: &str) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Ok(KernelVdpa { file })
    }

    fn state(&self, req: libc::c_ulong, index: u32, num: u32) -> io::Result<()> {
        let s = vb::vhost_vring_state { index, num };
        // SAFETY: `req` takes a `struct vhost_vring_state` the kernel only reads.
        rc(unsafe { ioctl_with_ref(&self.file, req, &s) })
    }

    fn vfile(&self, req: libc::c_ulong, index: u32, fd: RawFd) -> io::Result<()> {
        let f = vb::vhost_vring_file { index, fd };
        // SAFETY: `req` takes a `struct vhost_vring_file` the kernel only reads.
        rc(unsafe { ioctl_with_ref(&self.file, req, &f) })
    }

    fn get_u64(&self, req: libc::c_ulong) -> io::Result<u64> {
        let mut v = 0u64;
        // SAFETY: `req` writes one __u64 into `v`.
        rc(unsafe { ioctl_with_mut_ref(&self.file, req, &mut v) })?;
        Ok(v)
    }

    fn get_u32(&self, req: libc::c_ulong) -> io::Result<u32> {
        let mut v = 0u32;
        // SAFETY: `req` writes one __u32 into `v`.
        rc(unsafe { ioctl_with_mut_ref(&self.file, req, &mut v) })?;
        Ok(v)
    }

    fn set_u64(&self, req: libc::c_ulong, v: u64) -> io::Result<()> {
        // SAFETY: `req` reads one __u64 from `v`.
        rc(unsafe { ioctl_with_ref(&self.file, req, &v) })
    }
}

impl VdpaSys for KernelVdpa {
    fn set_owner(&self) -> io::Result<()> {
        // SAFETY: VHOST_SET_OWNER takes no argument.
        rc(unsafe { ioctl(&self.file, vb::VHOST_SET_OWNER()) })
    }
    fn get_device_id(&self) -> io::Result<u32> {
        self.get_u32(vb::VHOST_VDPA_GET_DEVICE_ID())
    }
    fn get_backend_features(&self) -> io::Result<u64> {
        self.get_u64(vb::VHOST_GET_BACKEND_FEATURES())
    }
    fn set_backend_features(&self, features: u64) -> io::Result<()> {
        self.set_u64(vb::VHOST_SET_BACKEND_FEATURES(), features)
    }
    fn get_features(&self) -> io::Result<u64> {
        self.get_u64(vb::VHOST_GET_FEATURES())
    }
    fn set_features(&self, features: u64) -> io::Result<()> {
        self.set_u64(vb::VHOST_SET_FEATURES(), features)
    }
    fn get_status(&self) -> io::Result<u8> {
        let mut v = 0u8;
        // SAFETY: VHOST_VDPA_GET_STATUS writes one __u8.
        rc(unsafe { ioctl_with_mut_ref(&self.file, vb::VHOST_VDPA_GET_STATUS(), &mut v) })?;
        Ok(v)
    }
    fn set_status(&self, status: u8) -> io::Result<()> {
        // SAFETY: VHOST_VDPA_SET_STATUS reads one __u8.
        rc(unsafe { ioctl_with_ref(&self.file, vb::VHOST_VDPA_SET_STATUS(), &status) })
    }
    fn get_config(&self, offset: u32, buf: &mut [u8]) -> io::Result<()> {
        // struct vhost_vdpa_config { __u32 off; __u32 len; __u8 buf[]; }
        let len = u32::try_from(buf.len()).map_err(|_| io::Error::from_raw_os_error(22))?;
        let mut raw = vec![0u8; 8 + buf.len()];
        raw[0..4].copy_from_slice(&offset.to_ne_bytes());
        raw[4..8].copy_from_slice(&len.to_ne_bytes());
        // SAFETY: `raw` holds the 8-byte header plus `len` bytes the kernel writes `buf` into.
        rc(unsafe {
            ioctl_with_mut_ptr(&self.file, vb::VHOST_VDPA_GET_CONFIG(), raw.as_mut_ptr())
        })?;
        buf.copy_from_slice(&raw[8..]);
        Ok(())
    }
    fn get_config_size(&self) -> io::Result<u32> {
        self.get_u32(vb::VHOST_VDPA_GET_CONFIG_SIZE())
    }
    fn set_config_call(&self, fd: RawFd) -> io::Result<()> {
        let fd: libc::c_int = fd;
        // SAFETY: VHOST_VDPA_SET_CONFIG_CALL reads one int (an eventfd, or -1 to unbind).
        rc(unsafe { ioctl_with_ref(&self.file, vb::VHOST_VDPA_SET_CONFIG_CALL(), &fd) })
    }
    fn get_iova_range(&self) -> io::Result<(u64, u64)> {
        let mut r = [0u64; 2]; // struct vhost_vdpa_iova_range { __u64 first; __u64 last; }
                               // SAFETY: the ioctl writes 16 bytes into `r`.
        rc(unsafe {
            ioctl_with_mut_ptr(&self.file, vb::VHOST_VDPA_GET_IOVA_RANGE(), r.as_mut_ptr())
        })?;
        Ok((r[0], r[1]))
    }
    fn get_vring_num(&self) -> io::Result<u16> {
        let mut v = 0u16;
        // SAFETY: VHOST_VDPA_GET_VRING_NUM writes one __u16.
        rc(unsafe { ioctl_with_mut_ref(&self.file, vb::VHOST_VDPA_GET_VRING_NUM(), &mut v) })?;
        Ok(v)
    }
    fn get_vqs_count(&self) -> io::Result<u32> {
        self.get_u32(vb::VHOST_VDPA_GET_VQS_COUNT())
    }
    fn set_vring_num(&self, index: u32, num: u32) -> io::Result<()> {
        self.state(vb::VHOST_SET_VRING_NUM(), index, num)
    }
    fn set_vring_base(&self, index: u32, base: u32) -> io::Result<()> {
        self.state(vb::VHOST_SET_VRING_BASE(), index, base)
    }
    fn set_vring_addr(&self, index: u32, desc: u64, avail: u64, used: u64) -> io::Result<()> {
        let a = vb::vhost_vring_addr {
            index,
            flags: 0,
            desc_user_addr: desc,
            used_user_addr: used,
            avail_user_addr: avail,
            log_guest_addr: 0,
        };
        // SAFETY: VHOST_SET_VRING_ADDR reads a `struct vhost_vring_addr`.
        rc(unsafe { ioctl_with_ref(&self.file, vb::VHOST_SET_VRING_ADDR(), &a) })
    }
    fn set_vring_kick(&self, index: u32, fd: RawFd) -> io::Result<()> {
        self.vfile(vb::VHOST_SET_VRING_KICK(), index, fd)
    }
    fn set_vring_call(&self, index: u32, fd: RawFd) -> io::Result<()> {
        self.vfile(vb::VHOST_SET_VRING_CALL(), index, fd)
    }
    fn set_vring_enable(&self, index: u32, enable: bool) -> io::Result<()> {
        self.state(vb::VHOST_VDPA_SET_VRING_ENABLE(), index, u32::from(enable))
    }
    fn write_msg(&self, msg: &[u8; VHOST_MSG_V2_SIZE]) -> io::Result<()> {
        let n = (&self.file).write(msg)?;
        if n != msg.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short IOTLB message write: {n} of {} bytes", msg.len()),
            ));
        }
        Ok(())
    }
}

/// One queue's eventfds.
#[derive(Debug)]
struct QueueFds {
    kick: EventFd,
    call: EventFd,
}

/// A vDPA device driven through vhost-vdpa. See the [module docs](self).
#[derive(Debug)]
pub struct VhostVdpaDevice {
    sys: Box<dyn VdpaSys>,
    path: String,
    device_id: u32,
    backend_features: u64,
    offered: u64,
    negotiated: Option<u64>,
    status: u8,
    iova_range: (u64, u64),
    max_vring: u16,
    num_queues: u16,
    queues: Vec<Option<QueueFds>>,
    /// (iova, size) of mapped ranges, invalidated on reset/drop.
    mapped: Vec<(u64, u64)>,
    /// The config interrupt's eventfd, when VHOST_VDPA_SET_CONFIG_CALL took it.
    config_call: Option<EventFd>,
    /// The device number of the node we opened (`None` over a test double): while the driver
    /// runs, the node must still be there and name the same device, or it was removed.
    rdev: Option<u64>,
}

fn io_err(op: &'static str) -> impl Fn(io::Error) -> DeviceError {
    move |e| DeviceError::io(op, e)
}

impl VhostVdpaDevice {
    /// Opens a vsock device (device id 19) and starts the bring-up up to ACKNOWLEDGE | DRIVER.
    pub fn open(path: &str) -> Result<Self, DeviceError> {
        Self::open_raw(path, VIRTIO_ID_VSOCK)
    }

    /// Opens any vDPA device whose device id is `expected_device_id` (e.g. 1 for `vdpa_sim_net`,
    /// used to test the plumbing on a non-vsock device).
    pub fn open_raw(path: &str, expected_device_id: u32) -> Result<Self, DeviceError> {
        let sys = KernelVdpa::open(path)
            .map_err(|e| DeviceError::Failed(format!("cannot open {path}: {e}")))?;
        let rdev = sys.file.metadata().ok().map(|m| m.rdev());
        let mut dev = Self::with_sys(Box::new(sys), path, expected_device_id)?;
        dev.rdev = rdev;
        Ok(dev)
    }

    /// Bring-up over any [`VdpaSys`] (tests use a double).
    pub fn with_sys(
        sys: Box<dyn VdpaSys>,
        path: &str,
        expected_device_id: u32,
    ) -> Result<Self, DeviceError> {
        sys.set_owner().map_err(io_err("VHOST_SET_OWNER"))?;
        let device_id = sys
            .get_device_id()
            .map_err(io_err("VHOST_VDPA_GET_DEVICE_ID"))?;
        if device_id != expected_device_id {
            return Err(DeviceError::Failed(format!(
                "{path}: device id {device_id} ({}), expected {expected_device_id} ({})",
                device_type_name(device_id),
                device_type_name(expected_device_id)
            )));
        }
        let offered_backend = sys
            .get_backend_features()
            .map_err(io_err("VHOST_GET_BACKEND_FEATURES"))?;
        if offered_backend & BACKEND_F_IOTLB_MSG_V2 == 0 {
            return Err(DeviceError::Failed(format!(
                "{path}: backend features {offered_backend:#x} lack IOTLB_MSG_V2"
            )));
        }
        let backend_features = offered_backend & (BACKEND_F_IOTLB_MSG_V2 | BACKEND_F_IOTLB_BATCH);
        sys.set_backend_features(backend_features)
            .map_err(io_err("VHOST_SET_BACKEND_FEATURES"))?;
        // The config interrupt before the first config read: a change after it is signalled.
        let config_call = EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        let config_call = match sys.set_config_call(config_call.as_raw_fd()) {
            Ok(()) => Some(config_call),
            Err(e) => {
                log::warn!(
                    "{path}: VHOST_VDPA_SET_CONFIG_CALL failed ({e}): a guest_cid change will go unnoticed"
                );
                None
            }
        };
        let iova_range = sys
            .get_iova_range()
            .map_err(io_err("VHOST_VDPA_GET_IOVA_RANGE"))?;
        let max_vring = sys
            .get_vring_num()
            .map_err(io_err("VHOST_VDPA_GET_VRING_NUM"))?;
        let num_queues = if device_id == VIRTIO_ID_VSOCK {
            3
        } else {
            let n = sys
                .get_vqs_count()
                .map_err(io_err("VHOST_VDPA_GET_VQS_COUNT"))?;
            u16::try_from(n).unwrap_or(u16::MAX)
        };
        let mut dev = VhostVdpaDevice {
            sys,
            path: path.to_string(),
            device_id,
            backend_features,
            offered: 0,
            negotiated: None,
            status: 0,
            iova_range,
            max_vring,
            num_queues,
            queues: (0..num_queues).map(|_| None).collect(),
            mapped: Vec::new(),
            config_call,
            rdev: None,
        };
        dev.start()?;
        Ok(dev)
    }

    /// The device id read at open.
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// The acked backend features.
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// The device's usable IOVA range (first, last), inclusive.
    pub fn iova_range(&self) -> (u64, u64) {
        self.iova_range
    }

    /// Reads `buf.len()` bytes of device config at `offset`.
    pub fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.sys
            .get_config(offset, buf)
            .map_err(io_err("VHOST_VDPA_GET_CONFIG"))
    }

    fn set_status(&mut self, s: u8) -> Result<(), DeviceError> {
        self.sys
            .set_status(s)
            .map_err(io_err("VHOST_VDPA_SET_STATUS"))?;
        self.status = s;
        Ok(())
    }

    fn add_status(&mut self, bit: u8) -> Result<(), DeviceError> {
        let s = self.status | bit;
        if let Err(e) = self.set_status(s) {
            self.fail();
            return Err(e);
        }
        Ok(())
    }

    /// From any status to ACKNOWLEDGE | DRIVER with the offered features read: where opening
    /// leaves the device, and where [`VsockDevice::restart`] brings it back.
    fn start(&mut self) -> Result<(), DeviceError> {
        self.set_status(0)?;
        self.add_status(status::ACKNOWLEDGE)?;
        self.add_status(status::DRIVER)?;
        self.offered = self
            .sys
            .get_features()
            .map_err(io_err("VHOST_GET_FEATURES"))?;
        Ok(())
    }

    /// Best effort: tell the device the driver gave up.
    fn fail(&mut self) {
        let s = self.status | status::FAILED;
        if self.sys.set_status(s).is_ok() {
            self.status = s;
        }
    }

    fn batching(&self) -> bool {
        self.backend_features & BACKEND_F_IOTLB_BATCH != 0
    }

    /// Sends IOTLB messages of `msg_type` for `ranges`, batched when the backend acked it.
    fn iotlb(&self, msg_type: u8, ranges: &[(u64, u64, u64)]) -> io::Result<()> {
        let batch = self.batching();
        if batch {
            self.sys
                .write_msg(&encode_iotlb_v2(0, vb::VHOST_IOTLB_BATCH_BEGIN, 0, 0, 0, 0))?;
        }
        let mut res = Ok(());
        for &(iova, size, uaddr) in ranges {
            let perm = if msg_type == vb::VHOST_IOTLB_UPDATE {
                VHOST_ACCESS_RW
            } else {
                0
            };
            res = self
                .sys
                .write_msg(&encode_iotlb_v2(0, msg_type, iova, size, uaddr, perm));
            if res.is_err() {
                break;
            }
        }
        if batch {
            let end =
                self.sys
                    .write_msg(&encode_iotlb_v2(0, vb::VHOST_IOTLB_BATCH_END, 0, 0, 0, 0));
            res = res.and(end);
        }
        res
    }

    /// Removes every mapping made by [`VsockDevice::map_dma`].
    pub fn unmap_all(&mut self) -> Result<(), DeviceError> {
        if self.mapped.is_empty() {
            return Ok(());
        }
        let ranges: Vec<_> = self.mapped.iter().map(|&(i, s)| (i, s, 0)).collect();
        self.iotlb(vb::VHOST_IOTLB_INVALIDATE, &ranges)
            .map_err(io_err("IOTLB INVALIDATE"))?;
        self.mapped.clear();
        Ok(())
    }

    fn queue_index(&self, index: u16) -> Result<usize, DeviceError> {
        if index >= self.num_queues {
            return Err(DeviceError::NoSuchQueue {
                index,
                count: self.num_queues,
            });
        }
        Ok(usize::from(index))
    }
}

impl VsockDevice for VhostVdpaDevice {
    fn name(&self) -> String {
        format!("vhost-vdpa:{}", self.path)
    }

    fn offered_features(&self) -> u64 {
        self.offered
    }

    fn negotiate(&mut self, features: u64) -> Result<u64, DeviceError> {
        if self.offered & (1 << F_VERSION_1) == 0 {
            self.fail();
            return Err(DeviceError::MissingFeature {
                name: "VIRTIO_F_VERSION_1",
                bit: F_VERSION_1,
                offered: self.offered,
            });
        }
        let want = (features | (1 << F_VERSION_1) | (self.offered & (1 << F_ACCESS_PLATFORM)))
            & self.offered;
        if let Err(e) = self.sys.set_features(want) {
            self.fail();
            return Err(DeviceError::io("VHOST_SET_FEATURES", e));
        }
        self.add_status(status::FEATURES_OK)?;
        let s = self
            .sys
            .get_status()
            .map_err(io_err("VHOST_VDPA_GET_STATUS"))?;
        if s & status::FEATURES_OK == 0 {
            self.fail();
            return Err(DeviceError::Failed(format!(
                "{}: device did not accept features {want:#x} (status {s:#x} lacks FEATURES_OK)",
                self.path
            )));
        }
        self.negotiated = Some(want);
        Ok(want)
    }

    fn guest_cid(&self) -> Result<u64, DeviceError> {
        let mut b = [0u8; 8];
        self.read_config(0, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn max_queue_size(&self, _index: u16) -> u16 {
        self.max_vring
    }

    fn dma_options(&self) -> DmaOptions {
        let page = PAGE_SIZE as u64;
        let first = self
            .iova_range
            .0
            .checked_add(page - 1)
            .map_or(0, |f| f & !(page - 1));
        DmaOptions {
            iova: IovaBase::Fixed(first),
            ..DmaOptions::default()
        }
    }

    fn map_dma(&mut self, dma: &DmaRegion) -> Result<(), DeviceError> {
        let iova = dma.iova_base();
        let size = dma.size() as u64;
        let (first, last) = self.iova_range;
        if iova < first || size == 0 || iova.checked_add(size - 1).is_none_or(|e| e > last) {
            return Err(DeviceError::Failed(format!(
                "{}: DMA region {iova:#x}+{size:#x} outside the device's IOVA range {first:#x}..={last:#x}",
                self.path
            )));
        }
        self.iotlb(vb::VHOST_IOTLB_UPDATE, &[(iova, size, dma.host_addr())])
            .map_err(io_err("IOTLB UPDATE"))?;
        self.mapped.push((iova, size));
        Ok(())
    }

    fn setup_queue(&mut self, index: u16, layout: &QueueLayout) -> Result<(), DeviceError> {
        let i = self.queue_index(index)?;
        if !layout.size.is_power_of_two() || layout.size > self.max_vring {
            return Err(DeviceError::BadQueueSize {
                size: layout.size,
                max: self.max_vring,
            });
        }
        let q = u32::from(index);
        // A queue set up again after a restart keeps its eventfds: the driver's event loop
        // waits on duplicates of the call eventfd it was given at bring-up.
        let (kick, call) = match self.queues[i].take() {
            Some(fds) => (fds.kick, fds.call),
            None => (
                EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?,
                EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?,
            ),
        };
        let s = &self.sys;
        let wired = (|| {
            s.set_vring_num(q, u32::from(layout.size))
                .map_err(io_err("VHOST_SET_VRING_NUM"))?;
            s.set_vring_base(q, 0)
                .map_err(io_err("VHOST_SET_VRING_BASE"))?;
            s.set_vring_addr(
                q,
                layout.desc_table.0,
                layout.avail_ring.0,
                layout.used_ring.0,
            )
            .map_err(io_err("VHOST_SET_VRING_ADDR"))?;
            s.set_vring_kick(q, kick.as_raw_fd())
                .map_err(io_err("VHOST_SET_VRING_KICK"))?;
            s.set_vring_call(q, call.as_raw_fd())
                .map_err(io_err("VHOST_SET_VRING_CALL"))?;
            s.set_vring_enable(q, true)
                .map_err(io_err("VHOST_VDPA_SET_VRING_ENABLE"))
        })();
        if let Err(err) = wired {
            self.fail();
            return Err(err);
        }
        self.queues[i] = Some(QueueFds { kick, call });
        Ok(())
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        if self.negotiated.is_none() {
            return Err(DeviceError::NotReady("activate before negotiate"));
        }
        self.add_status(status::DRIVER_OK)?;
        let s = self
            .sys
            .get_status()
            .map_err(io_err("VHOST_VDPA_GET_STATUS"))?;
        if s & status::DRIVER_OK == 0 || s & 0x40 != 0 {
            self.fail();
            return Err(DeviceError::Failed(format!(
                "{}: device status {s:#x} after DRIVER_OK",
                self.path
            )));
        }
        Ok(())
    }

    fn kick(&self, index: u16) -> Result<(), DeviceError> {
        let i = self.queue_index(index)?;
        let q = self.queues[i]
            .as_ref()
            .ok_or(DeviceError::NotReady("kick on a queue that is not set up"))?;
        q.kick.write(1).map_err(io_err("kick eventfd write"))
    }

    fn call_fd(&self, index: u16) -> Result<&EventFd, DeviceError> {
        let i = self.queue_index(index)?;
        self.queues[i]
            .as_ref()
            .map(|q| &q.call)
            .ok_or(DeviceError::NotReady(
                "call_fd of a queue that is not set up",
            ))
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        let r = self.set_status(0);
        let u = self.unmap_all();
        self.negotiated = None;
        r.and(u)
    }

    fn config_fd(&self) -> Option<&EventFd> {
        self.config_call.as_ref()
    }

    fn status(&self) -> Result<Option<u8>, DeviceError> {
        self.sys
            .get_status()
            .map(Some)
            .map_err(io_err("VHOST_VDPA_GET_STATUS"))
    }

    fn restart(&mut self) -> Result<(), DeviceError> {
        self.start()
    }

    fn polls_presence(&self) -> bool {
        self.rdev.is_some()
    }

    /// `vdpa dev del` removes the node (and then waits for us to close it): gone, or naming
    /// another device, means removed. Other errors (EACCES on a path we opened) say nothing.
    fn check_present(&self) -> Result<(), DeviceError> {
        let Some(rdev) = self.rdev else {
            return Ok(());
        };
        let how = match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                format!("its node {} is gone", self.path)
            }
            Ok(m) if m.rdev() != rdev => {
                format!("its node {} now names another device", self.path)
            }
            _ => return Ok(()),
        };
        Err(DeviceError::Removed {
            device: self.name(),
            how,
        })
    }

    fn details(&self) -> Vec<(&'static str, String)> {
        let failed = |e: io::Error| format!("unreadable: {e}");
        let mut out = vec![
            (
                "device id",
                format!("{} ({})", self.device_id, device_type_name(self.device_id)),
            ),
            (
                "backend features",
                format!(
                    "{:#x} ({})",
                    self.backend_features,
                    backend_feature_names(self.backend_features)
                ),
            ),
            (
                "status",
                self.sys
                    .get_status()
                    .map_or_else(failed, super::status_names),
            ),
        ];
        let config_size = self.sys.get_config_size();
        out.push((
            "config size",
            match &config_size {
                Ok(n) => format!("{n} bytes"),
                Err(e) => format!("unreadable: {e}"),
            },
        ));
        // The whole config space, at most one page of it; 8 bytes (guest_cid) when the size is
        // unknown.
        let len = config_size.map_or(8, |n| {
            usize::try_from(n).map_or(PAGE_SIZE, |n| n.min(PAGE_SIZE))
        });
        let mut cfg = vec![0u8; len];
        out.push((
            "config",
            match self.sys.get_config(0, &mut cfg) {
                Ok(()) => {
                    let hex: Vec<String> = cfg.iter().map(|b| format!("{b:02x}")).collect();
                    match cfg.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                        Some(cid) if self.device_id == VIRTIO_ID_VSOCK => {
                            format!("{} (guest_cid {})", hex.join(" "), u64::from_le_bytes(cid))
                        }
                        _ => hex.join(" "),
                    }
                }
                Err(e) => format!("unreadable: {e}"),
            },
        ));
        let (first, last) = self.iova_range;
        out.push(("iova range", format!("{first:#x}..={last:#x}")));
        out.push((
            "vrings",
            format!(
                "{} used, device reports {}, max size {} (VDPA_GET_VRING_NUM)",
                self.num_queues,
                self.sys
                    .get_vqs_count()
                    .map_or_else(failed, |n| n.to_string()),
                self.max_vring
            ),
        ));
        out.push((
            "config irq",
            if self.config_call.is_some() {
                "eventfd registered (VHOST_VDPA_SET_CONFIG_CALL)".to_string()
            } else {
                "not available".to_string()
            },
        ));
        out
    }
}

/// The names of the vhost backend feature bits in `bits` (linux/vhost_types.h).
pub fn backend_feature_names(bits: u64) -> String {
    const NAMES: &[(u64, &str)] = &[
        (vb::VHOST_BACKEND_F_IOTLB_MSG_V2, "IOTLB_MSG_V2"),
        (vb::VHOST_BACKEND_F_IOTLB_BATCH, "IOTLB_BATCH"),
        (vb::VHOST_BACKEND_F_IOTLB_ASID, "IOTLB_ASID"),
        (vb::VHOST_BACKEND_F_SUSPEND, "SUSPEND"),
    ];
    let names = super::bit_names(bits, NAMES);
    if names.is_empty() {
        "none".into()
    } else {
        names.join(" ")
    }
}

impl Drop for VhostVdpaDevice {
    fn drop(&mut self) {
        if self.status != 0 {
            let _ = self.set_status(0);
        }
        if let Err(e) = self.unmap_all() {
            log::warn!("{}: {e}", self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A recording double: every call is logged; status follows the virtio rules
    /// (no bit may be cleared except by writing 0).
    #[derive(Debug, Clone)]
    struct Fake {
        log: Arc<Mutex<Vec<String>>>,
        state: Arc<Mutex<FakeState>>,
    }

    #[derive(Debug)]
    struct FakeState {
        device_id: u32,
        backend: u64,
        features: u64,
        status: u8,
        reject_features_ok: bool,
        /// VHOST_VDPA_SET_CONFIG_CALL answers ENOTTY (an old kernel).
        no_config_call: bool,
        /// VHOST_VDPA_GET_VRING_NUM answers this.
        vring_num: u16,
        /// A write(2) of an IOTLB message of this type fails with EFAULT.
        fail_iotlb: Option<u8>,
        msgs: Vec<[u8; VHOST_MSG_V2_SIZE]>,
    }

    impl Fake {
        fn new(device_id: u32, backend: u64, features: u64) -> Self {
            Fake {
                log: Arc::default(),
                state: Arc::new(Mutex::new(FakeState {
                    device_id,
                    backend,
                    features,
                    status: 0,
                    reject_features_ok: false,
                    no_config_call: false,
                    vring_num: 256,
                    fail_iotlb: None,
                    msgs: Vec::new(),
                })),
            }
        }
        fn push(&self, s: String) {
            self.log.lock().unwrap().push(s);
        }
        fn calls(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
    }

    impl VdpaSys for Fake {
        fn set_owner(&self) -> io::Result<()> {
            self.push("set_owner".into());
            Ok(())
        }
        fn get_device_id(&self) -> io::Result<u32> {
            Ok(self.state.lock().unwrap().device_id)
        }
        fn get_backend_features(&self) -> io::Result<u64> {
            Ok(self.state.lock().unwrap().backend)
        }
        fn set_backend_features(&self, f: u64) -> io::Result<()> {
            self.push(format!("set_backend_features {f:#x}"));
            Ok(())
        }
        fn get_features(&self) -> io::Result<u64> {
            Ok(self.state.lock().unwrap().features)
        }
        fn set_features(&self, f: u64) -> io::Result<()> {
            self.push(format!("set_features {f:#x}"));
            Ok(())
        }
        fn get_status(&self) -> io::Result<u8> {
            Ok(self.state.lock().unwrap().status)
        }
        fn set_status(&self, s: u8) -> io::Result<()> {
            self.push(format!("set_status {s:#x}"));
            let mut st = self.state.lock().unwrap();
            if s != 0 && st.status & !s != 0 {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            st.status = if st.reject_features_ok {
                s & !status::FEATURES_OK
            } else {
                s
            };
            Ok(())
        }
        fn get_config(&self, offset: u32, buf: &mut [u8]) -> io::Result<()> {
            assert_eq!(offset, 0);
            self.push(format!("get_config {}", buf.len()));
            buf.copy_from_slice(&42u64.to_le_bytes()[..buf.len()]);
            Ok(())
        }
        fn get_config_size(&self) -> io::Result<u32> {
            Ok(8)
        }
        fn set_config_call(&self, fd: RawFd) -> io::Result<()> {
            if self.state.lock().unwrap().no_config_call {
                return Err(io::Error::from_raw_os_error(libc::ENOTTY));
            }
            assert!(fd >= 0);
            self.push("set_config_call".into());
            Ok(())
        }
        fn get_iova_range(&self) -> io::Result<(u64, u64)> {
            Ok((0x1001, u64::MAX))
        }
        fn get_vring_num(&self) -> io::Result<u16> {
            Ok(self.state.lock().unwrap().vring_num)
        }
        fn get_vqs_count(&self) -> io::Result<u32> {
            Ok(2)
        }
        fn set_vring_num(&self, i: u32, n: u32) -> io::Result<()> {
            self.push(format!("vring_num {i} {n}"));
            Ok(())
        }
        fn set_vring_base(&self, i: u32, n: u32) -> io::Result<()> {
            self.push(format!("vring_base {i} {n}"));
            Ok(())
        }
        fn set_vring_addr(&self, i: u32, d: u64, a: u64, u: u64) -> io::Result<()> {
            self.push(format!("vring_addr {i} {d:#x} {a:#x} {u:#x}"));
            Ok(())
        }
        fn set_vring_kick(&self, i: u32, _fd: RawFd) -> io::Result<()> {
            self.push(format!("vring_kick {i}"));
            Ok(())
        }
        fn set_vring_call(&self, i: u32, _fd: RawFd) -> io::Result<()> {
            self.push(format!("vring_call {i}"));
            Ok(())
        }
        fn set_vring_enable(&self, i: u32, e: bool) -> io::Result<()> {
            self.push(format!("vring_enable {i} {e}"));
            Ok(())
        }
        fn write_msg(&self, m: &[u8; VHOST_MSG_V2_SIZE]) -> io::Result<()> {
            self.push(format!("iotlb type {}", m[33]));
            let mut st = self.state.lock().unwrap();
            if st.fail_iotlb == Some(m[33]) {
                return Err(io::Error::from_raw_os_error(libc::EFAULT));
            }
            st.msgs.push(*m);
            Ok(())
        }
    }

    const VSOCK_FEATURES: u64 = (1 << F_VERSION_1) | (1 << F_ACCESS_PLATFORM) | 0b11;

    #[test]
    fn msg_v2_layout_matches_the_kernel_struct() {
        assert_eq!(std::mem::size_of::<vb::vhost_msg_v2>(), VHOST_MSG_V2_SIZE);
        let mut m = vb::vhost_msg_v2 {
            type_: vb::VHOST_IOTLB_MSG_V2,
            reserved: 7,
            ..Default::default()
        };
        m.__bindgen_anon_1.iotlb = vb::vhost_iotlb_msg {
            iova: 0x1000,
            size: 0x20_0000,
            uaddr: 0x7f00_0000_0000,
            perm: VHOST_ACCESS_RW,
            type_: vb::VHOST_IOTLB_UPDATE,
        };
        // SAFETY: vhost_msg_v2 is plain old data of VHOST_MSG_V2_SIZE bytes (asserted above);
        // padding bytes were zeroed by Default.
        let bytes: [u8; VHOST_MSG_V2_SIZE] = unsafe { std::mem::transmute(m) };
        let ours = encode_iotlb_v2(
            7,
            vb::VHOST_IOTLB_UPDATE,
            0x1000,
            0x20_0000,
            0x7f00_0000_0000,
            3,
        );
        assert_eq!(&bytes[..34], &ours[..34]);
        assert!(ours[34..].iter().all(|&b| b == 0));
    }

    #[test]
    fn refuses_a_net_device_for_vsock_use() {
        let f = Fake::new(1, BACKEND_F_IOTLB_MSG_V2, VSOCK_FEATURES);
        let e = VhostVdpaDevice::with_sys(Box::new(f), "/dev/vhost-vdpa-0", 19).unwrap_err();
        assert!(
            e.to_string()
                .contains("device id 1 (net), expected 19 (vsock)"),
            "{e}"
        );
    }

    #[test]
    fn requires_iotlb_msg_v2() {
        let f = Fake::new(19, 0, VSOCK_FEATURES);
        let e = VhostVdpaDevice::with_sys(Box::new(f), "/x", 19).unwrap_err();
        assert!(e.to_string().contains("IOTLB_MSG_V2"), "{e}");
    }

    #[test]
    fn bring_up_sequence_and_batched_iotlb() {
        let f = Fake::new(19, 0b1110, VSOCK_FEATURES);
        let mut d = VhostVdpaDevice::with_sys(Box::new(f.clone()), "/x", 19).unwrap();
        assert_eq!(
            d.backend_features(),
            BACKEND_F_IOTLB_MSG_V2 | BACKEND_F_IOTLB_BATCH
        );
        assert_eq!(d.backend_features(), 0x6); // bits 1 and 2 (linux/vhost_types.h)
        assert_eq!(d.num_queues(), 3);
        assert_eq!(d.max_queue_size(0), 256);
        assert_eq!(d.dma_options().iova, IovaBase::Fixed(0x2000));
        let neg = d.negotiate(1 << 1).unwrap();
        assert_eq!(neg, (1 << F_VERSION_1) | (1 << F_ACCESS_PLATFORM) | 2);
        assert_eq!(d.guest_cid().unwrap(), 42);
        let dma = DmaRegion::new(&d.dma_options()).unwrap();
        d.map_dma(&dma).unwrap();
        let q = crate::virtq::SplitQueue::new(&dma, 64, false).unwrap();
        let l = q.layout();
        for i in 0..3 {
            d.setup_queue(i, &l).unwrap();
        }
        assert!(d.setup_queue(3, &l).is_err());
        d.activate().unwrap();
        d.kick(1).unwrap();
        d.reset().unwrap();
        let calls: Vec<String> = f
            .calls()
            .into_iter()
            .filter(|c| !c.starts_with("get_config"))
            .collect();
        let expect_prefix = [
            "set_owner",
            "set_backend_features 0x6",
            "set_config_call",
            "set_status 0x0",
            "set_status 0x1",
            "set_status 0x3",
            "set_features 0x300000002",
            "set_status 0xb",
            "iotlb type 5",
            "iotlb type 2",
            "iotlb type 6",
            "vring_num 0 64",
            "vring_base 0 0",
        ];
        assert_eq!(&calls[..expect_prefix.len()], &expect_prefix, "{calls:#?}");
        let addr = format!(
            "vring_addr 0 {:#x} {:#x} {:#x}",
            l.desc_table.0, l.avail_ring.0, l.used_ring.0
        );
        assert!(calls.contains(&addr), "{calls:#?}");
        let tail = &calls[calls.len() - 5..];
        assert_eq!(
            tail,
            [
                "set_status 0xf",
                "set_status 0x0",
                "iotlb type 5",
                "iotlb type 3",
                "iotlb type 6"
            ]
        );
        let st = f.state.lock().unwrap();
        let upd = &st.msgs[1];
        assert_eq!(u64::from_ne_bytes(upd[8..16].try_into().unwrap()), 0x2000);
        assert_eq!(
            u64::from_ne_bytes(upd[16..24].try_into().unwrap()),
            dma.size() as u64
        );
        assert_eq!(
            u64::from_ne_bytes(upd[24..32].try_into().unwrap()),
            dma.host_addr()
        );
        assert_eq!(upd[32], VHOST_ACCESS_RW);
        let inv = &st.msgs[4];
        assert_eq!(u64::from_ne_bytes(inv[8..16].try_into().unwrap()), 0x2000);
    }

    #[test]
    fn config_call_is_wired_before_the_config_is_read() {
        let f = Fake::new(19, BACKEND_F_IOTLB_MSG_V2, VSOCK_FEATURES);
        let mut d = VhostVdpaDevice::with_sys(Box::new(f.clone()), "/x", 19).unwrap();
        assert!(d.config_fd().is_some());
        d.negotiate(0).unwrap();
        assert_eq!(d.guest_cid().unwrap(), 42);
        let calls = f.calls();
        let at = |name: &str| {
            calls
                .iter()
                .position(|c| c.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in {calls:#?}"))
        };
        // After SET_OWNER and the backend features (vhost-vdpa wants an owner), before the status
        // handshake and before guest_cid is first read: no change can slip between.
        assert!(at("set_owner") < at("set_config_call"));
        assert!(at("set_backend_features") < at("set_config_call"));
        assert!(at("set_config_call") < at("set_status"));
        assert!(at("set_config_call") < at("get_config"));
        assert_eq!(calls.iter().filter(|c| *c == "set_config_call").count(), 1);
    }

    #[test]
    fn no_config_call_on_an_old_kernel_is_not_fatal() {
        let f = Fake::new(19, BACKEND_F_IOTLB_MSG_V2, VSOCK_FEATURES);
        f.state.lock().unwrap().no_config_call = true;
        let d = VhostVdpaDevice::with_sys(Box::new(f), "/x", 19).unwrap();
        assert!(d.config_fd().is_none());
        let details = d.details();
        let irq = &details.iter().find(|(k, _)| *k == "config irq").unwrap().1;
        assert_eq!(irq, "not available");
    }

    #[test]
    fn details_name_id_features_status_config_and_queues() {
        let f = Fake::new(19, 0b110, VSOCK_FEATURES);
        let mut d = VhostVdpaDevice::with_sys(Box::new(f), "/x", 19).unwrap();
        d.negotiate(0).unwrap();
        let details = d.details();
        let get = |k: &str| {
            details
                .iter()
                .find(|(n, _)| *n == k)
                .unwrap_or_else(|| panic!("no {k} in {details:?}"))
                .1
                .clone()
        };
        assert_eq!(get("device id"), "19 (vsock)");
        assert_eq!(get("backend features"), "0x6 (IOTLB_MSG_V2 IOTLB_BATCH)");
        assert_eq!(get("status"), "0xb (ACKNOWLEDGE DRIVER FEATURES_OK)");
        assert_eq!(get("config size"), "8 bytes");
        assert_eq!(get("config"), "2a 00 00 00 00 00 00 00 (guest_cid 42)");
        assert_eq!(get("iova range"), "0x1001..=0xffffffffffffffff");
        assert_eq!(
            get("vrings"),
            "3 used, device reports 2, max size 256 (VDPA_GET_VRING_NUM)"
        );
        assert_eq!(
            get("config irq"),
            "eventfd registered (VHOST_VDPA_SET_CONFIG_CALL)"
        );
        let names: Vec<_> = details.iter().map(|(k, _)| *k).collect();
        assert_eq!(names[..3], ["device id", "backend features", "status"]);
    }

    #[test]
    fn backend_feature_names_decode_known_and_unknown_bits() {
        assert_eq!(backend_feature_names(0), "none");
        assert_eq!(
            backend_feature_names(BACKEND_F_IOTLB_MSG_V2 | (1 << 40)),
            "IOTLB_MSG_V2 bit 40"
        );
    }

    #[test]
    fn unbatched_without_iotlb_batch() {
        let f = Fake::new(19, BACKEND_F_IOTLB_MSG_V2, VSOCK_FEATURES);
        let mut d = VhostVdpaDevice::with_sys(Box::new(f.clone()), "/x", 19).unwrap();
        d.negotiate(0).unwrap();
        let dma = DmaRegion::new(&d.dma_options()).unwrap();
        d.map_dma(&dma).unwrap();
        drop(d);
        let iotlb: Vec<_> = f
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("iotlb"))
            .collect();
        assert_eq!(iotlb, ["iotlb type 2", "iotlb type 3"]);
    }

    #[test]
    fn features_ok_rejected_sets_failed() {
        let f = Fake::new(19, BACKEND_F_IOTLB_MSG_V2, VSOCK_FEATURES);
        f.state.lock().unwrap().reject_features_ok = true;
        let mut d = VhostVdpaDevice::with_sys(Box::new(f.clone()), "/x", 19).unwrap();
        let e = d.negotiate(0).unwrap_err();
        assert!(e.to_string().contains("FEATURES_OK"), "{e}");
        assert!(
            f.calls().contains(&"set_status 0x8b".to_string()),
            "{:?}",
            f.calls()
        );
    }

    #[test]
    fn version_1_required() {
        let f = Fake::new(19, BACKEND_F_IOTLB_MSG_V2, 1 << F_ACCESS_PLATFORM);
        let mut d = VhostVdpaDevice::with_sys(Box::new(f), "/x", 19).unwrap();
        assert!(d
            .negotiate(0)
            .unwrap_err()
            .to_string()
            .contains("VERSION_1"));
    }

    #[test]
    fn dma_outside_the_iova_range_is_refused() {
        let f = Fake::new(19, BACKEND_F_IOTLB_MSG_V2, VSOCK_FEATURES);
        let mut d = VhostVdpaDevice::with_sys(Box::new(f), "/x", 19).unwrap();
        let dma = DmaRegion::new(&DmaOptions {
            iova: IovaBase::Fixed(0),
            ..DmaOptions::default()
        })
        .unwrap();
        assert!(d
            .map_dma(&dma)
            .unwrap_err()
            .to_string()
            .contains("IOVA range"));
    }

    /// The kernel's only reply to an IOTLB message is write(2)'s result: a refused UPDATE fails
    /// the mapping with the errno, the batch is still closed, and nothing is recorded as mapped
    /// (so teardown does not invalidate a range the device never had).
    #[test]
    fn a_refused_iotlb_update_fails_the_mapping_and_closes_the_batch() {
        let f = Fake::new(
            19,
            BACKEND_F_IOTLB_MSG_V2 | BACKEND_F_IOTLB_BATCH,
            VSOCK_FEATURES,
        );
        f.state.lock().unwrap().fail_iotlb = Some(vb::VHOST_IOTLB_UPDATE);
        let mut d = VhostVdpaDevice::with_sys(Box::new(f.clone()), "/x", 19).unwrap();
        let dma = DmaRegion::new(&d.dma_options()).unwrap();
        let e = d.map_dma(&dma).unwrap_err();
        assert!(e.to_string().contains("IOTLB UPDATE"), "{e}");
        let errno = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<io::Error>())
            .and_then(io::Error::raw_os_error);
        assert_eq!(errno, Some(libc::EFAULT), "{e:?}");
        let iotlb: Vec<String> = f
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("iotlb"))
            .collect();
        // BATCH_BEGIN (5), the refused UPDATE (2), BATCH_END (6).
        assert_eq!(iotlb, ["iotlb type 5", "iotlb type 2", "iotlb type 6"]);
        d.unmap_all().unwrap();
        assert!(
            !f.calls().iter().any(|c| c == "iotlb type 3"),
            "no INVALIDATE for a range that was never mapped"
        );
    }

    /// VHOST_VDPA_GET_VRING_NUM is the device's word: it is reported as is (the driver takes the
    /// minimum with its own size and `SplitQueue::new` refuses 0 or a non-power of two, see
    /// `virtq::tests::construction::rejects_invalid_sizes`), and no queue above it, or with a
    /// size the spec forbids, reaches the device.
    #[test]
    fn a_bogus_vring_num_bounds_every_queue() {
        for bogus in [0u16, 100] {
            let f = Fake::new(19, BACKEND_F_IOTLB_MSG_V2, VSOCK_FEATURES);
            f.state.lock().unwrap().vring_num = bogus;
            let mut d = VhostVdpaDevice::with_sys(Box::new(f.clone()), "/x", 19).unwrap();
            assert_eq!(d.max_queue_size(0), bogus);
            let dma = DmaRegion::new(&d.dma_options()).unwrap();
            let q = crate::virtq::SplitQueue::new(&dma, 128, false).unwrap();
            let e = d.setup_queue(0, &q.layout()).unwrap_err();
            assert!(
                matches!(e, DeviceError::BadQueueSize { size: 128, max } if max == bogus),
                "{bogus}: {e:?}"
            );
            let odd = QueueLayout {
                size: 48,
                ..q.layout()
            };
            assert!(d.setup_queue(0, &odd).is_err(), "{bogus}: size 48 accepted");
            assert!(
                !f.calls().iter().any(|c| c.starts_with("vring_num")),
                "{bogus}: a refused size reached the device"
            );
        }
    }
}
