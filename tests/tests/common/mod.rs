//! What several training tests share.

use ir::plan::Plan;
use ir::Init;
use runtime::CpuBackend;

/// A cpu backend for `plan` on 2 threads with seeded frozen weights (uniform in ±0.2, norm weights 1) and the
/// plan's initializers run.
pub fn seeded_cpu_backend(plan: &Plan) -> CpuBackend {
    let mut be = CpuBackend::new(plan, 2).expect("backend");
    for p in &plan.params {
        if matches!(p.init, Init::Load) {
            let n: usize = p.shape.iter().product();
            let s = ir::init::param_seed(5, &p.name);
            let v: Vec<f32> = if p.name.contains("norm") {
                vec![1.0; n]
            } else {
                (0..n).map(|i| 0.2 * (2.0 * ir::rng::uniform(s, 1, i as u64) - 1.0)).collect()
            };
            be.set_param_f32(&p.name, &v).unwrap();
        }
    }
    be.init_params(plan.train.seed).unwrap();
    be
}
