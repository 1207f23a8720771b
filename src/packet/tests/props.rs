// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Properties over random chains.

use super::*;

/// A random descriptor: addresses biased to region ends, the fragment seam and `u64::MAX`.
fn arb_desc() -> impl Strategy<Value = (u64, u32, u16)> {
    let addr = prop_oneof![
        (0x1000u64..REGION),
        (0u64..128).prop_map(|d| REGION - d),
        (0u64..128).prop_map(|d| 2 * REGION - d),
        (0u64..256).prop_map(|d| u64::MAX - d),
        (0u64..256).prop_map(|d| HIGH + d),
        any::<u64>(),
    ];
    let len = prop_oneof![0u32..64, 0u32..300, 0u32..0x2_0000, any::<u32>()];
    let flags = prop_oneof![Just(R), Just(W)];
    (addr, len, flags)
}

/// Memory for the properties: the fragmented pair plus the high region.
fn prop_mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION as usize),
        (GuestAddress(REGION), REGION as usize),
        (GuestAddress(HIGH), REGION as usize),
    ])
    .unwrap()
}

proptest! {
    // Under Miri each case costs about a second: a handful still walks the unsafe slice code.
    #![proptest_config(ProptestConfig {
        cases: if cfg!(miri) { 8 } else { 2000 },
        failure_persistence: if cfg!(miri) { None } else { ProptestConfig::default().failure_persistence },
        ..ProptestConfig::default()
    })]

    /// No panic; a TX payload is exactly `len` bytes; every slice lies in memory; an RX buffer
    /// spread over descriptors is at most `max` bytes (a one-descriptor RX buffer is unbounded
    /// in 0.12, and parity keeps that).
    #[test]
    fn random_chains_keep_the_invariants(
        descs in prop::collection::vec(arb_desc(), 1..=8),
        len in prop_oneof![0u32..200, any::<u32>()],
        max in prop_oneof![Just(MAX), 0u32..300, any::<u32>()],
    ) {
        let mem = prop_mem();
        let h = hdr(len).to_bytes();
        for &(addr, _, _) in &descs {
            let _ = mem.write_slice(&h, GuestAddress(addr));
        }
        let c = chain(&mem, &descs);
        if let Ok(pkt) = VsockPacket::from_tx_virtq_chain(&mem, &mut c.clone(), max) {
            prop_assert_eq!(pkt.data_len(), pkt.len() as usize);
            prop_assert!(pkt.is_empty() || pkt.len() <= max);
            prop_assert_eq!(pkt.header_slices().map(|s| s.len()).sum::<usize>(), PKT_HEADER_SIZE);
            prop_assert!(slices_in_memory(&mem, &pkt));
        }
        if let Ok(pkt) = VsockPacket::from_rx_virtq_chain(&mem, &mut c.clone(), max) {
            prop_assert!(pkt.data_len() <= max as usize || descs.len() == 1);
            prop_assert_eq!(pkt.header_slices().map(|s| s.len()).sum::<usize>(), PKT_HEADER_SIZE);
            prop_assert!(slices_in_memory(&mem, &pkt));
        }
    }
}
