// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The modern virtio-pci transport (virtio 1.2 section 4.1.4; read 4.1.4.3 and 3.1.1 first):
//! the common configuration's state machine (reset, status, features, queues), notifications,
//! the ISR and the device configuration, over the BAR windows that the virtio vendor
//! capabilities name ([`super::pci`]).
//!
//! Register access goes through the small [`Regs`] trait, one per BAR: the VFIO backend
//! implements it over its mmap'd BAR areas, the tests below over a fake device. The device is
//! untrusted: [`Transport::new`] checks once that every window lies inside its BAR and is large
//! enough for the registers used; every access is checked against its window; queue sizes,
//! MSI-X vector answers and notify offsets are checked before they are used, and the
//! `config_generation` loop is bounded.
//!
//! Register offsets are those of `struct virtio_pci_common_cfg` (4.1.4.3): virtio-bindings 0.2
//! has no `virtio_pci` module, so they are spelled out in [`common`].

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pci::{VirtioCap, VirtioCaps};
use super::DeviceError;

pub(crate) use super::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FAILED, FEATURES_OK, NEEDS_RESET};

/// What a device answers for an MSI-X vector it cannot use (4.1.5.1.2).
pub(crate) const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// ISR status bit 0: a queue interrupt (4.1.4.5).
pub(crate) const ISR_QUEUE: u8 = 1;
/// ISR status bit 1: a configuration change (4.1.4.5).
pub(crate) const ISR_CONFIG: u8 = 2;

/// What `device_status` reads when nothing answers: a function that was unplugged (or whose
/// BAR no longer decodes) reads all ones. The value also has bits 4 and 5 set, which no
/// device sets (virtio 1.2 section 2.1), so it is never a real status.
pub(crate) const STATUS_ABSENT: u8 = 0xff;

/// How long a reset may take before the device is declared broken.
pub(crate) const RESET_TIMEOUT: Duration = Duration::from_secs(2);

/// How many times `guest_cid` is re-read while `config_generation` keeps changing.
pub(crate) const CONFIG_GENERATION_TRIES: usize = 100;

/// Offsets in `struct virtio_pci_common_cfg` (4.1.4.3).
pub(crate) mod common {
    pub(crate) const DEVICE_FEATURE_SELECT: u64 = 0;
    pub(crate) const DEVICE_FEATURE: u64 = 4;
    pub(crate) const DRIVER_FEATURE_SELECT: u64 = 8;
    pub(crate) const DRIVER_FEATURE: u64 = 12;
    pub(crate) const CONFIG_MSIX_VECTOR: u64 = 16;
    pub(crate) const NUM_QUEUES: u64 = 18;
    pub(crate) const DEVICE_STATUS: u64 = 20;
    pub(crate) const CONFIG_GENERATION: u64 = 21;
    pub(crate) const QUEUE_SELECT: u64 = 22;
    pub(crate) const QUEUE_SIZE: u64 = 24;
    pub(crate) const QUEUE_MSIX_VECTOR: u64 = 26;
    pub(crate) const QUEUE_ENABLE: u64 = 28;
    pub(crate) const QUEUE_NOTIFY_OFF: u64 = 30;
    pub(crate) const QUEUE_DESC: u64 = 32;
    pub(crate) const QUEUE_DRIVER: u64 = 40;
    pub(crate) const QUEUE_DEVICE: u64 = 48;
    /// Size of the structure up to and including `queue_device` (virtio 1.0 layout).
    pub(crate) const LEN: u32 = 56;
}

/// `guest_cid` is a le64 at offset 0 of the vsock device configuration (5.10.4).
const DEVICE_CFG_MIN_LEN: u32 = 8;
/// A notification is a 16-bit write (4.1.4.4).
const NOTIFY_WIDTH: u64 = 2;

/// Register access to one BAR; offsets are relative to the BAR's start.
pub(crate) trait Regs: Send + Sync + fmt::Debug {
    /// Reads `width` (1, 2 or 4) bytes at `off` (little-endian); `None` when
    /// `[off, off + width)` is not accessible or not aligned to `width`.
    fn read(&self, off: u64, width: usize) -> Option<u32>;
    /// Writes the low `width` (1, 2 or 4) bytes of `val` at `off`; `None` when not accessible.
    fn write(&self, off: u64, width: usize, val: u32) -> Option<()>;
}

fn failed(msg: impl Into<String>) -> DeviceError {
    DeviceError::Failed(msg.into())
}

/// The smallest length each virtio structure must have for the registers we use.
fn min_len(cfg_type: u8) -> u32 {
    match cfg_type {
        super::pci::VIRTIO_PCI_CAP_COMMON_CFG => common::LEN,
        super::pci::VIRTIO_PCI_CAP_NOTIFY_CFG => 2,
        super::pci::VIRTIO_PCI_CAP_ISR_CFG => 1,
        super::pci::VIRTIO_PCI_CAP_DEVICE_CFG => DEVICE_CFG_MIN_LEN,
        _ => 0,
    }
}

/// The human name of a virtio structure type.
pub(crate) fn cap_name(cfg_type: u8) -> &'static str {
    match cfg_type {
        super::pci::VIRTIO_PCI_CAP_COMMON_CFG => "common",
        super::pci::VIRTIO_PCI_CAP_NOTIFY_CFG => "notify",
        super::pci::VIRTIO_PCI_CAP_ISR_CFG => "ISR",
        super::pci::VIRTIO_PCI_CAP_DEVICE_CFG => "device config",
        _ => "unknown",
    }
}

/// Which mmap'able area of a BAR holds all of `cap`'s window: `(area offset, area length)`.
///
/// `bar_size` is the region's size, `mmap` whether VFIO lets the region be mmap'd at all,
/// `sparse` the sparse mmap areas if VFIO lists any (else the whole region is one area). The
/// window must lie inside the BAR and inside one area: the transport only touches registers
/// through mmap'd memory, never outside it.
pub(crate) fn mmap_area_for(
    cap: &VirtioCap,
    bar_size: u64,
    mmap: bool,
    sparse: Option<&[(u64, u64)]>,
) -> Result<(u64, u64), String> {
    let name = cap_name(cap.cfg_type);
    let start = u64::from(cap.offset);
    let end = start + u64::from(cap.length); // two u32s: no overflow in u64
    if cap.length < min_len(cap.cfg_type) {
        return Err(format!(
            "the {name} capability is {} bytes, expected at least {}",
            cap.length,
            min_len(cap.cfg_type)
        ));
    }
    if end > bar_size {
        return Err(format!(
            "the {name} capability [{start:#x}, {end:#x}) lies beyond BAR{} ({bar_size:#x} bytes)",
            cap.bar
        ));
    }
    if !mmap {
        return Err(format!(
            "BAR{} (holding the {name} capability) cannot be mmap'd (VFIO region without the \
             MMAP flag); this backend needs the virtio structures mmap'd",
            cap.bar
        ));
    }
    let whole = [(0, bar_size)];
    let areas = sparse.unwrap_or(&whole);
    areas
        .iter()
        .copied()
        .find(|&(off, len)| {
            off.checked_add(len)
                .is_some_and(|area_end| off <= start && end <= area_end && area_end <= bar_size)
        })
        .ok_or_else(|| {
            format!(
                "the {name} capability [{start:#x}, {end:#x}) of BAR{} is not inside one mmap'able \
                 area (sparse areas {areas:x?})",
                cap.bar
            )
        })
}

/// The modern virtio-pci transport of one function.
#[derive(Debug)]
pub(crate) struct Transport {
    /// For error messages: the PCI address.
    name: String,
    caps: VirtioCaps,
    bars: [Option<Arc<dyn Regs>>; 6],
    reset_timeout: Duration,
}

impl Transport {
    /// A transport over `bars` (indexed by BAR number). Every window in `caps` must have its BAR
    /// in `bars` and be large enough for the registers used.
    pub(crate) fn new(
        name: &str,
        caps: VirtioCaps,
        bars: [Option<Arc<dyn Regs>>; 6],
    ) -> Result<Self, DeviceError> {
        for cap in [caps.common, caps.notify, caps.isr, caps.device] {
            let what = cap_name(cap.cfg_type);
            if bars.get(usize::from(cap.bar)).is_none_or(Option::is_none) {
                return Err(failed(format!(
                    "{name}: BAR{} of the {what} capability is not mapped",
                    cap.bar
                )));
            }
            if cap.length < min_len(cap.cfg_type) {
                return Err(failed(format!(
                    "{name}: the {what} capability is {} bytes, expected at least {}",
                    cap.length,
                    min_len(cap.cfg_type)
                )));
            }
        }
        Ok(Transport {
            name: name.to_string(),
            caps,
            bars,
            reset_timeout: RESET_TIMEOUT,
        })
    }

    /// The virtio capabilities this transport uses.
    pub(crate) fn caps(&self) -> &VirtioCaps {
        &self.caps
    }

    #[cfg(test)]
    fn set_reset_timeout(&mut self, t: Duration) {
        self.reset_timeout = t;
    }

    /// Whether `[off, off + width)` lies inside `cap`'s window.
    fn in_window(cap: &VirtioCap, off: u64, width: usize) -> bool {
        off.checked_add(width as u64)
            .is_some_and(|end| end <= u64::from(cap.length))
    }

    fn bar(&self, cap: &VirtioCap) -> Option<&dyn Regs> {
        self.bars.get(usize::from(cap.bar))?.as_deref()
    }

    /// Reads a register of `width` bytes at `off` in `cap`'s window. Anything outside the window
    /// or not answered reads as all ones, as a read of an absent device does.
    fn cap_r(&self, cap: &VirtioCap, off: u64, width: usize) -> u32 {
        let ones = if width >= 4 {
            u32::MAX
        } else {
            (1 << (8 * width)) - 1
        };
        if !Self::in_window(cap, off, width) {
            return ones;
        }
        self.bar(cap)
            .and_then(|b| b.read(u64::from(cap.offset) + off, width))
            .unwrap_or(ones)
    }

    fn cap_w(&self, cap: &VirtioCap, off: u64, width: usize, v: u32) {
        let done = Self::in_window(cap, off, width)
            && self
                .bar(cap)
                .and_then(|b| b.write(u64::from(cap.offset) + off, width, v))
                .is_some();
        if !done {
            log::warn!(
                "{}: write of {width} bytes at {off:#x} in the {} structure failed",
                self.name,
                cap_name(cap.cfg_type)
            );
        }
    }

    fn common_r(&self, off: u64, width: usize) -> u32 {
        self.cap_r(&self.caps.common, off, width)
    }

    fn common_w(&self, off: u64, width: usize, v: u32) {
        self.cap_w(&self.caps.common, off, width, v);
    }

    fn common_w64(&self, off: u64, v: u64) {
        #[allow(clippy::cast_possible_truncation)] // the two halves, on purpose
        {
            self.common_w(off, 4, v as u32);
            self.common_w(off + 4, 4, (v >> 32) as u32);
        }
    }

    /// `device_status`.
    pub(crate) fn status(&self) -> u8 {
        #[allow(clippy::cast_possible_truncation)] // a 1-byte read
        let s = self.common_r(common::DEVICE_STATUS, 1) as u8;
        s
    }

    /// Writes `s` to `device_status` and checks that the device kept every bit of it and did
    /// not set FAILED.
    pub(crate) fn set_status(&self, s: u8) -> Result<(), DeviceError> {
        self.common_w(common::DEVICE_STATUS, 1, u32::from(s));
        let now = self.status();
        if now & FAILED != 0 || now & s != s {
            return Err(failed(format!(
                "{}: device status {} after writing {}",
                self.name,
                super::status_names(now),
                super::status_names(s)
            )));
        }
        Ok(())
    }

    /// Writes 0 to `device_status` and waits until it reads back 0 (4.1.4.3.2), at most the
    /// reset timeout. A status that reads all ones ([`STATUS_ABSENT`]) is a function that is
    /// gone: that is an error at once, not a wait (closing a device after a surprise removal
    /// must not take the whole timeout).
    pub(crate) fn reset(&self) -> Result<(), DeviceError> {
        self.common_w(common::DEVICE_STATUS, 1, 0);
        let start = Instant::now();
        loop {
            let s = self.status();
            if s == 0 {
                return Ok(());
            }
            if s == STATUS_ABSENT {
                return Err(failed(format!(
                    "{}: device_status reads {s:#x} (all ones) after the reset: the function \
                     does not answer (removed?)",
                    self.name
                )));
            }
            if start.elapsed() > self.reset_timeout {
                return Err(failed(format!(
                    "{}: device did not finish its reset within {:?} (status still {})",
                    self.name,
                    self.reset_timeout,
                    super::status_names(s)
                )));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Reset, then ACKNOWLEDGE and DRIVER (3.1.1 steps 1-3).
    pub(crate) fn begin_init(&self) -> Result<(), DeviceError> {
        self.reset()?;
        self.set_status(ACKNOWLEDGE)?;
        self.set_status(ACKNOWLEDGE | DRIVER)
    }

    /// The 64 feature bits the device offers (both halves of `device_feature`).
    pub(crate) fn device_features(&self) -> u64 {
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.common_w(common::DEVICE_FEATURE_SELECT, 4, sel);
            offered |= u64::from(self.common_r(common::DEVICE_FEATURE, 4)) << (32 * sel);
        }
        offered
    }

    /// Writes both halves of `driver_feature`, sets FEATURES_OK and re-reads it (3.1.1 steps
    /// 4-6). A device that clears FEATURES_OK does not support the subset: FAILED is set and an
    /// error says so.
    pub(crate) fn write_features(&self, features: u64) -> Result<(), DeviceError> {
        for sel in 0..2u32 {
            self.common_w(common::DRIVER_FEATURE_SELECT, 4, sel);
            #[allow(clippy::cast_possible_truncation)] // the selected half
            self.common_w(common::DRIVER_FEATURE, 4, (features >> (32 * sel)) as u32);
        }
        let want = ACKNOWLEDGE | DRIVER | FEATURES_OK;
        self.common_w(common::DEVICE_STATUS, 1, u32::from(want));
        let now = self.status();
        if now & want != want || now & FAILED != 0 {
            self.common_w(common::DEVICE_STATUS, 1, u32::from(now | FAILED));
            return Err(failed(format!(
                "{}: device did not accept features {features:#x}: status {} after setting \
                 FEATURES_OK; FAILED set",
                self.name,
                super::status_names(now)
            )));
        }
        Ok(())
    }

    /// `num_queues`.
    pub(crate) fn num_queues(&self) -> u16 {
        #[allow(clippy::cast_possible_truncation)] // a 2-byte read
        let n = self.common_r(common::NUM_QUEUES, 2) as u16;
        n
    }

    /// Routes configuration-change interrupts to `vector` (or none: [`VIRTIO_MSI_NO_VECTOR`]),
    /// and reads it back (4.1.5.1.2): a device that answers NO_VECTOR for a real vector could
    /// not allocate it, which is an error.
    pub(crate) fn set_config_msix_vector(&self, vector: u16) -> Result<(), DeviceError> {
        self.common_w(common::CONFIG_MSIX_VECTOR, 2, u32::from(vector));
        let got = self.common_r(common::CONFIG_MSIX_VECTOR, 2);
        if got != u32::from(vector) {
            return Err(failed(format!(
                "{}: config_msix_vector {vector:#x} refused (read back {got:#x}{})",
                self.name,
                if got == u32::from(VIRTIO_MSI_NO_VECTOR) {
                    ", NO_VECTOR: the device could not allocate it"
                } else {
                    ""
                }
            )));
        }
        Ok(())
    }

    fn queue_select(&self, index: u16) {
        self.common_w(common::QUEUE_SELECT, 2, u32::from(index));
    }

    /// The maximum size of queue `index` (0: the queue does not exist).
    pub(crate) fn queue_max_size(&self, index: u16) -> u16 {
        self.queue_select(index);
        #[allow(clippy::cast_possible_truncation)] // a 2-byte read
        let s = self.common_r(common::QUEUE_SIZE, 2) as u16;
        s
    }

    /// Sets up and enables queue `index` (4.1.5.1.3): size, the three ring addresses, the MSI-X
    /// vector (checked: a device that answers NO_VECTOR refused it), then `queue_enable`.
    /// Returns the queue's notify offset within the notify structure.
    pub(crate) fn setup_queue(
        &self,
        index: u16,
        size: u16,
        rings: QueueAddrs,
        msix_vector: Option<u16>,
    ) -> Result<u64, DeviceError> {
        let count = self.num_queues();
        if index >= count {
            return Err(DeviceError::NoSuchQueue { index, count });
        }
        let max = self.queue_max_size(index);
        if max == 0 {
            return Err(DeviceError::NoSuchQueue { index, count });
        }
        if size == 0 || !size.is_power_of_two() || size > max {
            return Err(DeviceError::BadQueueSize { size, max });
        }
        self.common_w(common::QUEUE_SIZE, 2, u32::from(size));
        self.common_w64(common::QUEUE_DESC, rings.desc);
        self.common_w64(common::QUEUE_DRIVER, rings.driver);
        self.common_w64(common::QUEUE_DEVICE, rings.device);
        if let Some(v) = msix_vector {
            self.common_w(common::QUEUE_MSIX_VECTOR, 2, u32::from(v));
            let got = self.common_r(common::QUEUE_MSIX_VECTOR, 2);
            if got != u32::from(v) {
                return Err(failed(format!(
                    "{}: queue {index} refused MSI-X vector {v} (read back {got:#x}{})",
                    self.name,
                    if got == u32::from(VIRTIO_MSI_NO_VECTOR) {
                        ", NO_VECTOR: the device could not allocate it"
                    } else {
                        ""
                    }
                )));
            }
        }
        let notify_off = self.common_r(common::QUEUE_NOTIFY_OFF, 2);
        let off = u64::from(notify_off) * u64::from(self.caps.notify_off_multiplier);
        if off + NOTIFY_WIDTH > u64::from(self.caps.notify.length) {
            return Err(failed(format!(
                "{}: queue {index} notify address {:#x} (queue_notify_off {notify_off} x \
                 notify_off_multiplier {}) is outside the notify structure [{:#x}, {:#x}) of BAR{}",
                self.name,
                u64::from(self.caps.notify.offset) + off,
                self.caps.notify_off_multiplier,
                self.caps.notify.offset,
                u64::from(self.caps.notify.offset) + u64::from(self.caps.notify.length),
                self.caps.notify.bar
            )));
        }
        self.common_w(common::QUEUE_ENABLE, 2, 1);
        Ok(off)
    }

    /// Notifies queue `index` at `off` (what [`Self::setup_queue`] returned).
    pub(crate) fn notify(&self, off: u64, index: u16) {
        self.cap_w(&self.caps.notify, off, 2, u32::from(index));
    }

    /// Reads (and so clears) the ISR status byte.
    pub(crate) fn read_isr(&self) -> u8 {
        #[allow(clippy::cast_possible_truncation)] // a 1-byte read
        let v = self.cap_r(&self.caps.isr, 0, 1) as u8;
        v
    }

    /// `guest_cid` from the device configuration, re-read while `config_generation` changes
    /// (4.1.4.3.1), at most [`CONFIG_GENERATION_TRIES`] times.
    pub(crate) fn guest_cid(&self) -> Result<u64, DeviceError> {
        for _ in 0..CONFIG_GENERATION_TRIES {
            let gen = self.common_r(common::CONFIG_GENERATION, 1);
            let lo = self.cap_r(&self.caps.device, 0, 4);
            let hi = self.cap_r(&self.caps.device, 4, 4);
            if gen == self.common_r(common::CONFIG_GENERATION, 1) {
                return Ok(u64::from(lo) | (u64::from(hi) << 32));
            }
        }
        Err(failed(format!(
            "{}: config_generation changed on each of {CONFIG_GENERATION_TRIES} reads of guest_cid",
            self.name
        )))
    }
}

/// The IOVAs of a split queue's three parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueAddrs {
    /// Descriptor table.
    pub(crate) desc: u64,
    /// Driver area (available ring).
    pub(crate) driver: u64,
    /// Device area (used ring).
    pub(crate) device: u64,
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::device::pci::{
        VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_PCI_CAP_ISR_CFG,
        VIRTIO_PCI_CAP_NOTIFY_CFG,
    };

    // The fake function's BAR 4: the four structures 4 KiB apart, as QEMU lays them out.
    const BAR: u8 = 4;
    const BAR_LEN: u64 = 0x4000;
    const ISR: u64 = 0x1000;
    const DEVICE: u64 = 0x2000;
    const NOTIFY: u64 = 0x3000;
    const MULT: u32 = 4;
    const CID: u64 = 0x1_0000_0003;

    #[derive(Debug, Default, Clone, Copy)]
    struct FakeQueue {
        max: u16,
        size: u16,
        msix: u16,
        enable: u16,
        notify_off: u16,
        desc: u64,
        driver: u64,
        device: u64,
    }

    /// The device side of the common configuration, ISR, device config and notify areas.
    #[derive(Debug, Default)]
    struct State {
        offered: u64,
        driver_features: u64,
        device_feature_select: u32,
        driver_feature_select: u32,
        status: u8,
        status_writes: Vec<u8>,
        /// Status reads a reset takes before status reads 0.
        reset_reads: usize,
        never_resets: bool,
        rejects_features: bool,
        queues: Vec<FakeQueue>,
        queue_select: u16,
        /// The device cannot allocate MSI-X vectors: it answers NO_VECTOR.
        no_vectors: bool,
        config_msix: u16,
        generation: u8,
        /// How many reads of `guest_cid` bump `config_generation` (a config change).
        generation_bumps: usize,
        device_cfg_reads: usize,
        isr: u8,
        notifies: Vec<(u64, u32)>,
        /// Accesses with the wrong width, misaligned, or outside every modelled register.
        bad: Vec<String>,
    }

    #[derive(Debug, Default)]
    struct Fake(Mutex<State>);

    fn width_of(off: u64) -> Option<usize> {
        Some(match off {
            0 | 4 | 8 | 12 | 32 | 36 | 40 | 44 | 48 | 52 => 4,
            16 | 18 | 22 | 24 | 26 | 28 | 30 => 2,
            20 | 21 => 1,
            _ => return None,
        })
    }

    fn half(v: u64, sel: u64) -> u32 {
        #[allow(clippy::cast_possible_truncation)]
        let h = (v >> (32 * sel)) as u32;
        h
    }

    fn set_half(v: &mut u64, sel: u64, h: u32) {
        *v = (*v & !(0xffff_ffff << (32 * sel))) | (u64::from(h) << (32 * sel));
    }

    impl State {
        fn queue(&mut self) -> Option<&mut FakeQueue> {
            self.queues.get_mut(usize::from(self.queue_select))
        }
    }

    #[allow(clippy::cast_possible_truncation)] // register widths
    impl Regs for Fake {
        fn read(&self, off: u64, width: usize) -> Option<u32> {
            let mut s = self.0.lock().unwrap();
            if off < ISR {
                if width_of(off) != Some(width) {
                    s.bad.push(format!("read {width} at common {off:#x}"));
                    return None;
                }
                return Some(match off {
                    0 => s.device_feature_select,
                    4 => match s.device_feature_select {
                        sel @ 0..=1 => half(s.offered, u64::from(sel)),
                        _ => 0,
                    },
                    8 => s.driver_feature_select,
                    12 => half(s.driver_features, u64::from(s.driver_feature_select.min(1))),
                    16 => u32::from(s.config_msix),
                    18 => s.queues.len() as u32,
                    20 => {
                        if s.status_writes.last() == Some(&0) && !s.never_resets {
                            if s.reset_reads == 0 {
                                s.status = 0;
                            } else {
                                s.reset_reads -= 1;
                            }
                        }
                        u32::from(s.status)
                    }
                    21 => u32::from(s.generation),
                    22 => u32::from(s.queue_select),
                    24..=54 => {
                        let Some(q) = s.queue().copied() else {
                            return Some(0);
                        };
                        match off {
                            24 => u32::from(q.size),
                            26 => u32::from(q.msix),
                            28 => u32::from(q.enable),
                            30 => u32::from(q.notify_off),
                            32 | 36 => half(q.desc, (off - 32) / 4),
                            40 | 44 => half(q.driver, (off - 40) / 4),
                            _ => half(q.device, (off - 48) / 4),
                        }
                    }
                    _ => unreachable!("width_of admits only the registers above"),
                });
            }
            match (off, width) {
                (ISR, 1) => {
                    let v = s.isr;
                    s.isr = 0; // reading clears it
                    Some(u32::from(v))
                }
                (o, 4) if o == DEVICE || o == DEVICE + 4 => {
                    s.device_cfg_reads += 1;
                    if o == DEVICE && s.generation_bumps > 0 {
                        s.generation_bumps -= 1;
                        s.generation = s.generation.wrapping_add(1);
                    }
                    Some(half(CID, (o - DEVICE) / 4))
                }
                _ => {
                    s.bad.push(format!("read {width} at {off:#x}"));
                    None
                }
            }
        }

        fn write(&self, off: u64, width: usize, val: u32) -> Option<()> {
            let mut s = self.0.lock().unwrap();
            if off < ISR {
                if width_of(off) != Some(width) || matches!(off, 4 | 18 | 21 | 30) {
                    s.bad.push(format!("write {width} at common {off:#x}"));
                    return None;
                }
                match off {
                    0 => s.device_feature_select = val,
                    8 => s.driver_feature_select = val,
                    12 => {
                        let sel = u64::from(s.driver_feature_select.min(1));
                        set_half(&mut s.driver_features, sel, val);
                    }
                    16 => {
                        s.config_msix = if s.no_vectors { 0xffff } else { val as u16 };
                    }
                    20 => {
                        let mut v = val as u8;
                        s.status_writes.push(v);
                        if v == 0 && (s.never_resets || s.reset_reads > 0) {
                            return Some(());
                        }
                        if v & FEATURES_OK != 0 && s.rejects_features {
                            v &= !FEATURES_OK;
                        }
                        s.status = v;
                    }
                    22 => s.queue_select = val as u16,
                    _ => {
                        let no_vectors = s.no_vectors;
                        let Some(q) = s.queue() else {
                            return Some(());
                        };
                        match off {
                            24 => q.size = val as u16,
                            26 => q.msix = if no_vectors { 0xffff } else { val as u16 },
                            28 => q.enable = val as u16,
                            32 | 36 => set_half(&mut q.desc, (off - 32) / 4, val),
                            40 | 44 => set_half(&mut q.driver, (off - 40) / 4, val),
                            _ => set_half(&mut q.device, (off - 48) / 4, val),
                        }
                    }
                }
                return Some(());
            }
            if (NOTIFY..NOTIFY + 0x1000).contains(&off) && width == 2 {
                s.notifies.push((off - NOTIFY, val));
                return Some(());
            }
            s.bad.push(format!("write {width} at {off:#x}"));
            None
        }
    }

    fn cap(cfg_type: u8, offset: u64, length: u32) -> VirtioCap {
        VirtioCap {
            cfg_type,
            bar: BAR,
            offset: u32::try_from(offset).unwrap(),
            length,
        }
    }

    fn caps() -> VirtioCaps {
        VirtioCaps {
            common: cap(VIRTIO_PCI_CAP_COMMON_CFG, 0, 0x1000),
            notify: cap(VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY, 0x1000),
            notify_off_multiplier: MULT,
            isr: cap(VIRTIO_PCI_CAP_ISR_CFG, ISR, 0x1000),
            device: cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE, 0x1000),
            msix_vectors: Some(3),
        }
    }

    /// A fake device with three queues of up to 256 entries (notify offsets 0, 1, 2) and a
    /// transport over it; `f` adjusts the device first.
    fn fake_with(caps: VirtioCaps, f: impl FnOnce(&mut State)) -> (Arc<Fake>, Transport) {
        let fake = Arc::new(Fake::default());
        {
            let mut s = fake.0.lock().unwrap();
            s.offered = (1 << 32) | (1 << 29) | 1;
            s.status = 0x0f;
            s.queues = (0..3)
                .map(|i| FakeQueue {
                    max: 256,
                    size: 256,
                    notify_off: i,
                    ..FakeQueue::default()
                })
                .collect();
            f(&mut s);
            for q in &mut s.queues {
                q.size = q.max;
            }
        }
        let mut bars: [Option<Arc<dyn Regs>>; 6] = Default::default();
        bars[usize::from(BAR)] = Some(fake.clone());
        let t = Transport::new("0000:00:04.0", caps, bars).unwrap();
        (fake, t)
    }

    fn fake(f: impl FnOnce(&mut State)) -> (Arc<Fake>, Transport) {
        fake_with(caps(), f)
    }

    /// Every access the transport made hit a modelled register with the right width.
    #[track_caller]
    fn assert_clean(fake: &Fake) {
        let s = fake.0.lock().unwrap();
        assert!(s.bad.is_empty(), "bad accesses: {:?}", s.bad);
    }

    fn err_text(r: Result<impl fmt::Debug, DeviceError>) -> String {
        r.expect_err("expected an error").to_string()
    }

    const RINGS: QueueAddrs = QueueAddrs {
        desc: 0x1_2345_6000,
        driver: 0x1_2345_7000,
        device: 0x2_0000_8000,
    };

    #[test]
    fn reset_waits_until_status_reads_zero() {
        let (fake, t) = fake(|s| s.reset_reads = 5);
        t.reset().unwrap();
        let s = fake.0.lock().unwrap();
        assert_eq!(s.status, 0);
        assert_eq!(s.reset_reads, 0, "returned before the device finished");
        drop(s);
        assert_clean(&fake);
    }

    #[test]
    fn a_device_that_never_resets_times_out_with_an_error() {
        let (fake, mut t) = fake(|s| s.never_resets = true);
        t.set_reset_timeout(Duration::from_millis(50));
        let start = Instant::now();
        let e = err_text(t.reset());
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(e.contains("did not finish its reset"), "{e}");
        assert!(
            e.contains("0xf (ACKNOWLEDGE DRIVER FEATURES_OK DRIVER_OK)"),
            "{e}"
        );
        assert_clean(&fake);
    }

    #[test]
    fn init_resets_then_acknowledges_then_driver() {
        let (fake, t) = fake(|_| {});
        t.begin_init().unwrap();
        let s = fake.0.lock().unwrap();
        assert_eq!(s.status_writes, [0, ACKNOWLEDGE, ACKNOWLEDGE | DRIVER]);
        assert_eq!(s.status, ACKNOWLEDGE | DRIVER);
        drop(s);
        assert_clean(&fake);
    }

    #[test]
    fn a_status_bit_the_device_drops_is_an_error() {
        let (fake, t) = fake(|s| s.rejects_features = true);
        let e = err_text(t.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK));
        assert!(e.contains("after writing 0xb"), "{e}");
        assert_clean(&fake);
    }

    #[test]
    fn features_are_read_and_written_in_both_halves() {
        let offered = (1 << 33) | (1 << 32) | (1 << 29) | 0b11;
        let (fake, t) = fake(|s| s.offered = offered);
        t.begin_init().unwrap();
        assert_eq!(t.device_features(), offered);
        let want = (1 << 33) | (1 << 32) | 1;
        t.write_features(want).unwrap();
        let s = fake.0.lock().unwrap();
        assert_eq!(s.driver_features, want, "high half lost?");
        assert_eq!(s.status, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        drop(s);
        assert_clean(&fake);
    }

    #[test]
    fn features_ok_cleared_by_the_device_sets_failed() {
        let (fake, t) = fake(|s| s.rejects_features = true);
        t.begin_init().unwrap();
        let e = err_text(t.write_features(1 << 32));
        assert!(e.contains("did not accept features 0x100000000"), "{e}");
        assert!(e.contains("FAILED set"), "{e}");
        let s = fake.0.lock().unwrap();
        assert_eq!(s.status & FAILED, FAILED, "driver must give up with FAILED");
        assert_eq!(s.status & FEATURES_OK, 0);
        drop(s);
        assert_clean(&fake);
    }

    #[test]
    fn queue_setup_writes_size_addresses_vector_and_enables() {
        let (fake, t) = fake(|_| {});
        assert_eq!(t.num_queues(), 3);
        assert_eq!(t.queue_max_size(1), 256);
        let off = t.setup_queue(1, 128, RINGS, Some(1)).unwrap();
        assert_eq!(off, u64::from(MULT), "queue_notify_off 1 x multiplier 4");
        let s = fake.0.lock().unwrap();
        let q = s.queues[1];
        assert_eq!(q.size, 128);
        assert_eq!(
            (q.desc, q.driver, q.device),
            (RINGS.desc, RINGS.driver, RINGS.device)
        );
        assert_eq!(q.msix, 1);
        assert_eq!(q.enable, 1);
        assert_eq!(s.queues[0].enable, 0, "only the selected queue");
        drop(s);
        t.notify(off, 1);
        assert_eq!(fake.0.lock().unwrap().notifies, [(4, 1)]);
        // Without MSI-X no vector is written.
        let off = t.setup_queue(0, 256, RINGS, None).unwrap();
        assert_eq!(off, 0);
        assert_eq!(fake.0.lock().unwrap().queues[0].msix, 0);
        assert_clean(&fake);
    }

    #[test]
    fn absent_queues_and_bad_sizes_are_refused() {
        let (fake, t) = fake(|s| s.queues[2].max = 0);
        assert!(matches!(
            t.setup_queue(2, 64, RINGS, None),
            Err(DeviceError::NoSuchQueue { index: 2, count: 3 })
        ));
        assert!(matches!(
            t.setup_queue(3, 64, RINGS, None),
            Err(DeviceError::NoSuchQueue { index: 3, count: 3 })
        ));
        for size in [0, 3, 100, 512] {
            assert!(
                matches!(
                    t.setup_queue(0, size, RINGS, None),
                    Err(DeviceError::BadQueueSize { max: 256, .. })
                ),
                "size {size}"
            );
        }
        let s = fake.0.lock().unwrap();
        assert!(s.queues.iter().all(|q| q.enable == 0 && q.desc == 0));
        drop(s);
        assert_clean(&fake);
    }

    #[test]
    fn a_refused_msix_vector_is_an_error() {
        let (fake, t) = fake(|s| s.no_vectors = true);
        let e = err_text(t.setup_queue(0, 64, RINGS, Some(0)));
        assert!(e.contains("refused MSI-X vector 0"), "{e}");
        assert!(e.contains("NO_VECTOR"), "{e}");
        assert_eq!(fake.0.lock().unwrap().queues[0].enable, 0);
        assert_clean(&fake);
    }

    #[test]
    fn a_notify_address_beyond_the_notify_structure_is_an_error() {
        // 0x3ff * 4 + 2 fits in 0x1000 bytes; 0x400 * 4 does not.
        let (fake, t) = fake(|s| {
            s.queues[0].notify_off = 0x3ff;
            s.queues[1].notify_off = 0x400;
        });
        assert_eq!(t.setup_queue(0, 64, RINGS, None).unwrap(), 0xffc);
        let e = err_text(t.setup_queue(1, 64, RINGS, None));
        assert!(e.contains("notify address 0x4000"), "{e}");
        assert!(
            e.contains("outside the notify structure [0x3000, 0x4000)"),
            "{e}"
        );
        assert_eq!(fake.0.lock().unwrap().queues[1].enable, 0);
        // A huge multiplier cannot overflow or wrap into range.
        let mut c = caps();
        c.notify_off_multiplier = u32::MAX;
        let (fake, t) = fake_with(c, |s| s.queues[0].notify_off = u16::MAX);
        let e = err_text(t.setup_queue(0, 64, RINGS, None));
        assert!(e.contains("outside the notify structure"), "{e}");
        assert_clean(&fake);
    }

    #[test]
    fn guest_cid_is_reread_until_config_generation_is_stable() {
        let (fake, t) = fake(|s| s.generation_bumps = 1);
        assert_eq!(t.guest_cid().unwrap(), CID);
        assert_eq!(fake.0.lock().unwrap().device_cfg_reads, 4, "one retry");
        assert_clean(&fake);
    }

    #[test]
    fn a_config_generation_that_never_settles_is_a_bounded_error() {
        let (fake, t) = fake(|s| s.generation_bumps = usize::MAX);
        let e = err_text(t.guest_cid());
        assert!(e.contains("config_generation changed"), "{e}");
        assert_eq!(
            fake.0.lock().unwrap().device_cfg_reads,
            2 * CONFIG_GENERATION_TRIES
        );
        assert_clean(&fake);
    }

    #[test]
    fn a_function_that_reads_all_ones_fails_its_reset_at_once() {
        // A surprise-removed function: every read is all ones, the reset never "finishes".
        let (fake, mut t) = fake(|s| {
            s.never_resets = true;
            s.status = STATUS_ABSENT;
        });
        t.set_reset_timeout(Duration::from_secs(30));
        let start = Instant::now();
        let e = err_text(t.reset());
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "waited {:?}",
            start.elapsed()
        );
        assert!(e.contains("0xff (all ones)"), "{e}");
        assert!(e.contains("does not answer"), "{e}");
        assert_clean(&fake);
    }

    #[test]
    fn the_config_vector_is_written_and_checked() {
        let (dev, t) = fake(|_| {});
        t.set_config_msix_vector(0).unwrap();
        assert_eq!(dev.0.lock().unwrap().config_msix, 0);
        t.set_config_msix_vector(VIRTIO_MSI_NO_VECTOR).unwrap();
        assert_eq!(dev.0.lock().unwrap().config_msix, VIRTIO_MSI_NO_VECTOR);
        assert_clean(&dev);
        // A device without vectors to spare answers NO_VECTOR: refused, with the reason.
        let (dev, t) = fake(|s| s.no_vectors = true);
        let e = err_text(t.set_config_msix_vector(0));
        assert!(e.contains("config_msix_vector 0x0 refused"), "{e}");
        assert!(e.contains("NO_VECTOR"), "{e}");
        // Asking for none is always accepted.
        t.set_config_msix_vector(VIRTIO_MSI_NO_VECTOR).unwrap();
        assert_clean(&dev);
    }

    #[test]
    fn isr_read_clears_it() {
        let (fake, t) = fake(|s| s.isr = 3);
        assert_eq!(t.read_isr(), 3);
        assert_eq!(t.read_isr(), 0);
        assert_clean(&fake);
    }

    #[test]
    fn accesses_beyond_a_window_never_reach_the_bar() {
        // A device config window of exactly 8 bytes: reads past it are all ones, not BAR reads.
        let mut c = caps();
        c.device.length = 8;
        let (fake, t) = fake_with(c, |_| {});
        assert_eq!(t.cap_r(&c.device, 8, 4), u32::MAX);
        assert_eq!(t.cap_r(&c.device, 7, 2), 0xffff);
        assert_eq!(t.cap_r(&c.device, u64::from(u32::MAX), 1), 0xff);
        assert_eq!(t.cap_r(&c.device, u64::MAX, 4), u32::MAX);
        t.cap_w(&c.device, u64::MAX - 1, 2, 0);
        t.cap_w(&c.notify, 0x1000, 2, 0);
        let s = fake.0.lock().unwrap();
        assert_eq!(s.device_cfg_reads, 0);
        assert!(s.notifies.is_empty());
        drop(s);
        assert_clean(&fake);
    }

    #[test]
    fn windows_too_small_or_on_unmapped_bars_are_refused() {
        let bars = || {
            let mut b: [Option<Arc<dyn Regs>>; 6] = Default::default();
            b[usize::from(BAR)] = Some(Arc::new(Fake::default()));
            b
        };
        let mut c = caps();
        c.common.length = 52; // no room for queue_device
        let e = err_text(Transport::new("x", c, bars()));
        assert!(
            e.contains("common capability is 52 bytes, expected at least 56"),
            "{e}"
        );
        let mut c = caps();
        c.device.length = 4; // half a guest_cid
        let e = err_text(Transport::new("x", c, bars()));
        assert!(e.contains("device config capability is 4 bytes"), "{e}");
        let mut c = caps();
        c.isr.bar = 2;
        let e = err_text(Transport::new("x", c, bars()));
        assert!(
            e.contains("BAR2 of the ISR capability is not mapped"),
            "{e}"
        );
    }

    #[test]
    fn a_window_must_lie_in_its_bar_and_one_mmap_area() {
        let common = cap(VIRTIO_PCI_CAP_COMMON_CFG, 0x1000, 0x1000);
        assert_eq!(
            mmap_area_for(&common, BAR_LEN, true, None),
            Ok((0, BAR_LEN))
        );
        let areas = [(0, 0x1000), (0x1000, 0x1000), (0x3000, 0x1000)];
        assert_eq!(
            mmap_area_for(&common, BAR_LEN, true, Some(&areas)),
            Ok((0x1000, 0x1000))
        );
        // Beyond the BAR, including offsets near u32::MAX (no overflow).
        let e = mmap_area_for(
            &cap(VIRTIO_PCI_CAP_COMMON_CFG, 0x3800, 0x1000),
            BAR_LEN,
            true,
            None,
        )
        .unwrap_err();
        assert!(
            e.contains("[0x3800, 0x4800) lies beyond BAR4 (0x4000 bytes)"),
            "{e}"
        );
        let huge = VirtioCap {
            cfg_type: VIRTIO_PCI_CAP_NOTIFY_CFG,
            bar: 0,
            offset: u32::MAX,
            length: u32::MAX,
        };
        assert!(mmap_area_for(&huge, u64::MAX, true, None).is_ok_and(|a| a == (0, u64::MAX)));
        assert!(mmap_area_for(&huge, BAR_LEN, true, None)
            .unwrap_err()
            .contains("beyond BAR0"));
        // Too short for its registers.
        let e = mmap_area_for(
            &cap(VIRTIO_PCI_CAP_COMMON_CFG, 0, 0x20),
            BAR_LEN,
            true,
            None,
        )
        .unwrap_err();
        assert!(e.contains("is 32 bytes, expected at least 56"), "{e}");
        // Not mmap'able at all.
        let e = mmap_area_for(&common, BAR_LEN, false, None).unwrap_err();
        assert!(e.contains("without the MMAP flag"), "{e}");
        // Sparse areas that leave the window out, or split it, or lie (overflowing) about it.
        for areas in [
            vec![(0, 0x1000), (0x2000, 0x2000)],
            vec![(0x800, 0x1000), (0x1800, 0x1000)],
            vec![(0x1000, u64::MAX)],
            vec![(0x1000, 0x8000)], // beyond the BAR
            vec![],
        ] {
            let e = mmap_area_for(&common, BAR_LEN, true, Some(&areas)).unwrap_err();
            assert!(
                e.contains("is not inside one mmap'able area"),
                "{areas:x?}: {e}"
            );
        }
    }
}
