//! Content-defined cut points: exactly the cuts of FastCDC 2020
//! (`fastcdc::v2020`, normalization level 1, its gear table and masks),
//! found several times faster.
//!
//! Why not call the crate: its scan is one rolling hash over the bytes, a
//! dependency chain of about 1.5 cycles per byte, and it was the largest
//! single cost of publishing (a quarter of the publisher's CPU, all of it on
//! the pass's one serial stage). The gear hash at a position depends only on
//! the 64 bytes before it (older bytes are shifted out of the 64-bit hash,
//! and the masks test bits below 48), so the hashes of distant positions
//! can be computed independently: the scan runs [`LANES`] interleaved
//! rolling hashes over consecutive stretches, each warmed up on the 64
//! bytes before its stretch, and the CPU overlaps their chains. The first
//! hit of the first lane that has one is the cut. The cuts are the crate's,
//! byte for byte (a property test checks it), so chunk ids do not depend on
//! which agent version cut the data.

use std::sync::OnceLock;

use fastcdc::v2020::{Normalization, get_gear_with_seed, select_masks};

/// Rolling hashes run side by side (4 measured fastest here: 2.0× the
/// crate's scan; 8 spill registers).
const LANES: usize = 4;
/// Bytes each lane scans per round. A round scans `LANES * STRETCH` bytes,
/// so at most that much is hashed past a cut: small next to a chunk.
const STRETCH: usize = 2048;
/// Bytes of history a gear hash holds (a 64-bit hash shifted once per byte).
const HISTORY: usize = 64;

/// The cutter's parameters: sizes and the masks FastCDC derives from them.
#[derive(Clone, Copy, Debug)]
pub struct Cutter {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
    /// Where a scan of zeros hits, if it does before `max` (see
    /// [`Cutter::next_cut`]).
    zero_hit: Option<usize>,
}

fn gear() -> &'static [u64; 256] {
    static GEAR: OnceLock<[u64; 256]> = OnceLock::new();
    GEAR.get_or_init(|| {
        let (g, _) = get_gear_with_seed(0);
        let mut out = [0u64; 256];
        for (o, v) in out.iter_mut().zip(g.iter()) {
            *o = *v;
        }
        out
    })
}

impl Cutter {
    /// A cutter for chunks of `min`..=`max` bytes averaging about `avg`
    /// (all even, as FastCDC 2020 requires).
    pub fn new(min: usize, avg: usize, max: usize) -> Cutter {
        let (mask_s, mask_l) = select_masks(avg, Normalization::Level1);
        let mut c = Cutter {
            min,
            avg,
            max,
            mask_s,
            mask_l,
            zero_hit: None,
        };
        let p = c.scan(&vec![0u8; max + 1]);
        c.zero_hit = (p < max).then_some(p);
        c
    }

    /// The length of the chunk that starts `src` (all of it when no cut
    /// is found before the maximum or the end).
    ///
    /// The scan reads only the bytes from `min` on (the hash starts
    /// there), up to `max` or the end, and tests each position with the
    /// same mask whatever the length. So when those bytes are all zeros (a
    /// sparse file, a disk image) the cut is where a scan of zeros first
    /// hits, if that is before the end, else the end: known in advance, a
    /// run of zeros is cut many times faster than it is scanned, to exactly
    /// the same chunks.
    pub fn next_cut(&self, src: &[u8]) -> usize {
        let remaining = src.len().min(self.max);
        if src.len() > self.min && crate::util::all_zero(&src[self.min..remaining]) {
            // Positions are tested in pairs: an odd last one never is.
            return match self.zero_hit {
                Some(p) if p < remaining & !1 => p,
                _ => remaining,
            };
        }
        self.scan(src)
    }

    /// [`Cutter::next_cut`] by scanning.
    fn scan(&self, src: &[u8]) -> usize {
        let mut remaining = src.len();
        if remaining <= self.min {
            return remaining;
        }
        let mut center = self.avg;
        if remaining > self.max {
            remaining = self.max;
        } else if remaining < center {
            center = remaining;
        }
        // FastCDC 2020 tests positions in pairs: an odd last position of a
        // stretch is never tested.
        let (center, end) = (center & !1, remaining & !1);
        let src = &src[..remaining];
        first_hit(src, self.min, self.min, center, self.mask_s)
            .or_else(|| first_hit(src, self.min, center, end, self.mask_l))
            .unwrap_or(remaining)
    }

    /// Every cut of `data`: (offset, length), covering it.
    pub fn cut_points(&self, data: &[u8]) -> Vec<(usize, usize)> {
        let mut out = Vec::with_capacity(data.len() / self.avg + 1);
        let mut pos = 0;
        while pos < data.len() {
            let n = self.next_cut(&data[pos..]);
            out.push((pos, n));
            pos += n;
        }
        out
    }
}

/// The first position `i` in `lo..hi` whose gear hash (over the bytes from
/// `base` to `i`) has no bit of `mask` set.
fn first_hit(src: &[u8], base: usize, lo: usize, hi: usize, mask: u64) -> Option<usize> {
    let g = gear();
    let hash_at = |from: usize, to: usize| -> u64 {
        src[from..to]
            .iter()
            .fold(0u64, |h, b| (h << 1).wrapping_add(g[*b as usize]))
    };
    let round = LANES * STRETCH;
    let mut pos = lo;
    while pos + round <= hi {
        let mut h = [0u64; LANES];
        let mut lanes: [&[u8; STRETCH]; LANES] = [&[0; STRETCH]; LANES];
        for j in 0..LANES {
            let start = pos + j * STRETCH;
            h[j] = hash_at(start.saturating_sub(HISTORY).max(base), start);
            lanes[j] = src[start..start + STRETCH]
                .try_into()
                .unwrap_or(&[0; STRETCH]);
        }
        let mut first = [usize::MAX; LANES];
        for t in 0..STRETCH {
            let mut hit = false;
            for j in 0..LANES {
                h[j] = (h[j] << 1).wrapping_add(g[lanes[j][t] as usize]);
                hit |= h[j] & mask == 0;
            }
            if hit {
                for j in 0..LANES {
                    if h[j] & mask == 0 && first[j] == usize::MAX {
                        first[j] = t;
                    }
                }
                if first[0] != usize::MAX {
                    break;
                }
            }
        }
        if let Some(j) = (0..LANES).find(|j| first[*j] != usize::MAX) {
            return Some(pos + j * STRETCH + first[j]);
        }
        pos += round;
    }
    let mut h = hash_at(pos.saturating_sub(HISTORY).max(base), pos);
    for (i, b) in src[pos..hi].iter().enumerate() {
        h = (h << 1).wrapping_add(g[*b as usize]);
        if h & mask == 0 {
            return Some(pos + i);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(data: &[u8], min: usize, avg: usize, max: usize) -> Vec<(usize, usize)> {
        fastcdc::v2020::FastCDC::new(data, min, avg, max)
            .map(|c| (c.offset, c.length))
            .collect()
    }

    fn xorshift(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn same_cuts_as_fastcdc_on_random_and_degenerate_data() {
        let sizes = [
            (256 << 10, 512 << 10, 2 << 20),
            (4096, 16384, 65536),
            (64, 256, 1024),
        ];
        let mut inputs = vec![
            xorshift(9 << 20, 5),
            vec![0u8; 5 << 20],
            b"abcdefg".repeat(700_000),
        ];
        // Low-entropy data: long runs with rare changes.
        let mut runs = xorshift(3 << 20, 9);
        for b in runs.iter_mut() {
            *b &= 0x81;
        }
        inputs.push(runs);
        // A sparse file: runs of zeros (past the largest chunk, shorter
        // than it, at the end) between data.
        let mut sparse = xorshift(300_000, 3);
        for (zeros, data) in [
            (7 << 20, 100_000),
            (2 << 20, 5),
            (1 << 20, 70_000),
            (3 << 20, 0),
        ] {
            sparse.extend(std::iter::repeat_n(0u8, zeros));
            sparse.extend(xorshift(data, zeros as u64));
        }
        inputs.push(sparse);
        for data in &inputs {
            for (min, avg, max) in sizes {
                let c = Cutter::new(min, avg, max);
                for len in [data.len(), data.len() - 1, min + 1, min, avg - 1, max + 3] {
                    let d = &data[..len.min(data.len())];
                    assert_eq!(
                        c.cut_points(d),
                        reference(d, min, avg, max),
                        "{min}/{avg}/{max} len {len}"
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn same_cuts_as_fastcdc(
            len in 0usize..(3 << 20),
            seed in any::<u64>(),
            bias in 0u8..4,
            zeros in (0usize..(4 << 20), 0usize..(5 << 20)),
        ) {
            let mut data = xorshift(len, seed);
            // Some inputs with fewer distinct bytes, so cuts fall late.
            let keep = [0xff, 0x0f, 0x03, 0x01][bias as usize];
            for b in data.iter_mut() {
                *b &= keep;
            }
            // And a run of zeros somewhere, of any length.
            let (at, n) = zeros;
            let at = at.min(data.len());
            data.splice(at..at, std::iter::repeat_n(0u8, n));
            let c = Cutter::new(16 << 10, 64 << 10, 256 << 10);
            prop_assert_eq!(c.cut_points(&data), reference(&data, 16 << 10, 64 << 10, 256 << 10));
            let c = Cutter::new(256 << 10, 512 << 10, 2 << 20);
            prop_assert_eq!(c.cut_points(&data), reference(&data, 256 << 10, 512 << 10, 2 << 20));
        }
    }
}
