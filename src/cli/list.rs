//! `vdpa-vsock list`: every device this driver could run on, and whether it can right now.
//!
//! Candidates: vDPA devices (`/sys/bus/vdpa/devices/*`), virtio-vsock PCI functions (vendor
//! 0x1af4, device 0x1053 modern or 0x1012 transitional), `/dev/vhost-vsock`, and `sim`. For each
//! the reason it can't be used is given: node missing, no read-write access, bound to the
//! wrong driver, not a vsock device, or no backend for it in this build.

use std::path::Path;

use anyhow::Result;
use clap::Args;
use serde_json::{json, Map, Value};

use super::{node_problem, Roots};
use vdpa_vsock::device::pci;

/// Options of `vdpa-vsock list`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Print JSON: `{"devices": [{"kind", "name", "spec", "usable", "reason", "facts"}]}`.
    #[arg(long)]
    json: bool,
}

/// Virtio's device id of vsock (virtio 1.2 section 5.10).
pub(crate) const VIRTIO_ID_VSOCK: u32 = 19;

/// One device the driver could run on.
#[derive(Debug)]
pub(crate) struct Candidate {
    /// `sim`, `vdpa`, `pci` or `vhost-vsock`.
    pub(crate) kind: &'static str,
    /// Its name: vDPA device name, BDF, node path.
    pub(crate) name: String,
    /// The `--device` string that selects it, when there is one.
    pub(crate) spec: Option<String>,
    /// Why it can't be used now; `None` when it can.
    pub(crate) problem: Option<String>,
    /// What sysfs says about it, in order.
    pub(crate) facts: Vec<(&'static str, String)>,
}

impl Candidate {
    /// The JSON form.
    pub(crate) fn to_json(&self) -> Value {
        let facts: Map<String, Value> = self
            .facts
            .iter()
            .map(|(k, v)| ((*k).to_string(), Value::String(v.clone())))
            .collect();
        json!({
            "kind": self.kind,
            "name": self.name,
            "spec": self.spec,
            "usable": self.problem.is_none(),
            "reason": self.problem,
            "facts": facts,
        })
    }

    /// The text form: a heading line and indented facts.
    pub(crate) fn print(&self) -> Result<()> {
        let status = match &self.problem {
            None => "usable".to_string(),
            Some(p) => format!("not usable: {p}"),
        };
        outln!(
            "{:<12} {:<28} {}",
            self.kind,
            self.spec.as_deref().unwrap_or(&self.name),
            status
        )?;
        for (k, v) in &self.facts {
            outln!("{:<12}   {k}: {v}", "")?;
        }
        Ok(())
    }
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_hex(p: &Path) -> Option<u32> {
    let s = read_trim(p)?;
    u32::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

/// The name of the driver bound to the sysfs device `dir`, if any.
pub(crate) fn driver_of(dir: &Path) -> Option<String> {
    let target = std::fs::read_link(dir.join("driver")).ok()?;
    target.file_name().map(|n| n.to_string_lossy().into_owned())
}

fn sorted_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// What `vdpa -j dev show NAME` says (only asked on the real /sys, when the tool exists).
fn vdpa_tool_facts(name: &str) -> Vec<(&'static str, String)> {
    let Ok(out) = std::process::Command::new("vdpa")
        .args(["-j", "dev", "show", name])
        .output()
    else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) else {
        return Vec::new();
    };
    let dev = &v["dev"][name];
    let mut facts = Vec::new();
    for key in ["type", "mgmtdev", "vendor_id", "max_vqs", "max_vq_size"] {
        if let Some(x) = dev.get(key) {
            let s = match x {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            facts.push((key, s));
        }
    }
    facts
}

/// Every vDPA device.
pub(crate) fn vdpa_devices(roots: &Roots) -> Vec<Candidate> {
    let base = roots.sys("bus/vdpa/devices");
    let mut out = Vec::new();
    for name in sorted_entries(&base) {
        let dir = base.join(&name);
        let mut facts = Vec::new();
        let driver = driver_of(&dir);
        facts.push(("driver", driver.clone().unwrap_or_else(|| "none".into())));
        let children = sorted_entries(&dir);
        // Bound to virtio_vdpa: the virtioN child carries the virtio device id.
        let mut device_id = children
            .iter()
            .filter(|c| c.starts_with("virtio"))
            .find_map(|c| read_hex(&dir.join(c).join("device")));
        if roots.is_real() {
            let tool = vdpa_tool_facts(&name);
            if device_id.is_none() {
                device_id = tool.iter().find_map(|(k, v)| match (*k, v.as_str()) {
                    ("type", "network") => Some(1),
                    ("type", "block") => Some(2),
                    ("type", "vsock") => Some(VIRTIO_ID_VSOCK),
                    _ => None,
                });
            }
            facts.extend(tool);
        }
        match device_id {
            Some(id) => facts.push((
                "device_id",
                format!(
                    "{id} ({})",
                    vdpa_vsock::device::vhost_vdpa::device_type_name(id)
                ),
            )),
            None => facts.push((
                "device_id",
                "unknown from sysfs (checked with VHOST_VDPA_GET_DEVICE_ID when opened)".into(),
            )),
        }
        let vhost_child = children.iter().find(|c| c.starts_with("vhost-vdpa-"));
        let node = vhost_child.map(|c| roots.dev(c));
        if let Some(n) = &node {
            facts.push(("node", n.display().to_string()));
        }
        let spec = node.as_ref().map(|n| format!("vhost-vdpa:{}", n.display()));
        let problem = if device_id.is_some_and(|id| id != VIRTIO_ID_VSOCK) {
            Some("not a vsock device".to_string())
        } else if driver.as_deref() != Some("vhost_vdpa") {
            Some(format!(
                "bound to {}, not vhost_vdpa; run tools/bind.sh --bind vhost_vdpa {name}",
                driver.as_deref().unwrap_or("no driver")
            ))
        } else if let Some(n) = &node {
            node_problem(n)
        } else {
            Some("bound to vhost_vdpa but has no vhost-vdpa-N child".into())
        };
        out.push(Candidate {
            kind: "vdpa",
            name,
            spec,
            problem,
            facts,
        });
    }
    out
}

/// Every virtio-vsock PCI function.
pub(crate) fn pci_devices(roots: &Roots) -> Vec<Candidate> {
    let base = roots.sys("bus/pci/devices");
    let mut out = Vec::new();
    for bdf in sorted_entries(&base) {
        let dir = base.join(&bdf);
        if let Some(kind) = pci::sysfs_vsock_function(&dir) {
            out.push(pci_candidate(roots, &bdf, &dir, kind));
        }
    }
    out
}

/// The candidate for the PCI function `bdf` (sysfs directory `dir`).
pub(crate) fn pci_candidate(
    roots: &Roots,
    bdf: &str,
    dir: &Path,
    kind: pci::VsockFunction,
) -> Candidate {
    let mut facts = vec![
        ("vendor", format!("{:#06x}", pci::PCI_VENDOR_VIRTIO)),
        ("device", format!("{:#06x} ({kind})", kind.device_id())),
    ];
    let driver = driver_of(dir);
    facts.push(("driver", driver.clone().unwrap_or_else(|| "none".into())));
    let group = std::fs::read_link(dir.join("iommu_group"))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
    if let Some(g) = &group {
        facts.push(("iommu_group", g.clone()));
    }
    // A group without an IOMMU behind it (VFIO's no-IOMMU mode) has only a noiommu-N node; our
    // spec must then say `,noiommu` explicitly.
    let mut noiommu = false;
    let problem = match driver.as_deref() {
        Some("vfio-pci") => {
            let node = group.as_ref().map(|g| {
                let plain = roots.dev("vfio").join(g);
                let unsafe_node = roots.dev("vfio").join(format!("noiommu-{g}"));
                if !plain.exists() && unsafe_node.exists() {
                    noiommu = true;
                    facts.push((
                        "iommu",
                        "none: VFIO no-IOMMU mode, no DMA isolation (the spec needs ,noiommu)"
                            .into(),
                    ));
                    unsafe_node
                } else {
                    plain
                }
            });
            match node {
                None => Some("bound to vfio-pci but has no iommu_group".into()),
                Some(n) => {
                    facts.push(("node", n.display().to_string()));
                    node_problem(&roots.dev("vfio/vfio")).or_else(|| node_problem(&n))
                }
            }
        }
        Some(other) => Some(format!(
            "bound to {other} (a kernel driver); run tools/bind.sh --bind vfio-pci {bdf}"
        )),
        None => Some(format!(
            "no driver bound; run tools/bind.sh --bind vfio-pci {bdf}"
        )),
    };
    Candidate {
        kind: "pci",
        name: bdf.to_string(),
        spec: Some(format!(
            "vfio:{bdf}{}",
            if noiommu { ",noiommu" } else { "" }
        )),
        problem,
        facts,
    }
}

/// The kernel's vhost-vsock node.
pub(crate) fn vhost_vsock(roots: &Roots) -> Candidate {
    let node = roots.dev("vhost-vsock");
    let problem = node_problem(&node);
    Candidate {
        kind: "vhost-vsock",
        name: node.display().to_string(),
        spec: Some(format!("vhost-vsock:{},cid=N", node.display())),
        problem,
        facts: vec![(
            "note",
            "our process becomes a guest with the CID given as cid=N (3 or more)".into(),
        )],
    }
}

/// The simulated device: always there.
pub(crate) fn sim() -> Candidate {
    Candidate {
        kind: "sim",
        name: "sim".into(),
        spec: Some("sim".into()),
        problem: None,
        facts: vec![(
            "note",
            "in-process simulated device; host CID 2 serves 7 (echo), 8 (seqpacket echo), 9 (discard)"
                .into(),
        )],
    }
}

/// Run `vdpa-vsock list`.
pub(crate) fn run(args: &ListArgs, roots: &Roots) -> Result<()> {
    let mut all = vdpa_devices(roots);
    all.extend(pci_devices(roots));
    all.push(vhost_vsock(roots));
    all.push(sim());
    if args.json {
        let v = json!({ "devices": all.iter().map(Candidate::to_json).collect::<Vec<_>>() });
        outln!("{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        for c in &all {
            c.print()?;
        }
    }
    Ok(())
}
