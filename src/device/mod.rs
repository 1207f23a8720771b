// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Devices: the one small trait every backend implements, and the device spec strings.
//!
//! A backend is whatever sits behind the rings (virtio 1.2 section 5.10): a vhost-vdpa device
//! ([`vhost_vdpa`]), a virtio-pci function bound to VFIO ([`vfio_pci`]), or the kernel's
//! vhost-vsock ([`vhost_vsock`]). The device layer never interprets a vsock header; it only
//! negotiates, maps memory, wires queues and moves notifications. It imports nothing above it:
//! the in-process simulated device implements [`VsockDevice`] too, but lives one layer up (in
//! `vdpa_vsock::sim`, on the runtime), so [`DeviceSpec::open`] does not build it.
//!
//! Bring-up order, as the driver performs it:
//! 1. [`VsockDevice::offered_features`], then [`VsockDevice::negotiate`] (FEATURES_OK).
//! 2. [`VsockDevice::dma_options`] tells where the DMA region must live (its IOVA base); the driver
//!    creates it and calls [`VsockDevice::map_dma`].
//! 3. [`VsockDevice::setup_queue`] for queues 0 (rx), 1 (tx) and, when present, 2 (event).
//! 4. [`VsockDevice::activate`] (DRIVER_OK). Then [`VsockDevice::kick`] after adding buffers and
//!    wait on [`VsockDevice::call_fd`] for used buffers.
//! 5. [`VsockDevice::reset`] stops the device; the rings may then be reclaimed.
//!
//! While it runs:
//! - When [`VsockDevice::config_fd`] fires, the device's configuration changed: the driver reads
//!   [`VsockDevice::status`] (NEEDS_RESET: recover, below) and re-reads `guest_cid` (a new CID
//!   resets every connection, as the event queue's TRANSPORT_RESET does).
//! - Recovery, after NEEDS_RESET or a device that broke the rules: [`VsockDevice::reset`],
//!   [`VsockDevice::restart`], then steps 1-4 again on the same DMA region and rings. The
//!   descriptors a backend hands out ([`VsockDevice::call_fd`], [`VsockDevice::config_fd`],
//!   [`VsockDevice::removal_fd`]) stay the same across a restart: the event loop keeps waiting
//!   on the ones it was given at bring-up.
//! - Removal: [`VsockDevice::removal_fd`] fires, or [`VsockDevice::check_present`] fails; the
//!   driver ends every call and drops the device.

use std::fmt;
use std::str::FromStr;

use vmm_sys_util::eventfd::EventFd;

use crate::dma::{DmaOptions, DmaRegion};
use crate::virtq::QueueLayout;

pub mod pci;
pub mod vfio_pci;
pub mod vhost_vdpa;
pub mod vhost_vsock;
pub(crate) mod virtio_pci;

/// Queue index of the receive queue (device to driver).
pub const RX_QUEUE: u16 = 0;
/// Queue index of the transmit queue (driver to device).
pub const TX_QUEUE: u16 = 1;
/// Queue index of the event queue.
pub const EVENT_QUEUE: u16 = 2;

/// Errors of the device layer. Causes: the cause is the source (the crate docs, "Errors and
/// their causes"); [`DeviceError::Failed`] holds a cause turned into text.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device spec string could not be parsed.
    #[error("invalid device spec {spec:?}: {reason} (expected one of: sim, vhost-vdpa:/dev/vhost-vdpa-N, vfio:DDDD:BB:DD.F, vhost-vsock[:PATH],cid=N, auto)")]
    InvalidSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The device lacks a feature the driver needs.
    #[error(
        "device does not offer required feature {name} (bit {bit}); offered features {offered:#x}"
    )]
    MissingFeature {
        /// Feature name.
        name: &'static str,
        /// Feature bit.
        bit: u64,
        /// What the device offered.
        offered: u64,
    },
    /// A queue index the device does not have.
    #[error("queue {index} does not exist: the device has {count} queues")]
    NoSuchQueue {
        /// The index asked for.
        index: u16,
        /// How many queues the device has.
        count: u16,
    },
    /// A queue size the device cannot take.
    #[error("queue size {size} not accepted: expected a power of two up to {max}")]
    BadQueueSize {
        /// The size asked for.
        size: u16,
        /// The device's maximum.
        max: u16,
    },
    /// An operation in the wrong order (e.g. kick before activate).
    #[error("device not ready: {0}")]
    NotReady(&'static str),
    /// The device reported a failure or stopped working.
    #[error("device failed: {0}")]
    Failed(String),
    /// A system call failed.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed, with what to do about it.
    #[error("{op} failed: {hint}")]
    Hinted {
        /// What was being done.
        op: &'static str,
        /// The likely cause and its fix, in words.
        hint: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// More eventfds than a call can pass (VFIO's `vfio_irq_set` buffer): none was wired.
    #[error("{op}: {count} eventfds given, expected at most {max}")]
    TooManyEventfds {
        /// The call ("VFIO_DEVICE_SET_IRQS").
        op: &'static str,
        /// How many were given.
        count: usize,
        /// How many it takes.
        max: usize,
    },
    /// The DMA region could not be set up.
    #[error("DMA memory")]
    Dma(#[from] crate::dma::DmaError),
    /// The device went away while in use: its node was deleted, or the kernel asked for it
    /// back (VFIO unbind, hot-unplug).
    #[error("{device} was removed: {how}")]
    Removed {
        /// The device's name.
        device: String,
        /// How it went ("its node /dev/vhost-vdpa-0 is gone", "the kernel requested it back").
        how: String,
    },
    /// [`DeviceSpec::open`] was given `sim`: the simulated device sits above the device layer.
    #[error(
        "DeviceSpec::open opens vhost-vdpa, vfio and vhost-vsock devices, found `{spec}`: {how}"
    )]
    NotADeviceNode {
        /// The spec as given.
        spec: &'static str,
        /// How to open it instead.
        how: &'static str,
    },
}

impl DeviceError {
    /// Wrap an OS error with what was being done.
    pub fn io(op: &'static str, source: std::io::Error) -> Self {
        DeviceError::Io { op, source }
    }

    /// Wrap an OS error with what was being done and a hint on how to fix it.
    pub fn hinted(op: &'static str, hint: impl Into<String>, source: std::io::Error) -> Self {
        DeviceError::Hinted {
            op,
            hint: hint.into(),
            source,
        }
    }

    /// The OS error behind this one, if any (e.g. to match on `EADDRINUSE`).
    pub fn os_error(&self) -> Option<&std::io::Error> {
        match self {
            DeviceError::Io { source, .. } | DeviceError::Hinted { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The one small trait every backend implements. See the module docs for the call order.
pub trait VsockDevice: Send + fmt::Debug {
    /// A short human name ("sim", "vhost-vsock:/dev/vhost-vsock", ...).
    fn name(&self) -> String;

    /// The feature bits the device offers.
    fn offered_features(&self) -> u64;

    /// Accept `features` (a subset of the offered ones); returns what was negotiated.
    fn negotiate(&mut self, features: u64) -> Result<u64, DeviceError>;

    /// The driver's CID: the device config's `guest_cid` (or the CID given to vhost-vsock).
    fn guest_cid(&self) -> Result<u64, DeviceError>;

    /// Number of queues the driver sets up: 2 (rx, tx) or 3 (with the event queue).
    fn num_queues(&self) -> u16;

    /// Largest queue size the device accepts for queue `index`.
    fn max_queue_size(&self, index: u16) -> u16;

    /// Where the DMA region must live (IOVA base, size hints) for this backend.
    fn dma_options(&self) -> DmaOptions;

    /// Make the DMA region accessible to the device.
    fn map_dma(&mut self, dma: &DmaRegion) -> Result<(), DeviceError>;

    /// Tell the device where queue `index` lives (addresses are IOVAs) and its size.
    fn setup_queue(&mut self, index: u16, layout: &QueueLayout) -> Result<(), DeviceError>;

    /// Start the device (DRIVER_OK).
    fn activate(&mut self) -> Result<(), DeviceError>;

    /// Notify the device that queue `index` has new available buffers.
    fn kick(&self, index: u16) -> Result<(), DeviceError>;

    /// The eventfd the device signals when it has put used buffers on queue `index`.
    fn call_fd(&self, index: u16) -> Result<&EventFd, DeviceError>;

    /// Stop the device; afterwards it does not touch the rings or the DMA region.
    fn reset(&mut self) -> Result<(), DeviceError>;

    /// The eventfd the device signals when its configuration changed (the config interrupt,
    /// virtio 1.2 section 2.5.1): the driver then re-reads [`VsockDevice::guest_cid`]. `None`
    /// (the default) when the backend has no config interrupt.
    fn config_fd(&self) -> Option<&EventFd> {
        None
    }

    /// The device status byte now (virtio 1.2 section 2.1), which the driver reads on every
    /// config interrupt to see `NEEDS_RESET` while running. `Ok(None)` (the default) when the
    /// backend has no status register (vhost-vsock).
    fn status(&self) -> Result<Option<u8>, DeviceError> {
        Ok(None)
    }

    /// Take the device from reset back to where opening it left it (status ACKNOWLEDGE |
    /// DRIVER, features offered), so that the driver can bring it up again: `negotiate`,
    /// `map_dma` (the same region again: a backend whose mappings outlive `reset` treats it as
    /// done), `setup_queue` for every queue, `activate`. The driver calls it after
    /// [`VsockDevice::reset`] to recover from `NEEDS_RESET` or a device that broke the rules.
    /// The default says the backend cannot, and the driver then ends for good.
    fn restart(&mut self) -> Result<(), DeviceError> {
        Err(DeviceError::NotReady(
            "this backend cannot bring a device up again after a reset",
        ))
    }

    /// An eventfd the backend signals when the device is being taken away (VFIO's device
    /// request interrupt, on unbind or hot-unplug). When it fires the driver ends every call
    /// with [`DeviceError::Removed`] and drops the device, so the kernel can finish the removal.
    /// `None` (the default) when removal is not signalled.
    fn removal_fd(&self) -> Option<&EventFd> {
        None
    }

    /// Whether the driver must ask [`VsockDevice::check_present`] now and then (every
    /// `PRESENCE_CHECK_INTERVAL` of the driver, 250 ms) because a removal is not signalled:
    /// a vhost-vdpa node deleted by `vdpa dev del`. `false` by default.
    fn polls_presence(&self) -> bool {
        false
    }

    /// `Err(DeviceError::Removed)` once the device is gone (see
    /// [`VsockDevice::polls_presence`]). `Ok(())` by default.
    fn check_present(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    /// Backend-specific facts for `vdpa-vsock inspect`, as (name, value) pairs in display order:
    /// device id, status, IOVA range, PCI capabilities, MSI-X vectors, raw config, ...
    /// The default has none.
    fn details(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

/// Device status bits (virtio 1.2 section 2.1), as the `u8` the status register holds; values from
/// virtio-bindings.
#[allow(clippy::cast_possible_truncation)] // every VIRTIO_CONFIG_S_* value fits in the status byte
pub mod status {
    use virtio_bindings::virtio_config as c;
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
    /// The guest knows how to drive it.
    pub const DRIVER: u8 = c::VIRTIO_CONFIG_S_DRIVER as u8;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = c::VIRTIO_CONFIG_S_DRIVER_OK as u8;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = c::VIRTIO_CONFIG_S_FEATURES_OK as u8;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u8 = c::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
    /// Something went wrong in the driver.
    pub const FAILED: u8 = c::VIRTIO_CONFIG_S_FAILED as u8;
}

/// The names of the bits set in `bits`, lowest first, from `table` (bit number, name); a bit the
/// table does not know reads `bit N`.
pub fn bit_names(bits: u64, table: &[(u64, &str)]) -> Vec<String> {
    (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| {
            table
                .iter()
                .find(|(bit, _)| *bit == b)
                .map_or_else(|| format!("bit {b}"), |(_, n)| (*n).to_string())
        })
        .collect()
}

/// A device status byte with its bits named (virtio 1.2 section 2.1), for `inspect` and errors:
/// `0xf (ACKNOWLEDGE DRIVER FEATURES_OK DRIVER_OK)`.
pub fn status_names(status: u8) -> String {
    use virtio_bindings::virtio_config as c;
    const NAMES: &[(u32, &str)] = &[
        (c::VIRTIO_CONFIG_S_ACKNOWLEDGE, "ACKNOWLEDGE"),
        (c::VIRTIO_CONFIG_S_DRIVER, "DRIVER"),
        (c::VIRTIO_CONFIG_S_FEATURES_OK, "FEATURES_OK"),
        (c::VIRTIO_CONFIG_S_DRIVER_OK, "DRIVER_OK"),
        (c::VIRTIO_CONFIG_S_NEEDS_RESET, "NEEDS_RESET"),
        (c::VIRTIO_CONFIG_S_FAILED, "FAILED"),
    ];
    let mut names: Vec<&str> = NAMES
        .iter()
        .filter(|(bit, _)| u32::from(status) & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    let known = NAMES.iter().fold(0, |acc, (bit, _)| acc | bit);
    if u32::from(status) & !known != 0 {
        names.push("unknown bits");
    }
    if names.is_empty() {
        names.push("reset");
    }
    format!("{status:#x} ({})", names.join(" "))
}

/// Which device to drive: the parsed form of a `--device` string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The in-process simulated device (the default).
    #[default]
    Sim,
    /// A vDPA device through its vhost-vdpa character device.
    VhostVdpa {
        /// Path of the node, e.g. `/dev/vhost-vdpa-0`.
        path: String,
    },
    /// A virtio-pci function bound to vfio-pci.
    Vfio {
        /// PCI address `DDDD:BB:DD.F`.
        bdf: String,
        /// Use VFIO's unsafe no-IOMMU mode (explicit opt-in).
        noiommu: bool,
    },
    /// The kernel's vhost-vsock: our process is the guest with CID `cid`.
    VhostVsock {
        /// Path of the node (default `/dev/vhost-vsock`).
        path: String,
        /// Our CID.
        cid: u64,
    },
    /// The first usable device of any kind.
    Auto,
}

/// The first CID `auto` tries for vhost-vsock (then the next ones while they are in use).
pub const AUTO_FIRST_CID: u64 = 3;
/// How many CIDs `auto` tries for vhost-vsock.
pub const AUTO_CID_TRIES: u64 = 64;

/// What `auto` tries, in order: vhost-vdpa nodes, virtio-vsock functions bound to vfio-pci, then
/// vhost-vsock with CIDs from [`AUTO_FIRST_CID`]. Candidates whose node is absent are left out.
pub fn auto_candidates() -> Vec<DeviceSpec> {
    let mut out = Vec::new();
    let mut vdpa: Vec<String> = std::fs::read_dir("/dev")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("vhost-vdpa-"))
        .map(|n| format!("/dev/{n}"))
        .collect();
    vdpa.sort();
    out.extend(vdpa.into_iter().map(|path| DeviceSpec::VhostVdpa { path }));
    let mut vfio: Vec<String> = std::fs::read_dir("/sys/bus/pci/drivers/vfio-pci")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| valid_bdf(n))
        .filter(|n| {
            pci::sysfs_vsock_function(&std::path::Path::new("/sys/bus/pci/devices").join(n))
                .is_some()
        })
        .collect();
    vfio.sort();
    out.extend(vfio.into_iter().map(|bdf| DeviceSpec::Vfio {
        bdf,
        noiommu: false,
    }));
    if std::path::Path::new(VHOST_VSOCK_PATH).exists() {
        out.extend(
            (AUTO_FIRST_CID..AUTO_FIRST_CID + AUTO_CID_TRIES).map(|cid| DeviceSpec::VhostVsock {
                path: VHOST_VSOCK_PATH.into(),
                cid,
            }),
        );
    }
    out
}

/// Default node of the kernel's vhost-vsock.
pub const VHOST_VSOCK_PATH: &str = "/dev/vhost-vsock";

fn valid_bdf(s: &str) -> bool {
    // DDDD:BB:DD.F, hex digits, device <= 0x1f, function <= 7.
    let b = s.as_bytes();
    if b.len() != 12 || b[4] != b':' || b[7] != b':' || b[10] != b'.' {
        return false;
    }
    let hex = |r: std::ops::Range<usize>| s[r].chars().all(|c| c.is_ascii_hexdigit());
    hex(0..4)
        && hex(5..7)
        && hex(8..10)
        && u8::from_str_radix(&s[8..10], 16).is_ok_and(|d| d <= 0x1f)
        && matches!(b[11], b'0'..=b'7')
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    /// Parse `sim`, `vhost-vdpa:PATH`, `vfio:BDF[,noiommu]`, `vhost-vsock[:PATH],cid=N`, `auto`.
    ///
    /// ```
    /// use vdpa_vsock::device::DeviceSpec;
    /// assert_eq!("sim".parse::<DeviceSpec>().unwrap(), DeviceSpec::Sim);
    /// assert_eq!(
    ///     "vhost-vsock,cid=3".parse::<DeviceSpec>().unwrap(),
    ///     DeviceSpec::VhostVsock { path: "/dev/vhost-vsock".into(), cid: 3 }
    /// );
    /// assert!("vhost-vsock,cid=2".parse::<DeviceSpec>().is_err()); // 2 is the host
    /// assert!("vfio:03:00.0".parse::<DeviceSpec>().is_err()); // domain missing
    /// ```
    fn from_str(spec: &str) -> Result<Self, DeviceError> {
        let bad = |reason: &str| DeviceError::InvalidSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let (kind, rest) = match spec.split_once(':') {
            Some((k, r)) => (k, Some(r)),
            None => match spec.split_once(',') {
                Some((k, _)) => (k, None),
                None => (spec, None),
            },
        };
        match kind {
            "sim" if rest.is_none() && spec == "sim" => Ok(DeviceSpec::Sim),
            "auto" if spec == "auto" => Ok(DeviceSpec::Auto),
            "vhost-vdpa" => {
                let path = rest.unwrap_or("");
                if !path.starts_with('/') {
                    return Err(bad("expected an absolute path after vhost-vdpa:, e.g. vhost-vdpa:/dev/vhost-vdpa-0"));
                }
                Ok(DeviceSpec::VhostVdpa {
                    path: path.to_string(),
                })
            }
            "vfio" => {
                let rest = rest.unwrap_or("");
                let mut parts = rest.split(',');
                let bdf = parts.next().unwrap_or("").to_ascii_lowercase();
                if !valid_bdf(&bdf) {
                    return Err(bad(&format!(
                        "expected a PCI address DDDD:BB:DD.F after vfio:, found {bdf:?}"
                    )));
                }
                let mut noiommu = false;
                for opt in parts {
                    match opt {
                        "noiommu" => noiommu = true,
                        other => {
                            return Err(bad(&format!(
                                "unknown vfio option {other:?} (known: noiommu)"
                            )))
                        }
                    }
                }
                Ok(DeviceSpec::Vfio { bdf, noiommu })
            }
            "vhost-vsock" => {
                let body = spec.strip_prefix("vhost-vsock").unwrap_or("");
                let (path, opts) = match body.strip_prefix(':') {
                    Some(p) => match p.split_once(',') {
                        Some((path, opts)) => (path.to_string(), opts),
                        None => (p.to_string(), ""),
                    },
                    None => (
                        VHOST_VSOCK_PATH.to_string(),
                        body.strip_prefix(',').unwrap_or(body),
                    ),
                };
                if !path.starts_with('/') {
                    return Err(bad("expected an absolute path after vhost-vsock:"));
                }
                let mut cid = None;
                for opt in opts.split(',').filter(|o| !o.is_empty()) {
                    match opt.split_once('=') {
                        Some(("cid", v)) => {
                            let v: u64 = v
                                .parse()
                                .map_err(|_| bad(&format!("cid must be a number, found {v:?}")))?;
                            // 0 (hypervisor), 1 (local), 2 (host) and u32::MAX (any) are reserved.
                            if v <= 2 || v >= u64::from(u32::MAX) {
                                return Err(bad(&format!(
                                    "cid {v} is reserved: expected 3..{}",
                                    u32::MAX - 1
                                )));
                            }
                            cid = Some(v);
                        }
                        _ => {
                            return Err(bad(&format!(
                                "unknown vhost-vsock option {opt:?} (known: cid=N)"
                            )))
                        }
                    }
                }
                let cid = cid.ok_or_else(|| {
                    bad("vhost-vsock needs cid=N: the CID our process takes as the guest")
                })?;
                Ok(DeviceSpec::VhostVsock { path, cid })
            }
            _ => Err(bad("unknown device kind")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Sim => f.write_str("sim"),
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::VhostVdpa { path } => write!(f, "vhost-vdpa:{path}"),
            DeviceSpec::Vfio { bdf, noiommu } => {
                write!(f, "vfio:{bdf}{}", if *noiommu { ",noiommu" } else { "" })
            }
            DeviceSpec::VhostVsock { path, cid } => write!(f, "vhost-vsock:{path},cid={cid}"),
        }
    }
}

impl DeviceSpec {
    /// Open the device this spec names: a vhost-vdpa, vfio or vhost-vsock device. `sim` is an
    /// error ([`DeviceError::NotADeviceNode`]): open it with `VsockDriver::open` or
    /// `VsockDriver::open_sim`, or build a `vdpa_vsock::sim::SimDevice`.
    pub fn open(&self) -> Result<Box<dyn VsockDevice>, DeviceError> {
        match self {
            DeviceSpec::Sim => Err(DeviceError::NotADeviceNode {
                spec: "sim",
                how: "the simulated device lives above the device layer; open it with \
                      VsockDriver::open or VsockDriver::open_sim, or build a sim::SimDevice",
            }),
            DeviceSpec::VhostVdpa { path } => {
                Ok(Box::new(vhost_vdpa::VhostVdpaDevice::open(path)?))
            }
            DeviceSpec::Vfio { bdf, noiommu } => {
                Ok(Box::new(vfio_pci::VfioPciDevice::open(bdf, *noiommu)?))
            }
            DeviceSpec::VhostVsock { path, cid } => {
                Ok(Box::new(vhost_vsock::VhostVsockDevice::open(path, *cid)?))
            }
            DeviceSpec::Auto => Err(DeviceError::NotReady(
                "`auto` names several candidates: open it with VsockDriver::open, which tries each",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_decodes_bits() {
        assert_eq!(status_names(0), "0x0 (reset)");
        assert_eq!(
            status_names(0xf),
            "0xf (ACKNOWLEDGE DRIVER FEATURES_OK DRIVER_OK)"
        );
        assert_eq!(status_names(0x80 | 1), "0x81 (ACKNOWLEDGE FAILED)");
        assert_eq!(status_names(0x10), "0x10 (unknown bits)");
    }

    #[track_caller]
    fn ok(s: &str) -> DeviceSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[track_caller]
    fn err(s: &str, needle: &str) {
        let e = s.parse::<DeviceSpec>().unwrap_err().to_string();
        assert!(e.contains(needle), "{s}: {e:?} lacks {needle:?}");
    }

    #[test]
    fn parses_every_kind() {
        assert_eq!(ok("sim"), DeviceSpec::Sim);
        assert_eq!(ok("auto"), DeviceSpec::Auto);
        assert_eq!(
            ok("vhost-vdpa:/dev/vhost-vdpa-0"),
            DeviceSpec::VhostVdpa {
                path: "/dev/vhost-vdpa-0".into()
            }
        );
        assert_eq!(
            ok("vfio:0000:03:00.0"),
            DeviceSpec::Vfio {
                bdf: "0000:03:00.0".into(),
                noiommu: false
            }
        );
        assert_eq!(
            ok("vfio:0000:0A:1f.7,noiommu"),
            DeviceSpec::Vfio {
                bdf: "0000:0a:1f.7".into(),
                noiommu: true
            }
        );
        assert_eq!(
            ok("vhost-vsock:/tmp/vv,cid=42"),
            DeviceSpec::VhostVsock {
                path: "/tmp/vv".into(),
                cid: 42
            }
        );
        assert_eq!(
            ok("vhost-vsock,cid=3"),
            DeviceSpec::VhostVsock {
                path: VHOST_VSOCK_PATH.into(),
                cid: 3
            }
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "sim",
            "auto",
            "vhost-vdpa:/dev/vhost-vdpa-1",
            "vfio:0000:03:00.0,noiommu",
            "vhost-vsock:/dev/vhost-vsock,cid=7",
        ] {
            assert_eq!(ok(s).to_string(), s);
            assert_eq!(ok(&ok(s).to_string()), ok(s));
        }
    }

    #[test]
    fn rejects_bad_specs_with_reasons() {
        err("", "unknown device kind");
        err("simulator", "unknown device kind");
        err("sim:x", "unknown device kind");
        err("vhost-vdpa:", "absolute path");
        err("vhost-vdpa:dev/x", "absolute path");
        err("vfio:03:00.0", "DDDD:BB:DD.F");
        err("vfio:0000:03:20.0", "DDDD:BB:DD.F");
        err("vfio:0000:03:00.8", "DDDD:BB:DD.F");
        err("vfio:0000:03:00.0,iommu", "unknown vfio option");
        err("vhost-vsock", "needs cid=N");
        err("vhost-vsock,cid=x", "must be a number");
        for reserved in ["0", "1", "2", "4294967295"] {
            err(&format!("vhost-vsock,cid={reserved}"), "reserved");
        }
        err("vhost-vsock,port=3", "unknown vhost-vsock option");
    }

    #[test]
    fn every_backend_is_built() {
        // vfio is built: a function that does not exist fails with a reason, not "unbuilt".
        let e = ok("vfio:ffff:ff:1f.7").open().unwrap_err().to_string();
        assert!(e.contains("no such PCI function"), "{e}");
        // vhost-vdpa is built: a missing node is an open error naming the path.
        let e = ok("vhost-vdpa:/nonexistent/vhost-vdpa-9")
            .open()
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot open /nonexistent/vhost-vdpa-9"), "{e}");
    }

    #[test]
    fn vhost_vsock_is_built() {
        // A missing node fails with the OS error and the modprobe hint.
        let spec = ok("vhost-vsock:/nonexistent/vhost-vsock,cid=4");
        let e = spec.open().unwrap_err();
        assert!(matches!(e, DeviceError::Hinted { .. }), "{e:?}");
        assert!(e.to_string().contains("modprobe vhost_vsock"), "{e}");
    }

    #[test]
    fn sim_is_not_opened_by_the_device_layer() {
        // The simulated device sits above this layer: asking here names where to go instead.
        let e = DeviceSpec::Sim.open().unwrap_err();
        assert!(
            matches!(e, DeviceError::NotADeviceNode { spec: "sim", .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("VsockDriver::open_sim"), "{e}");
    }
}
