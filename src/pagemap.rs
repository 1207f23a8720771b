// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Physical addresses of our own memory from `/proc/self/pagemap` (for VFIO's no-IOMMU mode,
//! where a device's DMA addresses are physical addresses).
//!
//! Each virtual page has one little-endian u64 entry: bits 0-54 the page frame number, bit 63
//! "present". The kernel reports PFN 0 to readers without `CAP_SYS_ADMIN`, so a zero PFN on a
//! present page is treated as "not permitted", never as physical address 0.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Page size of pagemap entries (x86-64 / arm64 base pages).
pub const PAGEMAP_PAGE_SIZE: u64 = 4096;

const PFN_MASK: u64 = (1 << 55) - 1;
const PRESENT: u64 = 1 << 63;

/// Why a range has no usable contiguous physical address. Causes: the cause is the source (the
/// crate docs, "Errors and their causes").
#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    /// Reading `/proc/self/pagemap` failed.
    #[error("reading /proc/self/pagemap failed")]
    Io(#[from] io::Error),
    /// A page is not resident.
    #[error("page {index} of the range is not present in memory (lock or touch it first)")]
    NotPresent {
        /// Page index within the range.
        index: usize,
    },
    /// The kernel hid the frame numbers.
    #[error("pagemap shows no page frame numbers: reading physical addresses needs CAP_SYS_ADMIN (run as root)")]
    NoPermission,
    /// The range is not physically contiguous.
    #[error(
        "memory is not physically contiguous: page {index} is at physical {found:#x}, \
         expected {expected:#x} (use one huge page, e.g. a 2 MiB DMA region on MAP_HUGETLB)"
    )]
    NotContiguous {
        /// Page index within the range.
        index: usize,
        /// Where the page should have been.
        expected: u64,
        /// Where it is.
        found: u64,
    },
}

/// The page frame number in one pagemap entry, or why there is none.
pub fn entry_pfn(entry: u64, index: usize) -> Result<u64, PagemapError> {
    if entry & PRESENT == 0 {
        return Err(PagemapError::NotPresent { index });
    }
    match entry & PFN_MASK {
        0 => Err(PagemapError::NoPermission),
        pfn => Ok(pfn),
    }
}

/// The physical address of the first page if `entries` (consecutive virtual pages) are
/// physically consecutive; every page is checked.
pub fn contiguous_base(entries: &[u64]) -> Result<u64, PagemapError> {
    let mut base = None;
    for (index, &e) in entries.iter().enumerate() {
        let phys = entry_pfn(e, index)? * PAGEMAP_PAGE_SIZE;
        let first = *base.get_or_insert(phys);
        let expected = first + index as u64 * PAGEMAP_PAGE_SIZE;
        if phys != expected {
            return Err(PagemapError::NotContiguous {
                index,
                expected,
                found: phys,
            });
        }
    }
    base.ok_or(PagemapError::NotPresent { index: 0 })
}

/// Physical base address of `[addr, addr + len)` in this process, if it is resident and
/// physically contiguous. `addr` must be page aligned.
pub fn physical_base(addr: u64, len: usize) -> Result<u64, PagemapError> {
    let pages = len.div_ceil(4096);
    let file = File::open("/proc/self/pagemap")?;
    let mut raw = vec![0u8; pages * 8];
    file.read_exact_at(&mut raw, addr / PAGEMAP_PAGE_SIZE * 8)?;
    let entries: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    contiguous_base(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PRESENT;

    #[test]
    fn contiguous_pages_give_the_first_address() {
        assert_eq!(
            contiguous_base(&[P | 0x100, P | 0x101, P | 0x102]).unwrap(),
            0x100_000
        );
    }

    #[test]
    fn a_gap_is_reported_with_its_page() {
        let e = contiguous_base(&[P | 0x100, P | 0x101, P | 0x200]).unwrap_err();
        assert!(
            matches!(
                e,
                PagemapError::NotContiguous {
                    index: 2,
                    expected: 0x102_000,
                    found: 0x200_000
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn absent_and_hidden_pages_are_errors() {
        assert!(matches!(
            contiguous_base(&[P | 1, 2]),
            Err(PagemapError::NotPresent { index: 1 })
        ));
        assert!(matches!(
            contiguous_base(&[P]),
            Err(PagemapError::NoPermission)
        ));
        assert!(contiguous_base(&[]).is_err());
        // Flag bits above the PFN (soft-dirty, exclusive) do not leak into the address.
        assert_eq!(
            contiguous_base(&[P | (1 << 55) | (1 << 56) | 7]).unwrap(),
            0x7000
        );
    }

    #[test]
    fn own_memory_without_root_is_refused_or_resolved() {
        let v = vec![1u8; 4096];
        let addr = v.as_ptr() as u64 & !(PAGEMAP_PAGE_SIZE - 1);
        // As root this resolves; otherwise the kernel hides PFNs: either way no panic, no 0.
        match physical_base(addr, 4096) {
            Ok(p) => assert_ne!(p, 0),
            Err(e) => assert!(
                matches!(e, PagemapError::NoPermission | PagemapError::Io(_)),
                "{e}"
            ),
        }
    }
}
