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
//! in `sys` with vmm-sys-util's macros, as `vfio-ioctls` does privately.
//!
//! Layout: `sys` (ioctl numbers and structures, one safe function per ioctl), `iommu`
//! (container, group, device fd, type1 DMA mappings, [`TYPE1_IOVA_BASE`]), `regions` (BARs,
//! region info, sparse mmap areas, the MMIO accesses), `irq` ([`IrqPlan`], MSI-X and INTx
//! wiring, the INTx forwarding thread, the device request interrupt); this file checks the
//! function, brings it up and implements [`VsockDevice`] over them.

mod iommu;
mod irq;
mod regions;
mod sys;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::iommu::DmaMapping;
pub use self::iommu::TYPE1_IOVA_BASE;
use self::irq::IntxForwarder;
pub use self::irq::IrqPlan;
use self::regions::{map_bars, region_info};
use super::pci;
use super::virtio_pci::{
    QueueAddrs, Transport, ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET,
};
use super::{DeviceError, VsockDevice, EVENT_QUEUE};
use crate::dma::{DmaOptions, DmaRegion, IovaBase, HUGE_PAGE_SIZE};
use crate::packet::VIRTIO_F_ACCESS_PLATFORM;
use crate::virtq::QueueLayout;

fn failed(msg: impl Into<String>) -> DeviceError {
    DeviceError::Failed(msg.into())
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
        let group_node = if noiommu {
            noiommu_node
        } else {
            format!("/dev/vfio/{group}")
        };
        let iommu::Attached {
            container,
            group: group_file,
            device,
        } = iommu::attach(bdf, &group, &group_node, noiommu)?;
        let device = Arc::new(device);

        let dinfo = sys::device_get_info(&device)
            .map_err(|e| DeviceError::io("VFIO_DEVICE_GET_INFO", e))?;
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
        self.map_type1(dma)
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
    fn opening_a_missing_function_fails_cleanly() {
        let e = VfioPciDevice::open("ffff:ff:1f.7", false).unwrap_err();
        assert!(e.to_string().contains("no such PCI function"), "{e}");
    }
}
