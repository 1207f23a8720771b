//! Helpers the integration tests over the sim device share (`mod common;` in each).
#![allow(clippy::cast_possible_truncation)] // Byte patterns: wrapping to u8 is the point.

/// FNV-1a, enough to tell streams apart.
pub(crate) fn checksum(data: &[u8], mut h: u64) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// `len` pseudo-random bytes from `seed` (xorshift), different for each seed.
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
