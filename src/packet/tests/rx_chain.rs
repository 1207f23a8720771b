// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! RX chains (device view): accepted layouts, then every error path.

use super::*;

// ---------------------------------------------------------------------------------------------
// RX: accepted layouts
// ---------------------------------------------------------------------------------------------

#[test]
fn rx_two_descs() {
    let mem = mem();
    mem.write_slice(&hdr(5).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let mut pkt = rx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, W), (0x2000, 4096, W)]),
    )
    .unwrap();
    // The copy starts zeroed (as 0.12): the device fills the header.
    assert_eq!(pkt.header(), Header::default());
    assert_eq!(pkt.data_slice().unwrap().len(), 4096);
    assert_eq!(pkt.write_data(b"pong").unwrap(), 4);
    pkt.set_header(&hdr(4));
    let mut back = [0u8; 4];
    mem.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
    assert_eq!(&back, b"pong");
    assert_eq!(header_mem(&pkt), hdr(4));
}

#[test]
fn rx_one_desc() {
    let mem = mem();
    let pkt = rx(&mem, &mut chain(&mem, &[(0x1000, HDR + 100, W)])).unwrap();
    assert_eq!(pkt.data_slice().unwrap().len(), 100);
    assert_eq!(
        pkt.data_slice().unwrap().ptr_guard().as_ptr(),
        unsafe_free_ptr(&mem, 0x1000 + 44)
    );
}

/// A one-descriptor RX buffer is looked up whole; when it is not one slice of memory, the
/// header and the room are looked up one after the other, as 0.12 does, for 0.12's verdict.
#[test]
fn rx_one_desc_not_in_one_slice_is_looked_up_in_two() {
    let mem = fragmented_mem();
    // Whole inside the first region: the header and the room are the parts of one slice.
    let pkt = rx(&mem, &mut chain(&mem, &[(REGION - 200, HDR + 100, W)])).unwrap();
    assert_eq!(
        pkt.header_slice().ptr_guard().as_ptr(),
        unsafe_free_ptr(&mem, REGION - 200)
    );
    assert_eq!(pkt.header_slice().len(), PKT_HEADER_SIZE);
    assert_fragments_at(&mem, &pkt, &[(REGION - 200 + HDR as u64, 100)]);
    // The header straddles the seam: the header lookup fails first, with its own length.
    let err = rx(&mem, &mut chain(&mem, &[(REGION - 20, HDR + 100, W)])).unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { len: 44, .. }),
        "{err:?}"
    );
    // The header ends where its region ends: each part is in one region, so it is accepted.
    let pkt = rx(&mem, &mut chain(&mem, &[(REGION - HDR as u64, HDR + 8, W)])).unwrap();
    assert_fragments_at(&mem, &pkt, &[(REGION, 8)]);
    // Nothing mapped after the header: the room's lookup fails.
    let high = high_mem();
    let err = rx(
        &high,
        &mut chain(&high, &[(u64::MAX - HDR as u64 - 1, HDR + 8, W)]),
    );
    assert!(
        matches!(err, Err(Error::FragmentedMemory { len: 8, .. })),
        "{err:?}"
    );
}

#[test]
fn rx_one_desc_has_no_max_bound() {
    // 0.12 puts no bound on the payload room of a single-descriptor RX buffer; parity keeps it.
    let mem = mem();
    let mut c = chain(&mem, &[(0x1000, HDR + 100, W)]);
    let pkt = VsockPacket::from_rx_virtq_chain(&mem, &mut c, 10).unwrap();
    assert_eq!(pkt.data_len(), 100);
}

#[test]
fn rx_head_padding_is_skipped_when_head_has_next() {
    let mem = mem();
    let pkt = rx(&mem, &mut chain(&mem, &[(0x1000, 100, W), (0x2000, 10, W)])).unwrap();
    assert_eq!(pkt.data_slices().count(), 1);
    assert_eq!(
        pkt.data_slice().unwrap().ptr_guard().as_ptr(),
        unsafe_free_ptr(&mem, 0x2000)
    );
}

#[test]
fn rx_zero_length_data_desc() {
    // 0.12 accepts it with no data slice.
    let mem = mem();
    let pkt = rx(&mem, &mut chain(&mem, &[(0x1000, HDR, W), (0x2000, 0, W)])).unwrap();
    assert!(pkt.data_slice().is_none());
    assert_eq!(pkt.data_len(), 0);
    assert_eq!(pkt.write_data(b"x").unwrap(), 0);
}

#[test]
fn rx_header_split_over_two_and_three_descs() {
    let mem = mem();
    let mut c = chain(&mem, &[(0x1000, 30, W), (0x2000, 14, W), (0x3000, 64, W)]);
    let mut pkt = rx(&mem, &mut c).unwrap();
    assert_eq!(pkt.header_slices().count(), 2);
    assert_eq!(pkt.data_len(), 64);
    pkt.set_header(&hdr(3));
    assert_eq!(header_mem(&pkt), hdr(3));

    // 3 header fragments, the last holding 4 header bytes and 12 bytes of room.
    let mut c = chain(
        &mem,
        &[
            (0x1000, 20, W),
            (0x5000, 0, W),
            (0x2000, 20, W),
            (0x3000, 16, W),
            (0x4000, 8, W),
        ],
    );
    let pkt = rx(&mem, &mut c).unwrap();
    assert_eq!(
        pkt.header_slices().map(|s| s.len()).collect::<Vec<_>>(),
        [20, 20, 4]
    );
    assert_eq!(
        pkt.data_slices().map(|s| s.len()).collect::<Vec<_>>(),
        [12, 8]
    );
}

#[test]
fn rx_payload_over_four_descs_with_zero_length_ones() {
    let mem = mem();
    let mut c = chain(
        &mem,
        &[
            (0x1000, HDR, W),
            (0x2000, 10, W),
            (0x9000, 0, W),
            (0x3000, 20, W),
            (0x4000, 30, W),
            (0x5000, 40, W),
        ],
    );
    let pkt = rx(&mem, &mut c).unwrap();
    assert_eq!(
        pkt.data_slices().map(|s| s.len()).collect::<Vec<_>>(),
        [10, 20, 30, 40]
    );
    assert_eq!(pkt.data_len(), 100);
    // 0.12's buffer: the second descriptor only.
    assert_eq!(pkt.data_slice().map(|s| s.len()), Some(10));
    let data = payload(100);
    assert_eq!(pkt.write_data(&data).unwrap(), 100);
    assert_eq!(data_of(&pkt), data);
    let mut frag = [0u8; 20];
    mem.read_slice(&mut frag, GuestAddress(0x3000)).unwrap();
    assert_eq!(&frag[..], &data[10..30]);
    // Writing more than the room stops at its end.
    assert_eq!(pkt.write_data(&payload(150)).unwrap(), 100);
}

#[test]
fn rx_extra_room_ends_at_the_first_descriptor_that_cannot_hold_it() {
    let mem = fragmented_mem();
    let lens = |pkt: &VsockPacket<'_, ()>| pkt.data_slices().map(|s| s.len()).collect::<Vec<_>>();
    // Read-only, outside memory, across the region seam: the room ends there, later
    // descriptors are not looked at, and the second descriptor stays 0.12's buffer.
    for bad in [
        (0x4000, 10, R),
        (0x10_0000, 10, W),
        (REGION - 4, 10, W),
        (u64::MAX - 3, 10, W),
    ] {
        let descs = [
            (0x1000, HDR, W),
            (0x2000, 10, W),
            (0x3000, 10, W),
            bad,
            (0x5000, 10, W),
        ];
        let pkt = rx(&mem, &mut chain(&mem, &descs)).unwrap();
        assert_eq!(lens(&pkt), [10, 10], "{bad:x?}");
        assert_eq!(pkt.data_slice().map(|s| s.len()), Some(10), "{bad:x?}");
    }
    // An empty second descriptor: no data slice (as 0.12), the extra room still counts.
    let pkt = rx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, W), (0x2000, 0, W), (0x3000, 10, W)]),
    )
    .unwrap();
    assert!(pkt.data_slice().is_none());
    assert_eq!(lens(&pkt), [10]);
    assert_eq!(pkt.write_data(&payload(12)).unwrap(), 10);
    // The second descriptor exactly at the maximum: nothing more.
    let mut c = chain(&mem, &[(0x1000, HDR, W), (0x2000, 100, W), (0x3000, 10, W)]);
    let pkt = VsockPacket::from_rx_virtq_chain(&mem, &mut c, 100).unwrap();
    assert_eq!(lens(&pkt), [100]);
}

#[test]
fn rx_total_equal_to_max_is_accepted() {
    let mem = mem();
    let mut c = chain(&mem, &[(0x1000, HDR, W), (0x2000, 60, W), (0x3000, 40, W)]);
    let pkt = VsockPacket::from_rx_virtq_chain(&mem, &mut c, 100).unwrap();
    assert_eq!(pkt.data_len(), 100);
}

// ---------------------------------------------------------------------------------------------
// RX: errors
// ---------------------------------------------------------------------------------------------

#[test]
fn rx_exhausted_chain_is_too_short() {
    let mem = mem();
    let mut c = chain(&mem, &[(0x1000, HDR, W)]);
    while c.next().is_some() {}
    assert!(matches!(
        rx(&mem, &mut c),
        Err(Error::DescriptorChainTooShort(_))
    ));
}

#[test]
fn rx_read_only_at_every_index() {
    let mem = mem();
    // (A read-only descriptor after 0.12's second one ends the room instead: see
    // `rx_extra_room_ends_at_the_first_descriptor_that_cannot_hold_it`.)
    let cases: [(Shape, usize); 5] = [
        (&[(0x1000, HDR, R), (0x2000, 100, W)], 0),
        (&[(0x1000, HDR, W), (0x2000, 100, R)], 1),
        (&[(0x1000, 20, W), (0x2000, 24, R), (0x3000, 100, W)], 1),
        (&[(0x1000, 20, W), (0x2000, 0, W), (0x3000, 24, R)], 2),
        (
            &[
                (0x1000, 20, W),
                (0x2000, 24, W),
                (0x3000, 10, W),
                (0x4000, 10, R),
            ],
            3,
        ),
    ];
    for (descs, want) in cases {
        let err = rx(&mem, &mut chain(&mem, descs)).unwrap_err();
        match &err {
            Error::UnexpectedReadOnlyDescriptor { index } => assert_eq!(*index, want, "{descs:?}"),
            e => panic!("{descs:?}: expected UnexpectedReadOnlyDescriptor, got {e:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "unexpected read-only descriptor (index {want} in the chain): RX buffers must be \
                 device-writable"
            )
        );
    }
}

#[test]
fn rx_header_only_chain_has_no_room() {
    let mem = mem();
    let err = rx(&mem, &mut chain(&mem, &[(0x1000, HDR, W)])).unwrap_err();
    assert!(matches!(err, Error::DescriptorChainTooShort(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "descriptor chain too short: expected room for a payload after the header, found none"
    );
    let err = rx(&mem, &mut dangling_chain(&mem, 0x1000, HDR, W)).unwrap_err();
    assert!(matches!(err, Error::DescriptorChainTooShort(_)), "{err:?}");
    assert!(err.to_string().contains("found the chain's end"), "{err}");
}

#[test]
fn rx_head_too_small() {
    let mem = mem();
    let err = rx(&mem, &mut chain(&mem, &[(0x1000, 43, W)])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 44,
                found: 43
            }
        ),
        "{err:?}"
    );
    let err = rx(&mem, &mut chain(&mem, &[(0x1000, 0, W)])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 44,
                found: 0
            }
        ),
        "{err:?}"
    );
    let err = rx(&mem, &mut chain(&mem, &[(0x1000, 40, W), (0x2000, 3, W)])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 44,
                found: 43
            }
        ),
        "{err:?}"
    );
}

#[test]
fn rx_room_above_max() {
    let mem = mem();
    let mut c = chain(&mem, &[(0x1000, HDR, W), (0x2000, 101, W)]);
    let err = VsockPacket::from_rx_virtq_chain(&mem, &mut c, 100).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooLong {
                max: 100,
                found: 101
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "descriptor length too long: expected at most 100 bytes, found 101"
    );
    // Spread over several descriptors after a split header.
    let mut c = chain(
        &mem,
        &[
            (0x1000, 20, W),
            (0x2000, 24, W),
            (0x3000, 60, W),
            (0x4000, 41, W),
        ],
    );
    let err = VsockPacket::from_rx_virtq_chain(&mem, &mut c, 100).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooLong {
                max: 100,
                found: 101
            }
        ),
        "{err:?}"
    );
    // After a whole header, room past 0.12's second descriptor is cut at the maximum instead.
    let mut c = chain(&mem, &[(0x1000, HDR, W), (0x2000, 60, W), (0x3000, 41, W)]);
    let pkt = VsockPacket::from_rx_virtq_chain(&mem, &mut c, 100).unwrap();
    assert_eq!(
        pkt.data_slices().map(|s| s.len()).collect::<Vec<_>>(),
        [60, 40]
    );
    // The leftover of a split header's last descriptor counts.
    let mut c = chain(&mem, &[(0x1000, 20, W), (0x2000, 24 + 101, W)]);
    let err = VsockPacket::from_rx_virtq_chain(&mem, &mut c, 100).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooLong {
                max: 100,
                found: 101
            }
        ),
        "{err:?}"
    );
    // A huge data descriptor is refused on its length, before its address is looked at.
    let mut c = chain(&mem, &[(0x1000, HDR, W), (u64::MAX - 5, u32::MAX - 100, W)]);
    let err = rx(&mem, &mut c).unwrap_err();
    assert!(
        matches!(err, Error::DescriptorLengthTooLong { .. }),
        "{err:?}"
    );
}

#[test]
fn rx_memory_errors() {
    let mem = fragmented_mem();
    let err = rx(
        &mem,
        &mut chain(&mem, &[(4 * REGION, HDR, W), (0x2000, 8, W)]),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidMemoryAccess(_)), "{err:?}");
    let err = rx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, W), (4 * REGION, 8, W)]),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidMemoryAccess(_)), "{err:?}");
    let err = rx(
        &mem,
        &mut chain(&mem, &[(REGION - 4, HDR, W), (0x2000, 8, W)]),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { len: 44, .. }),
        "{err:?}"
    );
    let err = rx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, W), (REGION - 4, 8, W)]),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { len: 8, .. }),
        "{err:?}"
    );
    let err = rx(&mem, &mut chain(&mem, &[(REGION - 50, HDR + 10, W)])).unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { len: 10, .. }),
        "{err:?}"
    );
}

#[test]
fn rx_addresses_near_u64_max_are_errors_not_panics() {
    let mem = high_mem();
    for addr in [u64::MAX, u64::MAX - 1, u64::MAX - 43] {
        let err = rx(&mem, &mut chain(&mem, &[(addr, HDR + 10, W)])).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidMemoryAccess(_) | Error::FragmentedMemory { .. }
            ),
            "{addr:#x}: {err:?}"
        );
    }
    let top = u64::MAX - 1;
    let pkt = rx(&mem, &mut chain(&mem, &[(top - 53, HDR + 10, W)])).unwrap();
    assert_eq!(pkt.data_len(), 10);
    assert!(slices_in_memory(&mem, &pkt));
    let err = rx(
        &mem,
        &mut chain(&mem, &[(top - 53, HDR, W), (u64::MAX - 3, 10, W)]),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidMemoryAccess(_) | Error::FragmentedMemory { .. }
        ),
        "{err:?}"
    );
}
