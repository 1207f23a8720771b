// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The packet module's error type.

use vm_memory::{GuestMemoryError, VolatileMemoryError};

use super::PKT_HEADER_SIZE;

/// Vsock packet parsing errors. The variants are those of `virtio-vsock` 0.12, with what was
/// expected and what was found added where it helps. Causes: the cause is the source (the
/// crate docs, "Errors and their causes").
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Too few descriptors in a descriptor chain.
    #[error("descriptor chain too short: {0}")]
    DescriptorChainTooShort(&'static str),
    /// A descriptor was too short for what it must hold.
    #[error("descriptor length too small: expected at least {expected} bytes, found {found}")]
    DescriptorLengthTooSmall {
        /// Bytes needed.
        expected: u64,
        /// Bytes the descriptor(s) provided.
        found: u64,
    },
    /// A descriptor was longer than the negotiated maximum.
    #[error("descriptor length too long: expected at most {max} bytes, found {found}")]
    DescriptorLengthTooLong {
        /// The maximum allowed.
        max: u64,
        /// What the descriptor(s) provided.
        found: u64,
    },
    /// A descriptor's buffer stretches over more than one host memory fragment.
    #[error(
        "descriptor buffer at {addr:#x} of {len} bytes stretches over multiple memory fragments"
    )]
    FragmentedMemory {
        /// Guest address (IOVA) of the buffer.
        addr: u64,
        /// Its length.
        len: usize,
    },
    /// The slice for creating a header has an invalid length.
    #[error("invalid header input size: expected {PKT_HEADER_SIZE} bytes, found {0}")]
    InvalidHeaderInputSize(usize),
    /// The `len` header field value exceeds the maximum allowed data size.
    #[error("invalid header `len` field: {len} exceeds the maximum of {max}")]
    InvalidHeaderLen {
        /// The header's `len`.
        len: u32,
        /// The largest payload allowed here.
        max: u32,
    },
    /// Invalid guest memory access.
    #[error("invalid guest memory access")]
    InvalidMemoryAccess(#[source] GuestMemoryError),
    /// Invalid volatile memory access.
    #[error("invalid volatile memory access")]
    InvalidVolatileAccess(#[source] VolatileMemoryError),
    /// A read-only descriptor where the protocol needs a device-writable one.
    #[error("unexpected read-only descriptor (index {index} in the chain): RX buffers must be device-writable")]
    UnexpectedReadOnlyDescriptor {
        /// Position of the descriptor in the chain (0 = head).
        index: usize,
    },
    /// A write-only descriptor where the protocol needs a device-readable one.
    #[error("unexpected write-only descriptor (index {index} in the chain): TX buffers must be device-readable")]
    UnexpectedWriteOnlyDescriptor {
        /// Position of the descriptor in the chain (0 = head).
        index: usize,
    },
}

/// Dedicated result type of this module.
pub type Result<T> = std::result::Result<T, Error>;
