//! Materializes parameter initializers (`Init`) as PEFT/PyTorch define them: `kaiming_uniform(a)` as
//! `torch.nn.init.kaiming_uniform_` with fan-in mode and leaky-ReLU gain (LoRA's A, a = √5 ⇒ U(−1/√in, 1/√in)),
//! zeros (LoRA's B), ones, normal(std), and `row_norm(W)` (DoRA's magnitude: the L2 norm of each output row of the
//! base weight — dequantized first when it is NF4, as PEFT does for 4-bit layers). Random draws use the
//! counter-based generator of `rng.rs`, seeded per parameter, so a run is reproducible.

use crate::attr::Init;
use crate::interp::{Tensor, Value};
use crate::nf4;

/// Why an initializer could not be materialized.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InitError {
    #[error("parameter `{0}` is loaded from the checkpoint, not initialized")]
    Load(String),
    #[error("`row_norm({of})` needs the value of `{of}`")]
    MissingSource { of: String },
    #[error("`{init}` needs a parameter of rank ≥ 1 (for the fan-in), found shape {shape:?}")]
    Rank { init: &'static str, shape: Vec<usize> },
}

/// A stable 64-bit seed for a parameter name (FNV-1a), mixed with the run's seed.
pub fn param_seed(run_seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    crate::rng::mix64(h ^ crate::rng::mix64(run_seed))
}

/// The initial value of parameter `name` of `shape`. `source` looks up other parameters' values (for `row_norm`).
pub fn materialize(
    init: &Init,
    name: &str,
    shape: &[usize],
    run_seed: u64,
    source: &dyn Fn(&str) -> Option<Value>,
) -> Result<Tensor, InitError> {
    let n: usize = shape.iter().product();
    let seed = param_seed(run_seed, name);
    let uniform = |i: usize, stream: u64| crate::rng::uniform(seed, stream, i as u64) as f64;
    Ok(match init {
        Init::Load => return Err(InitError::Load(name.to_string())),
        Init::Zeros => Tensor::zeros(shape),
        Init::Ones => Tensor::new(shape.to_vec(), vec![1.0; n]),
        Init::KaimingUniform { a } => {
            // fan_in = shape[1] · receptive field (1 for linear weights [out, in]); torch uses dims 1.. for fan-in.
            if shape.len() < 2 {
                return Err(InitError::Rank { init: "kaiming_uniform", shape: shape.to_vec() });
            }
            let fan_in: usize = shape[1..].iter().product();
            let gain = (2.0 / (1.0 + a * a)).sqrt();
            let bound = gain * (3.0 / fan_in as f64).sqrt();
            Tensor::new(shape.to_vec(), (0..n).map(|i| ((2.0 * uniform(i, 0) - 1.0) * bound) as f32 as f64).collect())
        }
        Init::Normal { std } => {
            // Box–Muller on two independent uniform streams (u1 in (0, 1]).
            let data = (0..n)
                .map(|i| {
                    let u1 = 1.0 - uniform(i, 1);
                    let u2 = uniform(i, 2);
                    (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 as f64
                })
                .collect();
            Tensor::new(shape.to_vec(), data)
        }
        Init::RowNorm { of } => {
            let w = match source(of).ok_or_else(|| InitError::MissingSource { of: of.clone() })? {
                Value::F(t) => t,
                Value::Q(q) => Tensor::from_f32(q.shape.clone(), &nf4::dequantize(&q)),
                Value::I { .. } => return Err(InitError::MissingSource { of: of.clone() }),
            };
            let cols = *w.shape.last().unwrap_or(&1);
            let rows = w.data.len() / cols.max(1);
            // In f32, as PEFT computes `torch.linalg.norm(weight, dim=1)` on the f32 weight.
            let data = (0..rows)
                .map(|r| w.data[r * cols..(r + 1) * cols].iter().map(|x| x * x).sum::<f64>().sqrt() as f32 as f64)
                .collect();
            Tensor::new(vec![rows], data)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kaiming_uniform_with_sqrt5_is_u_of_plus_minus_one_over_sqrt_fan_in() {
        let t =
            materialize(&Init::KaimingUniform { a: 5f64.sqrt() }, "m.lora_A.weight", &[16, 64], 0, &|_| None).unwrap();
        let bound = 1.0 / 64f64.sqrt();
        assert!(t.data.iter().all(|x| x.abs() <= bound * (1.0 + 1e-6)));
        // Uniform on (−b, b): variance b²/3; 1024 samples put the estimate within ~10%.
        let var = t.data.iter().map(|x| x * x).sum::<f64>() / t.data.len() as f64;
        assert!((var / (bound * bound / 3.0) - 1.0).abs() < 0.1, "variance {var}");
        let again =
            materialize(&Init::KaimingUniform { a: 5f64.sqrt() }, "m.lora_A.weight", &[16, 64], 0, &|_| None).unwrap();
        assert_eq!(t, again, "reproducible");
        let other =
            materialize(&Init::KaimingUniform { a: 5f64.sqrt() }, "n.lora_A.weight", &[16, 64], 0, &|_| None).unwrap();
        assert_ne!(t, other, "seeded per parameter");
    }

    #[test]
    fn normal_has_the_asked_std_and_zeros_are_zero() {
        let t = materialize(&Init::Normal { std: 0.02 }, "p", &[100, 100], 3, &|_| None).unwrap();
        let mean = t.data.iter().sum::<f64>() / 1e4;
        let std = (t.data.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / 1e4).sqrt();
        assert!(mean.abs() < 1e-3 && (std / 0.02 - 1.0).abs() < 0.03, "mean {mean} std {std}");
        assert!(materialize(&Init::Zeros, "b", &[3, 4], 0, &|_| None).unwrap().data.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn row_norm_is_the_norm_of_each_output_row_and_dequantizes_nf4() {
        let w = Tensor::new(vec![2, 2], vec![3.0, 4.0, 0.0, -2.0]);
        let src = |n: &str| (n == "w").then(|| Value::F(w.clone()));
        let m = materialize(&Init::RowNorm { of: "w".into() }, "m", &[2], 0, &src).unwrap();
        assert_eq!(m.data, vec![5.0, 2.0]);
        let vals: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
        let q = nf4::quantize(&vals, &[2, 64], 64, Some(256));
        let deq = nf4::dequantize(&q);
        let srcq = |_: &str| Some(Value::Q(q.clone()));
        let m = materialize(&Init::RowNorm { of: "w".into() }, "m", &[2], 0, &srcq).unwrap();
        let want: f64 = deq[..64].iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
        assert_eq!(m.data[0], want as f32 as f64);
        assert!(matches!(
            materialize(&Init::RowNorm { of: "x".into() }, "m", &[2], 0, &|_| None),
            Err(InitError::MissingSource { .. })
        ));
    }
}
