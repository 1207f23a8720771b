// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The runtime: what joins a device, its rings, the packet parser and the protocol core, and
//! what the sockets stand on. Read virtio 1.2 section 5.10 and the [`crate::proto`] primer first.
//!
//! It owns:
//! - [`Core`] (`core.rs`): one protocol endpoint behind a mutex, the per-connection condition
//!   variables blocked callers wait on, the routing of the endpoint's events to them, and the
//!   [`Transport`] trait: whoever moves packets between that endpoint and a device;
//! - the readiness descriptors (`readiness.rs`): a socketpair per polled socket whose kernel
//!   state is the connection's `poll(2)` mask, and an edge notifier (an eventfd) per socket
//!   registered with the tokio API; the core keeps both up to date after every call and event;
//! - the driver-level poller (`poller.rs`): one eventfd and a ready list for any number of
//!   sockets (no descriptor per socket), with epoll's level and edge semantics, kept up to date
//!   where the descriptors are; the public handle is `driver::VsockPoller`;
//! - [`EventLoop`] (`event_loop.rs`): the event-loop thread that sleeps on eventfds (used-buffer
//!   interrupts or kicks, the waker, the config interrupt) and pumps a core's transport;
//! - the leader (`irq.rs`): one blocked caller at a time waits on the rx and tx interrupts
//!   itself, and the loop thread stops watching them meanwhile, so a reply wakes the thread
//!   waiting for it with no hand-off through the loop thread (under `cfg(loom)`, `irq/model.rs`
//!   stands in for its interrupts, so that `loom_tests.rs` checks the hand-off);
//! - [`DriverTransport`] (`transport.rs`): the driver's transport, the TX/RX buffers and rings of
//!   one device, parsed with `VsockPacket` and fed to the endpoint;
//! - the payload storage in DMA memory (`storage.rs`): the TX chunk pool, the RX buffer pool,
//!   and the per-connection queues over them that make the data path one copy each way;
//! - `DriverStats` (`stats.rs`): the driver's data-path counters;
//! - [`TransportError`] and [`Ended`] (`error.rs`): why a transport failed, and why a core
//!   stopped (what blocked calls then fail with);
//! - the synchronisation primitives (`sync.rs`): `std`'s, or `loom`'s under `cfg(loom)`, where
//!   `loom_tests.rs` model-checks the core's blocking and waking.
//!
//! Layering: the runtime uses `device`, `dma`, `virtq`, `packet` and `proto`; the sockets
//! (`driver`) and the simulated device's host side (`sim`) use the runtime; nothing here knows
//! either of them. Everything is crate-internal: the public API is the sockets'.

mod core;
mod error;
mod event_loop;
mod irq;
mod poller;
mod readiness;
mod stats;
mod storage;
mod sync;
#[cfg(test)]
mod test_device;
mod transport;

pub(crate) use self::core::{to_io, Core, RtEndpoint, Target, Transport, Wait};
pub(crate) use self::error::{error_chain, Ended, TransportError};
pub(crate) use self::event_loop::{EventLoop, LoopFds};
pub use self::poller::Interest;
pub(crate) use self::poller::PollQueue;
pub(crate) use self::readiness::UserFd;
pub use self::stats::DriverStats;
pub(crate) use self::storage::{DmaStorage, RtStorage, RxPool, TxPool, TX_CHUNK};
pub(crate) use self::transport::{
    refill_rx, valid_guest_cid, DeviceRings, DriverTransport, EventQueue, RecoveryPolicy,
    DEFAULT_RECOVERY_LIMIT, EVENT_BUFFERS, TX_HDR_SLOT,
};
// For the crate's test of every error's causes (`src/error_chains.rs`).
#[cfg(test)]
pub(crate) use self::{
    core::ConnReset, error::ResetCause, storage::CopyError, transport::EventQueueError,
};
