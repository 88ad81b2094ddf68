//! Spot checks of the interpreter against values computed by hand (the golden tests against PyTorch cover the
//! model as a whole).

use ir::interp::{run, Env, Precision, Tensor, Value};
use ir::{Builder, Init, Op, OutputKind, Role, Type};

fn eval1(build: impl Fn(&mut Builder) -> ir::ValueId, env: Env) -> Tensor {
    let mut b = Builder::new("t");
    let y = build(&mut b);
    b.output(OutputKind::Logits, y);
    let g = b.finish();
    ir::verify::verify(&g).unwrap();
    let vals = run(&g, &env, Precision::F64).unwrap();
    vals[y.index()].as_f().unwrap().clone()
}

fn p(env: &mut Env, name: &str, shape: &[usize], data: &[f64]) {
    env.params.insert(name.into(), Value::F(Tensor::new(shape.to_vec(), data.to_vec())));
}

#[test]
fn matmul_with_transposes() {
    let mut env = Env::default();
    p(&mut env, "a", &[2, 3], &[1., 2., 3., 4., 5., 6.]);
    p(&mut env, "b", &[2, 3], &[1., 0., 1., 0., 1., 0.]);
    let t = eval1(
        |b| {
            let a = b.param("a", Type::f32(vec![2, 3]), Role::Frozen, Init::Load).unwrap();
            let w = b.param("b", Type::f32(vec![2, 3]), Role::Frozen, Init::Load).unwrap();
            b.matmul(a, w, false, true).unwrap()
        },
        env,
    );
    assert_eq!(t.shape, vec![2, 2]);
    assert_eq!(t.data, vec![4., 2., 10., 5.]);
}

#[test]
fn adamw_first_step_moves_by_lr_times_sign() {
    // torch.optim.AdamW, first step: m̂ = g, v̂ = g², so p ← p(1 − lr·wd) − lr·g/(|g| + eps).
    let mut env = Env::default();
    p(&mut env, "p", &[2], &[1.0, -2.0]);
    p(&mut env, "g", &[2], &[0.5, -3.0]);
    p(&mut env, "z", &[2], &[0.0, 0.0]);
    env.inputs.insert("lr".into(), Value::F(Tensor::scalar(0.1)));
    env.inputs.insert("t".into(), Value::ints(vec![], vec![1]));
    let t = eval1(
        |b| {
            let ty = Type::f32(vec![2]);
            let pp = b.param("p", ty.clone(), Role::Trainable, Init::Load).unwrap();
            let g = b.param("g", ty.clone(), Role::Frozen, Init::Load).unwrap();
            let z = b.param("z", ty, Role::State, Init::Load).unwrap();
            let lr = b.input("lr", Type::f32(vec![])).unwrap();
            let t = b.input("t", Type::i32(vec![])).unwrap();
            let m = b.op(Op::AdamWMoment { beta: 0.9, square: false }, &[z, g]).unwrap();
            let v = b.op(Op::AdamWMoment { beta: 0.999, square: true }, &[z, g]).unwrap();
            let upd = Op::AdamWUpdate { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
            b.op(upd, &[pp, m, v, lr, t]).unwrap()
        },
        env,
    );
    let want = [1.0 * (1.0 - 0.001) - 0.1 * 0.5 / (0.5 + 1e-8), -2.0 * (1.0 - 0.001) + 0.1 * 3.0 / (3.0 + 1e-8)];
    for (a, b) in t.data.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
}

#[test]
fn attention_gqa_causal_and_segments() {
    // One batch, 3 positions, 2 query heads sharing 1 kv head, head dim 1. With scores all equal (q = 0), each
    // position averages the values it may see: causal, and not across segments.
    let mut env = Env::default();
    p(&mut env, "q", &[1, 3, 2, 1], &[0.0; 6]);
    p(&mut env, "k", &[1, 3, 1, 1], &[1.0, 2.0, 3.0]);
    p(&mut env, "v", &[1, 3, 1, 1], &[10.0, 20.0, 60.0]);
    env.inputs.insert("seg".into(), Value::ints(vec![1, 3], vec![0, 0, 1]));
    let t = eval1(
        |b| {
            let q = b.param("q", Type::f32(vec![1, 3, 2, 1]), Role::Frozen, Init::Load).unwrap();
            let k = b.param("k", Type::f32(vec![1, 3, 1, 1]), Role::Frozen, Init::Load).unwrap();
            let v = b.param("v", Type::f32(vec![1, 3, 1, 1]), Role::Frozen, Init::Load).unwrap();
            let s = b.input("seg", Type::i32(vec![1, 3])).unwrap();
            b.attention(q, k, v, s, 1.0).unwrap()
        },
        env,
    );
    assert_eq!(t.data, vec![10.0, 10.0, 15.0, 15.0, 60.0, 60.0]);
}

#[test]
fn rope_rotates_pairs_half_apart() {
    // hd = 4: pairs (0, 2) and (1, 3); at position 1 pair j rotates by θ^(−2j/4) radians.
    let mut env = Env::default();
    p(&mut env, "x", &[1, 2, 1, 4], &[1.0, 2.0, 3.0, 4.0, 1.0, 0.0, 0.0, 1.0]);
    env.inputs.insert("pos".into(), Value::ints(vec![1, 2], vec![0, 1]));
    let t = eval1(
        |b| {
            let x = b.param("x", Type::f32(vec![1, 2, 1, 4]), Role::Frozen, Init::Load).unwrap();
            let pos = b.input("pos", Type::i32(vec![1, 2])).unwrap();
            b.rope(x, pos, 100.0).unwrap()
        },
        env,
    );
    assert_eq!(&t.data[..4], &[1.0, 2.0, 3.0, 4.0]); // position 0: identity
    let (a0, a1) = (1.0f64, 0.1f64); // 100^0, 100^(-1/2)
    let want = [a0.cos(), -a1.sin(), a0.sin(), a1.cos()];
    for (x, w) in t.data[4..].iter().zip(want) {
        assert!((x - w).abs() < 1e-15, "{x} vs {w}");
    }
}

#[test]
fn cross_entropy_ignores_and_averages() {
    let mut env = Env::default();
    p(&mut env, "l", &[3, 2], &[0.0, 0.0, 1.0, 0.0, 5.0, -5.0]);
    env.inputs.insert("y".into(), Value::ints(vec![3], vec![1, -100, 0]));
    let t = eval1(
        |b| {
            let l = b.param("l", Type::f32(vec![3, 2]), Role::Frozen, Init::Load).unwrap();
            let y = b.input("y", Type::i32(vec![3])).unwrap();
            b.cross_entropy(l, y, -100).unwrap()
        },
        env,
    );
    let want = (2f64.ln() + (1.0 + (-10f64).exp()).ln()) / 2.0;
    assert!((t.data[0] - want).abs() < 1e-15);
}

#[test]
fn f32_mode_rounds_and_bf16_rounds_always() {
    let mut env = Env::default();
    p(&mut env, "x", &[1], &[1.0 + 1e-9]);
    let build = |b: &mut Builder| {
        let x = b.param("x", Type::f32(vec![1]), Role::Frozen, Init::Load).unwrap();
        b.scale(x, 1.0).unwrap()
    };
    let mut b = Builder::new("t");
    let y = build(&mut b);
    let c = b.cast(y, ir::DType::BF16).unwrap();
    b.output(OutputKind::Logits, c);
    let g = b.finish();
    let v32 = run(&g, &env, Precision::F32).unwrap();
    let v64 = run(&g, &env, Precision::F64).unwrap();
    assert_eq!(v32[y.index()].as_f().unwrap().data[0], 1.0);
    assert_eq!(v64[y.index()].as_f().unwrap().data[0], 1.0 + 1e-9);
    assert_eq!(v64[c.index()].as_f().unwrap().data[0], 1.0);
}
