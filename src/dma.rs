// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! DMA memory: one mmap'd, locked region exposed as `GuestMemoryMmap` whose addresses are IOVAs.
//!
//! Everything the device reads or writes (descriptor tables, avail/used rings, packet buffers)
//! lives in one anonymous `MAP_SHARED` mapping owned by a [`DmaRegion`]. The device backend maps
//! that region once (VHOST_SET_MEM_TABLE, a vhost-vdpa IOTLB update, VFIO_IOMMU_MAP_DMA) at
//! [`DmaRegion::iova_base`]; after that every address we hand the device is an IOVA inside
//! `[iova_base, iova_base + size)`. [`DmaRegion::memory`] gives the same bytes as a
//! `vm_memory::GuestMemoryMmap` addressed by IOVA, so the rings and the packet parser use
//! vm-memory's bounds-checked `Bytes` accessors and never raw pointers.
//!
//! Allocation is a bump allocator: rings and buffer pools are carved out once at start-up and
//! never freed individually (the whole region is unmapped when the last handle is dropped).
//!
//! ```
//! use vdpa_vsock::dma::{DmaOptions, DmaRegion};
//! use vm_memory::Bytes;
//!
//! let dma = DmaRegion::new(&DmaOptions::default()).unwrap();
//! let buf = dma.alloc(4096, 64).unwrap();
//! dma.memory().write_obj(0x1234u32, buf).unwrap();
//! assert_eq!(dma.memory().read_obj::<u32>(buf).unwrap(), 0x1234);
//! ```

use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionCollectionError, GuestRegionMmap};

/// Size of the huge pages requested with `MAP_HUGETLB` (the x86-64 / arm64 default).
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Page size the region size is rounded up to, and that a fixed IOVA base must be aligned to.
pub const PAGE_SIZE: usize = 4096;

/// Default size of a DMA region: room for three 256-entry queues and their buffers.
pub const DEFAULT_DMA_SIZE: usize = 4 << 20;

/// Where the region sits in the device's (IOVA) address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IovaBase {
    /// The region starts at this IOVA (must be page aligned). Used with vhost-vdpa and VFIO.
    Fixed(u64),
    /// IOVA == host virtual address of the mapping (what vhost-vsock expects when the memory
    /// table maps userspace addresses one to one).
    Identity,
    /// IOVA == physical address (VFIO no-IOMMU mode). The region is populated and every page is
    /// checked in `/proc/self/pagemap`; it must be physically contiguous (use huge pages).
    Physical,
}

/// How to create a [`DmaRegion`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaOptions {
    /// Size in bytes; rounded up to [`PAGE_SIZE`] (to [`HUGE_PAGE_SIZE`] when huge pages are used).
    pub size: usize,
    /// IOVA placement of the region.
    pub iova: IovaBase,
    /// Ask for `MAP_HUGETLB`; falls back to normal pages (with a warning) if that fails.
    pub hugetlb: bool,
    /// `mlock` the region (best effort: a failure, e.g. RLIMIT_MEMLOCK, only logs a warning).
    pub lock: bool,
}

impl Default for DmaOptions {
    fn default() -> Self {
        DmaOptions {
            size: DEFAULT_DMA_SIZE,
            iova: IovaBase::Fixed(0),
            hugetlb: false,
            lock: true,
        }
    }
}

/// Errors from creating or using a [`DmaRegion`]. Causes: the cause is the source (the crate
/// docs, "Errors and their causes").
#[derive(thiserror::Error, Debug)]
pub enum DmaError {
    /// The region size is zero or too large to round up to a page.
    #[error("invalid DMA region size: expected 1..={max} bytes, found {size}")]
    InvalidSize {
        /// Requested size.
        size: usize,
        /// Largest accepted size.
        max: usize,
    },
    /// `mmap` of the region failed.
    #[error("mmap of a {size}-byte DMA region ({flags}) failed")]
    Mmap {
        /// Size of the attempted mapping.
        size: usize,
        /// The mapping flags in words.
        flags: &'static str,
        /// What vm-memory / the kernel reported.
        #[source]
        source: MmapRegionError,
    },
    /// Building the `GuestMemoryMmap` over the mapping failed.
    #[error("cannot expose the DMA region at IOVA {base:#x} as guest memory")]
    GuestMemory {
        /// IOVA base that was used.
        base: u64,
        /// vm-memory's reason.
        #[source]
        source: GuestRegionCollectionError,
    },
    /// A fixed IOVA base is not page aligned.
    #[error("IOVA base must be {PAGE_SIZE}-byte aligned, found {base:#x}")]
    MisalignedIova {
        /// The requested base.
        base: u64,
    },
    /// `iova_base + size` does not fit in 64 bits.
    #[error("DMA region [{base:#x}, +{size:#x}) overflows the 64-bit IOVA space")]
    IovaOverflow {
        /// IOVA base.
        base: u64,
        /// Region size.
        size: usize,
    },
    /// The bump allocator has no room left.
    #[error(
        "DMA region exhausted: requested {requested} bytes aligned to {align}, \
         but only {available} bytes are left"
    )]
    Exhausted {
        /// Requested size.
        requested: usize,
        /// Requested alignment.
        align: usize,
        /// Bytes left in the region (before alignment padding).
        available: usize,
    },
    /// Alignment is zero or not a power of two.
    #[error("alignment must be a non-zero power of two, found {0}")]
    InvalidAlignment(usize),
    /// Zero-size allocation.
    #[error("allocation size must be at least 1 byte, found 0")]
    ZeroSize,
    /// [`IovaBase::Physical`]: no usable physical address for the region.
    #[error("cannot use the physical address of the DMA region as its IOVA")]
    Physical(#[source] crate::pagemap::PagemapError),
    /// An address range is not inside the region.
    #[error("range [{addr:#x}, +{len:#x}) is outside the DMA region [{base:#x}, +{size:#x})")]
    OutOfRange {
        /// Start IOVA of the range.
        addr: u64,
        /// Length of the range.
        len: usize,
        /// IOVA base of the region.
        base: u64,
        /// Size of the region.
        size: usize,
    },
}

/// One mmap'd DMA region and its bump allocator. See the [module docs](self).
#[derive(Debug)]
pub struct DmaRegion {
    memory: GuestMemoryMmap<()>,
    /// The mapping itself (shared with `memory`); unmapped when the last reference drops.
    mapping: Arc<vm_memory::MmapRegion<()>>,
    iova_base: u64,
    size: usize,
    hugetlb: bool,
    locked: bool,
    /// Offset (from `iova_base`) of the first unallocated byte.
    next: Mutex<usize>,
}

fn round_up(size: usize, to: usize) -> Option<usize> {
    size.checked_add(to - 1).map(|s| s & !(to - 1))
}

/// Maps `size` bytes of anonymous shared memory; `hugetlb` adds `MAP_HUGETLB`.
fn map(size: usize, hugetlb: bool) -> Result<vm_memory::MmapRegion<()>, DmaError> {
    let mut flags = libc::MAP_ANONYMOUS | libc::MAP_SHARED;
    if hugetlb {
        flags |= libc::MAP_HUGETLB;
    }
    MmapRegionBuilder::new(size)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .with_hugetlbfs(hugetlb)
        .build()
        .map_err(|source| DmaError::Mmap {
            size,
            flags: if hugetlb {
                "MAP_ANONYMOUS|MAP_SHARED|MAP_HUGETLB"
            } else {
                "MAP_ANONYMOUS|MAP_SHARED"
            },
            source,
        })
}

/// `mlock`s the mapping; returns whether it worked (a failure is logged, not fatal).
#[cfg(not(miri))]
fn lock(mapping: &vm_memory::MmapRegion<()>) -> bool {
    // SAFETY: `as_ptr()`/`size()` describe a live mapping owned by `mapping`; mlock only changes
    // paging attributes and cannot invalidate memory Rust can see.
    let rc = unsafe { libc::mlock(mapping.as_ptr().cast(), mapping.size()) };
    if rc == 0 {
        return true;
    }
    let err = std::io::Error::last_os_error();
    log::warn!(
        "mlock of the {}-byte DMA region failed ({err}); continuing unlocked \
         (raise RLIMIT_MEMLOCK, e.g. `ulimit -l`, to lock it)",
        mapping.size()
    );
    false
}

/// Miri cannot call `mlock`; the region simply stays unlocked.
#[cfg(miri)]
fn lock(_mapping: &vm_memory::MmapRegion<()>) -> bool {
    false
}

impl DmaRegion {
    /// Maps, locks (best effort) and exposes a new DMA region.
    pub fn new(opts: &DmaOptions) -> Result<Self, DmaError> {
        let max = isize::MAX as usize - HUGE_PAGE_SIZE;
        if opts.size == 0 || opts.size > max {
            return Err(DmaError::InvalidSize {
                size: opts.size,
                max,
            });
        }
        if let IovaBase::Fixed(base) = opts.iova {
            if base % PAGE_SIZE as u64 != 0 {
                return Err(DmaError::MisalignedIova { base });
            }
        }

        let mut mapping = None;
        let mut hugetlb = false;
        if opts.hugetlb {
            // Cannot fail: opts.size <= isize::MAX - HUGE_PAGE_SIZE.
            let size = round_up(opts.size, HUGE_PAGE_SIZE).unwrap_or(opts.size);
            match map(size, true) {
                Ok(m) => {
                    mapping = Some(m);
                    hugetlb = true;
                }
                Err(e) => log::warn!(
                    "huge pages requested but unavailable ({e}: {}); falling back to normal \
                     pages (reserve some with /proc/sys/vm/nr_hugepages)",
                    std::error::Error::source(&e).map_or_else(String::new, |s| s.to_string())
                ),
            }
        }
        let mapping = match mapping {
            Some(m) => m,
            None => map(round_up(opts.size, PAGE_SIZE).unwrap_or(opts.size), false)?,
        };
        let size = mapping.size();
        let locked = opts.lock && lock(&mapping);

        let iova_base = match opts.iova {
            IovaBase::Fixed(base) => base,
            // The mapping exists now, so its address is known and stable: the guest address of
            // every byte is its own host virtual address.
            IovaBase::Identity => mapping.as_ptr() as u64,
            IovaBase::Physical => {
                // Fault every page in (mlock may have failed or been skipped).
                for off in (0..size).step_by(PAGE_SIZE) {
                    // SAFETY: `off < size`, so the byte lies inside the live mapping we own; no
                    // reference to it exists yet, and writing 0 to fresh anonymous memory changes
                    // nothing observable.
                    unsafe { mapping.as_ptr().add(off).write_volatile(0) };
                }
                crate::pagemap::physical_base(mapping.as_ptr() as u64, size)
                    .map_err(DmaError::Physical)?
            }
        };
        let mapping = Arc::new(mapping);
        let region = GuestRegionMmap::with_arc(Arc::clone(&mapping), GuestAddress(iova_base))
            .ok_or(DmaError::IovaOverflow {
                base: iova_base,
                size,
            })?;
        let memory = GuestMemoryMmap::from_regions(vec![region]).map_err(|source| {
            DmaError::GuestMemory {
                base: iova_base,
                source,
            }
        })?;
        Ok(DmaRegion {
            memory,
            mapping,
            iova_base,
            size,
            hugetlb,
            locked,
            next: Mutex::new(0),
        })
    }

    /// The region as IOVA-addressed guest memory. Clone it to share with a device thread; the
    /// mapping stays alive as long as any clone does.
    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.memory
    }

    /// IOVA of the first byte of the region.
    pub fn iova_base(&self) -> u64 {
        self.iova_base
    }

    /// Size of the region in bytes (after rounding up to the page size).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Userspace virtual address of the first byte (for VHOST_SET_MEM_TABLE / IOTLB updates).
    pub fn host_addr(&self) -> u64 {
        self.mapping.as_ptr() as u64
    }

    /// Whether the region is backed by huge pages.
    pub fn is_hugetlb(&self) -> bool {
        self.hugetlb
    }

    /// Whether `mlock` succeeded.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Whether `[addr, addr + len)` lies inside the region.
    pub fn contains(&self, addr: GuestAddress, len: usize) -> bool {
        self.offset_of(addr, len).is_ok()
    }

    /// Allocates `size` bytes aligned (as an IOVA) to `align`, a power of two. Returns the IOVA.
    /// Memory is never freed individually; a fresh mapping is zero-filled.
    pub fn alloc(&self, size: usize, align: usize) -> Result<GuestAddress, DmaError> {
        self.alloc_within(size, align, None)
    }

    /// Like [`alloc`](Self::alloc), and the block does not cross a multiple of `boundary` (a
    /// power of two; a block larger than `boundary` starts on one). Buffers that must not
    /// straddle two huge pages use [`HUGE_PAGE_SIZE`]: with IOVA = physical address, two huge
    /// pages need not be contiguous.
    pub fn alloc_within(
        &self,
        size: usize,
        align: usize,
        boundary: Option<usize>,
    ) -> Result<GuestAddress, DmaError> {
        if let Some(b) = boundary {
            if b == 0 || !b.is_power_of_two() {
                return Err(DmaError::InvalidAlignment(b));
            }
        }
        if align == 0 || !align.is_power_of_two() {
            return Err(DmaError::InvalidAlignment(align));
        }
        if size == 0 {
            return Err(DmaError::ZeroSize);
        }
        // A poisoned lock only means another thread panicked between two plain integer
        // operations; the offset is still consistent.
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let available = self.size - *next;
        let exhausted = DmaError::Exhausted {
            requested: size,
            align,
            available,
        };
        let align = align as u64;
        let start_iova = self
            .iova_base
            .checked_add(*next as u64)
            .and_then(|a| a.checked_add(align - 1))
            .map(|a| a & !(align - 1));
        let Some(mut start_iova) = start_iova else {
            return Err(exhausted);
        };
        if let Some(b) = boundary.map(|b| b as u64) {
            let Some(last) = start_iova.checked_add(size as u64 - 1) else {
                return Err(exhausted);
            };
            if start_iova / b != last / b {
                // Start on the next boundary instead (a multiple of `align` too when
                // `align <= b`; a larger alignment already is one).
                start_iova = (start_iova / b + 1) * b;
            }
        }
        let Ok(start) = usize::try_from(start_iova - self.iova_base) else {
            return Err(exhausted);
        };
        match start.checked_add(size) {
            Some(end) if end <= self.size => {
                *next = end;
                Ok(GuestAddress(start_iova))
            }
            _ => Err(exhausted),
        }
    }

    /// Bytes not yet handed out by [`alloc`](Self::alloc) (ignoring alignment padding).
    pub fn remaining(&self) -> usize {
        self.size - *self.next.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Offset of `[addr, addr + len)` from the region start, or `OutOfRange`.
    fn offset_of(&self, addr: GuestAddress, len: usize) -> Result<usize, DmaError> {
        let out = || DmaError::OutOfRange {
            addr: addr.0,
            len,
            base: self.iova_base,
            size: self.size,
        };
        let offset = addr.0.checked_sub(self.iova_base).ok_or_else(out)?;
        let offset = usize::try_from(offset).map_err(|_| out())?;
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(offset),
            _ => Err(out()),
        }
    }

    /// Runs `f` over the bytes at `[addr, addr + len)` as a plain mutable slice (for bulk copies
    /// into a buffer the driver owns, e.g. before posting it on the tx queue).
    ///
    /// # Safety
    ///
    /// The caller guarantees that nothing else accesses that range while `f` runs: the buffer
    /// is not in flight (the device was not given it, or gave it back), and no other thread of
    /// this process reads or writes it (including through [`memory`](Self::memory)).
    pub unsafe fn with_slice_mut<R>(
        &self,
        addr: GuestAddress,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R, DmaError> {
        let offset = self.offset_of(addr, len)?;
        // SAFETY: `offset + len <= self.size`, checked by `offset_of`, so the range is inside the
        // live mapping kept alive by `self.mapping` for the lifetime of `&self`; the memory is
        // initialised (mmap zero-fills). Exclusive access for the duration of `f` is the
        // caller's obligation (see `# Safety`).
        let slice =
            unsafe { std::slice::from_raw_parts_mut(self.mapping.as_ptr().add(offset), len) };
        Ok(f(slice))
    }

    /// Runs `f` over the bytes at `[addr, addr + len)` as a plain shared slice (for bulk copies
    /// out of a buffer the device has returned).
    ///
    /// # Safety
    ///
    /// The caller guarantees that nothing writes that range while `f` runs: the buffer is not in
    /// flight, and no other thread of this process writes it.
    pub unsafe fn with_slice<R>(
        &self,
        addr: GuestAddress,
        len: usize,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, DmaError> {
        let offset = self.offset_of(addr, len)?;
        // SAFETY: in bounds of the live, initialised mapping as in `with_slice_mut`; the absence
        // of concurrent writers is the caller's obligation.
        let slice = unsafe { std::slice::from_raw_parts(self.mapping.as_ptr().add(offset), len) };
        Ok(f(slice))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Address, Bytes, GuestMemoryBackend};

    #[track_caller]
    fn region(size: usize) -> DmaRegion {
        DmaRegion::new(&DmaOptions {
            size,
            ..DmaOptions::default()
        })
        .expect("DMA region")
    }

    mod creation {
        use super::*;

        #[test]
        fn default_region_is_page_rounded_and_zeroed() {
            let dma = region(5000);
            assert_eq!(dma.size(), 8192);
            assert_eq!(dma.iova_base(), 0);
            assert_eq!(dma.remaining(), 8192);
            assert_eq!(dma.memory().read_obj::<u64>(GuestAddress(8184)).unwrap(), 0);
            assert!(!dma.memory().address_in_range(GuestAddress(8192)));
            assert!(!dma.is_hugetlb());
        }

        #[test]
        fn fixed_base_is_honoured() {
            let dma = DmaRegion::new(&DmaOptions {
                size: PAGE_SIZE,
                iova: IovaBase::Fixed(0x1_0000_0000),
                ..DmaOptions::default()
            })
            .unwrap();
            assert_eq!(dma.iova_base(), 0x1_0000_0000);
            assert!(dma.memory().address_in_range(GuestAddress(0x1_0000_0000)));
            assert!(!dma.memory().address_in_range(GuestAddress(0)));
        }

        #[test]
        fn identity_base_equals_host_address() {
            let dma = DmaRegion::new(&DmaOptions {
                size: PAGE_SIZE,
                iova: IovaBase::Identity,
                ..DmaOptions::default()
            })
            .unwrap();
            assert_eq!(dma.iova_base(), dma.host_addr());
            let iova = dma.alloc(8, 8).unwrap();
            dma.memory().write_obj(0xdead_beef_u32, iova).unwrap();
            let host = dma.memory().get_host_address(iova).unwrap();
            assert_eq!(host as u64, iova.0);
        }

        #[test]
        fn hugetlb_falls_back_or_succeeds() {
            let dma = DmaRegion::new(&DmaOptions {
                size: PAGE_SIZE,
                hugetlb: true,
                ..DmaOptions::default()
            })
            .expect("hugetlb must fall back to normal pages, not fail");
            if dma.is_hugetlb() {
                assert_eq!(dma.size(), HUGE_PAGE_SIZE);
            } else {
                assert_eq!(dma.size(), PAGE_SIZE);
            }
            dma.memory().write_obj(1u8, GuestAddress(0)).unwrap();
        }

        #[test]
        fn lock_is_best_effort() {
            let dma = DmaRegion::new(&DmaOptions {
                size: PAGE_SIZE,
                lock: true,
                ..DmaOptions::default()
            })
            .unwrap();
            // Either outcome is fine; creation must not fail because of RLIMIT_MEMLOCK.
            let _ = dma.is_locked();
            let unlocked = DmaRegion::new(&DmaOptions {
                size: PAGE_SIZE,
                lock: false,
                ..DmaOptions::default()
            })
            .unwrap();
            assert!(!unlocked.is_locked());
        }

        #[test]
        fn bad_options_are_rejected() {
            let zero = DmaRegion::new(&DmaOptions {
                size: 0,
                ..DmaOptions::default()
            });
            assert!(matches!(zero, Err(DmaError::InvalidSize { size: 0, .. })));
            let misaligned = DmaRegion::new(&DmaOptions {
                iova: IovaBase::Fixed(0x1001),
                ..DmaOptions::default()
            });
            assert!(matches!(
                misaligned,
                Err(DmaError::MisalignedIova { base: 0x1001 })
            ));
            let overflow = DmaRegion::new(&DmaOptions {
                size: 2 * PAGE_SIZE,
                iova: IovaBase::Fixed(u64::MAX - PAGE_SIZE as u64 + 1),
                ..DmaOptions::default()
            });
            assert!(matches!(overflow, Err(DmaError::IovaOverflow { .. })));
        }

        #[test]
        fn region_is_send_and_sync() {
            fn check<T: Send + Sync>() {}
            check::<DmaRegion>();
        }
    }

    mod allocation {
        use super::*;

        #[test]
        fn alloc_honours_alignment() {
            let dma = region(PAGE_SIZE);
            let a = dma.alloc(3, 1).unwrap();
            assert_eq!(a, GuestAddress(0));
            let b = dma.alloc(10, 16).unwrap();
            assert_eq!(b, GuestAddress(16));
            let c = dma.alloc(1, 4096);
            assert!(matches!(c, Err(DmaError::Exhausted { .. })), "{c:?}");
            let d = dma.alloc(2, 2).unwrap();
            assert_eq!(d, GuestAddress(26));
            assert_eq!(dma.remaining(), PAGE_SIZE - 28);
        }

        #[test]
        fn alloc_aligns_iova_not_offset() {
            let dma = DmaRegion::new(&DmaOptions {
                size: 2 * PAGE_SIZE,
                iova: IovaBase::Identity,
                ..DmaOptions::default()
            })
            .unwrap();
            dma.alloc(1, 1).unwrap();
            let a = dma.alloc(64, 64).unwrap();
            assert_eq!(a.0 % 64, 0);
            assert!(dma.contains(a, 64));
        }

        #[test]
        fn exhaustion_reports_request_and_room() {
            let dma = region(PAGE_SIZE);
            dma.alloc(PAGE_SIZE - 8, 1).unwrap();
            let err = dma.alloc(16, 8).unwrap_err();
            match err {
                DmaError::Exhausted {
                    requested: 16,
                    align: 8,
                    available: 8,
                } => {}
                other => panic!("unexpected {other:?}"),
            }
            assert!(err.to_string().contains("requested 16"));
            // The failed request did not consume anything.
            assert_eq!(dma.alloc(8, 8).unwrap(), GuestAddress(PAGE_SIZE as u64 - 8));
            assert_eq!(dma.remaining(), 0);
        }

        #[test]
        fn invalid_requests_are_rejected() {
            let dma = region(PAGE_SIZE);
            assert!(matches!(dma.alloc(0, 8), Err(DmaError::ZeroSize)));
            assert!(matches!(
                dma.alloc(8, 0),
                Err(DmaError::InvalidAlignment(0))
            ));
            assert!(matches!(
                dma.alloc(8, 3),
                Err(DmaError::InvalidAlignment(3))
            ));
            assert!(matches!(
                dma.alloc(usize::MAX, 1),
                Err(DmaError::Exhausted { .. })
            ));
        }
    }

    mod slices {
        use super::*;

        #[test]
        fn with_slice_round_trips() {
            let dma = region(PAGE_SIZE);
            let a = dma.alloc(16, 8).unwrap();
            // SAFETY: no device and no other thread uses this region.
            unsafe { dma.with_slice_mut(a, 16, |s| s.copy_from_slice(&[7u8; 16])) }.unwrap();
            // SAFETY: as above.
            let sum =
                unsafe { dma.with_slice(a, 16, |s| s.iter().map(|&b| u32::from(b)).sum::<u32>()) };
            assert_eq!(sum.unwrap(), 7 * 16u32);
            assert_eq!(dma.memory().read_obj::<u8>(a.unchecked_add(15)).unwrap(), 7);
        }

        #[test]
        fn with_slice_checks_bounds() {
            let dma = DmaRegion::new(&DmaOptions {
                size: PAGE_SIZE,
                iova: IovaBase::Fixed(0x10000),
                ..DmaOptions::default()
            })
            .unwrap();
            let cases = [
                (0x10000 - 1, 1),
                (0x10000 + PAGE_SIZE as u64, 1),
                (0x10000 + PAGE_SIZE as u64 - 4, 5),
                (0x10000, usize::MAX),
                (u64::MAX, 2),
            ];
            for (addr, len) in cases {
                // SAFETY: the closure never runs for out-of-range requests; nothing else touches
                // the region.
                let r = unsafe { dma.with_slice(GuestAddress(addr), len, |_| ()) };
                assert!(
                    matches!(r, Err(DmaError::OutOfRange { .. })),
                    "{addr:#x}+{len}: {r:?}"
                );
            }
            // SAFETY: as above.
            let whole =
                unsafe { dma.with_slice_mut(GuestAddress(0x10000), PAGE_SIZE, |s| s.len()) };
            assert_eq!(whole.unwrap(), PAGE_SIZE);
            // SAFETY: as above.
            let empty =
                unsafe { dma.with_slice(GuestAddress(0x10000 + PAGE_SIZE as u64), 0, |s| s.len()) };
            assert_eq!(empty.unwrap(), 0);
        }
    }
}
