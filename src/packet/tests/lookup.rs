// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The region resolved at the head: buffers inside it are sub-slices, the rest are looked up.

use super::*;

#[test]
fn tx_data_below_the_header_in_the_same_region() {
    let mem = mem();
    mem.write_slice(&hdr(300).to_bytes(), GuestAddress(0x8_0000))
        .unwrap();
    let want = payload(300);
    mem.write_slice(&want, GuestAddress(0x2000)).unwrap();
    let pkt = tx(
        &mem,
        &mut chain(&mem, &[(0x8_0000, HDR, R), (0x2000, 300, R)]),
    )
    .unwrap();
    assert_eq!(data_of(&pkt), want);
    assert_fragments_at(&mem, &pkt, &[(0x2000, 300)]);
}

#[test]
fn tx_buffers_in_other_regions_are_looked_up() {
    let mem = fragmented_mem();
    // Header in the first region, payload in the second, then back in the first.
    mem.write_slice(&hdr(30).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let want = payload(30);
    write_frags(&mem, &want, &[(REGION + 0x100, 20), (0x3000, 10)]);
    let pkt = tx(
        &mem,
        &mut chain(
            &mem,
            &[(0x1000, HDR, R), (REGION + 0x100, 20, R), (0x3000, 10, R)],
        ),
    )
    .unwrap();
    assert_eq!(data_of(&pkt), want);
    assert_fragments_at(&mem, &pkt, &[(REGION + 0x100, 20), (0x3000, 10)]);
}

#[test]
fn one_desc_payload_starting_at_the_next_region_is_looked_up() {
    // The head's header fills its region's last bytes; the payload (buffer) is the next
    // region's first bytes: contiguous guest addresses, another host mapping, as 0.12 takes it.
    let mem = fragmented_mem();
    mem.write_slice(&hdr(20).to_bytes(), GuestAddress(REGION - HDR as u64))
        .unwrap();
    let want = payload(20);
    mem.write_slice(&want, GuestAddress(REGION)).unwrap();
    let pkt = tx(
        &mem,
        &mut chain(&mem, &[(REGION - HDR as u64, HDR + 20, R)]),
    )
    .unwrap();
    assert_eq!(data_of(&pkt), want);
    assert_fragments_at(&mem, &pkt, &[(REGION, 20)]);
    let pkt = rx(
        &mem,
        &mut chain(&mem, &[(REGION - HDR as u64, HDR + 64, W)]),
    )
    .unwrap();
    assert_fragments_at(&mem, &pkt, &[(REGION, 64)]);
}

#[test]
fn rx_buffers_across_regions() {
    let mem = fragmented_mem();
    let pkt = rx(
        &mem,
        &mut chain(
            &mem,
            &[
                (REGION + 0x4000, HDR, W),
                (0x2000, 100, W),
                (REGION + 0x100, 200, W),
            ],
        ),
    )
    .unwrap();
    assert_fragments_at(&mem, &pkt, &[(0x2000, 100), (REGION + 0x100, 200)]);
    // A buffer reaching out of the head's region into the next is one buffer over two host
    // mappings: refused, as 0.12 does.
    let err = rx(
        &mem,
        &mut chain(&mem, &[(0x1000, HDR, W), (REGION - 8, 100, W)]),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::FragmentedMemory { len: 100, .. }),
        "{err:?}"
    );
}
