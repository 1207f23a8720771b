// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! # vdpa-vsock
//!
//! A userspace virtio-vsock *driver* (virtio 1.2 section 5.10, device ID 19): AF_VSOCK-style
//! stream sockets without the kernel in the data path, over a vDPA device, a virtio-pci function
//! bound to VFIO, the kernel's vhost-vsock, or an embedded simulated device.
//!
//! Modules, from the device up (see `DESIGN.md` in the project's shared notes):
//! - [`packet`]: `VsockPacket`, the header/payload view of a descriptor chain or driver buffer.
//! - [`dma`]: the DMA region (IOVA-addressed guest memory) and its allocator.
//! - [`virtq`]: the driver half of a split virtqueue; validates everything the device writes.
//! - [`proto`]: the sans-IO vsock protocol engine (connections, credit, shutdown, reset).
//! - [`device`]: the `VsockDevice` trait and its backends (`sim`, later vhost-vsock, vhost-vdpa, VFIO).
//! - [`driver`]: the event loop joining device, rings, parser and protocol; the socket API.

#![deny(missing_docs)]

mod copy;
pub mod device;
pub mod dma;
pub mod driver;
pub mod packet;
pub mod pagemap;
pub mod proto;
mod runtime;
pub mod virtq;
