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
//! [`VolatileSlice`]s ([`VsockPacket::data_slices`]).
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

use std::fmt;
use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::{BitmapSlice, WithBitmapSlice};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryRegion, Permissions, VolatileMemory, VolatileMemoryError, VolatileSlice,
};

#[cfg(test)]
mod tests;

/// The size of the `virtio_vsock_hdr` structure on the wire.
pub const PKT_HEADER_SIZE: usize = 44;
/// [`PKT_HEADER_SIZE`] as a descriptor length (the rings' lengths are `u32`).
#[allow(clippy::cast_possible_truncation)] // 44 fits in a u32.
pub(crate) const PKT_HEADER_LEN: u32 = PKT_HEADER_SIZE as u32;

/// Feature bit: stream sockets (`VIRTIO_VSOCK_F_STREAM`, virtio 1.2 5.10.3). The vsock bits are
/// not in virtio-bindings; the transport bits below come from it.
pub const VIRTIO_VSOCK_F_STREAM: u64 = 0;
/// Feature bit: seqpacket sockets (`VIRTIO_VSOCK_F_SEQPACKET`).
pub const VIRTIO_VSOCK_F_SEQPACKET: u64 = 1;
/// Feature bit: stream support is not implied when STREAM is not offered (`VIRTIO_VSOCK_F_NO_IMPLIED_STREAM`).
pub const VIRTIO_VSOCK_F_NO_IMPLIED_STREAM: u64 = 2;
/// Whether stream sockets exist once `negotiated` is agreed (virtio 1.2 5.10.3.1): when
/// VIRTIO_VSOCK_F_STREAM is negotiated, or when VIRTIO_VSOCK_F_NO_IMPLIED_STREAM is not (a
/// device that does not know the bit implies streams, as every device before virtio 1.2 did).
pub fn stream_negotiated(negotiated: u64) -> bool {
    negotiated & (1 << VIRTIO_VSOCK_F_STREAM) != 0
        || negotiated & (1 << VIRTIO_VSOCK_F_NO_IMPLIED_STREAM) == 0
}
/// Feature bit: the device notifies with the used/avail event index (`VIRTIO_RING_F_EVENT_IDX`).
pub const VIRTIO_RING_F_EVENT_IDX: u64 =
    virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX as u64;
/// Feature bit: virtio 1.0 or later (`VIRTIO_F_VERSION_1`).
pub const VIRTIO_F_VERSION_1: u64 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1 as u64;
/// Feature bit: the device accesses memory through an IOMMU (`VIRTIO_F_ACCESS_PLATFORM`).
pub const VIRTIO_F_ACCESS_PLATFORM: u64 =
    virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM as u64;

/// Shutdown flag: the sender will receive no more data (`VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE`).
pub const VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE: u32 = 1;
/// Shutdown flag: the sender will send no more data (`VIRTIO_VSOCK_SHUTDOWN_F_SEND`).
pub const VIRTIO_VSOCK_SHUTDOWN_F_SEND: u32 = 2;
/// Seqpacket flag: end of message (`VIRTIO_VSOCK_SEQ_EOM`).
pub const VIRTIO_VSOCK_SEQ_EOM: u32 = 1;
/// Seqpacket flag: end of record (`VIRTIO_VSOCK_SEQ_EOR`).
pub const VIRTIO_VSOCK_SEQ_EOR: u32 = 2;

/// Event queue event id: the transport was reset (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`).
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

/// The well-known CID of the hypervisor (`VMADDR_CID_HYPERVISOR`, reserved).
pub const VMADDR_CID_HYPERVISOR: u64 = 0;
/// The well-known CID of local communication (`VMADDR_CID_LOCAL`, reserved).
pub const VMADDR_CID_LOCAL: u64 = 1;
/// The well-known CID of the host.
pub const VMADDR_CID_HOST: u64 = 2;
/// Any CID (`VMADDR_CID_ANY`, `-1U` in `linux/vm_sockets.h`): the largest CID an address can
/// hold, since `struct sockaddr_vm`'s `svm_cid` is an `unsigned int`.
pub const VMADDR_CID_ANY: u64 = 0xFFFF_FFFF;
/// Any port (`VMADDR_PORT_ANY`, `-1U`): `listen` on it picks a free port.
pub const VMADDR_PORT_ANY: u32 = 0xFFFF_FFFF;

/// Whether `cid` can be a vsock address's CID: it fits in `svm_cid`'s 32 bits, as in Linux
/// (the header field is 64 bits wide, but virtio 1.2 5.10.4 reserves the upper 32).
pub fn cid_fits(cid: u64) -> bool {
    cid <= VMADDR_CID_ANY
}

// Offsets of the header fields (virtio 1.2 5.10.6).
const SRC_CID_OFFSET: usize = 0;
const DST_CID_OFFSET: usize = 8;
const SRC_PORT_OFFSET: usize = 16;
const DST_PORT_OFFSET: usize = 20;
const LEN_OFFSET: usize = 24;
const TYPE_OFFSET: usize = 28;
const OP_OFFSET: usize = 30;
const FLAGS_OFFSET: usize = 32;
const BUF_ALLOC_OFFSET: usize = 36;
const FWD_CNT_OFFSET: usize = 40;

/// Vsock packet parsing errors. The variants are those of `virtio-vsock` 0.12, with what was
/// expected and what was found added where it helps.
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

/// An unknown value in a typed header field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown vsock {field} value {value}")]
pub struct UnknownValue {
    /// Which field (`op` or `type`).
    pub field: &'static str,
    /// The value found.
    pub value: u16,
}

/// Packet operation (`op` field, virtio 1.2 5.10.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Op {
    /// `VIRTIO_VSOCK_OP_REQUEST`: connection request.
    Request = 1,
    /// `VIRTIO_VSOCK_OP_RESPONSE`: connection accepted.
    Response = 2,
    /// `VIRTIO_VSOCK_OP_RST`: connection reset or refused.
    Rst = 3,
    /// `VIRTIO_VSOCK_OP_SHUTDOWN`: half or full close, see the shutdown flags.
    Shutdown = 4,
    /// `VIRTIO_VSOCK_OP_RW`: payload.
    Rw = 5,
    /// `VIRTIO_VSOCK_OP_CREDIT_UPDATE`: the sender's `buf_alloc`/`fwd_cnt` changed.
    CreditUpdate = 6,
    /// `VIRTIO_VSOCK_OP_CREDIT_REQUEST`: please send a credit update.
    CreditRequest = 7,
}

impl TryFrom<u16> for Op {
    type Error = UnknownValue;
    fn try_from(value: u16) -> std::result::Result<Self, UnknownValue> {
        Ok(match value {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            value => return Err(UnknownValue { field: "op", value }),
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Request => "VIRTIO_VSOCK_OP_REQUEST",
            Op::Response => "VIRTIO_VSOCK_OP_RESPONSE",
            Op::Rst => "VIRTIO_VSOCK_OP_RST",
            Op::Shutdown => "VIRTIO_VSOCK_OP_SHUTDOWN",
            Op::Rw => "VIRTIO_VSOCK_OP_RW",
            Op::CreditUpdate => "VIRTIO_VSOCK_OP_CREDIT_UPDATE",
            Op::CreditRequest => "VIRTIO_VSOCK_OP_CREDIT_REQUEST",
        })
    }
}

/// Socket type (`type` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum SocketType {
    /// `VIRTIO_VSOCK_TYPE_STREAM`.
    Stream = 1,
    /// `VIRTIO_VSOCK_TYPE_SEQPACKET`.
    SeqPacket = 2,
}

impl TryFrom<u16> for SocketType {
    type Error = UnknownValue;
    fn try_from(value: u16) -> std::result::Result<Self, UnknownValue> {
        match value {
            1 => Ok(SocketType::Stream),
            2 => Ok(SocketType::SeqPacket),
            value => Err(UnknownValue {
                field: "type",
                value,
            }),
        }
    }
}

impl fmt::Display for SocketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SocketType::Stream => "VIRTIO_VSOCK_TYPE_STREAM",
            SocketType::SeqPacket => "VIRTIO_VSOCK_TYPE_SEQPACKET",
        })
    }
}

/// The flags of a `VIRTIO_VSOCK_OP_SHUTDOWN` packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShutdownFlags {
    /// `VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE`: the sender will receive no more data.
    pub receive: bool,
    /// `VIRTIO_VSOCK_SHUTDOWN_F_SEND`: the sender will send no more data.
    pub send: bool,
}

impl ShutdownFlags {
    /// Decode from the header's `flags` (unknown bits are ignored, as Linux does).
    pub fn from_bits(flags: u32) -> Self {
        ShutdownFlags {
            receive: flags & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE != 0,
            send: flags & VIRTIO_VSOCK_SHUTDOWN_F_SEND != 0,
        }
    }
    /// Encode for the header's `flags`.
    pub fn bits(self) -> u32 {
        (if self.receive {
            VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE
        } else {
            0
        }) | (if self.send {
            VIRTIO_VSOCK_SHUTDOWN_F_SEND
        } else {
            0
        })
    }
}

/// The flags of a SEQPACKET `VIRTIO_VSOCK_OP_RW` packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeqFlags {
    /// `VIRTIO_VSOCK_SEQ_EOM`: this packet ends a message.
    pub eom: bool,
    /// `VIRTIO_VSOCK_SEQ_EOR`: this packet ends a record (`MSG_EOR`).
    pub eor: bool,
}

impl SeqFlags {
    /// Decode from the header's `flags`.
    pub fn from_bits(flags: u32) -> Self {
        SeqFlags {
            eom: flags & VIRTIO_VSOCK_SEQ_EOM != 0,
            eor: flags & VIRTIO_VSOCK_SEQ_EOR != 0,
        }
    }
    /// Encode for the header's `flags`.
    pub fn bits(self) -> u32 {
        (if self.eom { VIRTIO_VSOCK_SEQ_EOM } else { 0 })
            | (if self.eor { VIRTIO_VSOCK_SEQ_EOR } else { 0 })
    }
}

/// A decoded `virtio_vsock_hdr`: plain values in host byte order.
///
/// This is the private copy a [`VsockPacket`] keeps, and what the protocol core consumes and
/// produces. `type_` and `op` stay raw `u16`s so that unknown values survive a round trip; use
/// [`Header::op_typed`] and [`Header::socket_type`] for the typed view.
///
/// The fields are laid out in wire order (`repr(C)`, no padding before `fwd_cnt`), so that on a
/// little-endian host decoding and encoding are plain copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[repr(C)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Socket type ([`SocketType`]).
    pub type_: u16,
    /// Operation ([`Op`]).
    pub op: u16,
    /// Operation-specific flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer (free-running).
    pub fwd_cnt: u32,
}

impl Header {
    /// Decode from the 44 bytes of the wire format.
    #[inline]
    pub fn from_bytes(b: &[u8; PKT_HEADER_SIZE]) -> Self {
        // Constant offsets inside a fixed-size array: these compile to plain loads.
        fn at<const N: usize>(b: &[u8; PKT_HEADER_SIZE], o: usize) -> [u8; N] {
            let mut a = [0u8; N];
            a.copy_from_slice(&b[o..o + N]);
            a
        }
        let u64_at = |o: usize| u64::from_le_bytes(at(b, o));
        let u32_at = |o: usize| u32::from_le_bytes(at(b, o));
        let u16_at = |o: usize| u16::from_le_bytes(at(b, o));
        Header {
            src_cid: u64_at(SRC_CID_OFFSET),
            dst_cid: u64_at(DST_CID_OFFSET),
            src_port: u32_at(SRC_PORT_OFFSET),
            dst_port: u32_at(DST_PORT_OFFSET),
            len: u32_at(LEN_OFFSET),
            type_: u16_at(TYPE_OFFSET),
            op: u16_at(OP_OFFSET),
            flags: u32_at(FLAGS_OFFSET),
            buf_alloc: u32_at(BUF_ALLOC_OFFSET),
            fwd_cnt: u32_at(FWD_CNT_OFFSET),
        }
    }

    /// Encode to the 44 bytes of the wire format.
    #[inline]
    pub fn to_bytes(&self) -> [u8; PKT_HEADER_SIZE] {
        let mut b = [0u8; PKT_HEADER_SIZE];
        b[SRC_CID_OFFSET..SRC_CID_OFFSET + 8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[DST_CID_OFFSET..DST_CID_OFFSET + 8].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[SRC_PORT_OFFSET..SRC_PORT_OFFSET + 4].copy_from_slice(&self.src_port.to_le_bytes());
        b[DST_PORT_OFFSET..DST_PORT_OFFSET + 4].copy_from_slice(&self.dst_port.to_le_bytes());
        b[LEN_OFFSET..LEN_OFFSET + 4].copy_from_slice(&self.len.to_le_bytes());
        b[TYPE_OFFSET..TYPE_OFFSET + 2].copy_from_slice(&self.type_.to_le_bytes());
        b[OP_OFFSET..OP_OFFSET + 2].copy_from_slice(&self.op.to_le_bytes());
        b[FLAGS_OFFSET..FLAGS_OFFSET + 4].copy_from_slice(&self.flags.to_le_bytes());
        b[BUF_ALLOC_OFFSET..BUF_ALLOC_OFFSET + 4].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[FWD_CNT_OFFSET..FWD_CNT_OFFSET + 4].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The typed operation, or the unknown raw value.
    pub fn op_typed(&self) -> std::result::Result<Op, UnknownValue> {
        Op::try_from(self.op)
    }

    /// The typed socket type, or the unknown raw value.
    pub fn socket_type(&self) -> std::result::Result<SocketType, UnknownValue> {
        SocketType::try_from(self.type_)
    }
}

impl fmt::Display for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = self
            .op_typed()
            .map(|o| o.to_string())
            .unwrap_or_else(|_| format!("op {}", self.op));
        let ty = self
            .socket_type()
            .map(|t| t.to_string())
            .unwrap_or_else(|_| format!("type {}", self.type_));
        write!(
            f,
            "{op} {ty} {}:{} -> {}:{} len {} flags {:#x} buf_alloc {} fwd_cnt {}",
            self.src_cid,
            self.src_port,
            self.dst_cid,
            self.dst_port,
            self.len,
            self.flags,
            self.buf_alloc,
            self.fwd_cnt
        )
    }
}

/// The vsock packet: header and data as [`VolatileSlice`]s over the memory of a descriptor chain
/// (or of driver buffers), plus a private copy of the header.
#[derive(Debug)]
pub struct VsockPacket<'a, B: BitmapSlice> {
    /// The header's first (usually only) fragment.
    header_slice: VolatileSlice<'a, B>,
    /// Further header fragments when the header is split over descriptors (rare; no allocation
    /// when empty).
    header_rest: Vec<VolatileSlice<'a, B>>,
    /// The private copy every getter reads.
    header: Header,
    /// The payload's first fragment (`None` when there is no payload buffer).
    data_slice: Option<VolatileSlice<'a, B>>,
    /// Further payload fragments, in order.
    data_rest: Vec<VolatileSlice<'a, B>>,
    /// `data_slice` is the data slice 0.12 gives even though `data_rest` follows it: an RX
    /// chain's descriptors after the second, room 0.12 does not look at.
    data_slice_is_ref: bool,
}

/// Get a single slice for `[addr, addr + count)`, or `FragmentedMemory` when the range spans
/// host fragments. `count` must be non-zero.
#[inline]
fn get_single_slice<'a, M: GuestMemory, B: BitmapSlice>(
    mem: &'a M,
    addr: GuestAddress,
    count: usize,
    access: Permissions,
) -> Result<VolatileSlice<'a, B>>
where
    M::Bitmap: WithBitmapSlice<'a, S = B>,
{
    let mut slices = mem
        .get_slices(addr, count, access)
        .map_err(Error::InvalidMemoryAccess)?;
    let slice = match slices.next() {
        Some(s) => s.map_err(Error::InvalidMemoryAccess)?,
        None => {
            return Err(Error::DescriptorLengthTooSmall {
                expected: count as u64,
                found: 0,
            })
        }
    };
    if slice.len() == count {
        Ok(slice)
    } else {
        Err(Error::FragmentedMemory {
            addr: addr.raw_value(),
            len: count,
        })
    }
}

/// Guest-memory lookups for the buffers of one chain.
///
/// When `mem` has no IOMMU in between ([`GuestMemory::physical_memory`]: guest addresses are the
/// backend's addresses), the region holding the head descriptor is resolved once, as one slice
/// over the whole region, and every buffer inside that region is a bounds-checked sub-slice of
/// it: the same pointer and length a lookup of its own would give, without the lookup. Any
/// other buffer (another region, a region seam, an unmapped address, IOMMU-translated memory)
/// is looked up as 0.12 does, with its exact verdict.
struct Lookup<'a, M, B> {
    mem: &'a M,
    access: Permissions,
    /// Start of the resolved region and a slice over all of it.
    region: Option<(GuestAddress, VolatileSlice<'a, B>)>,
}

impl<'a, M: GuestMemory, B: BitmapSlice> Lookup<'a, M, B>
where
    M::Bitmap: WithBitmapSlice<'a, S = B>,
{
    /// Resolve the region that holds `addr` (if `mem` is plain physical memory and one does).
    /// Nothing is refused here: a buffer the region does not hold is looked up later.
    #[inline(always)]
    fn new(mem: &'a M, addr: GuestAddress, access: Permissions) -> Self {
        let region = mem
            .physical_memory()
            .and_then(|phys| phys.find_region(addr))
            .and_then(|r| {
                let len = usize::try_from(r.len()).ok()?;
                let whole = first_fragment(mem, r.start_addr(), len, access)?;
                (whole.len() == len).then_some((r.start_addr(), whole))
            });
        Lookup {
            mem,
            access,
            region,
        }
    }

    /// The single slice for `[addr, addr + count)` (`count` non-zero), or the error 0.12 gives.
    #[inline(always)]
    fn slice(&self, addr: GuestAddress, count: usize) -> Result<VolatileSlice<'a, B>> {
        if let Some((start, whole)) = &self.region {
            // `addr - start` and `offset + count` are checked (by `checked_offset_from` and
            // `subslice`): a buffer not wholly inside the region falls through to the lookup.
            if let Some(offset) = addr
                .checked_offset_from(*start)
                .and_then(|o| usize::try_from(o).ok())
            {
                if let Ok(slice) = whole.subslice(offset, count) {
                    return Ok(slice);
                }
            }
        }
        get_single_slice(self.mem, addr, count, self.access)
    }
}

/// The first host fragment of `[addr, addr + count)` (`count` non-zero): the whole range when
/// one mapping holds it, a shorter front part when it does not, `None` when `addr` cannot be
/// resolved.
#[inline]
fn first_fragment<'a, M: GuestMemory, B: BitmapSlice>(
    mem: &'a M,
    addr: GuestAddress,
    count: usize,
    access: Permissions,
) -> Option<VolatileSlice<'a, B>>
where
    M::Bitmap: WithBitmapSlice<'a, S = B>,
{
    mem.get_slices(addr, count, access).ok()?.next()?.ok()
}

/// Read the header at the start of `slice` (at least [`PKT_HEADER_SIZE`] bytes) into a private
/// copy, every byte exactly once: five 8-byte and one 4-byte volatile loads, where a
/// `read_slice` of a runtime length goes through a `memcpy` call.
#[inline(always)]
fn read_header<B: BitmapSlice>(slice: &VolatileSlice<'_, B>) -> Result<Header> {
    let words: [u64; 5] = slice
        .get_ref::<[u64; 5]>(0)
        .map_err(Error::InvalidVolatileAccess)?
        .load();
    let tail: u32 = slice
        .get_ref::<u32>(40)
        .map_err(Error::InvalidVolatileAccess)?
        .load();
    // Native-endian bytes are the bytes as they were in memory; `from_bytes` decodes them.
    let mut raw = [0u8; PKT_HEADER_SIZE];
    for (bytes, word) in raw.chunks_exact_mut(8).zip(words) {
        bytes.copy_from_slice(&word.to_ne_bytes());
    }
    raw[40..].copy_from_slice(&tail.to_ne_bytes());
    Ok(Header::from_bytes(&raw))
}

/// Which buffers a chain must hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Device-readable (driver to device).
    Tx,
    /// Device-writable (device to driver).
    Rx,
}

impl Direction {
    #[inline]
    fn check(self, write_only: bool, index: usize) -> Result<()> {
        match (self, write_only) {
            (Direction::Tx, true) => Err(Error::UnexpectedWriteOnlyDescriptor { index }),
            (Direction::Rx, false) => Err(Error::UnexpectedReadOnlyDescriptor { index }),
            _ => Ok(()),
        }
    }
    #[inline]
    fn access(self) -> Permissions {
        match self {
            Direction::Tx => Permissions::Read,
            Direction::Rx => Permissions::Write,
        }
    }
}

/// `DescriptorChainTooShort`: a TX payload but no descriptor holding it.
const NO_PAYLOAD_DESC: &str = "expected a descriptor holding the packet payload after the header";
/// `DescriptorChainTooShort`: an RX chain with no room after the header.
const NO_RX_ROOM: &str = "expected room for a payload after the header, found none";

/// A TX header's `len` must not exceed the negotiated maximum.
#[inline(always)]
fn check_tx_len(len: u32, max: u32) -> Result<()> {
    if len > max {
        return Err(Error::InvalidHeaderLen { len, max });
    }
    Ok(())
}

/// A descriptor as the parser needs it.
#[derive(Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    write_only: bool,
    has_next: bool,
}

#[inline]
fn next_desc<T>(chain: &mut DescriptorChain<T>) -> Option<Desc>
where
    T: Deref,
    T::Target: GuestMemory,
{
    chain.next().map(|d| Desc {
        addr: d.addr(),
        len: d.len(),
        write_only: d.is_write_only(),
        has_next: d.has_next(),
    })
}

/// Where a split header ended: the descriptor that held its last byte and how much of it is
/// left.
struct HeaderEnd {
    /// Index of that descriptor in the chain.
    index: usize,
    /// The descriptor.
    desc: Desc,
    /// Bytes of it the header used.
    used: u32,
}

/// A split header as [`VsockPacket::parse_split_header`] found it: its fragments and its
/// private copy.
struct HeaderParts<'a, B> {
    /// The first (usually only) fragment.
    slice: VolatileSlice<'a, B>,
    /// Further fragments of a split header.
    rest: Vec<VolatileSlice<'a, B>>,
    /// The private copy (zeroed for RX).
    header: Header,
}

impl<'a, B: BitmapSlice> HeaderParts<'a, B> {
    /// The packet, from its parts.
    #[inline(always)]
    fn into_packet(self, data: Fragments<'a, B>) -> VsockPacket<'a, B> {
        VsockPacket::assemble(self.slice, self.rest, self.header, data)
    }
}

/// Fragments in chain order, the first apart so that the common one-fragment case allocates
/// nothing.
struct Fragments<'a, B> {
    first: Option<VolatileSlice<'a, B>>,
    rest: Vec<VolatileSlice<'a, B>>,
    /// `first` is 0.12's data slice (possibly `None`) and `rest` is room 0.12 ignores.
    first_is_ref: bool,
}

impl<B> Default for Fragments<'_, B> {
    fn default() -> Self {
        Fragments {
            first: None,
            rest: Vec::new(),
            first_is_ref: false,
        }
    }
}

impl<'a, B> Fragments<'a, B> {
    #[inline(always)]
    fn push(&mut self, slice: VolatileSlice<'a, B>) {
        if self.first.is_none() {
            self.first = Some(slice);
        } else {
            self.rest.push(slice);
        }
    }
}

impl<'a, B: BitmapSlice> VsockPacket<'a, B> {
    /// Return a reference to the header's slice. When the header is split over several
    /// descriptors this is its first fragment; see [`VsockPacket::header_slices`].
    pub fn header_slice(&self) -> &VolatileSlice<'a, B> {
        &self.header_slice
    }

    /// The header's fragments, in order (one for every layout `virtio-vsock` 0.12 accepts).
    pub fn header_slices(&self) -> impl Iterator<Item = &VolatileSlice<'a, B>> {
        std::iter::once(&self.header_slice).chain(self.header_rest.iter())
    }

    /// Return the payload's slice when the payload (buffer) is one contiguous slice, or the
    /// slice `virtio-vsock` 0.12 gives for the same chain.
    ///
    /// `None` when the packet has no payload buffer, and also when the payload is spread over
    /// several descriptors in a layout 0.12 refuses: use [`VsockPacket::data_slices`] for the
    /// general case. For an RX chain of three or more descriptors whose head holds the header,
    /// this is 0.12's buffer, the second descriptor (`None` when it is empty), and
    /// [`VsockPacket::data_slices`] goes on with the room after it.
    pub fn data_slice(&self) -> Option<&VolatileSlice<'a, B>> {
        if self.data_rest.is_empty() || self.data_slice_is_ref {
            self.data_slice.as_ref()
        } else {
            None
        }
    }

    /// The payload's fragments in order (empty when there is no payload buffer).
    ///
    /// For a TX packet their lengths add up to the header's `len`; for an RX packet, to the
    /// capacity of the posted buffer.
    pub fn data_slices(&self) -> impl Iterator<Item = &VolatileSlice<'a, B>> {
        self.data_slice.iter().chain(self.data_rest.iter())
    }

    /// Total length of the payload fragments.
    pub fn data_len(&self) -> usize {
        self.data_slices().map(|s| s.len()).sum()
    }

    /// Copy the payload into `buf` (at most `buf.len()` bytes); returns the bytes copied.
    pub fn read_data(&self, buf: &mut [u8]) -> Result<usize> {
        self.read_data_at(0, buf)
    }

    /// Copy payload bytes from byte `offset` of the payload into `buf` (at most `buf.len()`,
    /// fewer where the payload ends); returns the bytes copied.
    pub fn read_data_at(&self, mut offset: usize, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        for s in self.data_slices() {
            if done == buf.len() {
                break;
            }
            if offset >= s.len() {
                offset -= s.len();
                continue;
            }
            let n = (s.len() - offset).min(buf.len() - done);
            crate::copy::from_volatile(s, offset, &mut buf[done..done + n])
                .map_err(Error::InvalidVolatileAccess)?;
            done += n;
            offset = 0;
        }
        Ok(done)
    }

    /// Copy `buf` into the payload buffer from its start; returns the bytes copied (at most the
    /// buffer's capacity). The header's `len` is not changed: call [`VsockPacket::set_len`].
    pub fn write_data(&self, buf: &[u8]) -> Result<usize> {
        self.write_data_at(0, buf)
    }

    /// Copy `buf` into the payload buffer from byte `offset` of the payload; returns the bytes
    /// copied (fewer where the buffer ends). The header's `len` is not changed.
    pub fn write_data_at(&self, mut offset: usize, buf: &[u8]) -> Result<usize> {
        let mut done = 0;
        for s in self.data_slices() {
            if done == buf.len() {
                break;
            }
            if offset >= s.len() {
                offset -= s.len();
                continue;
            }
            let n = (s.len() - offset).min(buf.len() - done);
            crate::copy::to_volatile(s, offset, &buf[done..done + n])
                .map_err(Error::InvalidVolatileAccess)?;
            done += n;
            offset = 0;
        }
        Ok(done)
    }

    /// The private copy of the header.
    pub fn header(&self) -> Header {
        self.header
    }

    /// Write a whole decoded header (to the copy and to memory).
    pub fn set_header(&mut self, header: &Header) -> &mut Self {
        self.write_header_bytes(&header.to_bytes(), 0);
        self.header = *header;
        self
    }

    /// Write to the packet header from an input of raw bytes (exactly [`PKT_HEADER_SIZE`]).
    ///
    /// # Example
    ///
    /// ```
    /// use vdpa_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
    ///
    /// let mut hdr = [0u8; PKT_HEADER_SIZE];
    /// // SAFETY: `hdr` outlives `pkt` and nothing else accesses it meanwhile.
    /// let mut pkt = unsafe { VsockPacket::new(&mut hdr, None).unwrap() };
    /// let mut raw = [0u8; PKT_HEADER_SIZE];
    /// raw[20] = 7; // dst_port = 7
    /// pkt.set_header_from_raw(&raw).unwrap();
    /// assert_eq!(pkt.dst_port(), 7);
    /// assert!(pkt.set_header_from_raw(&raw[..10]).is_err());
    /// ```
    pub fn set_header_from_raw(&mut self, bytes: &[u8]) -> Result<()> {
        let raw: &[u8; PKT_HEADER_SIZE] = bytes
            .try_into()
            .map_err(|_| Error::InvalidHeaderInputSize(bytes.len()))?;
        self.write_header_bytes(raw, 0);
        // Re-read what memory now holds, as 0.12 does, so the copy matches memory exactly.
        let mut copy = [0u8; PKT_HEADER_SIZE];
        self.read_header_bytes(&mut copy)?;
        self.header = Header::from_bytes(&copy);
        Ok(())
    }

    /// Write `bytes` at `offset` of the header, across fragments. The offsets used here are all
    /// inside the 44 header bytes that every constructor guarantees, so writes cannot fail.
    #[inline]
    fn write_header_bytes(&self, bytes: &[u8], offset: usize) {
        if self.header_rest.is_empty() {
            // The whole header is in `header_slice`, which is at least PKT_HEADER_SIZE long.
            let _ = self.header_slice.write_slice(bytes, offset);
            return;
        }
        let mut frag_start = 0;
        for s in self.header_slices() {
            let frag_end = frag_start + s.len();
            let lo = offset.max(frag_start);
            let hi = (offset + bytes.len()).min(frag_end);
            if lo < hi {
                let _ = s.write_slice(&bytes[lo - offset..hi - offset], lo - frag_start);
            }
            frag_start = frag_end;
        }
    }

    fn read_header_bytes(&self, out: &mut [u8; PKT_HEADER_SIZE]) -> Result<()> {
        let mut done = 0;
        for s in self.header_slices() {
            let n = s.len().min(PKT_HEADER_SIZE - done);
            s.read_slice(&mut out[done..done + n], 0)
                .map_err(Error::InvalidVolatileAccess)?;
            done += n;
        }
        Ok(())
    }
}

macro_rules! header_field {
    ($(#[$gdoc:meta])* $get:ident, $(#[$sdoc:meta])* $set:ident, $field:ident, $ty:ty, $offset:ident) => {
        impl<'a, B: BitmapSlice> VsockPacket<'a, B> {
            $(#[$gdoc])*
            #[inline]
            pub fn $get(&self) -> $ty {
                self.header.$field
            }
            $(#[$sdoc])*
            #[inline]
            pub fn $set(&mut self, value: $ty) -> &mut Self {
                self.header.$field = value;
                self.write_header_bytes(&value.to_le_bytes(), $offset);
                self
            }
        }
    };
}

header_field!(
    /// Return the `src_cid` of the header.
    src_cid,
    /// Set the `src_cid` of the header.
    set_src_cid, src_cid, u64, SRC_CID_OFFSET
);
header_field!(
    /// Return the `dst_cid` of the header.
    dst_cid,
    /// Set the `dst_cid` of the header.
    set_dst_cid, dst_cid, u64, DST_CID_OFFSET
);
header_field!(
    /// Return the `src_port` of the header.
    src_port,
    /// Set the `src_port` of the header.
    set_src_port, src_port, u32, SRC_PORT_OFFSET
);
header_field!(
    /// Return the `dst_port` of the header.
    dst_port,
    /// Set the `dst_port` of the header.
    set_dst_port, dst_port, u32, DST_PORT_OFFSET
);
header_field!(
    /// Return the `len` of the header.
    len,
    /// Set the `len` of the header.
    set_len, len, u32, LEN_OFFSET
);
header_field!(
    /// Return the `type` of the header.
    type_,
    /// Set the `type` of the header.
    set_type, type_, u16, TYPE_OFFSET
);
header_field!(
    /// Return the `op` of the header.
    op,
    /// Set the `op` of the header.
    set_op, op, u16, OP_OFFSET
);
header_field!(
    /// Return the `flags` of the header.
    flags,
    /// Set the `flags` of the header.
    set_flags, flags, u32, FLAGS_OFFSET
);
header_field!(
    /// Return the `buf_alloc` of the header.
    buf_alloc,
    /// Set the `buf_alloc` of the header.
    set_buf_alloc, buf_alloc, u32, BUF_ALLOC_OFFSET
);
header_field!(
    /// Return the `fwd_cnt` of the header.
    fwd_cnt,
    /// Set the `fwd_cnt` of the header.
    set_fwd_cnt, fwd_cnt, u32, FWD_CNT_OFFSET
);

impl<'a, B: BitmapSlice> VsockPacket<'a, B> {
    /// Returns whether the `len` field of the header is 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Set a specific flag of the header (OR it into `flags`).
    pub fn set_flag(&mut self, flag: u32) -> &mut Self {
        self.set_flags(self.flags() | flag)
    }

    /// Pop the head descriptor and check its direction.
    #[inline(always)]
    fn pop_head<T>(chain: &mut DescriptorChain<T>, dir: Direction) -> Result<Desc>
    where
        T: Deref,
        T::Target: GuestMemory,
    {
        let head = next_desc(chain).ok_or(Error::DescriptorChainTooShort(
            "expected a head descriptor holding the packet header, found an empty chain",
        ))?;
        dir.check(head.write_only, 0)?;
        Ok(head)
    }

    /// The packet, assembled once from its parts (no partly built packet is moved around).
    #[inline(always)]
    fn assemble(
        header_slice: VolatileSlice<'a, B>,
        header_rest: Vec<VolatileSlice<'a, B>>,
        header: Header,
        data: Fragments<'a, B>,
    ) -> Self {
        VsockPacket {
            header_slice,
            header_rest,
            header,
            data_slice: data.first,
            data_rest: data.rest,
            data_slice_is_ref: data.first_is_ref,
        }
    }

    /// Gather a header split over descriptors (the head is shorter than a header; beyond 0.12):
    /// its fragments and private copy (zeroed for RX, which is not read), and where it ended.
    fn parse_split_header<M, T>(
        lookup: &Lookup<'a, M, B>,
        chain: &mut DescriptorChain<T>,
        dir: Direction,
        head: Desc,
    ) -> Result<(HeaderParts<'a, B>, HeaderEnd)>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        if !head.has_next {
            return Err(Error::DescriptorLengthTooSmall {
                expected: PKT_HEADER_SIZE as u64,
                found: u64::from(head.len),
            });
        }
        let mut raw = [0u8; PKT_HEADER_SIZE];
        let mut got = 0usize;
        let mut frags = Fragments::default();
        let mut desc = head;
        let mut index = 0;
        loop {
            let take = (desc.len as usize).min(PKT_HEADER_SIZE - got);
            if take > 0 {
                let slice = lookup.slice(desc.addr, take)?;
                if dir == Direction::Tx {
                    slice
                        .read_slice(&mut raw[got..got + take], 0)
                        .map_err(Error::InvalidVolatileAccess)?;
                }
                got += take;
                frags.push(slice);
            }
            if got == PKT_HEADER_SIZE {
                let end = HeaderEnd {
                    index,
                    desc,
                    // `take` is at most PKT_HEADER_SIZE here.
                    used: u32::try_from(take).unwrap_or(PKT_HEADER_LEN),
                };
                let slice = frags
                    .first
                    .ok_or(Error::DescriptorChainTooShort("no header fragment"))?;
                let parts = HeaderParts {
                    slice,
                    rest: frags.rest,
                    // RX headers are not read: `raw` stayed zeroed.
                    header: Header::from_bytes(&raw),
                };
                return Ok((parts, end));
            }
            desc = match next_desc(chain) {
                Some(d) => d,
                None => {
                    return Err(Error::DescriptorLengthTooSmall {
                        expected: PKT_HEADER_SIZE as u64,
                        found: got as u64,
                    })
                }
            };
            index += 1;
            dir.check(desc.write_only, index)?;
        }
    }

    /// Create the packet wrapper from a TX chain (device view: the buffers are device-readable).
    ///
    /// The chain starts with the header; the payload (`len` bytes) follows, in the head
    /// descriptor after the header or in the following descriptors (see the module docs for the
    /// exact layout rules).
    ///
    /// # Arguments
    ///
    /// * `mem` - the memory that holds the queue buffers.
    /// * `desc_chain` - the descriptor chain corresponding to a packet.
    /// * `max_data_size` - the largest payload accepted.
    ///
    /// # Example
    ///
    /// ```
    /// use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    /// use virtio_queue::mock::MockSplitQueue;
    /// use virtio_queue::{Queue, QueueT};
    /// use vdpa_vsock::packet::{Op, VsockPacket};
    /// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    ///
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    /// let vq = MockSplitQueue::new(&mem, 16);
    /// let mut queue: Queue = vq.create_queue().unwrap();
    /// // Header (op RW, len 5) in one descriptor, payload in two more.
    /// let mut hdr = [0u8; 44];
    /// hdr[24] = 5;
    /// hdr[30] = Op::Rw as u8;
    /// mem.write_slice(&hdr, GuestAddress(0x5_0000)).unwrap();
    /// mem.write_slice(b"hel", GuestAddress(0x6_0000)).unwrap();
    /// mem.write_slice(b"lo", GuestAddress(0x7_0000)).unwrap();
    /// vq.build_desc_chain(&[
    ///     RawDescriptor::from(SplitDescriptor::new(0x5_0000, 44, 0, 0)),
    ///     RawDescriptor::from(SplitDescriptor::new(0x6_0000, 3, 0, 0)),
    ///     RawDescriptor::from(SplitDescriptor::new(0x7_0000, 2, 0, 0)),
    /// ]).unwrap();
    ///
    /// let mut chain = queue.pop_descriptor_chain(&mem).unwrap();
    /// let pkt = VsockPacket::from_tx_virtq_chain(&mem, &mut chain, 64 * 1024).unwrap();
    /// assert_eq!(pkt.op(), Op::Rw as u16);
    /// let mut data = [0u8; 5];
    /// pkt.read_data(&mut data).unwrap();
    /// assert_eq!(&data, b"hello");
    /// assert!(pkt.data_slice().is_none()); // fragmented: use data_slices()
    /// assert_eq!(pkt.data_slices().count(), 2);
    /// ```
    pub fn from_tx_virtq_chain<M, T>(
        mem: &'a M,
        desc_chain: &mut DescriptorChain<T>,
        max_data_size: u32,
    ) -> Result<Self>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        let head = Self::pop_head(desc_chain, Direction::Tx)?;
        let lookup = Lookup::new(mem, head.addr, Direction::Tx.access());
        if (head.len as usize) < PKT_HEADER_SIZE {
            return Self::tx_split_header(&lookup, desc_chain, max_data_size, head);
        }
        // The whole header in the head descriptor: every layout 0.12 accepts.
        let header_slice = lookup.slice(head.addr, PKT_HEADER_SIZE)?;
        // Read the header once, from the slice (no second address translation).
        let header = read_header(&header_slice)?;
        let want = header.len;
        let mut data = Fragments::default();
        // A header-only packet: anything after the header is ignored.
        if want > 0 {
            check_tx_len(want, max_data_size)?;
            if head.has_next {
                // The 0.12 rule: a head holding the whole header and followed by another
                // descriptor leaves the payload to the next descriptor (the head's remaining
                // bytes are padding).
                Self::tx_payload(&lookup, desc_chain, &mut data, want, want as usize, 0, true)?;
            } else {
                // One descriptor (Linux 6.2 and later): the payload follows the header. Refuse
                // a head too short for it before touching memory (0.12 answers "chain too
                // short" here whatever the buffer's address).
                if head.len - PKT_HEADER_LEN < want {
                    return Err(Error::DescriptorChainTooShort(NO_PAYLOAD_DESC));
                }
                let addr = head.addr.checked_add(PKT_HEADER_SIZE as u64).ok_or(
                    Error::DescriptorLengthTooSmall {
                        expected: PKT_HEADER_SIZE as u64 + u64::from(want),
                        found: u64::from(head.len),
                    },
                )?;
                data.push(lookup.slice(addr, want as usize)?);
            }
        }
        Ok(Self::assemble(header_slice, Vec::new(), header, data))
    }

    /// [`Self::from_tx_virtq_chain`] for a header split over descriptors (beyond 0.12): the
    /// payload starts right after the header's last byte.
    #[inline(never)]
    fn tx_split_header<M, T>(
        lookup: &Lookup<'a, M, B>,
        desc_chain: &mut DescriptorChain<T>,
        max_data_size: u32,
        head: Desc,
    ) -> Result<Self>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        let (parts, end) = Self::parse_split_header(lookup, desc_chain, Direction::Tx, head)?;
        let want = parts.header.len;
        let mut data = Fragments::default();
        if want == 0 {
            return Ok(parts.into_packet(data));
        }
        check_tx_len(want, max_data_size)?;
        let mut need = want as usize;
        let leftover = end.desc.len - end.used;
        if leftover > 0 {
            if !end.desc.has_next && (leftover as usize) < need {
                return Err(Error::DescriptorChainTooShort(NO_PAYLOAD_DESC));
            }
            let take = (leftover as usize).min(need);
            let addr = end.desc.addr.checked_add(u64::from(end.used)).ok_or(
                Error::DescriptorLengthTooSmall {
                    expected: PKT_HEADER_SIZE as u64 + u64::from(want),
                    found: u64::from(end.desc.len),
                },
            )?;
            data.push(lookup.slice(addr, take)?);
            need -= take;
        }
        Self::tx_payload(
            lookup,
            desc_chain,
            &mut data,
            want,
            need,
            end.index,
            end.desc.has_next,
        )?;
        Ok(parts.into_packet(data))
    }

    /// The last `need` bytes of a TX payload of `want` bytes, from the descriptors after the
    /// one at `index` (which has a next descriptor if `has_next`). Descriptors after the
    /// payload are ignored.
    #[inline(always)]
    fn tx_payload<M, T>(
        lookup: &Lookup<'a, M, B>,
        desc_chain: &mut DescriptorChain<T>,
        data: &mut Fragments<'a, B>,
        want: u32,
        mut need: usize,
        mut index: usize,
        mut has_next: bool,
    ) -> Result<()>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        let mut data_descs = 0usize;
        while need > 0 {
            let desc = match (has_next, next_desc(desc_chain)) {
                (true, Some(d)) => d,
                _ if data_descs == 0 => {
                    return Err(Error::DescriptorChainTooShort(NO_PAYLOAD_DESC))
                }
                _ => {
                    return Err(Error::DescriptorLengthTooSmall {
                        expected: u64::from(want),
                        found: (want as usize - need) as u64,
                    })
                }
            };
            index += 1;
            data_descs += 1;
            has_next = desc.has_next;
            Direction::Tx.check(desc.write_only, index)?;
            // The last descriptor must hold the rest: check its length before its address, as
            // 0.12 does.
            if !desc.has_next && (desc.len as usize) < need {
                return Err(Error::DescriptorLengthTooSmall {
                    expected: u64::from(want),
                    found: (want as usize - need) as u64 + u64::from(desc.len),
                });
            }
            let take = (desc.len as usize).min(need);
            if take > 0 {
                data.push(lookup.slice(desc.addr, take)?);
                need -= take;
            }
        }
        Ok(())
    }

    /// Create the packet wrapper from an RX chain (device view: the buffers are device-writable).
    ///
    /// The header comes first; the payload buffer follows (see the module docs, rules 4 and
    /// 5: the second descriptor as in 0.12, then any valid extra room up to `max_data_size`
    /// bytes). As in 0.12, a chain whose only room is the header is refused.
    ///
    /// # Example
    ///
    /// ```
    /// use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    /// use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    /// use virtio_queue::mock::MockSplitQueue;
    /// use virtio_queue::{Queue, QueueT};
    /// use vdpa_vsock::packet::{Op, VsockPacket};
    /// use vm_memory::{GuestAddress, GuestMemoryMmap};
    ///
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    /// let vq = MockSplitQueue::new(&mem, 16);
    /// let mut queue: Queue = vq.create_queue().unwrap();
    /// let w = VRING_DESC_F_WRITE as u16;
    /// vq.build_desc_chain(&[
    ///     RawDescriptor::from(SplitDescriptor::new(0x5_0000, 44, w, 0)),
    ///     RawDescriptor::from(SplitDescriptor::new(0x6_0000, 4096, w, 0)),
    /// ]).unwrap();
    ///
    /// let mut chain = queue.pop_descriptor_chain(&mem).unwrap();
    /// let mut pkt = VsockPacket::from_rx_virtq_chain(&mem, &mut chain, 64 * 1024).unwrap();
    /// let n = pkt.write_data(b"pong").unwrap();
    /// pkt.set_op(Op::Rw as u16).set_len(n as u32).set_src_cid(2).set_dst_cid(3);
    /// assert_eq!(pkt.len(), 4);
    /// ```
    pub fn from_rx_virtq_chain<M, T>(
        mem: &'a M,
        desc_chain: &mut DescriptorChain<T>,
        max_data_size: u32,
    ) -> Result<Self>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        let head = Self::pop_head(desc_chain, Direction::Rx)?;
        let lookup = Lookup::new(mem, head.addr, Direction::Rx.access());
        if (head.len as usize) < PKT_HEADER_SIZE {
            return Self::rx_split_header(&lookup, desc_chain, max_data_size, head);
        }
        // The whole header in the head descriptor: every layout 0.12 accepts.
        let header_slice = lookup.slice(head.addr, PKT_HEADER_SIZE)?;
        let mut data = Fragments::default();
        if head.has_next {
            // As in 0.12, the head's remaining bytes are padding and the buffer is the second
            // descriptor, checked as 0.12 checks it; the descriptors after it are extra room.
            Self::rx_second_and_extra(&lookup, desc_chain, &mut data, max_data_size)?;
        } else {
            // One descriptor: the buffer follows the header (0.12 puts no bound on it).
            let leftover = head.len - PKT_HEADER_LEN;
            if leftover == 0 {
                return Err(Error::DescriptorChainTooShort(NO_RX_ROOM));
            }
            let addr = head.addr.checked_add(PKT_HEADER_SIZE as u64).ok_or(
                Error::DescriptorLengthTooSmall {
                    expected: PKT_HEADER_SIZE as u64,
                    found: u64::from(head.len),
                },
            )?;
            data.push(lookup.slice(addr, leftover as usize)?);
        }
        // The RX header is not read: the copy stays zeroed (as 0.12) until the setters fill it.
        Ok(Self::assemble(
            header_slice,
            Vec::new(),
            Header::default(),
            data,
        ))
    }

    /// [`Self::from_rx_virtq_chain`] for a header split over descriptors (beyond 0.12): the
    /// buffer starts right after the header's last byte.
    #[inline(never)]
    fn rx_split_header<M, T>(
        lookup: &Lookup<'a, M, B>,
        desc_chain: &mut DescriptorChain<T>,
        max_data_size: u32,
        head: Desc,
    ) -> Result<Self>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        let (parts, end) = Self::parse_split_header(lookup, desc_chain, Direction::Rx, head)?;
        let mut data = Fragments::default();
        let leftover = end.desc.len - end.used;
        let mut total: u64 = 0;
        if leftover > 0 {
            // The leftover counts against the maximum like any other payload descriptor.
            if leftover > max_data_size {
                return Err(Error::DescriptorLengthTooLong {
                    max: u64::from(max_data_size),
                    found: u64::from(leftover),
                });
            }
            let addr = end.desc.addr.checked_add(u64::from(end.used)).ok_or(
                Error::DescriptorLengthTooSmall {
                    expected: PKT_HEADER_SIZE as u64,
                    found: u64::from(end.desc.len),
                },
            )?;
            data.push(lookup.slice(addr, leftover as usize)?);
            total = u64::from(leftover);
        }
        if !end.desc.has_next {
            if total == 0 {
                return Err(Error::DescriptorChainTooShort(NO_RX_ROOM));
            }
            return Ok(parts.into_packet(data));
        }
        Self::rx_payload(
            lookup,
            desc_chain,
            &mut data,
            max_data_size,
            total,
            end.index,
        )?;
        Ok(parts.into_packet(data))
    }

    /// The RX buffer after a head that holds the whole header and has a next descriptor.
    ///
    /// The second descriptor is 0.12's buffer, with 0.12's verdicts: it must exist, be
    /// device-writable, hold at most `max_data_size` bytes and be one slice of memory. The
    /// descriptors after it, which 0.12 ignores, are extra room in [`VsockPacket::data_slices`]
    /// as far as they are device-writable and inside memory, and only up to `max_data_size`
    /// bytes in all: the first that is not ends the buffer without failing the chain.
    #[inline(always)]
    fn rx_second_and_extra<M, T>(
        lookup: &Lookup<'a, M, B>,
        desc_chain: &mut DescriptorChain<T>,
        data: &mut Fragments<'a, B>,
        max_data_size: u32,
    ) -> Result<()>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        let second = next_desc(desc_chain).ok_or(Error::DescriptorChainTooShort(
            "expected a payload descriptor after the header, found the chain's end",
        ))?;
        if !second.write_only {
            return Err(Error::UnexpectedReadOnlyDescriptor { index: 1 });
        }
        if second.len > max_data_size {
            return Err(Error::DescriptorLengthTooLong {
                max: u64::from(max_data_size),
                found: u64::from(second.len),
            });
        }
        if second.len > 0 {
            data.first = Some(lookup.slice(second.addr, second.len as usize)?);
        }
        if second.has_next {
            Self::rx_extra(lookup, desc_chain, data, max_data_size - second.len);
        }
        Ok(())
    }

    /// Extra RX room 0.12 ignores: the descriptors that follow, while they are device-writable
    /// and inside memory, at most `room` bytes in all (the last one cut to fit). Never fails.
    #[inline(never)]
    fn rx_extra<M, T>(
        lookup: &Lookup<'a, M, B>,
        desc_chain: &mut DescriptorChain<T>,
        data: &mut Fragments<'a, B>,
        mut room: u32,
    ) where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        data.first_is_ref = true;
        while room > 0 {
            let Some(desc) = next_desc(desc_chain) else {
                break;
            };
            if !desc.write_only {
                break;
            }
            let take = desc.len.min(room);
            if take > 0 {
                let Ok(slice) = lookup.slice(desc.addr, take as usize) else {
                    break;
                };
                data.rest.push(slice);
                room -= take;
            }
            if !desc.has_next {
                break;
            }
        }
    }

    /// The rest of an RX buffer (`total` bytes so far): every descriptor after the one at
    /// `index`, which has a next descriptor; at most `max_data_size` bytes in all.
    #[inline(always)]
    fn rx_payload<M, T>(
        lookup: &Lookup<'a, M, B>,
        desc_chain: &mut DescriptorChain<T>,
        data: &mut Fragments<'a, B>,
        max_data_size: u32,
        mut total: u64,
        mut index: usize,
    ) -> Result<()>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
        T: Deref,
        T::Target: GuestMemory,
    {
        let mut seen_data_desc = false;
        while let Some(desc) = next_desc(desc_chain) {
            index += 1;
            seen_data_desc = true;
            if !desc.write_only {
                return Err(Error::UnexpectedReadOnlyDescriptor { index });
            }
            total += u64::from(desc.len);
            if total > u64::from(max_data_size) {
                return Err(Error::DescriptorLengthTooLong {
                    max: u64::from(max_data_size),
                    found: total,
                });
            }
            if desc.len > 0 {
                data.push(lookup.slice(desc.addr, desc.len as usize)?);
            }
            if !desc.has_next {
                break;
            }
        }
        if !seen_data_desc {
            return Err(Error::DescriptorChainTooShort(
                "expected a payload descriptor after the header, found the chain's end",
            ));
        }
        Ok(())
    }

    /// Driver view of a used RX buffer: the device wrote a packet into the buffer at `addr`
    /// (`capacity` bytes were posted) and reported `used_len` bytes written.
    ///
    /// Everything the device wrote is checked before use: `used_len` must cover a header and
    /// fit the posted buffer, and the header's `len` must fit in what was written. The payload is
    /// exactly `len` bytes.
    ///
    /// # Example
    ///
    /// ```
    /// use vdpa_vsock::packet::{Header, VsockPacket};
    /// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    ///
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    /// let hdr = Header { len: 3, op: 5, type_: 1, ..Default::default() };
    /// mem.write_slice(&hdr.to_bytes(), GuestAddress(0x1000)).unwrap();
    /// mem.write_slice(b"abc", GuestAddress(0x1000 + 44)).unwrap();
    /// let pkt = VsockPacket::from_used_rx_buffer(&mem, GuestAddress(0x1000), 4096, 47).unwrap();
    /// assert_eq!(pkt.header(), hdr);
    /// // A device that claims more than it wrote is refused.
    /// assert!(VsockPacket::from_used_rx_buffer(&mem, GuestAddress(0x1000), 4096, 45).is_err());
    /// ```
    pub fn from_used_rx_buffer<M>(
        mem: &'a M,
        addr: GuestAddress,
        capacity: u32,
        used_len: u32,
    ) -> Result<Self>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
    {
        if used_len > capacity {
            return Err(Error::DescriptorLengthTooLong {
                max: u64::from(capacity),
                found: u64::from(used_len),
            });
        }
        if (used_len as usize) < PKT_HEADER_SIZE {
            return Err(Error::DescriptorLengthTooSmall {
                expected: PKT_HEADER_SIZE as u64,
                found: u64::from(used_len),
            });
        }
        let header_slice = get_single_slice(mem, addr, PKT_HEADER_SIZE, Permissions::Read)?;
        let mut raw = [0u8; PKT_HEADER_SIZE];
        header_slice
            .read_slice(&mut raw, 0)
            .map_err(Error::InvalidVolatileAccess)?;
        let header = Header::from_bytes(&raw);
        let room = used_len - PKT_HEADER_LEN;
        if header.len > room {
            return Err(Error::InvalidHeaderLen {
                len: header.len,
                max: room,
            });
        }
        let data_slice = if header.len > 0 {
            let data_addr =
                addr.checked_add(PKT_HEADER_SIZE as u64)
                    .ok_or(Error::FragmentedMemory {
                        addr: addr.raw_value(),
                        len: used_len as usize,
                    })?;
            Some(get_single_slice(
                mem,
                data_addr,
                header.len as usize,
                Permissions::Read,
            )?)
        } else {
            None
        };
        Ok(VsockPacket {
            header_slice,
            header_rest: Vec::new(),
            header,
            data_slice,
            data_rest: Vec::new(),
            data_slice_is_ref: false,
        })
    }

    /// Driver view of a TX buffer being filled: a header at `addr` and room for up to
    /// `capacity - PKT_HEADER_SIZE` bytes of payload after it. The header starts zeroed.
    ///
    /// # Example
    ///
    /// ```
    /// use vdpa_vsock::packet::{Op, VsockPacket};
    /// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    ///
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    /// let mut pkt = VsockPacket::from_tx_buffer(&mem, GuestAddress(0x1000), 4096).unwrap();
    /// let n = pkt.write_data(b"ping").unwrap();
    /// pkt.set_op(Op::Rw as u16).set_len(n as u32);
    /// assert_eq!(pkt.data_len(), 4096 - 44);
    /// let mut raw = [0u8; 48];
    /// mem.read_slice(&mut raw, GuestAddress(0x1000)).unwrap();
    /// assert_eq!(raw[24], 4); // len
    /// assert_eq!(&raw[44..], b"ping");
    /// // Too small for a header.
    /// assert!(VsockPacket::from_tx_buffer(&mem, GuestAddress(0x1000), 43).is_err());
    /// ```
    pub fn from_tx_buffer<M>(mem: &'a M, addr: GuestAddress, capacity: u32) -> Result<Self>
    where
        M: GuestMemory,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
    {
        if (capacity as usize) < PKT_HEADER_SIZE {
            return Err(Error::DescriptorLengthTooSmall {
                expected: PKT_HEADER_SIZE as u64,
                found: u64::from(capacity),
            });
        }
        let header_slice = get_single_slice(mem, addr, PKT_HEADER_SIZE, Permissions::Write)?;
        let room = capacity as usize - PKT_HEADER_SIZE;
        let data_slice = if room > 0 {
            let data_addr =
                addr.checked_add(PKT_HEADER_SIZE as u64)
                    .ok_or(Error::FragmentedMemory {
                        addr: addr.raw_value(),
                        len: capacity as usize,
                    })?;
            Some(get_single_slice(mem, data_addr, room, Permissions::Write)?)
        } else {
            None
        };
        let mut pkt = VsockPacket {
            header_slice,
            header_rest: Vec::new(),
            header: Header::default(),
            data_slice,
            data_rest: Vec::new(),
            data_slice_is_ref: false,
        };
        pkt.set_header(&Header::default());
        Ok(pkt)
    }
}

impl<'a> VsockPacket<'a, ()> {
    /// Create a packet over one buffer for the header and an optional one for data.
    ///
    /// # Safety
    ///
    /// The caller must guarantee that the memory of `header` and `data` stays valid for the
    /// lifetime `'a` of the packet, and that every other user of that memory uses volatile
    /// accesses meanwhile.
    ///
    /// # Example
    ///
    /// ```
    /// use vdpa_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
    ///
    /// let mut raw = [0u8; PKT_HEADER_SIZE + 16];
    /// let (hdr, data) = raw.split_at_mut(PKT_HEADER_SIZE);
    /// // SAFETY: `raw` outlives the packet and is only accessed through it.
    /// let mut pkt = unsafe { VsockPacket::new(hdr, Some(data)).unwrap() };
    /// pkt.set_len(16);
    /// assert_eq!(pkt.data_slice().unwrap().len(), 16);
    /// ```
    pub unsafe fn new(header: &mut [u8], data: Option<&mut [u8]>) -> Result<VsockPacket<'a, ()>> {
        if header.len() != PKT_HEADER_SIZE {
            return Err(Error::InvalidHeaderInputSize(header.len()));
        }
        Ok(VsockPacket {
            // SAFETY: the caller guarantees the buffer outlives 'a and is accessed volatilely by
            // everyone else; its pointer and length come from a valid slice.
            header_slice: unsafe { VolatileSlice::new(header.as_mut_ptr(), PKT_HEADER_SIZE) },
            header_rest: Vec::new(),
            header: Header::default(),
            // SAFETY: as above, for the data buffer.
            data_slice: data.map(|d| unsafe { VolatileSlice::new(d.as_mut_ptr(), d.len()) }),
            data_rest: Vec::new(),
            data_slice_is_ref: false,
        })
    }
}
