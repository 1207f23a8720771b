// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The function's BARs as MMIO: region info (with the sparse mmap areas VFIO lists), the
//! mmap'd windows around each virtio structure, and the bounds-checked volatile accesses
//! (`Regs`) the virtio-pci transport reads and writes them with.

use std::fs::File;
use std::sync::Arc;

use super::failed;
use super::sys;
use crate::device::virtio_pci::{self, Regs};
use crate::device::{pci, DeviceError};

/// The only unsafe MMIO code: one mmap'd BAR window and bounds-checked volatile accesses.
mod mmio {
    use std::io;
    use std::os::fd::AsRawFd;

    /// A shared mapping of `len` bytes of a VFIO region.
    #[derive(Debug)]
    pub(super) struct Mapping {
        ptr: *mut u8,
        len: usize,
    }

    // SAFETY: the mapping is device memory owned by this value; all accesses are volatile single
    // loads/stores with no Rust references to the memory, so using it from several threads is
    // no different from a device register file shared by CPUs.
    unsafe impl Send for Mapping {}
    // SAFETY: as above; `&Mapping` only allows volatile accesses.
    unsafe impl Sync for Mapping {}

    impl Mapping {
        pub(super) fn new(fd: &impl AsRawFd, offset: u64, len: usize) -> io::Result<Self> {
            let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
            // SAFETY: a fresh shared mapping chosen by the kernel (addr NULL); it aliases no Rust
            // memory. The fd stays open for the call; the mapping keeps its own reference.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    off,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            Ok(Mapping {
                ptr: ptr.cast(),
                len,
            })
        }

        fn at(&self, off: u64, width: usize) -> Option<*mut u8> {
            let off = usize::try_from(off).ok()?;
            (off % width == 0 && off.checked_add(width)? <= self.len)
                // SAFETY: `off + width <= len`, so the pointer stays inside the mapping.
                .then(|| unsafe { self.ptr.add(off) })
        }

        /// Volatile read of `width` (1, 2 or 4) bytes at `off`; `None` if out of range or
        /// misaligned.
        pub(super) fn read(&self, off: u64, width: usize) -> Option<u32> {
            let p = self.at(off, width)?;
            // SAFETY: `at` checked that [p, p + width) is inside the live mapping and aligned to
            // `width`; device memory is read with one access of exactly that width.
            unsafe {
                Some(match width {
                    1 => u32::from(p.read_volatile()),
                    2 => u32::from(u16::from_le(p.cast::<u16>().read_volatile())),
                    4 => u32::from_le(p.cast::<u32>().read_volatile()),
                    _ => return None,
                })
            }
        }

        /// Volatile write of the low `width` (1, 2 or 4) bytes of `val` at `off`.
        pub(super) fn write(&self, off: u64, width: usize, val: u32) -> Option<()> {
            let p = self.at(off, width)?;
            // SAFETY: as in `read`; one aligned store of exactly `width` bytes (truncation to the
            // register width is intended).
            #[allow(clippy::cast_possible_truncation)]
            unsafe {
                match width {
                    1 => p.write_volatile(val as u8),
                    2 => p.cast::<u16>().write_volatile((val as u16).to_le()),
                    4 => p.cast::<u32>().write_volatile(val.to_le()),
                    _ => return None,
                }
            }
            Some(())
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: `ptr`/`len` are exactly what mmap returned; nothing uses them afterwards.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }
}

/// One BAR: its mmap'd areas (every virtio window lies inside one of them, checked in `open`).
#[derive(Debug)]
struct Bar {
    maps: Vec<(u64, u64, mmio::Mapping)>,
}

impl Regs for Bar {
    fn read(&self, off: u64, width: usize) -> Option<u32> {
        let (start, _, m) = self.area(off, width)?;
        m.read(off - start, width)
    }

    fn write(&self, off: u64, width: usize, val: u32) -> Option<()> {
        let (start, _, m) = self.area(off, width)?;
        m.write(off - start, width, val)
    }
}

impl Bar {
    /// The mapped area holding `[off, off + width)`.
    fn area(&self, off: u64, width: usize) -> Option<&(u64, u64, mmio::Mapping)> {
        let end = off.checked_add(width as u64)?;
        self.maps
            .iter()
            .find(|(start, len, _)| off >= *start && end <= start.saturating_add(*len))
    }
}

/// Sparse mmap areas of a region: (offset, size) pairs.
type SparseAreas = Option<Vec<(u64, u64)>>;

/// Region info and the sparse mmap areas if the region lists any.
pub(super) fn region_info(
    device: &File,
    index: u32,
) -> Result<(sys::vfio_region_info, SparseAreas), DeviceError> {
    let op = |e| DeviceError::io("VFIO_DEVICE_GET_REGION_INFO", e);
    let info = sys::device_get_region_info(device, index).map_err(op)?;
    if info.flags & sys::VFIO_REGION_INFO_FLAG_CAPS == 0
        || (info.argsz as usize) <= std::mem::size_of::<sys::vfio_region_info>()
    {
        return Ok((info, None));
    }
    // Again with room for the capability chain.
    let (info, bytes) =
        sys::device_get_region_info_with_caps(device, index, info.argsz).map_err(op)?;
    Ok((info, sparse_areas(&bytes, info.cap_offset as usize)))
}

/// Parses the VFIO region capability chain in `buf` from `first` for the sparse mmap areas.
fn sparse_areas(buf: &[u8], first: usize) -> Option<Vec<(u64, u64)>> {
    let u16_at = |o: usize| Some(u16::from_ne_bytes(buf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_ne_bytes(buf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_ne_bytes(buf.get(o..o + 8)?.try_into().ok()?));
    let mut off = first;
    for _ in 0..16 {
        if off == 0 {
            break;
        }
        if u32::from(u16_at(off)?) == sys::VFIO_REGION_INFO_CAP_SPARSE_MMAP {
            let n = u32_at(off + 8)? as usize;
            return (0..n.min(64))
                .map(|i| Some((u64_at(off + 16 + 16 * i)?, u64_at(off + 24 + 16 * i)?)))
                .collect();
        }
        off = u32_at(off + 4)? as usize;
    }
    None
}

/// Maps, for every BAR that holds a virtio structure, the mmap'able area around each structure
/// (sparse mmap areas honoured). A structure outside its BAR, or in a BAR or part of one that
/// VFIO does not let us mmap, is an error that names it.
pub(super) fn map_bars(
    device: &File,
    bdf: &str,
    caps: &pci::VirtioCaps,
) -> Result<[Option<Arc<dyn Regs>>; 6], DeviceError> {
    let mut bars: [Option<Arc<dyn Regs>>; 6] = Default::default();
    for i in 0..6u8 {
        let on_bar: Vec<_> = [caps.common, caps.notify, caps.isr, caps.device]
            .into_iter()
            .filter(|c| c.bar == i)
            .collect();
        if on_bar.is_empty() {
            continue;
        }
        let (info, sparse) = region_info(device, u32::from(i))?;
        let mmap = info.flags & sys::VFIO_REGION_INFO_FLAG_MMAP != 0;
        let mut maps: Vec<(u64, u64, mmio::Mapping)> = Vec::new();
        for cap in on_bar {
            let (off, len) = virtio_pci::mmap_area_for(&cap, info.size, mmap, sparse.as_deref())
                .map_err(|e| failed(format!("{bdf}: {e}")))?;
            if maps.iter().any(|(o, _, _)| *o == off) {
                continue;
            }
            let ulen = usize::try_from(len)
                .map_err(|_| failed(format!("{bdf}: BAR{i} area of {len:#x} bytes")))?;
            let offset = info
                .offset
                .checked_add(off)
                .ok_or_else(|| failed(format!("{bdf}: BAR{i} area offset {off:#x} overflows")))?;
            let m = mmio::Mapping::new(device, offset, ulen).map_err(|e| {
                DeviceError::hinted(
                    "mmap of a VFIO BAR",
                    format!("{bdf}: BAR{i} [{off:#x}, +{len:#x})"),
                    e,
                )
            })?;
            maps.push((off, len, m));
        }
        log::debug!(
            "vfio {bdf}: BAR{i} size {:#x}, {} mmap'd area(s)",
            info.size,
            maps.len()
        );
        bars[usize::from(i)] = Some(Arc::new(Bar { maps }));
    }
    Ok(bars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_mmap_areas_are_parsed_from_the_cap_chain() {
        // vfio_region_info (32 bytes), then a type cap (id 2) linking to a sparse cap at 48.
        let mut b = vec![0u8; 96];
        b[32..34].copy_from_slice(&2u16.to_ne_bytes());
        b[36..40].copy_from_slice(&48u32.to_ne_bytes());
        b[48..50].copy_from_slice(&1u16.to_ne_bytes());
        b[56..60].copy_from_slice(&2u32.to_ne_bytes());
        b[64..72].copy_from_slice(&0u64.to_ne_bytes());
        b[72..80].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[80..88].copy_from_slice(&0x3000u64.to_ne_bytes());
        b[88..96].copy_from_slice(&0x1000u64.to_ne_bytes());
        assert_eq!(
            sparse_areas(&b, 32),
            Some(vec![(0, 0x1000), (0x3000, 0x1000)])
        );
        assert_eq!(sparse_areas(&b, 0), None);
        assert_eq!(sparse_areas(&b[..90], 32), None); // truncated: ignored, not a panic
    }
}
