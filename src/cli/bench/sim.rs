//! Everything the bench knows about the simulated device, in one place (so that moving the sim
//! to its own module, and `VsockDriver::open_sim` returning the host beside the driver, touches
//! only this file): how to open it, its default peer, and its sink's byte counter.

use anyhow::{Context, Result};
use vdpa_vsock::driver::{DriverConfig, VsockAddr, VsockDriver};
use vdpa_vsock::proto;
use vdpa_vsock::sim::{SimConfig, SimHost, DISCARD_PORT, ECHO_PORT};

use super::peer::Peer;

/// The sim host's own services: discard (9) is the sink, echo (7) the echo service.
pub(super) const PEER: Peer = Peer {
    sink: VsockAddr {
        cid: 2,
        port: DISCARD_PORT,
    },
    echo: Some(VsockAddr {
        cid: 2,
        port: ECHO_PORT,
    }),
};

/// Open a sim device whose host side accepts as many connections as the driver may open
/// (`cfg.proto.max_connections`), spinning when `cfg.busy_poll` does.
pub(super) fn open(cfg: DriverConfig) -> Result<(VsockDriver, SimHost)> {
    let sim = SimConfig {
        busy_poll: cfg.busy_poll,
        host: proto::Config {
            max_connections: cfg.proto.max_connections,
            ..proto::Config::default()
        },
        ..SimConfig::default()
    };
    VsockDriver::open_sim(sim, cfg).context("opening the sim device")
}

/// Bytes the sim's discard service has consumed so far (`None` on other devices, or when the
/// sink is not that service): the one-way rows check that the sink saw every byte, not only
/// that it closed.
pub(super) fn discarded(host: Option<&SimHost>, sink: VsockAddr) -> Option<u64> {
    let host = host.filter(|_| sink == PEER.sink)?;
    Some(host.stats().discarded_bytes)
}
