//! `vdpa-vsock inspect DEVICE`: what a device offers and what the driver would negotiate.
//!
//! For `sim` the device is brought up as the driver does it: features offered and negotiated
//! (decoded by name), `guest_cid`, queues and their sizes. For the other specs: what sysfs and
//! the device node say, then the outcome of opening it (today: "backend not built yet").

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use vdpa_vsock::device::sim::{SimConfig, SimDevice};
use vdpa_vsock::device::{DeviceSpec, VsockDevice, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use vdpa_vsock::driver::{DriverConfig, VsockDriver};
use vdpa_vsock::packet::{
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_VSOCK_F_NO_IMPLIED_STREAM, VIRTIO_VSOCK_F_SEQPACKET, VIRTIO_VSOCK_F_STREAM,
};

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
    (
        virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC as u64,
        "INDIRECT_DESC",
    ),
    (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
    (VIRTIO_F_VERSION_1, "VERSION_1"),
    (VIRTIO_F_ACCESS_PLATFORM, "ACCESS_PLATFORM"),
    (
        virtio_bindings::virtio_config::VIRTIO_F_RING_PACKED as u64,
        "RING_PACKED",
    ),
    (
        virtio_bindings::virtio_config::VIRTIO_F_IN_ORDER as u64,
        "IN_ORDER",
    ),
    (
        virtio_bindings::virtio_config::VIRTIO_F_ORDER_PLATFORM as u64,
        "ORDER_PLATFORM",
    ),
    (
        virtio_bindings::virtio_config::VIRTIO_F_SR_IOV as u64,
        "SR_IOV",
    ),
    (
        virtio_bindings::virtio_config::VIRTIO_F_NOTIFICATION_DATA as u64,
        "NOTIFICATION_DATA",
    ),
];

/// The names of the bits set in `bits`; unknown bits as `bit N`.
pub(crate) fn feature_names(bits: u64) -> Vec<String> {
    (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| {
            FEATURES
                .iter()
                .find(|(bit, _)| *bit == b)
                .map_or_else(|| format!("bit {b}"), |(_, n)| (*n).to_string())
        })
        .collect()
}

fn features_json(bits: u64) -> Value {
    json!({ "bits": format!("{bits:#x}"), "names": feature_names(bits) })
}

fn inspect_sim(json_out: bool) -> Result<()> {
    let mut dev = SimDevice::new(SimConfig::default());
    let offered = dev.offered_features();
    // The same choice `VsockDriver::from_device` makes: VERSION_1, and EVENT_IDX and SEQPACKET
    // whenever offered.
    let want = (1 << VIRTIO_F_VERSION_1)
        | (offered & ((1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_VSOCK_F_SEQPACKET)));
    let negotiated = dev.negotiate(want).context("negotiating features")?;
    let cid = dev.guest_cid().context("reading guest_cid")?;
    let nq = dev.num_queues();
    let driver_q = DriverConfig::default().queue_size;
    let queues: Vec<Value> = [(RX_QUEUE, "rx"), (TX_QUEUE, "tx"), (EVENT_QUEUE, "event")]
        .iter()
        .filter(|(i, _)| *i < nq)
        .map(|(i, name)| {
            let max = dev.max_queue_size(*i);
            json!({ "index": i, "name": name, "max_size": max, "driver_size": driver_q.min(max) })
        })
        .collect();
    // Bring the real driver up too, so "inspect" also proves the device works.
    let up = VsockDriver::open(&DeviceSpec::Sim).map(|d| d.local_cid());
    let v = json!({
        "device": "sim",
        "offered": features_json(offered),
        "negotiated": features_json(negotiated),
        "guest_cid": cid,
        "num_queues": nq,
        "queues": queues,
        "driver_up": up.is_ok(),
    });
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("device:      sim (in-process simulated virtio-vsock)");
        println!(
            "offered:     {offered:#x} {}",
            feature_names(offered).join(" ")
        );
        println!(
            "negotiated:  {negotiated:#x} {}",
            feature_names(negotiated).join(" ")
        );
        println!("guest_cid:   {cid}");
        println!("queues:      {nq}");
        for q in &queues {
            println!(
                "  {:<6} max size {}, driver uses {}",
                q["name"].as_str().unwrap_or("?"),
                q["max_size"],
                q["driver_size"]
            );
        }
        println!(
            "driver:      {}",
            match &up {
                Ok(c) => format!("brought up, local CID {c}"),
                Err(e) => format!("failed: {e}"),
            }
        );
    }
    up.context("bringing the driver up on sim")?;
    Ok(())
}

/// What sysfs says about the device `spec` names, as a list candidate.
fn candidate_for(spec: &DeviceSpec, roots: &Roots) -> Option<Candidate> {
    match spec {
        DeviceSpec::VhostVdpa { path } => list::vdpa_devices(roots)
            .into_iter()
            .find(|c| c.spec.as_deref() == Some(&format!("vhost-vdpa:{path}"))),
        DeviceSpec::Vfio { bdf, .. } => {
            let dir = roots.sys("bus/pci/devices").join(bdf);
            let device = std::fs::read_to_string(dir.join("device")).ok()?;
            let device = u32::from_str_radix(device.trim().trim_start_matches("0x"), 16).ok()?;
            Some(list::pci_candidate(roots, bdf, &dir, device))
        }
        DeviceSpec::VhostVsock { .. } => Some(list::vhost_vsock(roots)),
        DeviceSpec::Sim | DeviceSpec::Auto => None,
    }
}

/// Run `vdpa-vsock inspect`.
pub(crate) fn run(args: &InspectArgs, roots: &Roots) -> Result<()> {
    if args.device == DeviceSpec::Sim {
        return inspect_sim(args.json);
    }
    if args.device == DeviceSpec::Auto {
        bail!("inspect needs a concrete device, not auto; `vdpa-vsock list` shows them");
    }
    let found = candidate_for(&args.device, roots);
    let opened = preflight(&args.device, roots)
        .and_then(|()| VsockDriver::open(&args.device).map_err(anyhow::Error::from));
    let backend = match &opened {
        Ok(_) => "opened".to_string(),
        Err(e) if super::hint(e).is_some_and(|h| h.contains("only --device sim")) => {
            "backend not built yet".to_string()
        }
        Err(e) => format!("cannot open: {e:#}"),
    };
    if args.json {
        let v = json!({
            "device": args.device.to_string(),
            "sysfs": found.as_ref().map(Candidate::to_json),
            "open": backend,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("device:  {}", args.device);
        match &found {
            Some(c) => c.print(),
            None => println!(
                "sysfs:   nothing known about it under {}",
                roots.sys.display()
            ),
        }
        println!("open:    {backend}");
    }
    opened
        .map(|_| ())
        .with_context(|| format!("opening device {}", args.device))
}
