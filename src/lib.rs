// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! # vdpa-vsock
//!
//! A userspace virtio-vsock *driver* (virtio 1.2 section 5.10, device ID 19): AF_VSOCK-style
//! stream sockets without the kernel in the data path, over a vDPA device, a virtio-pci function
//! bound to VFIO, the kernel's vhost-vsock, or an embedded simulated device.
//!
//! Modules, from the device up; each imports only the ones listed before it (see `DESIGN.md` in
//! the project's shared notes):
//! - [`packet`]: `VsockPacket`, the header/payload view of a descriptor chain or driver buffer.
//! - [`dma`]: the DMA region (IOVA-addressed guest memory) and its allocator.
//! - [`virtq`]: the driver half of a split virtqueue; validates everything the device writes.
//! - [`proto`]: the sans-IO vsock protocol engine (connections, credit, shutdown, reset).
//! - [`device`]: the `VsockDevice` trait and the hardware backends (vhost-vdpa, VFIO virtio-pci,
//!   vhost-vsock); it knows nothing above it.
//! - `runtime` (crate-internal): the shared core of an endpoint and its waiters, the `Transport`
//!   trait, the event loop, and the driver's transport joining device, rings, parser and protocol.
//! - [`driver`]: the sockets: `VsockDriver` (bring-up on a device), `VsockStream`,
//!   `VsockListener`, `VsockSeqPacket`, `VsockAddr`, and `VsockPoller` (one descriptor for the
//!   readiness of any number of them).
//! - [`sim`]: the simulated device (device half and host side, CID 2), built from the device
//!   trait, the runtime and the sockets.
//! - [`tokio`] (feature `tokio`, on by default): the async API on tokio, shaped as tokio-vsock's
//!   (`VsockStream::connect(&driver, addr).await`, `VsockListener`, `VsockSeqPacket`).
//! - `open` (crate-internal): `VsockDriver::open`, `open_with` and `open_sim`, opening by device
//!   spec, the one place that knows every backend.
//!
//! # Errors and their causes
//!
//! Every error says what was being done and what was seen. Where it has a cause, one of two
//! rules says where the cause's text is, so that a printer walking `source()` (anyhow's `{:#}`,
//! as the CLI prints errors) shows each cause once, and one printing `{}` alone still learns
//! what it needs. Each error type says which rule it follows.
//! - **The cause is the source** (every error enum: [`device::DeviceError`],
//!   [`dma::DmaError`], [`virtq::QueueError`], [`packet::Error`], [`pagemap::PagemapError`],
//!   [`driver::DriverError`], and the runtime's own): the message never holds the cause's
//!   text, and `source()` returns the cause, typed, so that it can be downcast (the CLI's
//!   hints find the `io::Error` of a failed system call that way;
//!   [`device::DeviceError::os_error`] returns it). A variant that only classifies its cause
//!   is `#[error(transparent)]`: it shows as its cause (the cause's message, then the cause's
//!   source).
//! - **The cause is in the message** (the inner errors of the `io::Error`s the sockets return:
//!   a dead device's, a connection reset by the transport): the message holds the cause's
//!   text and `source()` hands on the cause's own source, never the cause itself, as
//!   `io::Error::new` does with the error it wraps; `{}` on such an `io::Error` says why.
//!
//! An error that turns its cause into text (`DeviceError::Failed`, the CLI's `anyhow!`
//! messages) has no source.

#![deny(missing_docs)]

mod copy;
pub mod device;
pub mod dma;
pub mod driver;
#[cfg(test)]
mod error_chains;
mod open;
pub mod packet;
pub mod pagemap;
pub mod proto;
mod runtime;
pub mod sim;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod virtq;
