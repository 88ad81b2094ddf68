//! Property tests for the structural passes: CSE, DCE and frozen-gradient elimination keep every surviving
//! output's value (f64 interpreter, bitwise for CSE/DCE, since no arithmetic changes), on random MLP-like graphs with
//! random frozen/trainable mixes and duplicated subexpressions.

use ir::interp::{run, Env, Precision, Tensor, Value};
use ir::{Builder, Graph, Init, OutputKind, Role, Type};
use passes::autodiff::{differentiate, Wrt};
use passes::cse::Cse;
use passes::dce::Dce;
use passes::frozen_grads::EliminateFrozenGrads;
use passes::Pass;
use proptest::prelude::*;

/// A chain of linear layers (each frozen or trainable, some with a LoRA-like trainable side branch), computed twice
/// where `dup` says so (for CSE to find), ending in a cross-entropy loss.
fn mlp(widths: &[usize], frozen: &[bool], dup: &[bool], tokens: usize) -> (Graph, Env) {
    let mut b = Builder::new("mlp");
    let mut env = Env::default();
    let mut seed = 1u64;
    let mut rand = |shape: &[usize]| {
        seed += 1;
        let n: usize = shape.iter().product();
        Tensor::new(shape.to_vec(), (0..n).map(|i| 2.0 * ir::rng::uniform(seed, 0, i as u64) as f64 - 1.0).collect())
    };
    let x = b.input("x", Type::f32(vec![tokens, widths[0]])).unwrap();
    env.inputs.insert("x".into(), Value::F(rand(&[tokens, widths[0]])));
    let mut h = x;
    for (i, w) in widths.windows(2).enumerate() {
        let role = if frozen[i] { Role::Frozen } else { Role::Trainable };
        let name = format!("l{i}.weight");
        let wt = b.param(&name, Type::f32(vec![w[1], w[0]]), role, Init::Load).unwrap();
        env.params.insert(name, Value::F(rand(&[w[1], w[0]])));
        let mut y = b.matmul(h, wt, false, true).unwrap();
        if dup[i] {
            let again = b.matmul(h, wt, false, true).unwrap();
            y = b.add(y, again).unwrap();
        }
        if frozen[i] && i % 2 == 0 {
            let a = format!("l{i}.lora_A.weight");
            let at = b.param(&a, Type::f32(vec![2, w[0]]), Role::Trainable, Init::Load).unwrap();
            env.params.insert(a, Value::F(rand(&[2, w[0]])));
            let u = b.matmul(h, at, false, true).unwrap();
            let bn = format!("l{i}.lora_B.weight");
            let bt = b.param(&bn, Type::f32(vec![w[1], 2]), Role::Trainable, Init::Load).unwrap();
            env.params.insert(bn, Value::F(rand(&[w[1], 2])));
            let l = b.matmul(u, bt, false, true).unwrap();
            y = b.add(y, l).unwrap();
        }
        h = b.silu(y).unwrap();
    }
    let labels = b.input("labels", Type::i32(vec![tokens])).unwrap();
    let v = *widths.last().unwrap();
    env.inputs.insert("labels".into(), Value::ints(vec![tokens], (0..tokens).map(|t| (t % v) as i32).collect()));
    let loss = b.cross_entropy(h, labels, -100).unwrap();
    b.output(OutputKind::Loss, loss);
    (b.finish(), env)
}

fn values(g: &Graph, env: &Env) -> Vec<(OutputKind, Vec<f64>)> {
    let v = run(g, env, Precision::F64).unwrap();
    g.outputs.iter().map(|o| (o.kind.clone(), v[o.value.index()].as_f().unwrap().data.clone())).collect()
}

fn lookup(vals: &[(OutputKind, Vec<f64>)], k: &OutputKind) -> Vec<f64> {
    vals.iter().find(|(kk, _)| kk == k).unwrap_or_else(|| panic!("missing {k:?}")).1.clone()
}

fn shapes() -> impl Strategy<Value = (Vec<usize>, Vec<bool>, Vec<bool>, usize)> {
    (2usize..5).prop_flat_map(|layers| {
        (
            prop::collection::vec(1usize..7, layers + 1),
            prop::collection::vec(any::<bool>(), layers),
            prop::collection::vec(any::<bool>(), layers),
            1usize..5,
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn cse_and_dce_keep_every_output((widths, frozen, dup, tokens) in shapes()) {
        let (mut g, env) = mlp(&widths, &frozen, &dup, tokens);
        differentiate(&mut g, Wrt::AllParams).unwrap();
        let before = values(&g, &env);
        let n = g.nodes.len();
        Cse.run(&mut g).unwrap();
        ir::verify::verify(&g).unwrap();
        prop_assert!(g.nodes.len() <= n);
        if dup.iter().any(|&d| d) {
            prop_assert!(g.nodes.len() < n, "CSE found none of the duplicated products");
        }
        Dce.run(&mut g).unwrap();
        ir::verify::verify(&g).unwrap();
        let after = values(&g, &env);
        prop_assert_eq!(before, after);
    }

    #[test]
    fn frozen_grad_elimination_keeps_trainable_grads((widths, frozen, dup, tokens) in shapes()) {
        let (mut g, env) = mlp(&widths, &frozen, &dup, tokens);
        differentiate(&mut g, Wrt::AllParams).unwrap();
        let before = values(&g, &env);
        EliminateFrozenGrads.run(&mut g).unwrap();
        ir::verify::verify(&g).unwrap();
        let after = values(&g, &env);
        let frozen_names: Vec<String> =
            g.params().into_iter().filter(|p| p.2 == Role::Frozen).map(|p| p.1.to_string()).collect();
        for (k, v) in &before {
            match k {
                OutputKind::Grad(p) if frozen_names.contains(p) => {
                    prop_assert!(after.iter().all(|(kk, _)| kk != k), "frozen gradient {} survived", p)
                }
                _ => prop_assert_eq!(&lookup(&after, k), v),
            }
        }
        // Weight-gradient matmuls (dW = dYᵀ·X, the only ones with ta = true) are left exactly for trainable weights:
        // one per product a trainable weight takes part in, none for frozen ones.
        let expected: usize = (0..frozen.len())
            .map(|i| if !frozen[i] { 1 + dup[i] as usize } else if i % 2 == 0 { 2 } else { 0 })
            .sum();
        let wgrad = g.nodes.iter().filter(|n| matches!(n.op, ir::Op::MatMul { ta: true, .. })).count();
        prop_assert_eq!(wgrad, expected);
    }
}
