//! Counter-based random numbers: the same (seed, step, index) gives the same number on every backend, so dropout
//! masks need no state and the interpreter, host code and GPU kernels agree bit for bit.

/// SplitMix64's finaliser: a bijective 64-bit mix.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1) with 24 random bits (exact in f32) for element `index` of a draw at `step`.
pub fn uniform(seed: u64, step: u64, index: u64) -> f32 {
    let h = mix64(
        mix64(seed ^ 0x9e37_79b9_7f4a_7c15)
            .wrapping_add(mix64(step))
            .wrapping_add(index.wrapping_mul(0xd6e8_feb8_6659_fd93)),
    );
    (h >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// Whether dropout with probability `p` keeps element `index` at `step`.
pub fn dropout_keep(seed: u64, step: u64, index: u64, p: f64) -> bool {
    (uniform(seed, step, index) as f64) >= p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_roughly_uniform_and_deterministic() {
        let n = 100_000;
        let mean: f64 = (0..n).map(|i| uniform(7, 3, i) as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        assert_eq!(uniform(7, 3, 11), uniform(7, 3, 11));
        assert_ne!(uniform(7, 3, 11), uniform(7, 4, 11));
        let kept = (0..n).filter(|&i| dropout_keep(1, 0, i, 0.1)).count() as f64 / n as f64;
        assert!((kept - 0.9).abs() < 0.01, "kept {kept}");
    }
}
