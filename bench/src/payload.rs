//! Deterministic request payloads: every byte is a function of the request
//! id, so an echoed reply can be checked without storing what was sent.

const BROADCAST: u64 = 0x0101_0101_0101_0101;

fn seed(id: u64) -> u64 {
    let x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29) ^ 0x5DEE_CE66_D1CE_4E5B
}

fn word(seed: u64, chunk: usize) -> u64 {
    seed ^ (chunk as u8 as u64).wrapping_mul(BROADCAST)
}

/// Appends the `len`-byte payload of request `id` to `out`.
pub fn fill(id: u64, len: usize, out: &mut Vec<u8>) {
    let s = seed(id);
    out.reserve(len);
    let full = len / 8;
    for c in 0..full {
        out.extend_from_slice(&word(s, c).to_le_bytes());
    }
    out.extend_from_slice(&word(s, full).to_le_bytes()[..len % 8]);
}

/// Whether `data` is exactly the `len`-byte payload of request `id`.
pub fn matches(id: u64, len: usize, data: &[u8]) -> bool {
    if data.len() != len {
        return false;
    }
    let s = seed(id);
    let mut chunks = data.chunks_exact(8);
    for (c, ch) in chunks.by_ref().enumerate() {
        if ch != word(s, c).to_le_bytes() {
            return false;
        }
    }
    let rest = chunks.remainder();
    rest == &word(s, len / 8).to_le_bytes()[..rest.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_detects_changes() {
        for len in [0usize, 1, 7, 8, 9, 64, 1000, 4096] {
            for id in [0u64, 1, 42, u64::MAX, (7 << 40) | 3] {
                let mut b = Vec::new();
                fill(id, len, &mut b);
                assert_eq!(b.len(), len);
                assert!(matches(id, len, &b));
                if len > 0 {
                    let mut c = b.clone();
                    c[len - 1] ^= 1;
                    assert!(!matches(id, len, &c), "flip last byte, len {len}");
                    let mut c = b.clone();
                    c[0] ^= 0x80;
                    assert!(!matches(id, len, &c));
                    assert!(!matches(id, len, &b[..len - 1]));
                }
                let mut longer = b.clone();
                longer.push(0);
                assert!(!matches(id, len, &longer));
            }
        }
    }

    #[test]
    fn neighbouring_ids_differ() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        fill(1000, 64, &mut a);
        fill(1001, 64, &mut b);
        assert_ne!(a, b);
        assert!(!matches(1001, 64, &a));
        // and the pattern varies inside a payload
        assert_ne!(a[..8], a[8..16]);
    }
}
