// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Decoded header types.

use super::*;

#[test]
fn header_bytes_round_trip_and_offsets() {
    let h = hdr(0x0102_0304);
    let b = h.to_bytes();
    assert_eq!(Header::from_bytes(&b), h);
    assert_eq!(&b[24..28], &0x0102_0304u32.to_le_bytes());
    assert_eq!(&b[30..32], &(Op::Rw as u16).to_le_bytes());
    assert_eq!(&b[40..44], &77u32.to_le_bytes());
    assert_eq!(
        h.to_string(),
        "VIRTIO_VSOCK_OP_RW VIRTIO_VSOCK_TYPE_STREAM 72623859790382856:1024 -> 2:3735928559 \
         len 16909060 flags 0xa0b0c0d buf_alloc 262144 fwd_cnt 77"
    );
    let odd = Header {
        op: 99,
        type_: 9,
        ..Default::default()
    };
    assert!(odd.to_string().starts_with("op 99 type 9 "), "{odd}");
}

#[test]
fn typed_fields() {
    for v in 1..=7u16 {
        let op = Op::try_from(v).unwrap();
        assert_eq!(op as u16, v);
        assert!(op.to_string().starts_with("VIRTIO_VSOCK_OP_"));
    }
    let err = Op::try_from(0).unwrap_err();
    assert_eq!(
        err,
        UnknownValue {
            field: "op",
            value: 0
        }
    );
    assert_eq!(err.to_string(), "unknown vsock op value 0");
    assert_eq!(SocketType::try_from(2), Ok(SocketType::SeqPacket));
    assert_eq!(
        SocketType::SeqPacket.to_string(),
        "VIRTIO_VSOCK_TYPE_SEQPACKET"
    );
    assert_eq!(
        SocketType::try_from(3).unwrap_err().to_string(),
        "unknown vsock type value 3"
    );
    let h = hdr(0);
    assert_eq!(h.op_typed(), Ok(Op::Rw));
    assert_eq!(h.socket_type(), Ok(SocketType::Stream));
    for bits in 0..8u32 {
        assert_eq!(ShutdownFlags::from_bits(bits).bits(), bits & 3);
        assert_eq!(SeqFlags::from_bits(bits).bits(), bits & 3);
    }
    assert!(ShutdownFlags::from_bits(VIRTIO_VSOCK_SHUTDOWN_F_SEND).send);
    assert!(SeqFlags::from_bits(VIRTIO_VSOCK_SEQ_EOR).eor);
}
