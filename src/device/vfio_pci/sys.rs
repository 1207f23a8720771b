// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The VFIO ioctls we use. Structures and constants come from rust-vmm's `vfio-bindings`
//! (`linux/vfio.h`); it has no ioctl numbers (`vfio-ioctls` keeps its own private), so those are
//! declared here with vmm-sys-util's macros from the header's `VFIO_TYPE`/`VFIO_BASE`.
//!
//! Every ioctl (and the INTx thread's `poll`) is one small function here whose `// SAFETY:`
//! says why the call is sound, so the rest of the backend calls them without `unsafe`. They
//! return the raw `io::Error`; the callers name the operation in their `DeviceError`.

#![allow(non_upper_case_globals, unreachable_pub)]
use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use vmm_sys_util::ioctl::{
    ioctl, ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref, ioctl_with_val,
};
use vmm_sys_util::ioctl_io_nr;

pub use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_group_status, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap,
    vfio_irq_info, vfio_region_info, VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION, VFIO_DEVICE_FLAGS_PCI,
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_GROUP_FLAGS_VIABLE,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_NOIOMMU_IOMMU, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};

const TYPE: u32 = VFIO_TYPE as u32;

ioctl_io_nr!(VFIO_GET_API_VERSION, TYPE, VFIO_BASE);
ioctl_io_nr!(VFIO_CHECK_EXTENSION, TYPE, VFIO_BASE + 1);
ioctl_io_nr!(VFIO_SET_IOMMU, TYPE, VFIO_BASE + 2);
ioctl_io_nr!(VFIO_GROUP_GET_STATUS, TYPE, VFIO_BASE + 3);
ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, TYPE, VFIO_BASE + 4);
ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, TYPE, VFIO_BASE + 6);
ioctl_io_nr!(VFIO_DEVICE_GET_INFO, TYPE, VFIO_BASE + 7);
ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, TYPE, VFIO_BASE + 8);
ioctl_io_nr!(VFIO_DEVICE_GET_IRQ_INFO, TYPE, VFIO_BASE + 9);
ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, TYPE, VFIO_BASE + 10);
ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, TYPE, VFIO_BASE + 13);
ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, TYPE, VFIO_BASE + 14);

/// How many eventfds one [`IrqSet`] holds (a virtio-vsock function uses at most 4 vectors:
/// configuration changes plus rx, tx and event).
pub const IRQ_SET_ROOM: usize = 8;

/// `struct vfio_irq_set` (whose `data` is a flexible array in the bindings) with room for
/// up to [`IRQ_SET_ROOM`] eventfds, laid out as the kernel reads it.
#[repr(C)]
#[derive(Default)]
pub struct IrqSet {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
    pub data: [i32; IRQ_SET_ROOM],
}

// The header of `IrqSet` is exactly `vfio_irq_set`'s fixed part.
const _: () = assert!(
    std::mem::size_of::<vfio_bindings::bindings::vfio::vfio_irq_set>()
        == std::mem::offset_of!(IrqSet, data)
);

/// `argsz` of a VFIO structure (all are a few dozen bytes).
#[allow(clippy::cast_possible_truncation)]
pub(super) const fn argsz<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

/// An ioctl's return value, or the errno it left.
fn check(rc: i32) -> io::Result<i32> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `VFIO_GET_API_VERSION` of a container (`VFIO_API_VERSION`, 0, or a negative errno value).
pub fn get_api_version(container: &File) -> i32 {
    // SAFETY: GET_API_VERSION takes no argument.
    unsafe { ioctl(container, VFIO_GET_API_VERSION()) }
}

/// `VFIO_CHECK_EXTENSION`: 1 when the container supports IOMMU type (or extension) `ext`.
pub fn check_extension(container: &File, ext: u64) -> i32 {
    // SAFETY: CHECK_EXTENSION takes an integer argument and writes nothing.
    unsafe { ioctl_with_val(container, VFIO_CHECK_EXTENSION(), ext) }
}

/// `VFIO_SET_IOMMU`: the container's IOMMU model, once a group is in it.
pub fn set_iommu(container: &File, iommu: u64) -> io::Result<()> {
    // SAFETY: SET_IOMMU takes an integer argument.
    check(unsafe { ioctl_with_val(container, VFIO_SET_IOMMU(), iommu) }).map(drop)
}

/// `VFIO_GROUP_GET_STATUS`.
pub fn group_get_status(group: &File) -> io::Result<vfio_group_status> {
    let mut status = vfio_group_status {
        argsz: argsz::<vfio_group_status>(),
        flags: 0,
    };
    // SAFETY: GET_STATUS writes one `vfio_group_status` (argsz says how big it is).
    check(unsafe { ioctl_with_mut_ref(group, VFIO_GROUP_GET_STATUS(), &mut status) })?;
    Ok(status)
}

/// `VFIO_GROUP_SET_CONTAINER`: puts the group into `container`.
pub fn group_set_container(group: &File, container: &File) -> io::Result<()> {
    let cfd = container.as_raw_fd();
    // SAFETY: SET_CONTAINER reads one int (the container fd) from the pointer.
    check(unsafe { ioctl_with_ref(group, VFIO_GROUP_SET_CONTAINER(), &cfd) }).map(drop)
}

/// `VFIO_GROUP_GET_DEVICE_FD` of the device named `name` (its PCI address).
pub fn group_get_device_fd(group: &File, name: &CStr) -> io::Result<File> {
    // SAFETY: GET_DEVICE_FD reads a NUL-terminated string; it returns a new fd we own.
    let fd = check(unsafe { ioctl_with_ptr(group, VFIO_GROUP_GET_DEVICE_FD(), name.as_ptr()) })?;
    // SAFETY: `fd` is a fresh descriptor returned to us and owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `VFIO_DEVICE_GET_INFO`.
pub fn device_get_info(device: &File) -> io::Result<vfio_device_info> {
    let mut info = vfio_device_info {
        argsz: argsz::<vfio_device_info>(),
        ..Default::default()
    };
    // SAFETY: GET_INFO writes at most `argsz` bytes into `info`.
    check(unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_INFO(), &mut info) })?;
    Ok(info)
}

/// `VFIO_DEVICE_GET_REGION_INFO` of region `index`, without its capability chain (the
/// returned `argsz` says how large a buffer the chain needs).
pub fn device_get_region_info(device: &File, index: u32) -> io::Result<vfio_region_info> {
    let mut info = vfio_region_info {
        argsz: argsz::<vfio_region_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: GET_REGION_INFO writes at most `argsz` bytes into `info`, which is that large.
    check(unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_REGION_INFO(), &mut info) })?;
    Ok(info)
}

/// `VFIO_DEVICE_GET_REGION_INFO` of region `index` with room for `argsz` bytes (at least the
/// fixed part): the info and every byte the kernel filled in, the capability chain included
/// (its offsets count from the start of these bytes).
pub fn device_get_region_info_with_caps(
    device: &File,
    index: u32,
    argsz: u32,
) -> io::Result<(vfio_region_info, Vec<u8>)> {
    let argsz = argsz.max(self::argsz::<vfio_region_info>());
    // u64 words keep the buffer aligned for `vfio_region_info`.
    let words = (argsz as usize).div_ceil(8);
    let mut buf = vec![0u64; words];
    let head = buf.as_mut_ptr().cast::<vfio_region_info>();
    // SAFETY: `buf` is at least `argsz >= size_of::<vfio_region_info>()` bytes, 8-aligned, and
    // exclusively ours; the kernel writes at most `argsz` bytes.
    let rc = unsafe {
        head.write(vfio_region_info {
            argsz,
            index,
            ..Default::default()
        });
        ioctl_with_mut_ptr(device, VFIO_DEVICE_GET_REGION_INFO(), head)
    };
    check(rc)?;
    // SAFETY: the buffer starts with an initialised `vfio_region_info` (plain integers).
    let info = unsafe { head.read() };
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
    Ok((info, bytes))
}

/// `VFIO_DEVICE_GET_IRQ_INFO` of interrupt `index`.
pub fn device_get_irq_info(device: &File, index: u32) -> io::Result<vfio_irq_info> {
    let mut info = vfio_irq_info {
        argsz: argsz::<vfio_irq_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: GET_IRQ_INFO writes one `vfio_irq_info`.
    check(unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_IRQ_INFO(), &mut info) })?;
    Ok(info)
}

/// `VFIO_DEVICE_SET_IRQS`; refused (`InvalidInput`) when `set` says it is larger than it is.
pub fn device_set_irqs(device: &File, set: &IrqSet) -> io::Result<()> {
    let room = std::mem::size_of_val(&set.data) / std::mem::size_of::<i32>();
    if set.argsz > argsz::<IrqSet>() || set.count as usize > room {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "vfio_irq_set of argsz {} with {} eventfds, room for {room}",
                set.argsz, set.count
            ),
        ));
    }
    // SAFETY: SET_IRQS reads `argsz` bytes: the header and `count` (<= 8) eventfds.
    check(unsafe { ioctl_with_ref(device, VFIO_DEVICE_SET_IRQS(), set) }).map(drop)
}

/// `VFIO_IOMMU_MAP_DMA`: from now on the device may read and write `map.vaddr .. + map.size`
/// of this process at IOVA `map.iova`.
///
/// # Safety
///
/// `[map.vaddr, map.vaddr + map.size)` must be a mapping of this process that stays mapped
/// until [`iommu_unmap_dma`] removes it, and memory the device may change at any time (no Rust
/// value relies on its contents staying put, as in a `DmaRegion`).
pub unsafe fn iommu_map_dma(container: &File, map: &vfio_iommu_type1_dma_map) -> io::Result<()> {
    // SAFETY: MAP_DMA reads one `vfio_iommu_type1_dma_map`; the range is live, device-owned
    // memory (the caller's contract).
    check(unsafe { ioctl_with_ref(container, VFIO_IOMMU_MAP_DMA(), map) }).map(drop)
}

/// `VFIO_IOMMU_UNMAP_DMA`; the kernel writes the size it unmapped back into `unmap`.
pub fn iommu_unmap_dma(container: &File, unmap: &mut vfio_iommu_type1_dma_unmap) -> io::Result<()> {
    // SAFETY: UNMAP_DMA reads one `vfio_iommu_type1_dma_unmap` (and writes back the size
    // unmapped into it; it is exclusively ours for the call).
    check(unsafe { ioctl_with_mut_ref(container, VFIO_IOMMU_UNMAP_DMA(), unmap) }).map(drop)
}

/// `poll(2)` on `fds` (`timeout_ms` -1: no timeout): how many have events.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    let n = libc::nfds_t::try_from(fds.len()).map_err(io::Error::other)?;
    // SAFETY: `fds` is a valid, exclusively borrowed array of `n` pollfds for the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout_ms) };
    check(rc).map(|n| usize::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use crate::device::vfio_pci::sys;

    #[test]
    fn ioctl_numbers_match_linux_vfio_h() {
        // _IO(';', 100 + n) = 0x3b00 | (100 + n)
        assert_eq!(sys::VFIO_GET_API_VERSION(), 0x3b64);
        assert_eq!(sys::VFIO_GROUP_GET_DEVICE_FD(), 0x3b6a);
        assert_eq!(sys::VFIO_DEVICE_SET_IRQS(), 0x3b6e);
        assert_eq!(sys::VFIO_IOMMU_MAP_DMA(), 0x3b71);
        assert_eq!(std::mem::size_of::<sys::vfio_region_info>(), 32);
        assert_eq!(std::mem::size_of::<sys::vfio_iommu_type1_dma_map>(), 32);
    }

    /// A file that is no VFIO node (every VFIO ioctl on it fails with ENOTTY).
    fn not_vfio() -> std::fs::File {
        std::fs::File::open("/dev/null").unwrap()
    }

    #[test]
    fn a_failed_ioctl_returns_its_errno() {
        let f = not_vfio();
        let e = sys::device_get_region_info(&f, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
        let e = sys::device_get_irq_info(&f, sys::VFIO_PCI_MSIX_IRQ_INDEX).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
        let e = sys::group_get_status(&f).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
        let e = sys::set_iommu(&f, u64::from(sys::VFIO_NOIOMMU_IOMMU)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
        assert!(sys::get_api_version(&f) < 0);
    }

    #[test]
    fn set_irqs_refuses_a_set_larger_than_its_buffer() {
        let f = not_vfio();
        let too_many = sys::IrqSet {
            argsz: sys::argsz::<sys::IrqSet>(),
            count: 9,
            ..Default::default()
        };
        let too_long = sys::IrqSet {
            argsz: sys::argsz::<sys::IrqSet>() + 4,
            count: 1,
            ..Default::default()
        };
        for set in [too_many, too_long] {
            let e = sys::device_set_irqs(&f, &set).unwrap_err();
            // Refused before the ioctl (which would have said ENOTTY).
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
        }
        // One that fits reaches the kernel.
        let fits = sys::IrqSet {
            argsz: sys::argsz::<sys::IrqSet>(),
            count: 8,
            ..Default::default()
        };
        let e = sys::device_set_irqs(&f, &fits).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
    }

    #[test]
    fn poll_reports_a_signalled_eventfd() {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let quiet = EventFd::new(EFD_NONBLOCK).unwrap();
        let loud = EventFd::new(EFD_NONBLOCK).unwrap();
        let pollfd = |e: &EventFd| libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [pollfd(&quiet), pollfd(&loud)];
        assert_eq!(sys::poll(&mut fds, 0).unwrap(), 0);
        loud.write(1).unwrap();
        assert_eq!(sys::poll(&mut fds, -1).unwrap(), 1);
        assert_eq!(fds[0].revents, 0);
        assert_ne!(fds[1].revents & libc::POLLIN, 0);
    }
}
