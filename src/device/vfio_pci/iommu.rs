// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The IOMMU side of the container: which `VFIO_IOMMU_MAP_DMA` a bring-up needs given what
//! is mapped already, and `VFIO_IOMMU_UNMAP_DMA` of a mapping we made (type1 mode only).

use super::sys::{self, argsz};
use super::VfioPciDevice;
use crate::device::DeviceError;

/// What a `VFIO_IOMMU_MAP_DMA` of a region needs, given what is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MapStep {
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
    pub(super) iova: u64,
    pub(super) size: u64,
    pub(super) vaddr: u64,
}

impl MapStep {
    pub(super) fn plan(mapped: Option<DmaMapping>, want: DmaMapping) -> MapStep {
        match mapped {
            Some(m) if m == want => MapStep::Done,
            Some(m) => MapStep::Replace(m),
            None => MapStep::Map,
        }
    }
}

impl VfioPciDevice {
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
    use crate::device::vfio_pci::TYPE1_IOVA_BASE;

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
