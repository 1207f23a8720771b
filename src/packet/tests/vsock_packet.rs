// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Header getters and setters.

use super::*;

/// Set every field one by one and check the copy, the memory and the getters agree.
#[track_caller]
fn check_setters<B: BitmapSlice>(pkt: &mut VsockPacket<'_, B>) {
    let h = hdr(0x1234_5678);
    pkt.set_src_cid(h.src_cid)
        .set_dst_cid(h.dst_cid)
        .set_src_port(h.src_port)
        .set_dst_port(h.dst_port)
        .set_len(h.len)
        .set_type(h.type_)
        .set_op(h.op)
        .set_flags(h.flags)
        .set_buf_alloc(h.buf_alloc)
        .set_fwd_cnt(h.fwd_cnt);
    assert_eq!(pkt.src_cid(), h.src_cid);
    assert_eq!(pkt.dst_cid(), h.dst_cid);
    assert_eq!(pkt.src_port(), h.src_port);
    assert_eq!(pkt.dst_port(), h.dst_port);
    assert_eq!(pkt.len(), h.len);
    assert_eq!(pkt.type_(), h.type_);
    assert_eq!(pkt.op(), h.op);
    assert_eq!(pkt.flags(), h.flags);
    assert_eq!(pkt.buf_alloc(), h.buf_alloc);
    assert_eq!(pkt.fwd_cnt(), h.fwd_cnt);
    assert_eq!(pkt.header(), h);
    assert_eq!(header_mem(pkt), h, "memory and copy agree");
    assert!(!pkt.is_empty());

    // Every field again with its maximum value: no byte spills into a neighbour.
    pkt.set_src_cid(u64::MAX);
    pkt.set_dst_cid(u64::MAX);
    pkt.set_src_port(u32::MAX);
    pkt.set_dst_port(u32::MAX);
    pkt.set_len(u32::MAX);
    pkt.set_type(u16::MAX);
    pkt.set_op(u16::MAX);
    pkt.set_flags(u32::MAX);
    pkt.set_buf_alloc(u32::MAX);
    pkt.set_fwd_cnt(u32::MAX);
    assert_eq!(header_mem(pkt).to_bytes(), [0xFF; PKT_HEADER_SIZE]);
    pkt.set_header(&Header::default());
    assert_eq!(header_mem(pkt).to_bytes(), [0; PKT_HEADER_SIZE]);
    assert!(pkt.is_empty());

    // set_flag ORs into flags.
    pkt.set_flag(VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE)
        .set_flag(VIRTIO_VSOCK_SHUTDOWN_F_SEND);
    assert_eq!(pkt.flags(), 3);
    assert_eq!(header_mem(pkt).flags, 3);
}

#[test]
fn setters_and_getters_round_trip_contiguous() {
    let mut raw = [0u8; PKT_HEADER_SIZE];
    // SAFETY: `raw` outlives `pkt` and is only accessed through it.
    let mut pkt = unsafe { VsockPacket::new(&mut raw, None) }.unwrap();
    check_setters(&mut pkt);
    drop(pkt);
    assert_eq!(Header::from_bytes(&raw).flags, 3);
}

#[test]
fn setters_write_across_header_fragments() {
    // Fragments of 5, 17 and 22 bytes: src_cid, dst_cid, src_port and len all straddle a seam.
    let mem = mem();
    let mut c = chain(
        &mem,
        &[
            (0x1000, 5, W),
            (0x2000, 17, W),
            (0x3000, 22, W),
            (0x4000, 8, W),
        ],
    );
    let mut pkt = rx(&mem, &mut c).unwrap();
    assert_eq!(
        pkt.header_slices().map(|s| s.len()).collect::<Vec<_>>(),
        [5, 17, 22]
    );
    check_setters(&mut pkt);
    // Each fragment's memory holds its part of the encoding.
    pkt.set_header(&hdr(1));
    let bytes = hdr(1).to_bytes();
    let mut frag = [0u8; 17];
    mem.read_slice(&mut frag, GuestAddress(0x2000)).unwrap();
    assert_eq!(&frag[..], &bytes[5..22]);
    // The payload descriptor is untouched by header writes.
    let mut data = [0xAAu8; 8];
    mem.read_slice(&mut data, GuestAddress(0x4000)).unwrap();
    assert_eq!(data, [0; 8]);
}

#[test]
fn setters_on_a_tx_packet() {
    let mem = mem();
    mem.write_slice(&hdr(0).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let mut pkt = tx(&mem, &mut chain(&mem, &[(0x1000, HDR, R)])).unwrap();
    check_setters(&mut pkt);
}

#[test]
fn getters_answer_from_the_parsed_copy() {
    // TOCTOU: a peer rewriting the header after parsing cannot change what the getters say.
    let mem = mem();
    mem.write_slice(&hdr(4).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let pkt = tx(&mem, &mut chain(&mem, &[(0x1000, HDR + 4, R)])).unwrap();
    mem.write_slice(&[0x55; PKT_HEADER_SIZE], GuestAddress(0x1000))
        .unwrap();
    assert_eq!(pkt.header(), hdr(4));
    assert_eq!(pkt.len(), 4);
    assert_eq!(pkt.src_cid(), hdr(4).src_cid);
    assert_eq!(pkt.op(), Op::Rw as u16);
    assert_eq!(pkt.data_len(), 4, "the payload bound is the parsed len");
    assert_ne!(header_mem(&pkt), hdr(4), "memory did change");

    // Same with a split header.
    write_frags(&mem, &hdr(2).to_bytes(), &[(0x2000, 30), (0x3000, 14)]);
    let mut c = chain(&mem, &[(0x2000, 30, R), (0x3000, 16, R)]);
    let pkt = tx(&mem, &mut c).unwrap();
    mem.write_slice(&[0x55; 16], GuestAddress(0x3000)).unwrap();
    assert_eq!(pkt.header(), hdr(2));
}
