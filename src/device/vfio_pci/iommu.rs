// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The IOMMU side: the VFIO container and the function's group in it (type1v2, or no-IOMMU
//! when explicitly asked for), the device fd, and the DMA mappings of type1 mode (which
//! `VFIO_IOMMU_MAP_DMA` a bring-up needs given what is mapped already, and the unmap).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;

use super::sys::{self, argsz};
use super::{failed, VfioPciDevice};
use crate::device::DeviceError;
use crate::dma::DmaRegion;

/// IOVA where the DMA region is mapped in type1 (real IOMMU) mode.
pub const TYPE1_IOVA_BASE: u64 = 0x1_0000_0000;

/// A VFIO container holding the function's group, its IOMMU model set, and the function's
/// device fd.
#[derive(Debug)]
pub(super) struct Attached {
    pub(super) container: File,
    pub(super) group: File,
    pub(super) device: File,
}

/// Opens the container, checks it offers the IOMMU model (no-IOMMU when `noiommu`, else
/// type1v2), opens the group node `group_node` (group `group`), checks it is viable, puts it
/// in the container, sets the IOMMU model and gets the device fd of `bdf`. Every node is
/// opened with `O_CLOEXEC`.
pub(super) fn attach(
    bdf: &str,
    group: &str,
    group_node: &str,
    noiommu: bool,
) -> Result<Attached, DeviceError> {
    let rw = |p: &str| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(p)
            .map_err(|e| failed(format!("open {p}: {e}")))
    };
    let container = rw("/dev/vfio/vfio")?;
    let v = sys::get_api_version(&container);
    if i64::from(v) != i64::from(sys::VFIO_API_VERSION) {
        return Err(failed(format!("VFIO API version {v}, expected 0")));
    }
    let iommu = u64::from(if noiommu {
        sys::VFIO_NOIOMMU_IOMMU
    } else {
        sys::VFIO_TYPE1v2_IOMMU
    });
    let ok = sys::check_extension(&container, iommu);
    if ok != 1 {
        return Err(failed(format!(
            "the VFIO container does not support IOMMU type {iommu} ({})",
            if noiommu {
                "load vfio with enable_unsafe_noiommu_mode=1"
            } else {
                "type1v2: is an IOMMU enabled?"
            }
        )));
    }
    let group_file = rw(group_node)?;
    let status = sys::group_get_status(&group_file)
        .map_err(|e| DeviceError::io("VFIO_GROUP_GET_STATUS", e))?;
    if status.flags & sys::VFIO_GROUP_FLAGS_VIABLE == 0 {
        return Err(failed(format!(
            "VFIO group {group} is not viable: bind every device of the group to vfio-pci"
        )));
    }
    sys::group_set_container(&group_file, &container)
        .map_err(|e| DeviceError::io("VFIO_GROUP_SET_CONTAINER", e))?;
    sys::set_iommu(&container, iommu).map_err(|e| DeviceError::io("VFIO_SET_IOMMU", e))?;
    let name = std::ffi::CString::new(bdf).map_err(|_| failed("NUL in PCI address"))?;
    let device = sys::group_get_device_fd(&group_file, &name)
        .map_err(|e| DeviceError::io("VFIO_GROUP_GET_DEVICE_FD", e))?;
    Ok(Attached {
        container,
        group: group_file,
        device,
    })
}

/// What a `VFIO_IOMMU_MAP_DMA` of a region needs, given what is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MapStep {
    /// That very region is mapped already (a bring-up again after `restart`): nothing to do.
    Done,
    /// Nothing is mapped: map it.
    Map,
    /// Another region is mapped: unmap it first, then map.
    Replace(DmaMapping),
}

/// One `VFIO_IOMMU_MAP_DMA` we made: the IOVA range and the process memory behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DmaMapping {
    iova: u64,
    size: u64,
    vaddr: u64,
}

impl MapStep {
    fn plan(mapped: Option<DmaMapping>, want: DmaMapping) -> MapStep {
        match mapped {
            Some(m) if m == want => MapStep::Done,
            Some(m) => MapStep::Replace(m),
            None => MapStep::Map,
        }
    }
}

impl VfioPciDevice {
    /// Type1 mode: `VFIO_IOMMU_MAP_DMA` of the DMA region, unless that very region is mapped
    /// already (a bring-up again after `restart`); another region mapped before is unmapped
    /// first.
    pub(super) fn map_type1(&mut self, dma: &DmaRegion) -> Result<(), DeviceError> {
        let want = DmaMapping {
            iova: dma.iova_base(),
            size: dma.size() as u64,
            vaddr: dma.host_addr(),
        };
        match MapStep::plan(self.dma_mapped, want) {
            // The container's mapping outlives a device reset that did not undo it.
            MapStep::Done => return Ok(()),
            MapStep::Map => {}
            MapStep::Replace(old) => {
                self.unmap_dma(old)?;
                self.dma_mapped = None;
            }
        }
        let map = sys::vfio_iommu_type1_dma_map {
            argsz: argsz::<sys::vfio_iommu_type1_dma_map>(),
            flags: sys::VFIO_DMA_MAP_FLAG_READ | sys::VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: want.vaddr,
            iova: want.iova,
            size: want.size,
        };
        // SAFETY: the range is the DMA region's live mapping, memory shared with the device by
        // design (vm-memory guest memory), which the driver keeps alive until after `reset`
        // (where we unmap it).
        unsafe { sys::iommu_map_dma(&self.container, &map) }
            .map_err(|e| DeviceError::io("VFIO_IOMMU_MAP_DMA", e))?;
        self.dma_mapped = Some(want);
        Ok(())
    }

    /// `VFIO_IOMMU_UNMAP_DMA` of a mapping we made.
    pub(super) fn unmap_dma(&self, m: DmaMapping) -> Result<(), DeviceError> {
        let mut unmap = sys::vfio_iommu_type1_dma_unmap {
            argsz: argsz::<sys::vfio_iommu_type1_dma_unmap>(),
            flags: 0,
            iova: m.iova,
            size: m.size,
            ..Default::default()
        };
        sys::iommu_unmap_dma(&self.container, &mut unmap)
            .map_err(|e| DeviceError::io("VFIO_IOMMU_UNMAP_DMA", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_map_of_the_same_region_is_done_and_another_replaces_it() {
        let a = DmaMapping {
            iova: TYPE1_IOVA_BASE,
            size: 2 << 20,
            vaddr: 0x7f00_0000_0000,
        };
        assert_eq!(MapStep::plan(None, a), MapStep::Map);
        assert_eq!(MapStep::plan(Some(a), a), MapStep::Done);
        for b in [
            DmaMapping {
                vaddr: 0x7f00_0020_0000,
                ..a
            },
            DmaMapping { size: 4 << 20, ..a },
            DmaMapping { iova: 0, ..a },
        ] {
            assert_eq!(MapStep::plan(Some(a), b), MapStep::Replace(a));
        }
    }
}
