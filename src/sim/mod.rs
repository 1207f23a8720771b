// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The simulated virtio-vsock device (`--device sim`): the embedded default that needs no
//! hardware and no privileges.
//!
//! It runs in its own thread over the driver's DMA memory and behaves as a device must: it reads
//! the rings with rust-vmm's device-side `virtio_queue::Queue` and parses every chain with
//! [`VsockPacket::from_tx_virtq_chain`](crate::packet::VsockPacket::from_tx_virtq_chain) /
//! [`VsockPacket::from_rx_virtq_chain`](crate::packet::VsockPacket::from_rx_virtq_chain), exactly like a
//! vhost-user device would. Behind it sits the host, CID 2, as a full protocol endpoint (the same
//! sans-IO core the driver uses), which makes it a strict peer: a driver that overruns the host's
//! credit is reset and counted, and packets for unknown connections get RST.
//!
//! Built-in host services:
//! - port [`ECHO_PORT`] (7): stream echo, every byte comes back;
//! - port [`SEQPACKET_ECHO_PORT`] (8): SEQPACKET echo, every message comes back whole;
//! - port [`DISCARD_PORT`] (9): stream sink, bytes are counted and dropped.
//!
//! Programs and tests reach the host side through [`SimHost`]: listen on a port and accept, or
//! connect to the driver. A test-only [`Hostile`] mode makes the device write bogus used entries.
//! [`SimHost::set_guest_cid`] changes the config's `guest_cid` at run time and raises the config
//! interrupt ([`VsockDevice::config_fd`](crate::device::VsockDevice::config_fd)), as a migration
//! to another CID would. The device's lifecycle can be driven too:
//! [`SimHost::transport_reset`] sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue (as
//! QEMU does after a migration), [`SimHost::set_needs_reset`] makes the device stop and set
//! NEEDS_RESET, and [`SimHost::unplug`] signals its removal
//! ([`VsockDevice::removal_fd`](crate::device::VsockDevice::removal_fd)).
//!
//! Files, and the layering: [`SimDevice`] (`device.rs`) implements the device layer's
//! [`VsockDevice`](crate::device::VsockDevice) trait and runs the device thread; `rings.rs` is the
//! device half of the rings (and the hostile mode); [`SimHost`] (`host.rs`) is CID 2, a runtime
//! core whose transport is those rings plus the built-in services, with the socket types on it.
//! So `sim` sits above the device layer, the runtime and the sockets, and none of them knows it.
//! [`VsockDriver::open_sim`](crate::driver::VsockDriver::open_sim) brings a driver up on a new
//! simulated device and hands back both ends; dropping the [`SimHost`] does not stop the device
//! (it keeps its own handle on the host core), dropping the driver does.

use std::sync::Mutex;

use crate::proto;

mod device;
mod host;
mod rings;

pub use device::SimDevice;
pub use host::SimHost;

/// Host port of the built-in stream echo service.
pub const ECHO_PORT: u32 = 7;
/// Host port of the built-in SEQPACKET echo service.
pub const SEQPACKET_ECHO_PORT: u32 = 8;
/// Host port of the built-in discard (sink) service.
pub const DISCARD_PORT: u32 = 9;

/// Largest message the SEQPACKET echo returns whole (bigger ones come back truncated).
pub const SERVICE_BUF: usize = 4 << 20;

/// A bogus thing the hostile device does, once, on its first RX delivery (tests only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// A used element whose id is beyond the ring.
    BogusUsedId,
    /// A used length larger than the buffer the driver posted.
    LenBeyondBuffer,
    /// The same used element twice.
    DuplicateUsed,
    /// The used index jumps by more than the ring size.
    UsedIdxJump,
}

/// Settings of the simulated device.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The driver's CID (the device config's `guest_cid`).
    pub guest_cid: u64,
    /// Largest queue size offered.
    pub queue_max: u16,
    /// Largest payload the device puts in one RX packet.
    pub max_payload: u32,
    /// Spin instead of sleeping on kicks (pairs with the driver's busy-poll mode).
    pub busy_poll: bool,
    /// Offer VIRTIO_VSOCK_F_SEQPACKET.
    pub seqpacket: bool,
    /// Offer VIRTIO_VSOCK_F_STREAM.
    pub stream: bool,
    /// Offer VIRTIO_VSOCK_F_NO_IMPLIED_STREAM (with `stream: false`, the host has no streams).
    pub no_implied_stream: bool,
    /// Offer VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Have an event queue (queue 2), as every virtio-vsock device does; `false` models one
    /// with rx and tx only (the kernel's vhost-vsock ABI).
    pub event_queue: bool,
    /// Settings of the host-side protocol endpoint (its CID is always 2).
    pub host: proto::Config,
    /// Misbehave on purpose (tests).
    pub hostile: Option<Hostile>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            guest_cid: 3,
            queue_max: 256,
            max_payload: 64 * 1024,
            busy_poll: false,
            seqpacket: true,
            stream: true,
            no_implied_stream: true,
            event_idx: true,
            event_queue: true,
            host: proto::Config::default(),
            hostile: None,
        }
    }
}

/// Counters of the simulated device and its host side.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SimStats {
    /// Packets the driver sent (TX chains consumed).
    pub tx_packets: u64,
    /// Packets delivered to the driver (RX chains used).
    pub rx_packets: u64,
    /// Driver misbehaviour: malformed chains, wrong source CID, wrong destination.
    pub protocol_violations: u64,
    /// Bytes the discard service dropped.
    pub discarded_bytes: u64,
    /// Bytes the echo services sent back.
    pub echoed_bytes: u64,
    /// Payload bytes the device side copied: from the driver's TX buffers into the host's
    /// queues, from those into the driver's RX buffers, and straight from a TX buffer into an
    /// RX buffer (an echo that keeps up: its bytes are copied once). The discard service
    /// copies nothing.
    pub payload_bytes_copied: u64,
}

/// Lock `m`, also after a panic elsewhere (the state stays usable).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
