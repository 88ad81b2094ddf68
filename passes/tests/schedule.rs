//! The scheduling pass: kernels in an order that frees memory early, leaves first, each kernel contiguous, values
//! renumbered consistently; and a property test over random DAGs of elementwise ops, matmuls and reductions: after
//! `fuse` + `schedule` the interpreter gives bit-identical outputs, kernels form an acyclic graph, and running them
//! in `g.kernels` order never reads a value of a later kernel.

use ir::interp::{Env, Precision, Tensor, Value};
use ir::{Builder, Graph, Init, Op, OutputKind, Role, Type, ValueId};
use passes::fuse::Fuse;
use passes::schedule::Schedule;
use passes::Pass;
use proptest::prelude::*;

fn param(b: &mut Builder, name: &str, shape: &[usize]) -> ValueId {
    b.param(name, Type::f32(shape.to_vec()), Role::Frozen, Init::Load).unwrap()
}

fn run_pass(p: &dyn Pass, g: &mut Graph) -> Result<String, String> {
    let summary = p.run(g).map_err(|e| format!("{}: {e}", p.name()))?;
    ir::verify::verify(g).map_err(|e| format!("after {}: {e}\n{}", p.name(), ir::text::print(g)))?;
    Ok(summary)
}

/// Checks the scheduled form: every non-leaf node in exactly one kernel; leaves first; kernels contiguous and in
/// node order; no kernel reads a value of a later kernel.
fn check_scheduled(g: &Graph) -> Result<(), String> {
    let mut of = vec![None; g.nodes.len()];
    for (k, kernel) in g.kernels.iter().enumerate() {
        for v in &kernel.nodes {
            if of[v.index()].replace(k).is_some() {
                return Err(format!("{v} is in two kernels"));
            }
        }
    }
    let leaves = g.nodes.iter().take_while(|n| n.op.is_leaf()).count();
    if let Some(i) = (leaves..g.nodes.len()).find(|&i| g.nodes[i].op.is_leaf() || of[i].is_none()) {
        return Err(format!("%{i}: a leaf after the first kernel, or a node in no kernel"));
    }
    let flat: Vec<ValueId> = g.kernels.iter().flat_map(|k| k.nodes.iter().copied()).collect();
    if flat != (leaves as u32..g.nodes.len() as u32).map(ValueId).collect::<Vec<_>>() {
        return Err("kernels are not contiguous and in node order".into());
    }
    for (k, kernel) in g.kernels.iter().enumerate() {
        for v in &kernel.nodes {
            for i in &g.node(*v).inputs {
                if of[i.index()].is_some_and(|ki| ki > k) {
                    return Err(format!("kernel {k} reads {i} of later kernel {:?}", of[i.index()]));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn the_kernel_that_frees_a_value_runs_first() {
    // a = x·W1 and b = x·W2 are both ready at the start; sum(a) frees a, so it runs before b is computed.
    let mut b = Builder::new("greedy");
    let x = param(&mut b, "x", &[64, 64]);
    let w1 = param(&mut b, "w1", &[64, 64]);
    let w2 = param(&mut b, "w2", &[64, 64]);
    b.set_label(Some("a".into()));
    let a = b.matmul(x, w1, false, false).unwrap();
    b.set_label(Some("b".into()));
    let bb = b.matmul(x, w2, false, false).unwrap();
    b.set_label(Some("sum a".into()));
    let sa = b.sum(a, &[0, 1], false).unwrap();
    b.set_label(Some("sum b".into()));
    let sb = b.sum(bb, &[0, 1], false).unwrap();
    let y = b.add(sa, sb).unwrap();
    b.output(OutputKind::Metric("y".into()), y);
    let mut g = b.finish();
    run_pass(&Fuse, &mut g).unwrap();
    let names = |g: &Graph| g.kernels.iter().map(|k| k.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&g), ["matmul:a", "matmul:b", "sum:sum a", "sum:sum b"]);
    let summary = run_pass(&Schedule, &mut g).unwrap();
    assert_eq!(names(&g), ["matmul:a", "sum:sum a", "matmul:b", "sum:sum b"]);
    // Before: a and b (16 KiB each) live together; after: one of them at a time, plus scalars (sum a, y).
    assert_eq!(summary, "4 kernels; peak of live intermediates 32.00 KiB → 16.01 KiB");
    check_scheduled(&g).unwrap();
}

#[test]
fn leaves_move_first_and_values_are_renumbered() {
    let mut b = Builder::new("renumber");
    let x = param(&mut b, "x", &[2, 3]);
    let n = b.neg(x).unwrap();
    let t = b.transpose(n, &[1, 0]).unwrap();
    let w = param(&mut b, "w", &[3, 2]);
    let m = b.mul(t, w).unwrap();
    b.output(OutputKind::Metric("m".into()), m);
    b.output(OutputKind::Metric("n".into()), n);
    let mut g = b.finish();
    run_pass(&Fuse, &mut g).unwrap();
    run_pass(&Schedule, &mut g).unwrap();
    let expected = "\
graph \"renumber\" {
  %0 = param {name=\"x\", role=frozen, init=load} : f32[2,3]
  %1 = param {name=\"w\", role=frozen, init=load} : f32[3,2]
  %2 = neg(%0) : f32[2,3]
  %3 = transpose(%2) {perm=[1,0]} : f32[3,2]
  %4 = mul(%3, %1) : f32[3,2]
  output metric \"m\" = %4
  output metric \"n\" = %2
  kernel \"transpose\" = [%2, %3, %4]
}
";
    assert_eq!(ir::text::print(&g), expected);
}

#[test]
fn schedule_needs_kernels() {
    let mut b = Builder::new("unfused");
    let x = param(&mut b, "x", &[2]);
    let y = b.neg(x).unwrap();
    b.output(OutputKind::Metric("y".into()), y);
    let mut g = b.finish();
    let err = Schedule.run(&mut g).unwrap_err();
    assert!(err.contains("run `fuse` first") && err.contains("%1 (neg) is in no kernel"), "{err}");
}

// ---- random DAGs ----------------------------------------------------------------------------------------------

const DIMS: [usize; 3] = [2, 3, 5];

/// One step of a random graph: an op selector, two operand selectors and a shape/variant selector.
type Step = (u8, u16, u16, u8);

/// Builds a random DAG: the pool starts with three parameters; each step appends one op reading pool values.
fn random_graph(steps: &[Step], extra_outputs: &[u16]) -> (Graph, Env) {
    let mut b = Builder::new("random");
    let mut env = Env::default();
    let mut pool: Vec<ValueId> = vec![];
    let mut new_param = |b: &mut Builder, pool: &mut Vec<ValueId>, shape: [usize; 2]| -> ValueId {
        let name = format!("p{}", env.params.len());
        let v = param(b, &name, &shape);
        let k = env.params.len() as u64;
        let data = (0..shape[0] * shape[1]).map(|i| ir::rng::uniform(k, 0, i as u64) as f64 * 2.0 - 1.0).collect();
        env.params.insert(name, Value::F(Tensor::new(shape.to_vec(), data)));
        pool.push(v);
        v
    };
    for (i, s) in [[2, 3], [3, 5], [5, 2]].into_iter().enumerate() {
        b.set_label(Some(format!("p{i}")));
        new_param(&mut b, &mut pool, s);
    }
    for (at, &(op, x, y, sel)) in steps.iter().enumerate() {
        b.set_label(Some(format!("s{at}")));
        let a = pool[x as usize % pool.len()];
        let sa = b.ty(a).shape.clone();
        let dim = DIMS[sel as usize % DIMS.len()];
        let same: Vec<ValueId> = pool.iter().copied().filter(|&v| b.ty(v).shape == sa).collect();
        let v = match op % 10 {
            0 => b.neg(a),
            1 if sel % 2 == 0 => b.op(Op::Sigmoid {}, &[a]),
            1 => b.op(Op::Exp {}, &[a]),
            2 => b.scale(a, 0.5),
            3 => b.silu(a),
            4 => {
                let other = same[y as usize % same.len()];
                match sel % 5 {
                    0 => b.add(a, other),
                    1 => b.sub(a, other),
                    2 => b.mul(a, other),
                    3 => b.op(Op::Maximum {}, &[a, other]),
                    _ => {
                        let c = b.constant(1.5, Type::f32(vec![])).unwrap();
                        b.mul(a, c)
                    }
                }
            }
            5 => {
                let k = sa[1];
                let fits: Vec<ValueId> = pool.iter().copied().filter(|&v| b.ty(v).shape[0] == k).collect();
                let w = if fits.is_empty() || sel % 3 == 0 {
                    new_param(&mut b, &mut pool, [k, dim])
                } else {
                    fits[y as usize % fits.len()]
                };
                b.matmul(a, w, false, false)
            }
            6 => b.sum(a, &[sel as usize % 2], true),
            7 if sa.contains(&1) => {
                let shape: Vec<usize> = sa.iter().map(|&d| if d == 1 { dim } else { d }).collect();
                b.broadcast_to(a, &shape)
            }
            7 => b.sum(a, &[1], true),
            8 => b.reshape(a, &[sa[1], sa[0]]),
            _ => b.transpose(a, &[1, 0]),
        }
        .unwrap();
        pool.push(v);
    }
    let mut g = b.finish();
    let readers = g.use_counts();
    let mut outs: Vec<ValueId> = g.ids().filter(|&v| !g.node(v).op.is_leaf() && readers[v.index()] == 0).collect();
    for &o in extra_outputs {
        let v = pool[o as usize % pool.len()];
        if !g.node(v).op.is_leaf() && !outs.contains(&v) {
            outs.push(v);
        }
    }
    for (i, v) in outs.into_iter().enumerate() {
        g.outputs.push(ir::Output { kind: OutputKind::Metric(format!("o{i}")), value: v });
    }
    (g, env)
}

fn output_bits(g: &Graph, env: &Env) -> Vec<(OutputKind, Vec<u64>)> {
    let vals = ir::interp::run(g, env, Precision::F64).unwrap();
    g.outputs
        .iter()
        .map(|o| (o.kind.clone(), vals[o.value.index()].as_f().unwrap().data.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

fn fuse_and_schedule_preserve(steps: &[Step], extra_outputs: &[u16]) -> Result<(), String> {
    let (mut g, env) = random_graph(steps, extra_outputs);
    ir::verify::verify(&g).map_err(|e| e.to_string())?;
    let before = output_bits(&g, &env);
    let nodes = g.nodes.len();
    run_pass(&Fuse, &mut g)?;
    passes::fuse::check_partition(&g)?;
    run_pass(&Schedule, &mut g)?;
    if g.nodes.len() != nodes {
        return Err("schedule changed the node count".into());
    }
    check_scheduled(&g).map_err(|e| format!("{e}\n{}", ir::text::print(&g)))?;
    if output_bits(&g, &env) != before {
        return Err(format!("outputs changed\n{}", ir::text::print(&g)));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]
    #[test]
    fn fuse_and_schedule_keep_outputs_bit_identical(
        steps in prop::collection::vec((0u8..10, any::<u16>(), any::<u16>(), any::<u8>()), 1..32),
        extra in prop::collection::vec(any::<u16>(), 0..4),
    ) {
        fuse_and_schedule_preserve(&steps, &extra).map_err(TestCaseError::fail)?;
    }
}
