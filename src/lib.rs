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

#![deny(missing_docs)]

mod copy;
pub mod device;
pub mod dma;
pub mod driver;
mod open;
pub mod packet;
pub mod pagemap;
pub mod proto;
mod runtime;
pub mod sim;
#[cfg(feature = "tokio")]
pub mod tokio;
pub mod virtq;
