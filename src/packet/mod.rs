// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The vsock packet: a 44-byte `virtio_vsock_hdr` plus an optional payload, carried in a virtio
//! descriptor chain.
//!
//! Read virtio 1.2 section 5.10.6 first. A packet on the wire is:
//!
//! ```text
//! le64 src_cid | le64 dst_cid | le32 src_port | le32 dst_port | le32 len |
//! le16 type    | le16 op      | le32 flags    | le32 buf_alloc | le32 fwd_cnt | u8 data[len]
//! ```
//!
//! [`VsockPacket`] keeps the public API of rust-vmm's `virtio-vsock` 0.12 (`from_tx_virtq_chain`,
//! `from_rx_virtq_chain`, `new`, `header_slice`, `data_slice`, a getter and a chaining setter per
//! header field) and gives the same verdict on every chain shape that crate accepts. Beyond it, it
//! accepts any descriptor layout the spec allows (2.7.4, "Message Framing"): a header split over
//! several descriptors and a payload spread over several descriptors, exposed as an ordered list of
//! [`VolatileSlice`](vm_memory::VolatileSlice)s ([`VsockPacket::data_slices`]).
//!
//! The header is read from shared memory exactly once, into a private copy: every getter answers
//! from that copy, so a device (or driver) that rewrites the header after parsing cannot make two
//! reads disagree (no time-of-check/time-of-use). Setters write both the copy and the memory.
//!
//! Layout rules, in order:
//! 1. The header is the first 44 bytes of the chain. It may be split over several descriptors
//!    (zero-length descriptors are skipped).
//! 2. Compatibility with 0.12: when the header ends inside the *head* descriptor and the head has a
//!    next descriptor, the payload starts at the next descriptor (the head's remaining bytes are
//!    padding). Otherwise the payload starts right after the header's last byte.
//! 3. TX: the payload is the next `len` bytes; descriptors after them are ignored (never looked
//!    at, so they may be anything, as in 0.12).
//! 4. RX, header in the head: the second descriptor is the buffer, checked as 0.12 checks it
//!    (device-writable, at most `max_data_size` bytes, one slice of memory) and returned by
//!    [`VsockPacket::data_slice`]. The descriptors after it, which 0.12 ignores, extend the
//!    buffer in [`VsockPacket::data_slices`] as far as they are device-writable and inside
//!    memory, up to `max_data_size` bytes in all; the first one that is not ends the buffer,
//!    it never fails the chain. So every chain 0.12 accepts is accepted with 0.12's
//!    `data_slice`.
//! 5. RX, header split (beyond 0.12): the buffer is every remaining byte of the chain, at most
//!    `max_data_size` bytes, and every descriptor must be device-writable and inside memory.
//!
//! Where each part lives:
//! - `wire.rs`: the header size, feature and flag bits, well-known CIDs, [`Header`] and the
//!   typed [`Op`] and [`SocketType`];
//! - `error.rs`: [`Error`], the one error type of this module;
//! - `vsock_packet.rs`: [`VsockPacket`] itself and the accessors every constructor shares;
//! - `chain.rs`: the device view, [`VsockPacket::from_tx_virtq_chain`] and
//!   [`VsockPacket::from_rx_virtq_chain`], by the rules above;
//! - `lookup.rs`: a guest address and length to one slice of memory;
//! - `buffer.rs`: the driver view, packets over buffers the driver owns
//!   ([`VsockPacket::from_used_rx_buffer`], [`VsockPacket::from_tx_buffer`], [`VsockPacket::new`]).

mod buffer;
mod chain;
mod error;
mod lookup;
mod vsock_packet;
mod wire;

#[cfg(test)]
mod tests;

pub use error::{Error, Result};
pub use vsock_packet::VsockPacket;
pub(crate) use wire::PKT_HEADER_LEN;
pub use wire::{
    cid_fits, stream_negotiated, Header, Op, SeqFlags, ShutdownFlags, SocketType, UnknownValue,
    PKT_HEADER_SIZE, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, VIRTIO_VSOCK_F_NO_IMPLIED_STREAM, VIRTIO_VSOCK_F_SEQPACKET,
    VIRTIO_VSOCK_F_STREAM, VIRTIO_VSOCK_SEQ_EOM, VIRTIO_VSOCK_SEQ_EOR,
    VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE, VIRTIO_VSOCK_SHUTDOWN_F_SEND, VMADDR_CID_ANY, VMADDR_CID_HOST,
    VMADDR_CID_HYPERVISOR, VMADDR_CID_LOCAL, VMADDR_PORT_ANY,
};
