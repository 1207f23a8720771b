// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Driver-side constructors, `new` and raw headers.

use super::*;

// ---------------------------------------------------------------------------------------------
// Driver-side constructors
// ---------------------------------------------------------------------------------------------

#[test]
fn used_rx_buffer_accepts_what_the_device_wrote() {
    let mem = mem();
    mem.write_slice(&hdr(3).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    mem.write_slice(b"abc", GuestAddress(0x1000 + 44)).unwrap();
    let pkt = VsockPacket::from_used_rx_buffer(&mem, GuestAddress(0x1000), 4096, 47).unwrap();
    assert_eq!(pkt.header(), hdr(3));
    assert_eq!(data_of(&pkt), b"abc");
    // len 0: no payload slice, even with room.
    mem.write_slice(&hdr(0).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let pkt = VsockPacket::from_used_rx_buffer(&mem, GuestAddress(0x1000), 4096, 44).unwrap();
    assert!(pkt.data_slice().is_none());
}

#[test]
fn used_rx_buffer_errors() {
    let mem = fragmented_mem();
    mem.write_slice(&hdr(10).to_bytes(), GuestAddress(0x1000))
        .unwrap();
    let used = |addr: u64, cap: u32, used: u32| {
        VsockPacket::from_used_rx_buffer(&mem, GuestAddress(addr), cap, used).unwrap_err()
    };
    let err = used(0x1000, 100, 101);
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
    let err = used(0x1000, 100, 43);
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
    // The device claims len 10 but wrote only 5 bytes of payload.
    let err = used(0x1000, 100, 49);
    assert!(
        matches!(err, Error::InvalidHeaderLen { len: 10, max: 5 }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "invalid header `len` field: 10 exceeds the maximum of 5"
    );
    let err = used(8 * REGION, 100, 60);
    assert!(matches!(err, Error::InvalidMemoryAccess(_)), "{err:?}");
    let err = used(REGION - 10, 100, 60);
    assert!(matches!(err, Error::FragmentedMemory { .. }), "{err:?}");
    // Header fits before the boundary, payload crosses it.
    mem.write_slice(&hdr(10).to_bytes(), GuestAddress(REGION - 50))
        .unwrap();
    let err = used(REGION - 50, 100, 60);
    assert!(
        matches!(err, Error::FragmentedMemory { len: 10, .. }),
        "{err:?}"
    );

    let high = high_mem();
    for addr in [u64::MAX, u64::MAX - 10, u64::MAX - 43] {
        let r = VsockPacket::from_used_rx_buffer(&high, GuestAddress(addr), 100, 60);
        assert!(r.is_err(), "{addr:#x}");
    }
    // The header ends on the last byte of memory; a payload after it cannot exist.
    let top = u64::MAX - 1;
    high.write_slice(&hdr(10).to_bytes(), GuestAddress(top - 43))
        .unwrap();
    let r = VsockPacket::from_used_rx_buffer(&high, GuestAddress(top - 43), 100, 60);
    assert!(matches!(
        r,
        Err(Error::InvalidMemoryAccess(_) | Error::FragmentedMemory { .. })
    ));
    high.write_slice(&hdr(0).to_bytes(), GuestAddress(top - 43))
        .unwrap();
    let pkt = VsockPacket::from_used_rx_buffer(&high, GuestAddress(top - 43), 100, 60).unwrap();
    assert_eq!(pkt.data_len(), 0);
}

#[test]
fn tx_buffer_starts_with_a_zeroed_header() {
    let mem = mem();
    mem.write_slice(&[0xFF; 100], GuestAddress(0x1000)).unwrap();
    let mut pkt = VsockPacket::from_tx_buffer(&mem, GuestAddress(0x1000), 100).unwrap();
    assert_eq!(pkt.header(), Header::default());
    assert_eq!(header_mem(&pkt), Header::default());
    assert_eq!(pkt.data_len(), 56);
    pkt.set_header(&hdr(5));
    assert_eq!(pkt.write_data(b"hello").unwrap(), 5);
    let mut back = [0u8; 49];
    mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
    assert_eq!(&back[..44], &hdr(5).to_bytes());
    assert_eq!(&back[44..], b"hello");
    // Exactly a header: no payload room.
    let pkt = VsockPacket::from_tx_buffer(&mem, GuestAddress(0x1000), 44).unwrap();
    assert!(pkt.data_slice().is_none());
}

#[test]
fn tx_buffer_errors() {
    let mem = fragmented_mem();
    let buf = |addr: u64, cap: u32| VsockPacket::from_tx_buffer(&mem, GuestAddress(addr), cap);
    let err = buf(0x1000, 43).unwrap_err();
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
    assert!(matches!(
        buf(8 * REGION, 100),
        Err(Error::InvalidMemoryAccess(_))
    ));
    assert!(matches!(
        buf(REGION - 10, 100),
        Err(Error::FragmentedMemory { len: 44, .. })
    ));
    assert!(matches!(
        buf(REGION - 50, 100),
        Err(Error::FragmentedMemory { len: 56, .. })
    ));
    let high = high_mem();
    for addr in [u64::MAX, u64::MAX - 10, u64::MAX - 44] {
        assert!(
            VsockPacket::from_tx_buffer(&high, GuestAddress(addr), 100).is_err(),
            "{addr:#x}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// `new` and raw headers
// ---------------------------------------------------------------------------------------------

#[test]
fn new_checks_the_header_size() {
    for n in [0, 43, 45] {
        let mut raw = vec![0u8; n];
        // SAFETY: `raw` outlives the (failed) packet and nothing else accesses it.
        let err = unsafe { VsockPacket::new(&mut raw, None) }.unwrap_err();
        assert!(
            matches!(err, Error::InvalidHeaderInputSize(m) if m == n),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("invalid header input size: expected 44 bytes, found {n}")
        );
    }
}

#[test]
fn set_header_from_raw() {
    let mut raw = [0u8; PKT_HEADER_SIZE];
    // SAFETY: `raw` outlives `pkt` and is only accessed through it.
    let mut pkt = unsafe { VsockPacket::new(&mut raw, None) }.unwrap();
    pkt.set_header_from_raw(&hdr(9).to_bytes()).unwrap();
    assert_eq!(pkt.header(), hdr(9));
    assert_eq!(header_mem(&pkt), hdr(9));
    let err = pkt.set_header_from_raw(&[0u8; 45]).unwrap_err();
    assert!(matches!(err, Error::InvalidHeaderInputSize(45)), "{err:?}");
    assert_eq!(pkt.header(), hdr(9), "a refused write changes nothing");
}

#[test]
fn set_header_from_raw_across_fragments() {
    let mem = mem();
    let mut c = chain(&mem, &[(0x1000, 7, W), (0x2000, 30, W), (0x3000, 20, W)]);
    let mut pkt = rx(&mem, &mut c).unwrap();
    pkt.set_header_from_raw(&hdr(12).to_bytes()).unwrap();
    assert_eq!(pkt.header(), hdr(12));
    let mut raw = [0u8; PKT_HEADER_SIZE];
    mem.read_slice(&mut raw[..7], GuestAddress(0x1000)).unwrap();
    mem.read_slice(&mut raw[7..37], GuestAddress(0x2000))
        .unwrap();
    mem.read_slice(&mut raw[37..], GuestAddress(0x3000))
        .unwrap();
    assert_eq!(raw, hdr(12).to_bytes());
}
