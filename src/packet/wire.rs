// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Wire types of virtio 1.2 section 5.10.6: the header size, feature and flag bits, well-known
//! CIDs, the decoded [`Header`] and the typed `op` and `type` fields.

use std::fmt;

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
pub(super) const SRC_CID_OFFSET: usize = 0;
pub(super) const DST_CID_OFFSET: usize = 8;
pub(super) const SRC_PORT_OFFSET: usize = 16;
pub(super) const DST_PORT_OFFSET: usize = 20;
pub(super) const LEN_OFFSET: usize = 24;
pub(super) const TYPE_OFFSET: usize = 28;
pub(super) const OP_OFFSET: usize = 30;
pub(super) const FLAGS_OFFSET: usize = 32;
pub(super) const BUF_ALLOC_OFFSET: usize = 36;
pub(super) const FWD_CNT_OFFSET: usize = 40;

/// An unknown value in a typed header field. No cause.
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
/// This is the private copy a [`VsockPacket`](super::VsockPacket) keeps, and what the protocol
/// core consumes and produces. `type_` and `op` stay raw `u16`s so that unknown values survive
/// a round trip; use [`Header::op_typed`] and [`Header::socket_type`] for the typed view.
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
