// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest-memory lookups: a buffer's guest address and length to one [`VolatileSlice`].

use vm_memory::bitmap::{BitmapSlice, WithBitmapSlice};
use vm_memory::{
    Address, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, Permissions,
    VolatileSlice,
};

use super::{Error, Result};

/// Get a single slice for `[addr, addr + count)`, or `FragmentedMemory` when the range spans
/// host fragments. `count` must be non-zero.
#[inline]
pub(super) fn get_single_slice<'a, M: GuestMemory, B: BitmapSlice>(
    mem: &'a M,
    addr: GuestAddress,
    count: usize,
    access: Permissions,
) -> Result<VolatileSlice<'a, B>>
where
    M::Bitmap: WithBitmapSlice<'a, S = B>,
{
    let mut slices = mem
        .get_slices(addr, count, access)
        .map_err(Error::InvalidMemoryAccess)?;
    let slice = match slices.next() {
        Some(s) => s.map_err(Error::InvalidMemoryAccess)?,
        None => {
            return Err(Error::DescriptorLengthTooSmall {
                expected: count as u64,
                found: 0,
            })
        }
    };
    if slice.len() == count {
        Ok(slice)
    } else {
        Err(Error::FragmentedMemory {
            addr: addr.raw_value(),
            len: count,
        })
    }
}

/// Guest-memory lookups for the buffers of one chain.
///
/// When `mem` has no IOMMU in between ([`GuestMemory::physical_memory`]: guest addresses are the
/// backend's addresses), the region holding the head descriptor is resolved once, as one slice
/// over the whole region, and every buffer inside that region is a bounds-checked sub-slice of
/// it: the same pointer and length a lookup of its own would give, without the lookup. Any
/// other buffer (another region, a region seam, an unmapped address, IOMMU-translated memory)
/// is looked up as 0.12 does, with its exact verdict.
pub(super) struct Lookup<'a, M, B> {
    mem: &'a M,
    access: Permissions,
    /// Start of the resolved region and a slice over all of it.
    region: Option<(GuestAddress, VolatileSlice<'a, B>)>,
}

impl<'a, M: GuestMemory, B: BitmapSlice> Lookup<'a, M, B>
where
    M::Bitmap: WithBitmapSlice<'a, S = B>,
{
    /// Resolve the region that holds `addr` (if `mem` is plain physical memory and one does).
    /// Nothing is refused here: a buffer the region does not hold is looked up later.
    #[inline(always)]
    pub(super) fn new(mem: &'a M, addr: GuestAddress, access: Permissions) -> Self {
        let region = mem
            .physical_memory()
            .and_then(|phys| phys.find_region(addr))
            .and_then(|r| {
                let len = usize::try_from(r.len()).ok()?;
                let whole = first_fragment(mem, r.start_addr(), len, access)?;
                (whole.len() == len).then_some((r.start_addr(), whole))
            });
        Lookup {
            mem,
            access,
            region,
        }
    }

    /// The single slice for `[addr, addr + count)` (`count` non-zero), or the error 0.12 gives.
    #[inline(always)]
    pub(super) fn slice(&self, addr: GuestAddress, count: usize) -> Result<VolatileSlice<'a, B>> {
        if let Some((start, whole)) = &self.region {
            // `addr - start` and `offset + count` are checked (by `checked_offset_from` and
            // `subslice`): a buffer not wholly inside the region falls through to the lookup.
            if let Some(offset) = addr
                .checked_offset_from(*start)
                .and_then(|o| usize::try_from(o).ok())
            {
                if let Ok(slice) = whole.subslice(offset, count) {
                    return Ok(slice);
                }
            }
        }
        get_single_slice(self.mem, addr, count, self.access)
    }
}

/// The first host fragment of `[addr, addr + count)` (`count` non-zero): the whole range when
/// one mapping holds it, a shorter front part when it does not, `None` when `addr` cannot be
/// resolved.
#[inline]
fn first_fragment<'a, M: GuestMemory, B: BitmapSlice>(
    mem: &'a M,
    addr: GuestAddress,
    count: usize,
    access: Permissions,
) -> Option<VolatileSlice<'a, B>>
where
    M::Bitmap: WithBitmapSlice<'a, S = B>,
{
    mem.get_slices(addr, count, access).ok()?.next()?.ok()
}
