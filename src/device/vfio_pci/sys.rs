// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The VFIO ioctls we use. Structures and constants come from rust-vmm's `vfio-bindings`
//! (`linux/vfio.h`); it has no ioctl numbers (`vfio-ioctls` keeps its own private), so those are
//! declared here with vmm-sys-util's macros from the header's `VFIO_TYPE`/`VFIO_BASE`.

#![allow(non_upper_case_globals, unreachable_pub)]
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

/// `struct vfio_irq_set` (whose `data` is a flexible array in the bindings) with room for
/// up to 8 eventfds, laid out as the kernel reads it.
#[repr(C)]
#[derive(Default)]
pub struct IrqSet {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
    pub data: [i32; 8],
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
}
