// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! TX chains (device view): accepted layouts, then every error path.

use super::*;

// ---------------------------------------------------------------------------------------------
// TX: accepted layouts
// ---------------------------------------------------------------------------------------------

#[test]
fn tx_header_only() {
    let mem = mem();
    mem.write_slice(&hdr(0).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let pkt = tx(&mem, &mut chain(&mem, &[(0x1000, HDR, R)])).unwrap();
    assert_eq!(pkt.header(), hdr(0));
    assert!(pkt.data_slice().is_none());
    assert_eq!(pkt.data_slices().count(), 0);
    assert_eq!(pkt.data_len(), 0);
    assert_eq!(pkt.header_slices().count(), 1);
    assert_eq!(pkt.header_slice().len(), PKT_HEADER_SIZE);
}

#[test]
fn tx_header_only_ignores_what_follows() {
    // As 0.12: a len-0 packet ignores any following descriptor, even a write-only one.
    let mem = mem();
    mem.write_slice(&hdr(0).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let mut c = chain(&mem, &[(0x1000, 100, R), (0xFFFF_0000, 8, W)]);
    let pkt = tx(&mem, &mut c).unwrap();
    assert!(pkt.is_empty());
    assert_eq!(pkt.data_len(), 0);
}

#[test]
fn tx_header_and_data_in_one_desc() {
    let mem = mem();
    let data = payload(100);
    mem.write_slice(&hdr(100).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    mem.write_slice(&data, GuestAddress(0x1000 + 44)).unwrap();
    // The descriptor may be longer than header + len; the payload is exactly len bytes.
    let pkt = tx(&mem, &mut chain(&mem, &[(0x1000, HDR + 200, R)])).unwrap();
    assert_eq!(pkt.len(), 100);
    let ds = pkt.data_slice().unwrap();
    assert_eq!(ds.len(), 100);
    assert_eq!(ds.ptr_guard().as_ptr(), unsafe_free_ptr(&mem, 0x1000 + 44));
    assert_eq!(data_of(&pkt), data);
}

#[test]
fn tx_header_and_data_in_two_descs() {
    let mem = mem();
    let data = payload(300);
    mem.write_slice(&hdr(300).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    mem.write_slice(&data, GuestAddress(0x8000)).unwrap();
    let pkt = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, R), (0x8000, 4096, R)]),
    )
    .unwrap();
    assert_eq!(pkt.header(), hdr(300));
    assert_eq!(pkt.data_slice().unwrap().len(), 300);
    assert_eq!(data_of(&pkt), data);
}

#[test]
fn tx_head_padding_is_skipped_when_head_has_next() {
    // The 0.12 rule: header fully in a head that has a next descriptor => payload starts at the
    // next descriptor, the head's remaining bytes are padding.
    let mem = mem();
    let data = payload(10);
    mem.write_slice(&hdr(10).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    mem.write_slice(&[0xEE; 56], GuestAddress(0x1000 + 44))
        .unwrap();
    mem.write_slice(&data, GuestAddress(0x8000)).unwrap();
    let pkt = tx(&mem, &mut chain(&mem, &[(0x1000, 100, R), (0x8000, 10, R)])).unwrap();
    assert_eq!(data_of(&pkt), data);
}

#[test]
fn tx_header_split_over_two_descs() {
    let mem = mem();
    let data = payload(50);
    write_frags(&mem, &hdr(50).to_bytes(), &[(0x1000, 20), (0x2000, 24)]);
    mem.write_slice(&data, GuestAddress(0x3000)).unwrap();
    let mut c = chain(&mem, &[(0x1000, 20, R), (0x2000, 24, R), (0x3000, 50, R)]);
    let pkt = tx(&mem, &mut c).unwrap();
    assert_eq!(pkt.header(), hdr(50));
    let lens: Vec<usize> = pkt.header_slices().map(|s| s.len()).collect();
    assert_eq!(lens, [20, 24]);
    assert_eq!(data_of(&pkt), data);
}

#[test]
fn tx_header_split_over_three_descs_payload_continues_in_the_last() {
    // 10 + 0 (skipped) + 20 + 14 header bytes; the rest of the fourth descriptor is payload
    // (the compat rule only applies to the head), then one more payload descriptor.
    let mem = mem();
    let data = payload(30);
    write_frags(
        &mem,
        &hdr(30).to_bytes(),
        &[(0x1000, 10), (0x2000, 20), (0x3000, 14)],
    );
    mem.write_slice(&data[..6], GuestAddress(0x3000 + 14))
        .unwrap();
    mem.write_slice(&data[6..], GuestAddress(0x4000)).unwrap();
    let mut c = chain(
        &mem,
        &[
            (0x1000, 10, R),
            (0x9000, 0, R),
            (0x2000, 20, R),
            (0x3000, 20, R),
            (0x4000, 100, R),
        ],
    );
    let pkt = tx(&mem, &mut c).unwrap();
    assert_eq!(pkt.header(), hdr(30));
    assert_eq!(pkt.header_slices().count(), 3);
    assert_eq!(
        pkt.data_slices().map(|s| s.len()).collect::<Vec<_>>(),
        [6, 24]
    );
    assert!(
        pkt.data_slice().is_none(),
        "fragmented payload has no single slice"
    );
    assert_eq!(data_of(&pkt), data);
}

#[test]
fn tx_payload_over_four_descs() {
    let mem = mem();
    let data = payload(1000);
    mem.write_slice(&hdr(1000).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let frags = [(0x2000, 100), (0x3000, 400), (0x4000, 250), (0x5000, 250)];
    write_frags(&mem, &data, &frags);
    let mut descs = vec![(0x1000, HDR, R)];
    // The last descriptor is longer than needed; only len bytes are payload.
    descs.extend(frags.iter().map(|&(a, n)| (a, n as u32, R)));
    descs[4].1 = 4096;
    let pkt = tx(&mem, &mut chain(&mem, &descs)).unwrap();
    assert_eq!(
        pkt.data_slices().map(|s| s.len()).collect::<Vec<_>>(),
        [100, 400, 250, 250]
    );
    assert_eq!(pkt.data_len(), 1000);
    assert_eq!(data_of(&pkt), data);
    // A short read stops at the buffer's end, across fragments.
    let mut small = [0u8; 150];
    assert_eq!(pkt.read_data(&mut small).unwrap(), 150);
    assert_eq!(&small[..], &data[..150]);
}

/// `read_data_at`/`write_data_at` start anywhere in a fragmented payload, cross fragment
/// boundaries, and stop where the payload ends.
#[test]
fn data_at_an_offset_across_fragments() {
    let mem = mem();
    let data = payload(1000);
    mem.write_slice(&hdr(1000).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let frags = [(0x2000, 100), (0x3000, 400), (0x4000, 250), (0x5000, 250)];
    write_frags(&mem, &data, &frags);
    let mut descs = vec![(0x1000, HDR, R)];
    descs.extend(frags.iter().map(|&(a, n)| (a, n as u32, R)));
    let pkt = tx(&mem, &mut chain(&mem, &descs)).unwrap();
    for (offset, len) in [
        (0, 1000),
        (99, 2),
        (100, 400),
        (350, 500),
        (990, 50),
        (1000, 5),
    ] {
        let mut buf = vec![0u8; len];
        let n = pkt.read_data_at(offset, &mut buf).unwrap();
        assert_eq!(n, len.min(1000 - offset), "offset {offset}");
        assert_eq!(&buf[..n], &data[offset..offset + n], "offset {offset}");
    }
    let patch = [0xeeu8; 300];
    assert_eq!(pkt.write_data_at(450, &patch).unwrap(), 300);
    let mut all = vec![0u8; 1000];
    assert_eq!(pkt.read_data(&mut all).unwrap(), 1000);
    assert_eq!(&all[..450], &data[..450]);
    assert_eq!(&all[450..750], &patch[..]);
    assert_eq!(&all[750..], &data[750..]);
    assert_eq!(
        pkt.write_data_at(900, &patch).unwrap(),
        100,
        "stops at the end"
    );
}

#[test]
fn tx_zero_length_descs_are_skipped() {
    let mem = mem();
    let data = payload(20);
    mem.write_slice(&hdr(20).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    write_frags(&mem, &data, &[(0x2000, 5), (0x3000, 15)]);
    let mut c = chain(
        &mem,
        &[
            (0x1000, HDR, R),
            (0x7000, 0, R),
            (0x2000, 5, R),
            (0x7000, 0, R),
            (0x3000, 15, R),
        ],
    );
    let pkt = tx(&mem, &mut c).unwrap();
    assert_eq!(pkt.data_slices().count(), 2);
    assert_eq!(data_of(&pkt), data);
}

#[test]
fn tx_descs_after_the_payload_are_ignored() {
    let mem = mem();
    mem.write_slice(&hdr(8).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    // The third descriptor is write-only and outside memory: never looked at.
    let mut c = chain(
        &mem,
        &[(0x1000, HDR, R), (0x2000, 8, R), (0xFFFF_FFFF_0000, 8, W)],
    );
    let pkt = tx(&mem, &mut c).unwrap();
    assert_eq!(pkt.data_len(), 8);
}

#[test]
fn tx_len_equal_to_max_is_accepted() {
    let mem = mem();
    mem.write_slice(&hdr(100).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let mut c = chain(&mem, &[(0x1000, HDR, R), (0x2000, 100, R)]);
    let pkt = VsockPacket::from_tx_virtq_chain(&mem, &mut c, 100).unwrap();
    assert_eq!(pkt.data_len(), 100);
}

// ---------------------------------------------------------------------------------------------
// TX: errors
// ---------------------------------------------------------------------------------------------

#[test]
fn tx_exhausted_chain_is_too_short() {
    let mem = mem();
    let mut c = chain(&mem, &[(0x1000, HDR, R)]);
    while c.next().is_some() {}
    let err = tx(&mem, &mut c).unwrap_err();
    assert!(matches!(err, Error::DescriptorChainTooShort(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "descriptor chain too short: expected a head descriptor holding the packet header, \
         found an empty chain"
    );
}

#[test]
fn tx_write_only_head() {
    let mem = mem();
    let err = tx(&mem, &mut chain(&mem, &[(0x1000, HDR, W)])).unwrap_err();
    assert!(
        matches!(err, Error::UnexpectedWriteOnlyDescriptor { index: 0 }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "unexpected write-only descriptor (index 0 in the chain): TX buffers must be device-readable"
    );
}

#[test]
fn tx_write_only_at_every_index() {
    // Index 1: the data descriptor; index 1 and 2 of a split header; index 3 in the payload.
    let mem = mem();
    mem.write_slice(&hdr(100).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let cases: [(Shape, usize); 4] = [
        (&[(0x1000, HDR, R), (0x2000, 100, W)], 1),
        (&[(0x1000, 20, R), (0x1014, 24, W), (0x2000, 100, R)], 1),
        (&[(0x1000, 20, R), (0x1014, 4, R), (0x1018, 20, W)], 2),
        (
            &[
                (0x1000, HDR, R),
                (0x2000, 10, R),
                (0x3000, 10, R),
                (0x4000, 80, W),
            ],
            3,
        ),
    ];
    for (descs, want) in cases {
        let err = tx(&mem, &mut chain(&mem, descs)).unwrap_err();
        match err {
            Error::UnexpectedWriteOnlyDescriptor { index } => assert_eq!(index, want, "{descs:?}"),
            e => panic!("{descs:?}: expected UnexpectedWriteOnlyDescriptor, got {e:?}"),
        }
    }
}

#[test]
fn tx_head_shorter_than_header_without_next() {
    let mem = mem();
    let err = tx(&mem, &mut chain(&mem, &[(0x1000, 30, R)])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 44,
                found: 30
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "descriptor length too small: expected at least 44 bytes, found 30"
    );
}

#[test]
fn tx_split_header_chain_ends_early() {
    let mem = mem();
    let err = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, 20, R), (0x2000, 0, R), (0x3000, 10, R)]),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 44,
                found: 30
            }
        ),
        "{err:?}"
    );
    // Head claims a next descriptor that is not there.
    let err = tx(&mem, &mut dangling_chain(&mem, 0x1000, 20, R)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 44,
                found: 20
            }
        ),
        "{err:?}"
    );
}

#[test]
fn tx_len_above_max() {
    let mem = mem();
    mem.write_slice(&hdr(MAX + 1).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let err = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, R), (0x2000, MAX + 1, R)]),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::InvalidHeaderLen { len, max: MAX } if len == MAX + 1),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "invalid header `len` field: 65537 exceeds the maximum of 65536"
    );
}

#[test]
fn tx_one_desc_too_short_for_len() {
    let mem = mem();
    mem.write_slice(&hdr(100).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    for len in [HDR, HDR + 99] {
        let err = tx(&mem, &mut chain(&mem, &[(0x1000, len, R)])).unwrap_err();
        assert!(matches!(err, Error::DescriptorChainTooShort(_)), "{err:?}");
        assert!(err.to_string().contains("expected"), "{err}");
    }
}

#[test]
fn tx_one_desc_too_short_is_refused_before_touching_memory() {
    // Parity with 0.12: a head without next that cannot hold the payload is "chain too short",
    // even when the head's remaining bytes are outside memory.
    let mem = fragmented_mem();
    mem.write_slice(&hdr(100).to_bytes(), GuestAddress(REGION * 2 - 44 - 10))
        .unwrap();
    let err = tx(&mem, &mut chain(&mem, &[(REGION * 2 - 54, HDR + 50, R)])).unwrap_err();
    assert!(matches!(err, Error::DescriptorChainTooShort(_)), "{err:?}");
}

#[test]
fn tx_head_has_next_but_chain_ends() {
    let mem = mem();
    mem.write_slice(&hdr(10).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let err = tx(&mem, &mut dangling_chain(&mem, 0x1000, HDR, R)).unwrap_err();
    assert!(matches!(err, Error::DescriptorChainTooShort(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "descriptor chain too short: expected a descriptor holding the packet payload after the \
         header"
    );
}

#[test]
fn tx_data_desc_too_short() {
    let mem = mem();
    mem.write_slice(&hdr(100).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let err = tx(&mem, &mut chain(&mem, &[(0x1000, HDR, R), (0x2000, 99, R)])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 100,
                found: 99
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "descriptor length too small: expected at least 100 bytes, found 99"
    );
    // Refused on its length before its (invalid) address is looked at, as 0.12 does.
    let err = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, R), (0xFFFF_0000_0000, 99, R)]),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::DescriptorLengthTooSmall { .. }),
        "{err:?}"
    );
    // Several payload descriptors that together fall short.
    let err = tx(
        &mem,
        &mut chain(
            &mem,
            &[
                (0x1000, HDR, R),
                (0x2000, 30, R),
                (0x3000, 0, R),
                (0x4000, 30, R),
            ],
        ),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DescriptorLengthTooSmall {
                expected: 100,
                found: 60
            }
        ),
        "{err:?}"
    );
}

#[test]
fn tx_invalid_memory_access() {
    let mem = mem();
    // Header outside memory.
    let err = tx(&mem, &mut chain(&mem, &[(0x20_0000, HDR, R)])).unwrap_err();
    assert!(matches!(err, Error::InvalidMemoryAccess(_)), "{err:?}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "the cause survives"
    );
    // Data outside memory.
    mem.write_slice(&hdr(10).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let err = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, R), (0x20_0000, 10, R)]),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidMemoryAccess(_)), "{err:?}");
    // Split header with its second fragment outside memory.
    let err = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, 20, R), (0x20_0000, 24, R)]),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidMemoryAccess(_)), "{err:?}");
}

#[test]
fn tx_fragmented_memory() {
    let mem = fragmented_mem();
    // Header crossing the two regions.
    let err = tx(&mem, &mut chain(&mem, &[(REGION - 20, HDR, R)])).unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { addr, len: 44 } if addr == REGION - 20),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "descriptor buffer at 0xffec of 44 bytes stretches over multiple memory fragments"
    );
    // Payload crossing them, in the head and in a data descriptor.
    mem.write_slice(&hdr(40).to_bytes(), GuestAddress(REGION - 64))
        .unwrap();
    let err = tx(&mem, &mut chain(&mem, &[(REGION - 64, 200, R)])).unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { len: 40, .. }),
        "{err:?}"
    );
    mem.write_slice(&hdr(40).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let err = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, R), (REGION - 8, 40, R)]),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { len: 40, .. }),
        "{err:?}"
    );
    // A buffer reaching past the end of memory is cut short, like a fragment.
    let err = tx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, R), (2 * REGION - 8, 40, R)]),
    )
    .unwrap_err();
    assert!(matches!(err, Error::FragmentedMemory { .. }), "{err:?}");
}

#[test]
fn tx_addresses_near_u64_max_are_errors_not_panics() {
    let mem = high_mem();
    let top = u64::MAX - 1; // the last byte of memory
    mem.write_slice(&hdr(20).to_bytes(), GuestAddress(top - 63))
        .unwrap();
    // Header runs off the end of the address space.
    for addr in [u64::MAX, u64::MAX - 43, top - 42] {
        let err = tx(&mem, &mut chain(&mem, &[(addr, HDR, R)])).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidMemoryAccess(_) | Error::FragmentedMemory { .. }
            ),
            "{addr:#x}: {err:?}"
        );
    }
    // Header fits, payload in the head runs off the end.
    mem.write_slice(&hdr(20).to_bytes(), GuestAddress(top - 53))
        .unwrap();
    let err = tx(&mem, &mut chain(&mem, &[(top - 43 - 10, HDR + 20, R)])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidMemoryAccess(_) | Error::FragmentedMemory { .. }
        ),
        "{err:?}"
    );
    // Exactly at the end: accepted.
    mem.write_slice(&hdr(20).to_bytes(), GuestAddress(top - 63))
        .unwrap();
    let pkt = tx(&mem, &mut chain(&mem, &[(top - 63, 64, R)])).unwrap();
    assert_eq!(pkt.data_len(), 20);
    // Payload descriptor near u64::MAX.
    let err = tx(
        &mem,
        &mut chain(&mem, &[(top - 63, HDR, R), (u64::MAX - 5, 20, R)]),
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
