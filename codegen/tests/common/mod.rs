//! What the template tests share: reproducible random inputs and the ptxas policy.
#![allow(dead_code)]

use codegen::ptxas;

/// xorshift64*: reproducible inputs without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    /// Uniform in [0, 1) with 24 random bits.
    pub fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f64 / (1u64 << 24) as f64
    }
    /// Uniform in [lo, hi), rounded to f32.
    pub fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n).map(|_| (lo + (hi - lo) * self.next()) as f32).collect()
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> i32 {
        ((self.next() * n as f64) as usize).min(n - 1) as i32
    }
}

/// ptxas is part of the toolchain: its absence fails the suite unless explicitly allowed.
pub fn require_ptxas() -> bool {
    if ptxas::find_ptxas().is_some() {
        return true;
    }
    if std::env::var("TUNEC_ALLOW_NO_PTXAS").as_deref() == Ok("1") {
        eprintln!("ptxas not found; skipping the ptxas checks because TUNEC_ALLOW_NO_PTXAS=1");
        return false;
    }
    panic!(
        "ptxas not found (TUNEC_PTXAS, ~/.cache/tunec/{}, PATH): run scripts/setup.sh, or set TUNEC_ALLOW_NO_PTXAS=1 \
         to skip the ptxas checks",
        ptxas::CACHED_PTXAS
    );
}
