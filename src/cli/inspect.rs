//! `vdpa-vsock inspect DEVICE`: what a device offers and what the driver would negotiate.
//!
//! The device is probed as the driver does it: features offered and negotiated (decoded by name),
//! `guest_cid`, queues and their sizes, and the backend's own details (device id, status, IOVA
//! range, PCI capabilities, MSI-X). Then the device is reset and the real driver is brought up on
//! it, so `inspect` also proves the device works. For hardware specs, what sysfs says comes first.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use vdpa_vsock::device::{DeviceError, DeviceSpec, VsockDevice, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use vdpa_vsock::driver::{wanted_features, DriverConfig, DriverStats, VsockDriver};
use vdpa_vsock::packet::{
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_VSOCK_F_NO_IMPLIED_STREAM, VIRTIO_VSOCK_F_SEQPACKET, VIRTIO_VSOCK_F_STREAM,
};
use vdpa_vsock::sim::{SimConfig, SimDevice};
use virtio_bindings::{virtio_config as vc, virtio_ring as vr};

use super::list::{self, Candidate};
use super::{preflight, Roots};

/// Options of `vdpa-vsock inspect`.
#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// Device spec: sim, vhost-vdpa:PATH, vfio:BDF, vhost-vsock[:PATH],cid=N.
    device: DeviceSpec,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Feature bits by name: the vsock ones and the transport ones a vsock device may offer.
const FEATURES: &[(u64, &str)] = &[
    (VIRTIO_VSOCK_F_STREAM, "STREAM"),
    (VIRTIO_VSOCK_F_SEQPACKET, "SEQPACKET"),
    (VIRTIO_VSOCK_F_NO_IMPLIED_STREAM, "NO_IMPLIED_STREAM"),
    (vr::VIRTIO_RING_F_INDIRECT_DESC as u64, "INDIRECT_DESC"),
    (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
    (VIRTIO_F_VERSION_1, "VERSION_1"),
    (VIRTIO_F_ACCESS_PLATFORM, "ACCESS_PLATFORM"),
    (vc::VIRTIO_F_RING_PACKED as u64, "RING_PACKED"),
    (vc::VIRTIO_F_IN_ORDER as u64, "IN_ORDER"),
    (vc::VIRTIO_F_ORDER_PLATFORM as u64, "ORDER_PLATFORM"),
    (vc::VIRTIO_F_SR_IOV as u64, "SR_IOV"),
    (vc::VIRTIO_F_NOTIFICATION_DATA as u64, "NOTIFICATION_DATA"),
    (vc::VIRTIO_F_NOTIFY_ON_EMPTY as u64, "NOTIFY_ON_EMPTY"),
    (vc::VIRTIO_F_ANY_LAYOUT as u64, "ANY_LAYOUT"),
    (vc::VIRTIO_F_NOTIF_CONFIG_DATA as u64, "NOTIF_CONFIG_DATA"),
    (vc::VIRTIO_F_RING_RESET as u64, "RING_RESET"),
    (vc::VIRTIO_F_ADMIN_VQ as u64, "ADMIN_VQ"),
];

/// The names of the feature bits set in `bits`; unknown bits as `bit N`.
pub(crate) fn feature_names(bits: u64) -> Vec<String> {
    vdpa_vsock::device::bit_names(bits, FEATURES)
}

fn features_json(bits: u64) -> Value {
    json!({ "bits": format!("{bits:#x}"), "names": feature_names(bits) })
}

/// Probe `dev` as the driver would (features, `guest_cid`, queues, the backend's details), reset
/// it, then bring the real driver up on `spec` to prove the device works.
fn inspect_device(
    spec: &DeviceSpec,
    mut dev: Box<dyn VsockDevice>,
    sysfs: Option<&Candidate>,
    json_out: bool,
) -> Result<()> {
    let offered = dev.offered_features();
    // The driver's own choice; the backend adds ACCESS_PLATFORM when offered.
    let want = wanted_features(offered);
    let negotiated = dev.negotiate(want);
    let cid = dev.guest_cid();
    let nq = dev.num_queues();
    let driver_q = DriverConfig::default().queue_size;
    let queues: Vec<Value> = [(RX_QUEUE, "rx"), (TX_QUEUE, "tx"), (EVENT_QUEUE, "event")]
        .iter()
        .filter(|(i, _)| *i < nq)
        .map(|(i, name)| {
            let max = dev.max_queue_size(*i);
            // The event queue holds the driver's few event buffers, not a data ring.
            let want = if *i == EVENT_QUEUE {
                vdpa_vsock::driver::EVENT_BUFFERS
            } else {
                driver_q
            };
            json!({ "index": i, "name": name, "max_size": max, "driver_size": want.min(max) })
        })
        .collect();
    let details = dev.details();
    let name = dev.name();
    // Give the device back before the driver opens it again (one owner per vhost/VFIO device).
    if let Err(e) = dev.reset() {
        log::warn!("resetting {name} after probing: {e}");
    }
    drop(dev);
    let up = VsockDriver::open_with(spec, driver_config(spec)).map(|d| (d.local_cid(), d.stats()));
    // Printing stops at a closed stdout, but the device's own failures still decide the exit.
    let printed = (|| -> Result<()> {
        if json_out {
            let mut v = json!({
                "device": spec.to_string(),
                "name": name,
                "offered": features_json(offered),
                "negotiated": negotiated.as_ref().map_or_else(|e| json!({ "error": e.to_string() }), |n| features_json(*n)),
                "guest_cid": cid.as_ref().map_or_else(|e| json!({ "error": e.to_string() }), |c| json!(c)),
                "num_queues": nq,
                "queues": queues,
                "details": details.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                "driver_up": up.is_ok(),
            });
            if let Some(c) = sysfs {
                v["sysfs"] = c.to_json();
            }
            match &up {
                Ok((_, s)) => v["driver_stats"] = stats_json(s),
                Err(e) => v["driver_error"] = json!(format!("{e:#}")),
            }
            outln!("{}", serde_json::to_string_pretty(&v)?)?;
        } else {
            outln!("device:      {spec} ({name})")?;
            if let Some(c) = sysfs {
                c.print()?;
            }
            outln!(
                "offered:     {offered:#x} {}",
                feature_names(offered).join(" ")
            )?;
            match &negotiated {
                Ok(n) => outln!("negotiated:  {n:#x} {}", feature_names(*n).join(" "))?,
                Err(e) => outln!("negotiated:  failed: {e}")?,
            }
            match &cid {
                Ok(c) => outln!("guest_cid:   {c}")?,
                Err(e) => outln!("guest_cid:   unreadable: {e}")?,
            }
            outln!("queues:      {nq}")?;
            for q in &queues {
                outln!(
                    "  {:<6} max size {}, driver uses {}",
                    q["name"].as_str().unwrap_or("?"),
                    q["max_size"],
                    q["driver_size"]
                )?;
            }
            for (k, v) in &details {
                outln!("{:<12} {v}", format!("{k}:"))?;
            }
            outln!(
                "driver:      {}",
                match &up {
                    Ok((c, _)) => format!("brought up, local CID {c}"),
                    Err(e) => format!("failed: {e}"),
                }
            )?;
            if let Ok((_, s)) = &up {
                outln!(
                    "pools:       RX {} buffers ({} on the ring), TX {} chunks of 64 KiB",
                    s.rx_buffers,
                    s.rx_buffers_on_ring,
                    s.tx_chunks
                )?;
            }
        }
        Ok(())
    })();
    negotiated.with_context(|| format!("negotiating features with {spec}"))?;
    cid.with_context(|| format!("reading guest_cid of {spec}"))?;
    up.with_context(|| format!("bringing the driver up on {spec}"))?;
    printed
}

/// The driver's counters as JSON (field names as in `DriverStats`).
pub(crate) fn stats_json(s: &DriverStats) -> Value {
    json!({
        "bad_rx_packets": s.bad_rx_packets,
        "rx_packets": s.rx_packets,
        "tx_packets": s.tx_packets,
        "kicks": s.kicks,
        "interrupts": s.interrupts,
        "caller_interrupts": s.caller_interrupts,
        "tx_payload_bytes_copied": s.tx_payload_bytes_copied,
        "rx_payload_bytes_copied": s.rx_payload_bytes_copied,
        "rx_payload_bytes_copied_out": s.rx_payload_bytes_copied_out,
        "rx_buffers": s.rx_buffers,
        "rx_buffers_on_ring": s.rx_buffers_on_ring,
        "rx_buffers_held": s.rx_buffers_held,
        "tx_chunks": s.tx_chunks,
        "tx_chunks_in_use": s.tx_chunks_in_use,
        "transport_resets": s.transport_resets,
        "bad_events": s.bad_events,
        "recoveries": s.recoveries,
        "connections": s.connections,
    })
}

/// The driver settings `inspect` brings the driver up with: the defaults, except for VFIO in
/// no-IOMMU mode, whose DMA region must be physically contiguous: there the rings and buffers
/// must fit one 2 MiB huge page (128-entry queues, 4 KiB payloads plus the 44-byte header: about 1.2 MiB).
fn driver_config(spec: &DeviceSpec) -> DriverConfig {
    match spec {
        DeviceSpec::Vfio { noiommu: true, .. } => DriverConfig {
            queue_size: 128,
            rx_buf_size: 4096 + 44,
            tx_buf_size: 4096 + 44,
            ..DriverConfig::default()
        },
        _ => DriverConfig::default(),
    }
}

/// What sysfs says about the device `spec` names, as a list candidate.
fn candidate_for(spec: &DeviceSpec, roots: &Roots) -> Option<Candidate> {
    match spec {
        DeviceSpec::VhostVdpa { path } => list::vdpa_devices(roots)
            .into_iter()
            .find(|c| c.spec.as_deref() == Some(&format!("vhost-vdpa:{path}"))),
        DeviceSpec::Vfio { bdf, .. } => {
            let dir = roots.sys("bus/pci/devices").join(bdf);
            let kind = vdpa_vsock::device::pci::sysfs_vsock_function(&dir)?;
            Some(list::pci_candidate(roots, bdf, &dir, kind))
        }
        DeviceSpec::VhostVsock { .. } => Some(list::vhost_vsock(roots)),
        DeviceSpec::Sim | DeviceSpec::Auto => None,
    }
}

/// The bare device `spec` names: the device layer opens hardware backends; the simulated device
/// sits above it, so it is built here.
fn open_device(spec: &DeviceSpec) -> Result<Box<dyn VsockDevice>, DeviceError> {
    match spec {
        DeviceSpec::Sim => Ok(Box::new(SimDevice::new(SimConfig::default()))),
        _ => spec.open(),
    }
}

/// Run `vdpa-vsock inspect`.
pub(crate) fn run(args: &InspectArgs, roots: &Roots) -> Result<()> {
    if args.device == DeviceSpec::Auto {
        bail!("inspect needs a concrete device, not auto; `vdpa-vsock list` shows them");
    }
    let found = candidate_for(&args.device, roots);
    let opened = preflight(&args.device, roots)
        .and_then(|()| open_device(&args.device).map_err(anyhow::Error::from));
    match opened {
        Ok(dev) => inspect_device(&args.device, dev, found.as_ref(), args.json),
        Err(e) => {
            // A closed stdout does not hide the open error: it is returned either way.
            let _ = (|| -> Result<()> {
                if args.json {
                    let v = json!({
                        "device": args.device.to_string(),
                        "sysfs": found.as_ref().map(Candidate::to_json),
                        "open": format!("cannot open: {e:#}"),
                    });
                    outln!("{}", serde_json::to_string_pretty(&v)?)?;
                } else {
                    outln!("device:  {}", args.device)?;
                    match &found {
                        Some(c) => c.print()?,
                        None => outln!(
                            "sysfs:   nothing known about it under {}",
                            roots.sys.display()
                        )?,
                    }
                    outln!("open:    cannot open: {e:#}")?;
                }
                Ok(())
            })();
            Err(e.context(format!("opening device {}", args.device)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::feature_names;

    #[test]
    fn feature_names_cover_what_real_devices_offer() {
        // What vdpasim_vsock offers (vdpa_sim adds ANY_LAYOUT), and an unknown bit.
        assert_eq!(
            feature_names(0x3_0800_0000 | (1 << 50)),
            ["ANY_LAYOUT", "VERSION_1", "ACCESS_PLATFORM", "bit 50"]
        );
        // Debian 6.12's vhost-vsock, virtio bits only.
        assert_eq!(
            feature_names(0x1_2000_0002),
            ["SEQPACKET", "EVENT_IDX", "VERSION_1"]
        );
    }
}
