//! The pseudo-random orders of the data pipeline (per-epoch shuffles, the eval split). Written out here rather than
//! taken from `rand` so that an order depends only on the seed, never on a crate version: a checkpoint's data
//! position must mean the same examples after an upgrade.

/// SplitMix64 (Steele, Lea, Flood 2014): a 64-bit state, one add and a mix per output.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by Lemire's multiply-shift with rejection (no modulo bias).
    pub fn below(&mut self, n: u64) -> u64 {
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// A seed for one purpose (`stream`) and one epoch, mixed from the run's seed.
pub fn derive_seed(seed: u64, stream: u64, epoch: u64) -> u64 {
    let mut r = SplitMix64::new(seed ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03));
    let a = r.next_u64();
    SplitMix64::new(a ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64()
}

/// The permutation of `0..n` that a Fisher–Yates shuffle with `seed` makes.
pub fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut r = SplitMix64::new(seed);
    for i in (1..n).rev() {
        let j = r.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}
