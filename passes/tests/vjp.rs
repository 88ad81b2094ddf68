//! Every vector-Jacobian rule against central finite differences (f64, reference interpreter): for each op,
//! loss = Σ op(inputs) ⊙ R with a fixed random R, gradients w.r.t. every float input.

use ir::interp::{Env, Tensor, Value};
use ir::{AttnArg, Builder, Init, Op, OutputKind, Role, Type, ValueId};
use passes::gradcheck::check_gradients;

fn rand(shape: &[usize], seed: u64, lo: f64, hi: f64) -> Tensor {
    let n = shape.iter().product::<usize>();
    Tensor::new(shape.to_vec(), (0..n).map(|i| lo + (hi - lo) * ir::rng::uniform(seed, 0, i as u64) as f64).collect())
}

/// Float inputs are trainable params p0, p1, …; int inputs are graph inputs i0, i1, ….
enum Arg {
    F(Vec<usize>, f64, f64),
    I(Vec<usize>, Vec<i32>),
}

fn check(name: &str, args: Vec<Arg>, build: impl Fn(&mut Builder, &[ValueId]) -> ValueId) {
    let mut b = Builder::new(name);
    let mut env = Env::default();
    let mut ids = vec![];
    for (k, a) in args.iter().enumerate() {
        match a {
            Arg::F(shape, lo, hi) => {
                let pname = format!("p{k}");
                ids.push(b.param(&pname, Type::f32(shape.clone()), Role::Trainable, Init::Load).unwrap());
                env.params.insert(pname, Value::F(rand(shape, 100 + k as u64, *lo, *hi)));
            }
            Arg::I(shape, data) => {
                let iname = format!("i{k}");
                ids.push(b.input(&iname, Type::i32(shape.clone())).unwrap());
                env.inputs.insert(iname, Value::ints(shape.clone(), data.clone()));
            }
        }
    }
    let y = build(&mut b, &ids);
    let yty = b.ty(y).clone();
    let loss = if yty.rank() == 0 {
        y
    } else {
        let r = b.param("r", yty.clone(), Role::Frozen, Init::Load).unwrap();
        env.params.insert("r".into(), Value::F(rand(&yty.shape, 7, -1.0, 1.0)));
        let p = b.mul(y, r).unwrap();
        let axes: Vec<usize> = (0..yty.rank()).collect();
        b.sum(p, &axes, false).unwrap()
    };
    b.output(OutputKind::Loss, loss);
    let g = b.finish();
    ir::verify::verify(&g).unwrap();
    let checks = check_gradients(&g, &env, 1e-6, None).unwrap();
    assert!(!checks.is_empty(), "{name}: nothing checked");
    for c in checks {
        assert!(c.fd_norm > 0.0, "{name}: gradient of {} is identically zero; the check proves nothing", c.param);
        assert!(c.rel_err < 1e-6, "{name}: {} relative error {:e}", c.param, c.rel_err);
    }
}

fn f(shape: &[usize]) -> Arg {
    Arg::F(shape.to_vec(), -1.0, 1.0)
}
fn pos(shape: &[usize]) -> Arg {
    Arg::F(shape.to_vec(), 0.5, 2.0)
}

#[test]
fn layout_ops() {
    check("reshape", vec![f(&[2, 6])], |b, x| b.reshape(x[0], &[3, 4]).unwrap());
    check("transpose", vec![f(&[2, 3, 4])], |b, x| b.transpose(x[0], &[2, 0, 1]).unwrap());
    check("concat", vec![f(&[2, 3]), f(&[2, 5])], |b, x| b.concat(&[x[0], x[1]], 1).unwrap());
    check("slice", vec![f(&[4, 6])], |b, x| b.slice(x[0], 1, 1, 4).unwrap());
    check("broadcast_to", vec![f(&[3, 1])], |b, x| b.broadcast_to(x[0], &[2, 3, 4]).unwrap());
    check("sum_to", vec![f(&[2, 3, 4])], |b, x| b.sum_to(x[0], &[3, 1]).unwrap());
    check("sum", vec![f(&[2, 3, 4])], |b, x| b.sum(x[0], &[0, 2], false).unwrap());
    check("sum keepdim", vec![f(&[2, 3, 4])], |b, x| b.sum(x[0], &[1], true).unwrap());
}

#[test]
fn elementwise_ops() {
    check("add bcast", vec![f(&[3, 4]), f(&[4])], |b, x| b.add(x[0], x[1]).unwrap());
    check("sub bcast", vec![f(&[3, 1]), f(&[3, 4])], |b, x| b.sub(x[0], x[1]).unwrap());
    check("mul bcast", vec![f(&[2, 3, 4]), f(&[3, 1])], |b, x| b.mul(x[0], x[1]).unwrap());
    check("div", vec![f(&[3, 4]), pos(&[4])], |b, x| b.div(x[0], x[1]).unwrap());
    check("neg", vec![f(&[5])], |b, x| b.neg(x[0]).unwrap());
    check("exp", vec![f(&[5])], |b, x| b.op(Op::Exp {}, &[x[0]]).unwrap());
    check("log", vec![pos(&[5])], |b, x| b.op(Op::Log {}, &[x[0]]).unwrap());
    check("sqrt", vec![pos(&[5])], |b, x| b.sqrt(x[0]).unwrap());
    check("rsqrt", vec![pos(&[5])], |b, x| b.op(Op::Rsqrt {}, &[x[0]]).unwrap());
    check("sigmoid", vec![f(&[5])], |b, x| b.op(Op::Sigmoid {}, &[x[0]]).unwrap());
    check("silu", vec![f(&[5])], |b, x| b.silu(x[0]).unwrap());
    check("swiglu", vec![f(&[3, 5]), f(&[3, 5])], |b, x| b.swiglu(x[0], x[1]).unwrap());
    check("scale", vec![f(&[5])], |b, x| b.scale(x[0], -2.5).unwrap());
    check("softmax", vec![f(&[3, 7])], |b, x| b.softmax(x[0]).unwrap());
    // stop_gradient: the gradient flows only through the other path.
    check("stop_gradient", vec![f(&[4])], |b, x| {
        let s = b.stop_gradient(x[0]).unwrap();
        b.mul(x[0], s).unwrap()
    });
}

#[test]
fn matmul_all_transposes() {
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let a = if ta { [5, 3] } else { [3, 5] };
        let bb = if tb { [4, 5] } else { [5, 4] };
        check(&format!("matmul {ta} {tb}"), vec![f(&a), f(&bb)], |b, x| b.matmul(x[0], x[1], ta, tb).unwrap());
        let a3 = [2, a[0], a[1]];
        let b3 = [2, bb[0], bb[1]];
        check(&format!("bmm {ta} {tb}"), vec![f(&a3), f(&b3)], |b, x| b.matmul(x[0], x[1], ta, tb).unwrap());
    }
}

#[test]
fn transformer_ops() {
    check("embedding", vec![f(&[7, 4]), Arg::I(vec![2, 3], vec![0, 6, 2, 2, 5, 0])], |b, x| {
        b.embedding(x[0], x[1]).unwrap()
    });
    check("rms_norm", vec![f(&[3, 8]), pos(&[8])], |b, x| b.rms_norm(x[0], x[1], 1e-5).unwrap());
    check("rope", vec![f(&[2, 3, 2, 8]), Arg::I(vec![2, 3], vec![0, 1, 2, 5, 6, 7])], |b, x| {
        b.rope(x[0], x[1], 10000.0).unwrap()
    });
    for causal in [true, false] {
        let seg = Arg::I(vec![2, 5], vec![0, 0, 0, 1, 1, 0, 0, 0, 0, 0]);
        check(
            &format!("attention gqa causal={causal}"),
            vec![f(&[2, 5, 4, 6]), f(&[2, 5, 2, 6]), f(&[2, 5, 2, 6]), seg],
            |b, x| b.op(Op::Attention { causal, scale: 0.4 }, &[x[0], x[1], x[2], x[3]]).unwrap(),
        );
    }
    check("cross_entropy", vec![f(&[4, 6]), Arg::I(vec![4], vec![1, -100, 5, 0])], |b, x| {
        b.cross_entropy(x[0], x[1], -100).unwrap()
    });
    check("dropout", vec![f(&[64]), Arg::I(vec![], vec![3])], |b, x| b.dropout(x[0], x[1], 0.3, 42).unwrap());
}

#[test]
fn attention_bwd_ops_are_consistent_with_attn_arg() {
    // The three gradient ops have the shapes of q, k, v.
    let mut b = Builder::new("t");
    let q = b.param("q", Type::f32(vec![1, 2, 4, 2]), Role::Trainable, Init::Load).unwrap();
    let k = b.param("k", Type::f32(vec![1, 2, 2, 2]), Role::Trainable, Init::Load).unwrap();
    let v = b.param("v", Type::f32(vec![1, 2, 2, 2]), Role::Trainable, Init::Load).unwrap();
    let s = b.input("s", Type::i32(vec![1, 2])).unwrap();
    let o = b.attention(q, k, v, s, 1.0).unwrap();
    for (wrt, want) in [(AttnArg::Q, q), (AttnArg::K, k), (AttnArg::V, v)] {
        let d = b.attention_bwd([o, q, k, v, s], true, 1.0, wrt).unwrap();
        assert_eq!(b.ty(d), b.ty(want));
    }
}
