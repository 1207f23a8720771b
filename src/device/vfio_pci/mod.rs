// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A virtio-vsock PCI function bound to `vfio-pci`, driven from userspace (virtio 1.2 section
//! 4.1, modern virtio-pci only).
//!
//! Bring-up: container and group (IOMMU type1v2, or no-IOMMU when explicitly asked for), device
//! fd, config space read through the VFIO config region, the virtio vendor capabilities found by
//! walking the capability list ([`super::pci`]), the mmap'able areas of the BARs that hold them
//! mapped (sparse mmap areas honoured; a structure outside its BAR or outside every mmap'able
//! area is refused with an error naming it), bus master on, then the modern virtio-pci
//! transport (`device::virtio_pci`: status reset / ACKNOWLEDGE / DRIVER, features, FEATURES_OK
//! re-read, queues, DRIVER_OK) over those mappings, and MSI-X vectors wired to eventfds with
//! `VFIO_DEVICE_SET_IRQS` ([`IrqPlan`], as Linux's `vp_find_vqs` chooses: one vector for
//! configuration changes and one per queue, else one shared by every queue, else INTx with a
//! forwarding thread that reads the ISR).
//!
//! Queues: rx, tx and, when the common configuration's `num_queues` says so, the event queue
//! (virtio 1.2 section 5.10.2). Removal: the device request interrupt
//! (`VFIO_PCI_REQ_IRQ_INDEX`), which the kernel signals when the function is unbound from
//! vfio-pci or unplugged and then waits until we close the device, is
//! [`VsockDevice::removal_fd`].
//!
//! IOVAs: with type1v2 the DMA region is mapped with `VFIO_IOMMU_MAP_DMA` at [`TYPE1_IOVA_BASE`];
//! with no-IOMMU the device sees physical addresses, so the region must be pinned, physically
//! contiguous memory whose physical address is its IOVA ([`IovaBase::Physical`]: one huge page).
//!
//! Why not the `vfio-ioctls` crate: 0.10 is compatible with our vm-memory 0.18 / vmm-sys-util
//! 0.15 (and builds without KVM), but its `VfioContainer` only accepts the type1 IOMMU models
//! (`check_extension` / `set_iommu` reject anything else), so it cannot open a no-IOMMU group,
//! the only mode our QEMU harness has. Its structures and constants are rust-vmm's
//! `vfio-bindings` (the crate `vfio-ioctls` builds on); the dozen ioctl numbers are declared
//! below with vmm-sys-util's macros, as `vfio-ioctls` does privately.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::pci;
use super::virtio_pci::{
    self, QueueAddrs, Regs, Transport, ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, ISR_CONFIG,
    ISR_QUEUE, NEEDS_RESET, VIRTIO_MSI_NO_VECTOR,
};
use super::{DeviceError, VsockDevice, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::dma::{DmaOptions, DmaRegion, IovaBase, HUGE_PAGE_SIZE};
use crate::virtq::QueueLayout;

/// IOVA where the DMA region is mapped in type1 (real IOMMU) mode.
pub const TYPE1_IOVA_BASE: u64 = 0x1_0000_0000;

use crate::packet::VIRTIO_F_ACCESS_PLATFORM;
/// The VFIO ioctls we use. Structures and constants come from rust-vmm's `vfio-bindings`
/// (`linux/vfio.h`); it has no ioctl numbers (`vfio-ioctls` keeps its own private), so those are
/// declared here with vmm-sys-util's macros from the header's `VFIO_TYPE`/`VFIO_BASE`.
mod sys {
    #![allow(non_upper_case_globals, unreachable_pub)]
    use vmm_sys_util::ioctl_io_nr;

    pub use vfio_bindings::bindings::vfio::{
        vfio_device_info, vfio_group_status, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap,
        vfio_irq_info, vfio_region_info, VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION,
        VFIO_DEVICE_FLAGS_PCI, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE,
        VFIO_GROUP_FLAGS_VIABLE, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
        VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_NOIOMMU_IOMMU,
        VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_PCI_REQ_IRQ_INDEX, VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS,
        VFIO_REGION_INFO_FLAG_MMAP,
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
}

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
fn region_info(
    device: &File,
    index: u32,
) -> Result<(sys::vfio_region_info, SparseAreas), DeviceError> {
    let mut info = sys::vfio_region_info {
        argsz: argsz::<sys::vfio_region_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: GET_REGION_INFO writes at most `argsz` bytes into `info`, which is that large.
    let rc = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(
            device,
            sys::VFIO_DEVICE_GET_REGION_INFO(),
            &mut info,
        )
    };
    if rc < 0 {
        return Err(DeviceError::io(
            "VFIO_DEVICE_GET_REGION_INFO",
            io::Error::last_os_error(),
        ));
    }
    if info.flags & sys::VFIO_REGION_INFO_FLAG_CAPS == 0
        || (info.argsz as usize) <= std::mem::size_of::<sys::vfio_region_info>()
    {
        return Ok((info, None));
    }
    // Again with room for the capability chain (u64 words keep the buffer aligned).
    let words = (info.argsz as usize).div_ceil(8);
    let mut buf = vec![0u64; words];
    let argsz = info.argsz;
    let head = buf.as_mut_ptr().cast::<sys::vfio_region_info>();
    // SAFETY: `buf` is at least `argsz >= size_of::<vfio_region_info>()` bytes, 8-aligned, and
    // exclusively ours; the kernel writes at most `argsz` bytes.
    let rc = unsafe {
        head.write(sys::vfio_region_info {
            argsz,
            index,
            ..Default::default()
        });
        vmm_sys_util::ioctl::ioctl_with_mut_ptr(device, sys::VFIO_DEVICE_GET_REGION_INFO(), head)
    };
    if rc < 0 {
        return Err(DeviceError::io(
            "VFIO_DEVICE_GET_REGION_INFO",
            io::Error::last_os_error(),
        ));
    }
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
    // SAFETY: the buffer starts with an initialised `vfio_region_info` (plain integers).
    let info = unsafe { head.read() };
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
fn map_bars(
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

/// `argsz` of a VFIO structure (all are a few dozen bytes).
#[allow(clippy::cast_possible_truncation)]
const fn argsz<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

fn errno(op: &'static str) -> DeviceError {
    DeviceError::io(op, io::Error::last_os_error())
}

fn failed(msg: impl Into<String>) -> DeviceError {
    DeviceError::Failed(msg.into())
}

/// The INTx forwarding thread and its stop signal.
#[derive(Debug)]
struct IntxForwarder {
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for IntxForwarder {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one INTx interrupt means (virtio 1.2 section 4.1.4.5): ISR bit 0 (a queue
/// interrupt) signals every queue's eventfd (the ISR does not say which queue), bit 1 (a
/// configuration change) the config eventfd. Returns the ISR read.
fn dispatch_isr(isr: u8, calls: &[EventFd], config: &EventFd) -> u8 {
    if isr & ISR_QUEUE != 0 {
        for c in calls {
            let _ = c.write(1);
        }
    }
    if isr & ISR_CONFIG != 0 {
        let _ = config.write(1);
    }
    isr
}

/// The eventfds the INTx thread signals.
#[derive(Debug)]
struct IntxTargets {
    /// One per queue.
    calls: Vec<EventFd>,
    /// Configuration changes.
    config: EventFd,
}

/// Waits for the INTx eventfd; reads the ISR (clears it, deasserts the line) and signals what
/// it says ([`dispatch_isr`]); unmasks the line in VFIO.
fn intx_loop(
    device: &File,
    transport: &Transport,
    line: &EventFd,
    stop: &EventFd,
    targets: &IntxTargets,
) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: line.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("vfio INTx: poll failed: {}", io::Error::last_os_error());
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents != 0 {
            let _ = line.read();
            dispatch_isr(transport.read_isr(), &targets.calls, &targets.config);
            if let Err(e) = set_irqs_on(
                device,
                sys::VFIO_PCI_INTX_IRQ_INDEX,
                sys::VFIO_IRQ_SET_DATA_NONE | sys::VFIO_IRQ_SET_ACTION_UNMASK,
                &[],
            ) {
                log::error!("vfio INTx: unmask failed: {e}");
                return;
            }
        }
    }
}

/// The MSI-X vector of configuration changes whenever MSI-X is in use (Linux's
/// `VP_MSIX_CONFIG_VECTOR`); queue vectors follow it.
const CONFIG_VECTOR: u16 = 0;

/// How the function's interrupts are wired, in the order Linux's `vp_find_vqs` tries them: a
/// vector per queue plus one for configuration changes, else one vector shared by every queue
/// plus the configuration vector, else INTx (the ISR says which of the two it was).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqPlan {
    /// MSI-X: configuration changes on vector 0, queue `i` on vector `1 + i`.
    PerQueue {
        /// How many queues have a vector.
        queues: u16,
    },
    /// MSI-X: configuration changes on vector 0, every queue on vector 1 (one eventfd that
    /// every queue's [`VsockDevice::call_fd`] names).
    Shared,
    /// The INTx line, read by a thread that signals the queues and the configuration change
    /// eventfds as the ISR says.
    Intx,
}

impl IrqPlan {
    /// The plans to try, best first, for an MSI-X table of `table` entries (0: no MSI-X) and
    /// `queues` queues; INTx always comes last, and alone when `force_intx`.
    pub fn candidates(table: u32, queues: u16, force_intx: bool) -> Vec<IrqPlan> {
        let mut out = Vec::new();
        if !force_intx {
            // One vector per queue plus the config vector.
            if table > u32::from(queues) {
                out.push(IrqPlan::PerQueue { queues });
            }
            if table >= 2 {
                out.push(IrqPlan::Shared);
            }
        }
        out.push(IrqPlan::Intx);
        out
    }

    /// MSI-X vectors in use (0 with INTx).
    pub fn vectors(self) -> u32 {
        match self {
            IrqPlan::PerQueue { queues } => u32::from(queues) + 1,
            IrqPlan::Shared => 2,
            IrqPlan::Intx => 0,
        }
    }

    /// The MSI-X vector of queue `index` (`None` with INTx, or a queue without one).
    pub fn queue_vector(self, index: u16) -> Option<u16> {
        match self {
            IrqPlan::PerQueue { queues } if index < queues => Some(CONFIG_VECTOR + 1 + index),
            IrqPlan::PerQueue { .. } | IrqPlan::Intx => None,
            IrqPlan::Shared => Some(CONFIG_VECTOR + 1),
        }
    }

    /// What goes into `config_msix_vector`.
    pub fn config_vector(self) -> u16 {
        match self {
            IrqPlan::PerQueue { .. } | IrqPlan::Shared => CONFIG_VECTOR,
            IrqPlan::Intx => VIRTIO_MSI_NO_VECTOR,
        }
    }
}

impl std::fmt::Display for IrqPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            IrqPlan::PerQueue { queues } => {
                write!(f, "config on vector {CONFIG_VECTOR}")?;
                for q in 0..queues {
                    let v = self.queue_vector(q).unwrap_or(VIRTIO_MSI_NO_VECTOR);
                    write!(f, ", {} on {v}", queue_name(q))?;
                }
                Ok(())
            }
            IrqPlan::Shared => write!(
                f,
                "config on vector {CONFIG_VECTOR}, every queue on vector {} (shared: too few \
                 vectors for one each)",
                CONFIG_VECTOR + 1
            ),
            IrqPlan::Intx => f.write_str("INTx, ISR bit 0 queues, bit 1 config"),
        }
    }
}

/// The spec's name of queue `index` (5.10.2).
fn queue_name(index: u16) -> &'static str {
    match index {
        RX_QUEUE => "rx",
        TX_QUEUE => "tx",
        EVENT_QUEUE => "event",
        _ => "queue",
    }
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
struct DmaMapping {
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

/// The most queues a virtio-vsock device has (rx, tx, event; 5.10.2).
const MAX_QUEUES: u16 = 3;

/// A virtio-vsock PCI function driven through VFIO.
#[derive(Debug)]
pub struct VfioPciDevice {
    bdf: String,
    /// Modern or transitional, from the config space's ids.
    kind: pci::VsockFunction,
    noiommu: bool,
    container: File,
    _group: File,
    device: Arc<File>,
    config_offset: u64,
    /// The virtio-pci transport over the mmap'd BARs (shared with the INTx thread).
    transport: Arc<Transport>,
    /// INTx fallback: the thread that turns the line into per-queue eventfd signals.
    intx: Option<IntxForwarder>,
    force_intx: bool,
    /// Type1 only: map the DMA region at IOVA = its physical address.
    identity_iova: bool,
    offered: u64,
    /// Feature bits [`Self::hide_features`] keeps from the driver (also after `restart`).
    hidden: u64,
    /// Queues the driver may set up: `num_queues` of the common configuration, at most 3.
    queues: u16,
    /// Notify-area offsets (within the notify structure) of queues 0, 1 and 2.
    notify_off: [Option<u64>; 3],
    /// One per queue (with [`IrqPlan::Shared`] all name one eventfd).
    calls: Vec<EventFd>,
    /// Configuration changes (the MSI-X config vector, or the INTx thread on ISR bit 1).
    config_irq: EventFd,
    /// The device request interrupt: the kernel wants the function back.
    removal: Option<EventFd>,
    irqs: IrqPlan,
    dma_mapped: Option<DmaMapping>,
    started: bool,
}

impl VfioPciDevice {
    /// Opens `bdf` (bound to vfio-pci). `noiommu` must be true exactly when its group is a VFIO
    /// no-IOMMU group; IOVAs are then physical addresses.
    pub fn open(bdf: &str, noiommu: bool) -> Result<Self, DeviceError> {
        Self::open_with(bdf, noiommu, false)
    }

    /// [`Self::open`], optionally using the INTx fallback even when MSI-X exists (tests).
    pub fn open_with(bdf: &str, noiommu: bool, force_intx: bool) -> Result<Self, DeviceError> {
        let sysdev = Path::new("/sys/bus/pci/devices").join(bdf);
        if !sysdev.exists() {
            return Err(failed(format!("{bdf}: no such PCI function")));
        }
        let driver = fs::read_link(sysdev.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        if driver.as_deref() != Some("vfio-pci") {
            return Err(failed(format!(
                "{bdf} is bound to {}, not vfio-pci (bind it first, e.g. tools/bind.sh)",
                driver.as_deref().unwrap_or("no driver")
            )));
        }
        let group = fs::read_link(sysdev.join("iommu_group"))
            .map_err(|e| DeviceError::io("read iommu_group link", e))?;
        let group = group
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let noiommu_node = format!("/dev/vfio/noiommu-{group}");
        let group_is_noiommu = Path::new(&noiommu_node).exists()
            || fs::read_to_string(format!("/sys/kernel/iommu_groups/{group}/name"))
                .is_ok_and(|n| n.trim() == "vfio-noiommu");
        if group_is_noiommu && !noiommu {
            return Err(failed(format!(
                "{bdf} is in VFIO no-IOMMU group {group}: the device can DMA to any physical \
                 memory and nothing confines it to our buffers (a buggy or hostile device can \
                 corrupt the whole machine; the kernel is tainted). Refusing without explicit \
                 consent: use the spec vfio:{bdf},noiommu if you accept that risk"
            )));
        }
        if noiommu && !group_is_noiommu {
            return Err(failed(format!(
                "{bdf}: ,noiommu was asked for but group {group} is behind a real IOMMU: drop \
                 ,noiommu (type1 mode is the safe one)"
            )));
        }
        let rw = |p: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(p)
                .map_err(|e| failed(format!("open {p}: {e}")))
        };
        let container = rw("/dev/vfio/vfio")?;
        // SAFETY: GET_API_VERSION takes no argument.
        let v = unsafe { vmm_sys_util::ioctl::ioctl(&container, sys::VFIO_GET_API_VERSION()) };
        if i64::from(v) != i64::from(sys::VFIO_API_VERSION) {
            return Err(failed(format!("VFIO API version {v}, expected 0")));
        }
        let iommu = u64::from(if noiommu {
            sys::VFIO_NOIOMMU_IOMMU
        } else {
            sys::VFIO_TYPE1v2_IOMMU
        });
        // SAFETY: CHECK_EXTENSION takes an integer argument and writes nothing.
        let ok = unsafe {
            vmm_sys_util::ioctl::ioctl_with_val(&container, sys::VFIO_CHECK_EXTENSION(), iommu)
        };
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
        let group_file = rw(&if noiommu {
            noiommu_node
        } else {
            format!("/dev/vfio/{group}")
        })?;
        let mut status = sys::vfio_group_status {
            argsz: argsz::<sys::vfio_group_status>(),
            flags: 0,
        };
        // SAFETY: GET_STATUS writes one `vfio_group_status` (argsz says how big it is).
        if unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(
                &group_file,
                sys::VFIO_GROUP_GET_STATUS(),
                &mut status,
            )
        } < 0
        {
            return Err(errno("VFIO_GROUP_GET_STATUS"));
        }
        if status.flags & sys::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(failed(format!(
                "VFIO group {group} is not viable: bind every device of the group to vfio-pci"
            )));
        }
        let cfd = container.as_raw_fd();
        // SAFETY: SET_CONTAINER reads one int (the container fd) from the pointer.
        if unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(&group_file, sys::VFIO_GROUP_SET_CONTAINER(), &cfd)
        } < 0
        {
            return Err(errno("VFIO_GROUP_SET_CONTAINER"));
        }
        // SAFETY: SET_IOMMU takes an integer argument.
        if unsafe { vmm_sys_util::ioctl::ioctl_with_val(&container, sys::VFIO_SET_IOMMU(), iommu) }
            < 0
        {
            return Err(errno("VFIO_SET_IOMMU"));
        }
        let name = std::ffi::CString::new(bdf).map_err(|_| failed("NUL in PCI address"))?;
        // SAFETY: GET_DEVICE_FD reads a NUL-terminated string; it returns a new fd we own.
        let fd = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ptr(
                &group_file,
                sys::VFIO_GROUP_GET_DEVICE_FD(),
                name.as_ptr(),
            )
        };
        if fd < 0 {
            return Err(errno("VFIO_GROUP_GET_DEVICE_FD"));
        }
        // SAFETY: `fd` is a fresh descriptor returned to us and owned by nobody else.
        let device = Arc::new(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) });

        let mut dinfo = sys::vfio_device_info {
            argsz: argsz::<sys::vfio_device_info>(),
            ..Default::default()
        };
        // SAFETY: GET_INFO writes at most `argsz` bytes into `dinfo`.
        if unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(
                &*device,
                sys::VFIO_DEVICE_GET_INFO(),
                &mut dinfo,
            )
        } < 0
        {
            return Err(errno("VFIO_DEVICE_GET_INFO"));
        }
        if dinfo.flags & sys::VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(failed(format!("{bdf}: VFIO says this is not a PCI device")));
        }

        let (cfg_info, _) = region_info(&device, sys::VFIO_PCI_CONFIG_REGION_INDEX)?;
        let mut cfg = vec![0u8; 256];
        device
            .read_exact_at(&mut cfg, cfg_info.offset)
            .map_err(|e| DeviceError::io("read PCI config space", e))?;
        let vendor = u16::from_le_bytes([cfg[0], cfg[1]]);
        let devid = u16::from_le_bytes([cfg[2], cfg[3]]);
        let Some(kind) = pci::vsock_function(vendor, devid) else {
            return Err(failed(format!(
                "{bdf} is {vendor:04x}:{devid:04x}, not a virtio-vsock function \
                 (expected 1af4:1053 modern or 1af4:1012 transitional)"
            )));
        };
        let caps = pci::virtio_caps(&cfg).map_err(|e| match kind {
            pci::VsockFunction::Modern => failed(format!("{bdf}: {e}")),
            pci::VsockFunction::Transitional => failed(format!(
                "{bdf} is a transitional virtio-vsock function (1af4:1012) without a usable \
                 modern interface, and the legacy interface is not supported: {e}"
            )),
        })?;

        let transport = Arc::new(Transport::new(bdf, caps, map_bars(&device, bdf, &caps)?)?);

        let mut dev = VfioPciDevice {
            bdf: bdf.to_string(),
            kind,
            noiommu,
            container,
            _group: group_file,
            device,
            config_offset: cfg_info.offset,
            transport,
            offered: 0,
            hidden: 0,
            queues: 0,
            notify_off: [None; 3],
            calls: Vec::new(),
            config_irq: EventFd::new(EFD_NONBLOCK).map_err(|e| DeviceError::io("eventfd", e))?,
            removal: None,
            irqs: IrqPlan::Intx,
            intx: None,
            force_intx,
            identity_iova: false,
            dma_mapped: None,
            started: false,
        };
        // Memory decoding and bus mastering on: the device DMAs into our rings.
        let cmd = dev.config_read16(pci::PCI_COMMAND)?;
        dev.config_write16(
            pci::PCI_COMMAND,
            cmd | pci::PCI_COMMAND_MEMORY | pci::PCI_COMMAND_MASTER,
        )?;
        dev.transport.begin_init()?;
        dev.offered = dev.transport.device_features();
        let nq = dev.transport.num_queues();
        if nq < 2 {
            return Err(failed(format!(
                "{bdf}: device has {nq} queues, expected >= 2"
            )));
        }
        dev.queues = nq.min(MAX_QUEUES);
        dev.setup_irqs()?;
        dev.removal = dev.setup_removal();
        Ok(dev)
    }

    /// Stops offering the feature bits in `mask` to the driver (diagnostics: e.g. run without
    /// `VIRTIO_RING_F_EVENT_IDX` to tell a notification-suppression problem from others).
    pub fn hide_features(&mut self, mask: u64) {
        self.hidden |= mask;
        self.offered &= !mask;
    }

    /// Type1 (IOMMU) mode only: map the DMA region at IOVAs equal to its physical addresses (one
    /// huge page) instead of at [`TYPE1_IOVA_BASE`]. For a device that bypasses the IOMMU (an
    /// emulated virtio device without ACCESS_PLATFORM behind an emulated IOMMU), the identity
    /// mapping is the only one both it and the IOMMU agree on. Diagnostics and VM tests; no
    /// effect in no-IOMMU mode, where IOVAs are physical addresses anyway.
    pub fn set_identity_iova(&mut self, on: bool) {
        self.identity_iova = on;
    }

    /// Number of MSI-X vectors in use (0: INTx).
    pub fn msix_vectors(&self) -> u32 {
        self.irqs.vectors()
    }

    /// How the interrupts are wired.
    pub fn irq_plan(&self) -> IrqPlan {
        self.irqs
    }

    /// Whether the device request interrupt is wired to [`VsockDevice::removal_fd`].
    pub fn signals_removal(&self) -> bool {
        self.removal.is_some()
    }

    /// MSI-X table size the function advertises in its capability.
    pub fn msix_table_size(&self) -> Option<u16> {
        self.transport.caps().msix_vectors
    }

    fn config_read16(&self, off: usize) -> Result<u16, DeviceError> {
        let mut b = [0u8; 2];
        self.device
            .read_exact_at(&mut b, self.config_offset + off as u64)
            .map_err(|e| DeviceError::io("read PCI config space", e))?;
        Ok(u16::from_le_bytes(b))
    }

    fn config_write16(&self, off: usize, v: u16) -> Result<(), DeviceError> {
        self.device
            .write_all_at(&v.to_le_bytes(), self.config_offset + off as u64)
            .map_err(|e| DeviceError::io("write PCI config space", e))
    }

    fn set_irqs(&self, index: u32, fds: &[i32]) -> Result<(), DeviceError> {
        let flags = if fds.is_empty() {
            sys::VFIO_IRQ_SET_DATA_NONE | sys::VFIO_IRQ_SET_ACTION_TRIGGER
        } else {
            sys::VFIO_IRQ_SET_DATA_EVENTFD | sys::VFIO_IRQ_SET_ACTION_TRIGGER
        };
        set_irqs_on(&self.device, index, flags, fds)
    }

    /// `VFIO_IOMMU_UNMAP_DMA` of a mapping we made.
    fn unmap_dma(&self, m: DmaMapping) -> Result<(), DeviceError> {
        let mut unmap = sys::vfio_iommu_type1_dma_unmap {
            argsz: argsz::<sys::vfio_iommu_type1_dma_unmap>(),
            flags: 0,
            iova: m.iova,
            size: m.size,
            ..Default::default()
        };
        // SAFETY: UNMAP_DMA reads one `vfio_iommu_type1_dma_unmap` (and writes back the size
        // unmapped into it; it is exclusively ours for the call).
        if unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(
                &self.container,
                sys::VFIO_IOMMU_UNMAP_DMA(),
                &mut unmap,
            )
        } < 0
        {
            return Err(errno("VFIO_IOMMU_UNMAP_DMA"));
        }
        Ok(())
    }
}

/// `VFIO_DEVICE_SET_IRQS` for `fds` (at most 8) from vector 0; `DATA_NONE` with no fds uses
/// count 0 for TRIGGER (disable) and count 1 for UNMASK.
fn set_irqs_on(device: &File, index: u32, flags: u32, fds: &[i32]) -> Result<(), DeviceError> {
    {
        let fds = &fds[..fds.len().min(8)];
        #[allow(clippy::cast_possible_truncation)]
        let n = fds.len() as u32; // <= 8
        let mut set = sys::IrqSet {
            argsz: argsz::<vfio_bindings::bindings::vfio::vfio_irq_set>() + 4 * n,
            flags,
            index,
            start: 0,
            count: if flags & sys::VFIO_IRQ_SET_ACTION_UNMASK != 0 {
                1
            } else {
                n
            },
            data: [0; 8],
        };
        set.data[..fds.len()].copy_from_slice(fds);
        // SAFETY: SET_IRQS reads `argsz` bytes: the header and `count` (<= 8) eventfds.
        if unsafe { vmm_sys_util::ioctl::ioctl_with_ref(device, sys::VFIO_DEVICE_SET_IRQS(), &set) }
            < 0
        {
            return Err(errno("VFIO_DEVICE_SET_IRQS"));
        }
        Ok(())
    }
}

impl VfioPciDevice {
    fn irq_count(&self, index: u32) -> u32 {
        let mut info = sys::vfio_irq_info {
            argsz: argsz::<sys::vfio_irq_info>(),
            index,
            ..Default::default()
        };
        // SAFETY: GET_IRQ_INFO writes one `vfio_irq_info`.
        let rc = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(
                &*self.device,
                sys::VFIO_DEVICE_GET_IRQ_INFO(),
                &mut info,
            )
        };
        if rc < 0 {
            0
        } else {
            info.count
        }
    }

    /// Wires the interrupts: the first [`IrqPlan`] of [`IrqPlan::candidates`] that the function
    /// accepts (a device that refuses the config vector moves us on to the next, as Linux
    /// does). The eventfds stay the same for the device's life, also across `restart`.
    fn setup_irqs(&mut self) -> Result<(), DeviceError> {
        let msix = self.irq_count(sys::VFIO_PCI_MSIX_IRQ_INDEX);
        let mut last = None;
        for plan in IrqPlan::candidates(msix, self.queues, self.force_intx) {
            let r = match plan {
                IrqPlan::Intx => self.setup_intx(),
                _ => self.setup_msix(plan),
            };
            match r {
                Ok(()) => {
                    self.irqs = plan;
                    log::info!(
                        "vfio {}: {} of {msix} MSI-X vectors in use{}: {plan}",
                        self.bdf,
                        plan.vectors(),
                        if self.force_intx {
                            " (INTx forced)"
                        } else {
                            ""
                        }
                    );
                    return Ok(());
                }
                Err(e) => {
                    log::warn!("vfio {}: interrupts as {plan:?} failed: {e}", self.bdf);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| failed(format!("{}: no interrupt plan", self.bdf))))
    }

    fn eventfd() -> Result<EventFd, DeviceError> {
        EventFd::new(EFD_NONBLOCK).map_err(|e| DeviceError::io("eventfd", e))
    }

    fn dup(e: &EventFd) -> Result<EventFd, DeviceError> {
        e.try_clone().map_err(|e| DeviceError::io("dup eventfd", e))
    }

    /// MSI-X: the config eventfd on [`CONFIG_VECTOR`], the queues' after it (one each, or one
    /// shared), and `config_msix_vector` set (checked).
    fn setup_msix(&mut self, plan: IrqPlan) -> Result<(), DeviceError> {
        let calls: Vec<EventFd> = match plan {
            IrqPlan::PerQueue { queues } => (0..queues)
                .map(|_| Self::eventfd())
                .collect::<Result<_, _>>()?,
            _ => {
                let one = Self::eventfd()?;
                let mut calls = (1..self.queues)
                    .map(|_| Self::dup(&one))
                    .collect::<Result<Vec<_>, _>>()?;
                calls.insert(0, one);
                calls
            }
        };
        let mut fds = vec![self.config_irq.as_raw_fd()];
        match plan {
            IrqPlan::PerQueue { .. } => fds.extend(calls.iter().map(AsRawFd::as_raw_fd)),
            _ => fds.push(calls[0].as_raw_fd()),
        }
        self.set_irqs(sys::VFIO_PCI_MSIX_IRQ_INDEX, &fds)?;
        if let Err(e) = self.transport.set_config_msix_vector(plan.config_vector()) {
            let _ = self.set_irqs(sys::VFIO_PCI_MSIX_IRQ_INDEX, &[]);
            return Err(e);
        }
        self.calls = calls;
        Ok(())
    }

    /// INTx: one level-triggered line for everything. VFIO masks it when it fires; a thread
    /// reads the ISR (which deasserts the line), signals the queues' eventfds on a queue
    /// interrupt and the config eventfd on a configuration change, and unmasks.
    fn setup_intx(&mut self) -> Result<(), DeviceError> {
        if self.irq_count(sys::VFIO_PCI_INTX_IRQ_INDEX) == 0 {
            return Err(failed(format!("{}: neither MSI-X nor INTx", self.bdf)));
        }
        let calls: Vec<EventFd> = (0..self.queues)
            .map(|_| Self::eventfd())
            .collect::<Result<_, _>>()?;
        // No vector: with MSI-X disabled the device raises INTx and sets the ISR.
        let _ = self
            .transport
            .set_config_msix_vector(IrqPlan::Intx.config_vector());
        let cmd = self.config_read16(pci::PCI_COMMAND)?;
        self.config_write16(pci::PCI_COMMAND, cmd & !pci::PCI_COMMAND_INTX_DISABLE)?;
        let line = Self::eventfd()?;
        set_irqs_on(
            &self.device,
            sys::VFIO_PCI_INTX_IRQ_INDEX,
            sys::VFIO_IRQ_SET_DATA_EVENTFD | sys::VFIO_IRQ_SET_ACTION_TRIGGER,
            &[line.as_raw_fd()],
        )?;
        let stop = Self::eventfd()?;
        let transport = Arc::clone(&self.transport);
        let device = Arc::clone(&self.device);
        let targets = IntxTargets {
            calls: calls.iter().map(Self::dup).collect::<Result<_, _>>()?,
            config: Self::dup(&self.config_irq)?,
        };
        let stop2 = Self::dup(&stop)?;
        let thread = std::thread::Builder::new()
            .name(format!("vfio-intx-{}", self.bdf))
            .spawn(move || intx_loop(&device, &transport, &line, &stop2, &targets))
            .map_err(|e| DeviceError::io("spawn INTx thread", e))?;
        self.intx = Some(IntxForwarder {
            stop,
            thread: Some(thread),
        });
        self.calls = calls;
        Ok(())
    }

    /// The device request interrupt on an eventfd, when the function has one (vfio-pci always
    /// reports it). Without it the kernel still waits for us on unbind, but nothing tells us.
    fn setup_removal(&self) -> Option<EventFd> {
        if self.irq_count(sys::VFIO_PCI_REQ_IRQ_INDEX) == 0 {
            log::warn!(
                "vfio {}: no device request interrupt: an unbind will wait for the process to \
                 close the device unannounced",
                self.bdf
            );
            return None;
        }
        let wired = Self::eventfd().and_then(|fd| {
            self.set_irqs(sys::VFIO_PCI_REQ_IRQ_INDEX, &[fd.as_raw_fd()])
                .map(|()| fd)
        });
        match wired {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::warn!("vfio {}: device request interrupt: {e}", self.bdf);
                None
            }
        }
    }
}

impl VsockDevice for VfioPciDevice {
    fn name(&self) -> String {
        format!(
            "vfio:{}{}",
            self.bdf,
            if self.noiommu { ",noiommu" } else { "" }
        )
    }

    fn offered_features(&self) -> u64 {
        self.offered
    }

    fn negotiate(&mut self, features: u64) -> Result<u64, DeviceError> {
        // Our buffers are reached through VFIO's DMA translation (or physical addresses in
        // no-IOMMU mode): accept ACCESS_PLATFORM when offered.
        let features = features | (self.offered & (1 << VIRTIO_F_ACCESS_PLATFORM));
        if features & !self.offered != 0 {
            return Err(failed(format!(
                "driver accepted features {features:#x} beyond those offered {:#x}",
                self.offered
            )));
        }
        self.transport.write_features(features)?;
        Ok(features)
    }

    fn guest_cid(&self) -> Result<u64, DeviceError> {
        self.transport.guest_cid()
    }

    /// `num_queues` of the common configuration (at most 3: rx, tx, event).
    fn num_queues(&self) -> u16 {
        self.queues
    }

    fn max_queue_size(&self, index: u16) -> u16 {
        self.transport.queue_max_size(index)
    }

    fn dma_options(&self) -> DmaOptions {
        if self.noiommu || self.identity_iova {
            // Physical addresses: one huge page is physically contiguous by construction.
            DmaOptions {
                size: HUGE_PAGE_SIZE,
                iova: IovaBase::Physical,
                hugetlb: true,
                lock: true,
            }
        } else {
            DmaOptions {
                iova: IovaBase::Fixed(TYPE1_IOVA_BASE),
                ..DmaOptions::default()
            }
        }
    }

    fn map_dma(&mut self, dma: &DmaRegion) -> Result<(), DeviceError> {
        if self.noiommu {
            // Nothing to map; DmaRegion (IovaBase::Physical) checked every page in pagemap.
            if !dma.is_hugetlb() && dma.size() > 4096 {
                log::warn!(
                    "vfio {}: no-IOMMU DMA region is not on huge pages; it was physically \
                     contiguous when checked",
                    self.bdf
                );
            }
            log::info!(
                "vfio {}: no-IOMMU DMA region at physical {:#x}, {} bytes",
                self.bdf,
                dma.iova_base(),
                dma.size()
            );
            return Ok(());
        }
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
        // SAFETY: MAP_DMA reads one `vfio_iommu_type1_dma_map`; the range is our live mapping,
        // which the driver keeps alive until after `reset` (where we unmap it).
        if unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(&self.container, sys::VFIO_IOMMU_MAP_DMA(), &map)
        } < 0
        {
            return Err(errno("VFIO_IOMMU_MAP_DMA"));
        }
        self.dma_mapped = Some(want);
        Ok(())
    }

    fn setup_queue(&mut self, index: u16, layout: &QueueLayout) -> Result<(), DeviceError> {
        if index >= self.queues {
            return Err(DeviceError::NoSuchQueue {
                index,
                count: self.queues,
            });
        }
        let rings = QueueAddrs {
            desc: layout.desc_table.0,
            driver: layout.avail_ring.0,
            device: layout.used_ring.0,
        };
        let vector = self.irqs.queue_vector(index);
        let off = self
            .transport
            .setup_queue(index, layout.size, rings, vector)?;
        self.notify_off[usize::from(index)] = Some(off);
        Ok(())
    }

    fn activate(&mut self) -> Result<(), DeviceError> {
        // The event queue is optional (a driver that does not use it leaves it disabled).
        if self.notify_off[..2].iter().any(Option::is_none) {
            return Err(DeviceError::NotReady(
                "activate before the rx and tx queues were set up",
            ));
        }
        self.transport
            .set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)?;
        let s = self.transport.status();
        if s & NEEDS_RESET != 0 {
            return Err(failed(format!(
                "{}: device needs reset (status {s:#x})",
                self.bdf
            )));
        }
        self.started = true;
        Ok(())
    }

    fn kick(&self, index: u16) -> Result<(), DeviceError> {
        let off = self
            .notify_off
            .get(usize::from(index))
            .copied()
            .flatten()
            .ok_or(DeviceError::NotReady("kick of a queue that is not set up"))?;
        self.transport.notify(off, index);
        Ok(())
    }

    fn call_fd(&self, index: u16) -> Result<&EventFd, DeviceError> {
        self.calls
            .get(usize::from(index))
            .ok_or(DeviceError::NoSuchQueue {
                index,
                count: self.queues,
            })
    }

    fn config_fd(&self) -> Option<&EventFd> {
        Some(&self.config_irq)
    }

    fn status(&self) -> Result<Option<u8>, DeviceError> {
        Ok(Some(self.transport.status()))
    }

    /// Back to ACKNOWLEDGE | DRIVER with the offered features re-read (less the hidden ones)
    /// and the config vector written again (a reset clears it); the eventfds and the DMA
    /// mapping are those of before.
    fn restart(&mut self) -> Result<(), DeviceError> {
        self.started = false;
        self.notify_off = [None; 3];
        self.transport.begin_init()?;
        let nq = self.transport.num_queues().min(MAX_QUEUES);
        if nq != self.queues {
            return Err(failed(format!(
                "{}: num_queues changed from {} to {nq} across a reset",
                self.bdf, self.queues
            )));
        }
        self.offered = self.transport.device_features() & !self.hidden;
        if self.irqs != IrqPlan::Intx {
            self.transport
                .set_config_msix_vector(self.irqs.config_vector())?;
        }
        log::info!(
            "vfio {}: restarted, features {:#x} offered",
            self.bdf,
            self.offered
        );
        Ok(())
    }

    fn removal_fd(&self) -> Option<&EventFd> {
        self.removal.as_ref()
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        let r = self.transport.reset();
        self.started = false;
        self.notify_off = [None; 3];
        if let Some(m) = self.dma_mapped {
            match self.unmap_dma(m) {
                Ok(()) => self.dma_mapped = None,
                // Still mapped: a later map of the same region is then a no-op.
                Err(e) => log::warn!("vfio {}: {e}", self.bdf),
            }
        }
        r
    }
    fn details(&self) -> Vec<(&'static str, String)> {
        let caps = self.transport.caps();
        let cap = |c: &pci::VirtioCap| {
            format!("BAR{} offset {:#x}, {:#x} bytes", c.bar, c.offset, c.length)
        };
        let mut d = vec![
            (
                "pci",
                format!(
                    "{} ({:04x}:{:04x}, {})",
                    self.bdf,
                    pci::PCI_VENDOR_VIRTIO,
                    self.kind.device_id(),
                    self.kind
                ),
            ),
            (
                "iommu",
                if self.noiommu {
                    "noiommu (VFIO no-IOMMU: IOVAs are physical addresses, DMA unconfined)"
                        .to_string()
                } else if self.identity_iova {
                    "type1v2 (DMA region mapped at IOVA = its physical address)".to_string()
                } else {
                    format!("type1v2 (DMA region mapped at IOVA {TYPE1_IOVA_BASE:#x})")
                },
            ),
            ("common cfg", cap(&caps.common)),
            (
                "notify cfg",
                format!(
                    "{}, notify_off_multiplier {}",
                    cap(&caps.notify),
                    caps.notify_off_multiplier
                ),
            ),
            ("isr cfg", cap(&caps.isr)),
            ("device cfg", cap(&caps.device)),
            (
                "msi-x",
                match (caps.msix_vectors, self.irqs.vectors()) {
                    (None, _) => "none (INTx)".to_string(),
                    (Some(t), 0) => format!("{t} vectors in the table, INTx fallback in use"),
                    (Some(t), n) => format!("{t} vectors in the table, {n} in use"),
                },
            ),
            ("interrupts", self.irqs.to_string()),
            (
                "removal",
                if self.removal.is_some() {
                    "device request interrupt wired (unbind and unplug are signalled)"
                } else {
                    "not signalled (no device request interrupt)"
                }
                .to_string(),
            ),
            ("status", super::status_names(self.transport.status())),
        ];
        let nq = self.transport.num_queues();
        let sizes: Vec<String> = (0..nq.min(8))
            .map(|i| format!("{i}:{}", self.transport.queue_max_size(i)))
            .collect();
        d.push(("queues", format!("{nq} (max sizes {})", sizes.join(" "))));
        d.push((
            "event queue",
            if self.queues > EVENT_QUEUE {
                format!(
                    "queue {EVENT_QUEUE}, max size {}, {}",
                    self.transport.queue_max_size(EVENT_QUEUE),
                    match self.irqs.queue_vector(EVENT_QUEUE) {
                        Some(v) => format!("MSI-X vector {v}"),
                        None => "INTx".to_string(),
                    }
                )
            } else {
                format!("absent (num_queues {nq})")
            },
        ));
        d.push((
            "guest_cid",
            match self.transport.guest_cid() {
                Ok(c) => c.to_string(),
                Err(e) => format!("unreadable: {e}"),
            },
        ));
        d
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        // Reset first: the device must stop touching our memory before the DMA mapping goes.
        if let Err(e) = self.reset() {
            log::warn!("vfio {}: reset on close: {e}", self.bdf);
        }
        if self.irqs.vectors() > 0 {
            let _ = self.set_irqs(sys::VFIO_PCI_MSIX_IRQ_INDEX, &[]);
        }
        if self.removal.take().is_some() {
            let _ = self.set_irqs(sys::VFIO_PCI_REQ_IRQ_INDEX, &[]);
        }
        if self.intx.take().is_some() {
            let _ = self.set_irqs(sys::VFIO_PCI_INTX_IRQ_INDEX, &[]);
        }
        if let Ok(cmd) = self.config_read16(pci::PCI_COMMAND) {
            let _ = self.config_write16(pci::PCI_COMMAND, cmd & !pci::PCI_COMMAND_MASTER);
        }
    }
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

    #[test]
    fn interrupt_plans_follow_linux_vp_find_vqs() {
        use IrqPlan::{Intx, PerQueue, Shared};
        // Enough vectors for config + rx + tx + event: one each.
        assert_eq!(
            IrqPlan::candidates(4, 3, false),
            [PerQueue { queues: 3 }, Shared, Intx]
        );
        assert_eq!(
            IrqPlan::candidates(64, 3, false),
            [PerQueue { queues: 3 }, Shared, Intx]
        );
        // QEMU's vhost-user-vsock-pci: a 3-entry table for 3 queues + config: shared.
        assert_eq!(IrqPlan::candidates(3, 3, false), [Shared, Intx]);
        // Without an event queue 3 vectors are enough for one each.
        assert_eq!(
            IrqPlan::candidates(3, 2, false),
            [PerQueue { queues: 2 }, Shared, Intx]
        );
        // One vector cannot hold config and queues apart: INTx (Linux does the same).
        assert_eq!(IrqPlan::candidates(1, 3, false), [Intx]);
        assert_eq!(IrqPlan::candidates(0, 3, false), [Intx]);
        // Forced INTx ignores the table.
        assert_eq!(IrqPlan::candidates(64, 3, true), [Intx]);
    }

    #[test]
    fn vector_assignment_per_plan() {
        let per = IrqPlan::PerQueue { queues: 3 };
        assert_eq!(per.vectors(), 4);
        assert_eq!(per.config_vector(), 0);
        assert_eq!(
            (0..4).map(|q| per.queue_vector(q)).collect::<Vec<_>>(),
            [Some(1), Some(2), Some(3), None]
        );
        assert_eq!(
            per.to_string(),
            "config on vector 0, rx on 1, tx on 2, event on 3"
        );
        let two = IrqPlan::PerQueue { queues: 2 };
        assert_eq!(two.vectors(), 3);
        assert_eq!(two.queue_vector(2), None);
        let shared = IrqPlan::Shared;
        assert_eq!(shared.vectors(), 2);
        assert_eq!(shared.config_vector(), 0);
        assert!((0..3).all(|q| shared.queue_vector(q) == Some(1)));
        assert!(shared.to_string().contains("every queue on vector 1"));
        let intx = IrqPlan::Intx;
        assert_eq!(intx.vectors(), 0);
        assert_eq!(intx.config_vector(), VIRTIO_MSI_NO_VECTOR);
        assert!((0..3).all(|q| intx.queue_vector(q).is_none()));
    }

    /// Drains `e` and says whether it had been signalled.
    fn fired(e: &EventFd) -> bool {
        e.read().is_ok()
    }

    #[test]
    fn intx_honours_both_isr_bits() {
        let mk = || EventFd::new(EFD_NONBLOCK).unwrap();
        let calls = [mk(), mk(), mk()];
        let config = mk();
        // Bit 0: every queue (the ISR does not say which), not the config.
        dispatch_isr(ISR_QUEUE, &calls, &config);
        assert!(calls.iter().all(fired));
        assert!(!fired(&config));
        // Bit 1: the config only.
        dispatch_isr(ISR_CONFIG, &calls, &config);
        assert!(calls.iter().all(|c| !fired(c)));
        assert!(fired(&config));
        // Both at once; and a spurious 0 (shared line) signals nothing.
        dispatch_isr(ISR_QUEUE | ISR_CONFIG, &calls, &config);
        assert!(calls.iter().all(fired) && fired(&config));
        dispatch_isr(0, &calls, &config);
        assert!(calls.iter().all(|c| !fired(c)) && !fired(&config));
    }

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

    #[test]
    fn opening_a_missing_function_fails_cleanly() {
        let e = VfioPciDevice::open("ffff:ff:1f.7", false).unwrap_err();
        assert!(e.to_string().contains("no such PCI function"), "{e}");
    }
}
