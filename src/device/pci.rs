// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! PCI configuration space: the capability list and the virtio vendor capabilities
//! (virtio 1.2 section 4.1.4). Pure functions over a byte array, so they are testable without
//! hardware; the VFIO backend reads the real config space into such an array.

/// Config space offset of the command register.
pub const PCI_COMMAND: usize = 0x04;
/// Command register: memory space enable.
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master enable.
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// Command register: INTx disable.
pub const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;
const PCI_STATUS: usize = 0x06;
const PCI_STATUS_CAP_LIST: u16 = 1 << 4;
const PCI_CAPABILITY_LIST: usize = 0x34;
/// Capability ID of MSI-X.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;
/// Capability ID of vendor-specific capabilities (the virtio ones).
pub const PCI_CAP_ID_VNDR: u8 = 0x09;

/// virtio-pci capability types (`cfg_type`).
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// Notification structure.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// ISR status.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// Device-specific configuration.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

/// PCI vendor id of virtio devices.
pub const PCI_VENDOR_VIRTIO: u16 = 0x1af4;
/// PCI device id of a modern virtio-vsock function: 0x1040 + 19 (virtio 1.2 4.1.2.1).
pub const PCI_DEVICE_VSOCK_MODERN: u16 = 0x1053;
/// PCI device id of a transitional virtio-vsock function (QEMU's `PCI_DEVICE_ID_VIRTIO_VSOCK`;
/// the spec lists no legacy vsock, so such a function is driven through its modern interface).
pub const PCI_DEVICE_VSOCK_TRANSITIONAL: u16 = 0x1012;

/// The kind of virtio-vsock PCI function, from its ids (see [`vsock_function`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VsockFunction {
    /// 1af4:1053, modern only.
    Modern,
    /// 1af4:1012, transitional: usable through its modern interface (the virtio vendor
    /// capabilities) with VIRTIO_F_VERSION_1, as for any device; the legacy I/O BAR is not used.
    Transitional,
}

impl VsockFunction {
    /// Its PCI device id.
    pub fn device_id(self) -> u16 {
        match self {
            VsockFunction::Modern => PCI_DEVICE_VSOCK_MODERN,
            VsockFunction::Transitional => PCI_DEVICE_VSOCK_TRANSITIONAL,
        }
    }
}

impl std::fmt::Display for VsockFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VsockFunction::Modern => "modern virtio-vsock",
            VsockFunction::Transitional => {
                "transitional virtio-vsock (driven through its modern interface)"
            }
        })
    }
}

/// The one answer to "is this PCI function a virtio-vsock device?", used by `list`, `auto` and
/// the VFIO backend's open. Both ids are accepted: the driver needs the modern interface and
/// VIRTIO_F_VERSION_1, which opening the function checks ([`virtio_caps`] and feature
/// negotiation, each with its own error), whatever the device id.
pub fn vsock_function(vendor: u16, device: u16) -> Option<VsockFunction> {
    match (vendor, device) {
        (PCI_VENDOR_VIRTIO, PCI_DEVICE_VSOCK_MODERN) => Some(VsockFunction::Modern),
        (PCI_VENDOR_VIRTIO, PCI_DEVICE_VSOCK_TRANSITIONAL) => Some(VsockFunction::Transitional),
        _ => None,
    }
}

/// A PCI id as sysfs writes it (`0x1af4\n`).
pub fn parse_sysfs_id(s: &str) -> Option<u16> {
    let s = s.trim();
    u16::from_str_radix(s.strip_prefix("0x").unwrap_or(s), 16).ok()
}

/// [`vsock_function`] for the PCI function whose sysfs directory is `dir` (its `vendor` and
/// `device` files); `None` when they are missing or name another device.
pub fn sysfs_vsock_function(dir: &std::path::Path) -> Option<VsockFunction> {
    let id = |f: &str| parse_sysfs_id(&std::fs::read_to_string(dir.join(f)).ok()?);
    vsock_function(id("vendor")?, id("device")?)
}

/// Why a config space does not describe a usable virtio-pci device. No variant has a cause.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// A capability pointer leaves the config space or the list loops.
    #[error("malformed PCI capability list: {0}")]
    Malformed(String),
    /// A required virtio capability is absent.
    #[error("no virtio {0} capability: not a modern (virtio 1.x) virtio-pci device")]
    Missing(&'static str),
}

/// One virtio vendor capability: a window of `length` bytes at `offset` in BAR `bar`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCap {
    /// `cfg_type`.
    pub cfg_type: u8,
    /// BAR index (0-5).
    pub bar: u8,
    /// Offset within the BAR.
    pub offset: u32,
    /// Length of the structure.
    pub length: u32,
}

/// The virtio structures of a modern virtio-pci function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCaps {
    /// Common configuration.
    pub common: VirtioCap,
    /// Notifications.
    pub notify: VirtioCap,
    /// `notify_off_multiplier` of the notify capability.
    pub notify_off_multiplier: u32,
    /// ISR status.
    pub isr: VirtioCap,
    /// Device-specific configuration.
    pub device: VirtioCap,
    /// MSI-X table size (number of vectors), if the function has MSI-X.
    pub msix_vectors: Option<u16>,
}

fn rd8(cfg: &[u8], off: usize) -> Result<u8, PciError> {
    cfg.get(off)
        .copied()
        .ok_or_else(|| PciError::Malformed(format!("offset {off:#x} beyond config space")))
}

fn rd16(cfg: &[u8], off: usize) -> Result<u16, PciError> {
    Ok(u16::from_le_bytes([rd8(cfg, off)?, rd8(cfg, off + 1)?]))
}

fn rd32(cfg: &[u8], off: usize) -> Result<u32, PciError> {
    Ok(u32::from_le_bytes([
        rd8(cfg, off)?,
        rd8(cfg, off + 1)?,
        rd8(cfg, off + 2)?,
        rd8(cfg, off + 3)?,
    ]))
}

/// Every capability in the standard list as `(id, offset)`, in list order.
pub fn capabilities(cfg: &[u8]) -> Result<Vec<(u8, usize)>, PciError> {
    let mut caps = Vec::new();
    if rd16(cfg, PCI_STATUS)? & PCI_STATUS_CAP_LIST == 0 {
        return Ok(caps);
    }
    let mut ptr = usize::from(rd8(cfg, PCI_CAPABILITY_LIST)? & !3);
    // At most 48 capabilities fit in 192 bytes; more means a loop.
    while ptr != 0 {
        if ptr < 0x40 {
            return Err(PciError::Malformed(format!(
                "capability pointer {ptr:#x} points into the header"
            )));
        }
        if caps.len() >= 48 {
            return Err(PciError::Malformed("the capability list loops".into()));
        }
        caps.push((rd8(cfg, ptr)?, ptr));
        ptr = usize::from(rd8(cfg, ptr + 1)? & !3);
    }
    Ok(caps)
}

/// Finds the virtio structures; the first capability of each type wins (section 4.1.4.1:
/// the driver should use the first one it can).
pub fn virtio_caps(cfg: &[u8]) -> Result<VirtioCaps, PciError> {
    let (mut common, mut notify, mut isr, mut device) = (None, None, None, None);
    let mut mult = 0;
    let mut msix = None;
    for (id, off) in capabilities(cfg)? {
        match id {
            PCI_CAP_ID_MSIX => msix = Some((rd16(cfg, off + 2)? & 0x7ff) + 1),
            PCI_CAP_ID_VNDR => {
                let cap_len = rd8(cfg, off + 2)?;
                if cap_len < 16 {
                    return Err(PciError::Malformed(format!(
                        "virtio capability at {off:#x} is {cap_len} bytes, expected >= 16"
                    )));
                }
                let cap = VirtioCap {
                    cfg_type: rd8(cfg, off + 3)?,
                    bar: rd8(cfg, off + 4)?,
                    offset: rd32(cfg, off + 8)?,
                    length: rd32(cfg, off + 12)?,
                };
                if cap.bar > 5 {
                    continue; // reserved BAR values: skip (4.1.4)
                }
                let slot = match cap.cfg_type {
                    VIRTIO_PCI_CAP_COMMON_CFG => &mut common,
                    VIRTIO_PCI_CAP_NOTIFY_CFG => {
                        if notify.is_none() {
                            if cap_len < 20 {
                                return Err(PciError::Malformed(format!(
                                    "notify capability at {off:#x} lacks notify_off_multiplier"
                                )));
                            }
                            mult = rd32(cfg, off + 16)?;
                        }
                        &mut notify
                    }
                    VIRTIO_PCI_CAP_ISR_CFG => &mut isr,
                    VIRTIO_PCI_CAP_DEVICE_CFG => &mut device,
                    _ => continue,
                };
                slot.get_or_insert(cap);
            }
            _ => {}
        }
    }
    Ok(VirtioCaps {
        common: common.ok_or(PciError::Missing("common"))?,
        notify: notify.ok_or(PciError::Missing("notify"))?,
        notify_off_multiplier: mult,
        isr: isr.ok_or(PciError::Missing("ISR"))?,
        device: device.ok_or(PciError::Missing("device config"))?,
        msix_vectors: msix,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn vsock_function_accepts_both_vsock_ids_only() {
        use super::{parse_sysfs_id, vsock_function, VsockFunction};
        assert_eq!(vsock_function(0x1af4, 0x1053), Some(VsockFunction::Modern));
        assert_eq!(
            vsock_function(0x1af4, 0x1012),
            Some(VsockFunction::Transitional)
        );
        for (v, d) in [(0x1af4, 0x1041), (0x1af4, 0x1000), (0x8086, 0x1053), (0, 0)] {
            assert_eq!(vsock_function(v, d), None, "{v:04x}:{d:04x}");
        }
        assert_eq!(parse_sysfs_id("0x1af4\n"), Some(0x1af4));
        assert_eq!(parse_sysfs_id("1053"), Some(0x1053));
        assert_eq!(parse_sysfs_id("0x10000"), None);
        assert_eq!(parse_sysfs_id(""), None);
    }

    use super::*;

    /// A config space like QEMU's virtio-vsock-pci: MSI-X at 0x98, vendor caps from 0x84 down.
    fn qemu_like() -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[0..4].copy_from_slice(&[0xf4, 0x1a, 0x53, 0x10]);
        c[PCI_STATUS] = 1 << 4; // PCI_STATUS_CAP_LIST
        c[PCI_CAPABILITY_LIST] = 0x98;
        // MSI-X: 3 vectors, next 0x84.
        c[0x98..0x9c].copy_from_slice(&[PCI_CAP_ID_MSIX, 0x84, 2, 0]);
        let mut vcap = |at: usize, next: u8, len: u8, ty: u8, bar: u8, off: u32, l: u32| {
            c[at..at + 4].copy_from_slice(&[PCI_CAP_ID_VNDR, next, len, ty]);
            c[at + 4] = bar;
            c[at + 8..at + 12].copy_from_slice(&off.to_le_bytes());
            c[at + 12..at + 16].copy_from_slice(&l.to_le_bytes());
        };
        vcap(0x84, 0x70, 20, 2, 4, 0x3000, 0x1000); // notify
        vcap(0x70, 0x60, 16, 4, 4, 0x2000, 0x1000); // device
        vcap(0x60, 0x50, 16, 3, 4, 0x1000, 0x1000); // isr
        vcap(0x50, 0x40, 16, 1, 4, 0x0000, 0x1000); // common
        vcap(0x40, 0x00, 20, 5, 0, 0, 4); // pci cfg access: ignored
        c[0x84 + 16..0x84 + 20].copy_from_slice(&4u32.to_le_bytes());
        c
    }

    #[test]
    fn finds_every_virtio_structure() {
        let caps = virtio_caps(&qemu_like()).unwrap();
        assert_eq!(
            caps.common,
            VirtioCap {
                cfg_type: 1,
                bar: 4,
                offset: 0,
                length: 0x1000
            }
        );
        assert_eq!(caps.isr.offset, 0x1000);
        assert_eq!(caps.device.offset, 0x2000);
        assert_eq!(caps.notify.offset, 0x3000);
        assert_eq!(caps.notify_off_multiplier, 4);
        assert_eq!(caps.msix_vectors, Some(3));
        let ids: Vec<u8> = capabilities(&qemu_like())
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(ids, [0x11, 9, 9, 9, 9, 9]);
    }

    #[test]
    fn no_list_or_missing_caps_are_explained() {
        let mut c = qemu_like();
        c[PCI_STATUS] = 0;
        assert_eq!(capabilities(&c).unwrap(), []);
        assert_eq!(virtio_caps(&c), Err(PciError::Missing("common")));
        let mut c = qemu_like();
        c[0x60 + 1] = 0x40; // skip common
        assert_eq!(virtio_caps(&c), Err(PciError::Missing("common")));
    }

    #[test]
    fn loops_and_wild_pointers_are_malformed() {
        let mut c = qemu_like();
        c[0x40 + 1] = 0x98; // back to the start
        assert!(matches!(capabilities(&c), Err(PciError::Malformed(m)) if m.contains("loops")));
        let mut c = qemu_like();
        c[PCI_CAPABILITY_LIST] = 0x10;
        assert!(matches!(capabilities(&c), Err(PciError::Malformed(_))));
        let mut c = qemu_like();
        c.truncate(0x90); // MSI-X cap cut off
        assert!(matches!(capabilities(&c), Err(PciError::Malformed(_))));
        let mut c = qemu_like();
        c[0x84 + 2] = 16; // notify cap too short for its multiplier
        assert!(matches!(virtio_caps(&c), Err(PciError::Malformed(m)) if m.contains("multiplier")));
    }

    #[test]
    fn pointers_out_of_range_or_into_the_header_are_malformed() {
        // A next pointer past the end of a (short) config space.
        let mut c = qemu_like();
        c[0x98 + 1] = 0xf0;
        c.truncate(0xa0);
        let e = capabilities(&c).unwrap_err();
        assert!(
            matches!(&e, PciError::Malformed(m) if m.contains("0xf0")),
            "{e}"
        );
        // A next pointer into the standard header (below 0x40).
        let mut c = qemu_like();
        c[0x84 + 1] = 0x3c;
        let e = capabilities(&c).unwrap_err();
        assert!(
            matches!(&e, PciError::Malformed(m) if m.contains("into the header")),
            "{e}"
        );
        // A capability that points at itself.
        let mut c = qemu_like();
        c[0x70 + 1] = 0x70;
        assert!(matches!(capabilities(&c), Err(PciError::Malformed(m)) if m.contains("loops")));
        // The low two bits of a pointer are reserved: 0x87 means 0x84, not a misaligned read.
        let mut c = qemu_like();
        c[0x98 + 1] = 0x87;
        assert_eq!(virtio_caps(&c).unwrap(), virtio_caps(&qemu_like()).unwrap());
    }

    #[test]
    fn truncated_or_short_vendor_caps_are_malformed() {
        // A vendor capability at the very end of the config space: its offset and length
        // fields would lie beyond it.
        let mut c = qemu_like();
        c[0x40 + 1] = 0xf8;
        c[0xf8..0xfc].copy_from_slice(&[PCI_CAP_ID_VNDR, 0, 16, VIRTIO_PCI_CAP_DEVICE_CFG]);
        let e = virtio_caps(&c).unwrap_err();
        assert!(
            matches!(&e, PciError::Malformed(m) if m.contains("beyond config space")),
            "{e}"
        );
        // cap_len below the 16 bytes of struct virtio_pci_cap.
        let mut c = qemu_like();
        c[0x50 + 2] = 12;
        let e = virtio_caps(&c).unwrap_err();
        assert!(
            matches!(&e, PciError::Malformed(m) if m.contains("12 bytes, expected >= 16")),
            "{e}"
        );
    }

    #[test]
    fn reserved_bars_are_skipped_and_the_first_capability_of_a_type_wins() {
        // The common capability names BAR 6 (reserved): skipped, so none is left.
        let mut c = qemu_like();
        c[0x50 + 4] = 6;
        assert_eq!(virtio_caps(&c), Err(PciError::Missing("common")));
        // A second common capability later in the list does not replace the first.
        let mut c = qemu_like();
        c[0x40..0x44].copy_from_slice(&[PCI_CAP_ID_VNDR, 0, 16, VIRTIO_PCI_CAP_COMMON_CFG]);
        c[0x40 + 4] = 2;
        let caps = virtio_caps(&c).unwrap();
        assert_eq!((caps.common.bar, caps.common.offset), (4, 0));
    }

    #[test]
    fn arbitrary_config_spaces_never_panic() {
        // xorshift noise over the capability area of a valid header, with the list enabled.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for round in 0..20_000 {
            let len = [256, 0x41, 0x90, 0x100][round % 4];
            let mut c = qemu_like();
            for b in &mut c[0x34..] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x.to_le_bytes()[0];
            }
            c[PCI_STATUS] |= 1 << 4;
            c.truncate(len);
            let _ = virtio_caps(&c);
        }
    }
}
