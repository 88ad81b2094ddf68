//! The memory plan, checked by simulating it: every step's reads must find their value still in its buffer, graph
//! outputs must survive to the end, and buffers live at the same time must not overlap. On a hand-built two-layer
//! LoRA model (AdamW in place, reuse below the naive total), an NF4 variant, and random graphs and kernel groupings.

use ir::{Builder, DType, Graph, Init, Kernel, Nf4Format, Op, OutputKind, Role, Type, ValueId};
use passes::adamw::AdamW;
use passes::autodiff::{differentiate, Wrt};
use passes::cost::is_view;
use passes::memory::{plan, MemoryPlan, Placement, Region, ALIGN};
use passes::Pass;
use proptest::prelude::*;

/// A two-layer toy with the shape of a LoRA fine-tune: per layer rms_norm → frozen up-projection plus a trainable
/// rank-r branch (optionally after dropout) → silu → frozen down-projection → residual add; an LM head and
/// cross-entropy; then the backward (trainable only) and AdamW.
struct Mini {
    layers: usize,
    tokens: usize,
    hidden: usize,
    ffn: usize,
    vocab: usize,
    rank: usize,
    /// NF4 storage for the frozen up-projection (QLoRA).
    nf4: bool,
}

fn mini(m: &Mini) -> Graph {
    let (n, d, f, v, r) = (m.tokens, m.hidden, m.ffn, m.vocab, m.rank);
    let mut b = Builder::new("mini");
    let ids = b.input("input_ids", Type::i32([n])).unwrap();
    let labels = b.input("labels", Type::i32([n])).unwrap();
    let frozen = |b: &mut Builder, name: &str, shape: &[usize]| {
        b.param(name, Type::f32(shape.to_vec()), Role::Frozen, Init::Load).unwrap()
    };
    let trainable = |b: &mut Builder, name: &str, shape: &[usize]| {
        b.param(name, Type::f32(shape.to_vec()), Role::Trainable, Init::Load).unwrap()
    };
    b.set_label(Some("model.embed_tokens".into()));
    let table = frozen(&mut b, "model.embed_tokens.weight", &[v, d]);
    let mut h = b.embedding(table, ids).unwrap();
    for i in 0..m.layers {
        let l = format!("model.layers.{i}");
        b.set_label(Some(format!("{l}.post_attention_layernorm")));
        let nw = frozen(&mut b, &format!("{l}.post_attention_layernorm.weight"), &[d]);
        let x = b.rms_norm(h, nw, 1e-5).unwrap();
        b.set_label(Some(format!("{l}.mlp.up_proj")));
        let base = if m.nf4 {
            let fmt = Nf4Format { block: 64, double_quant: Some(256) };
            let w = b.param(
                &format!("{l}.mlp.up_proj.weight"),
                Type::new(DType::Nf4(fmt), [f, d]),
                Role::Frozen,
                Init::Load,
            );
            let w = b.nf4_dequantize(w.unwrap()).unwrap();
            b.matmul(x, w, false, true).unwrap()
        } else {
            let w = frozen(&mut b, &format!("{l}.mlp.up_proj.weight"), &[f, d]);
            b.matmul(x, w, false, true).unwrap()
        };
        let la = trainable(&mut b, &format!("{l}.mlp.up_proj.lora_A.weight"), &[r, d]);
        let lb = trainable(&mut b, &format!("{l}.mlp.up_proj.lora_B.weight"), &[f, r]);
        let a = b.matmul(x, la, false, true).unwrap();
        let bb = b.matmul(a, lb, false, true).unwrap();
        let s = b.scale(bb, 2.0).unwrap();
        let y = b.add(base, s).unwrap();
        b.set_label(Some(format!("{l}.mlp")));
        let act = b.silu(y).unwrap();
        b.set_label(Some(format!("{l}.mlp.down_proj")));
        let wd = frozen(&mut b, &format!("{l}.mlp.down_proj.weight"), &[d, f]);
        let o = b.matmul(act, wd, false, true).unwrap();
        b.set_label(Some(l));
        h = b.add(h, o).unwrap();
    }
    b.set_label(Some("model.norm".into()));
    let nw = frozen(&mut b, "model.norm.weight", &[d]);
    let hn = b.rms_norm(h, nw, 1e-5).unwrap();
    b.set_label(Some("lm_head".into()));
    let head = frozen(&mut b, "lm_head.weight", &[v, d]);
    let logits = b.matmul(hn, head, false, true).unwrap();
    b.set_label(Some("loss".into()));
    let loss = b.cross_entropy(logits, labels, -100).unwrap();
    b.output(OutputKind::Loss, loss);
    let mut g = b.finish();
    differentiate(&mut g, Wrt::Trainable).unwrap();
    AdamW::default().run(&mut g).unwrap();
    ir::verify::verify(&g).unwrap();
    g
}

const SMALL: Mini = Mini { layers: 2, tokens: 16, hidden: 32, ffn: 64, vocab: 48, rank: 4, nf4: false };

// ---- the simulation -----------------------------------------------------------------------------------------------

/// Ops that read and write element i only (this test's own list, independent of the planner's).
fn elementwise(op: &Op) -> bool {
    use ir::OpKind::*;
    matches!(
        op.kind(),
        Add | Sub
            | Mul
            | Div
            | Minimum
            | Maximum
            | Neg
            | Exp
            | Log
            | Sqrt
            | Rsqrt
            | Sigmoid
            | Silu
            | SiluBwd
            | Swiglu
            | Scale
            | Cast
            | Dropout
            | AdamWMoment
            | AdamWUpdate
    )
}

/// Runs the plan step by step and checks that it is sound. Returns how many reads crossed a kernel boundary.
fn check_plan(g: &Graph, p: &MemoryPlan) -> usize {
    let n = g.nodes.len();
    let runs = |v: usize| !g.nodes[v].op.is_leaf() && !is_view(&g.nodes[v].op);
    // The schedule, recomputed here: the graph's kernels, or one kernel per running node.
    let mut step: Vec<Option<usize>> = vec![None; n];
    let mut members: Vec<Vec<usize>> = vec![];
    if g.kernels.is_empty() {
        for v in (0..n).filter(|&v| runs(v)) {
            step[v] = Some(members.len());
            members.push(vec![v]);
        }
    } else {
        for (k, kernel) in g.kernels.iter().enumerate() {
            members.push(kernel.nodes.iter().map(|v| v.index()).filter(|&v| runs(v)).collect());
            for &v in &members[k] {
                step[v] = Some(k);
            }
        }
    }
    assert!(!p.per_node || g.kernels.is_empty(), "the plan ignored valid kernels: {:?}", p.notes);
    let steps = members.len();
    assert_eq!(p.steps, steps);
    let mut root: Vec<usize> = vec![];
    for (v, node) in g.nodes.iter().enumerate() {
        root.push(if is_view(&node.op) { root[node.inputs[0].index()] } else { v });
    }
    let range = |v: usize| {
        let b = p.buffer_of(ValueId(v as u32))?;
        Some((b.region, b.offset, b.offset + b.bytes))
    };
    // Every buffer is aligned, inside its region, large enough for each value it holds.
    for b in &p.buffers {
        assert_eq!(b.offset % ALIGN, 0);
        assert_eq!(b.bytes % ALIGN, 0);
        let size = if b.region == Region::Arena { p.arena_bytes } else { p.persistent_bytes };
        assert!(b.offset + b.bytes <= size, "buffer {b:?} outside its region of {size} bytes");
    }
    for (v, node) in g.nodes.iter().enumerate() {
        if let Some(b) = p.buffer_of(ValueId(v as u32)) {
            assert!(b.bytes >= node.ty.bytes(), "%{v} does not fit its buffer");
        }
        if is_view(&node.op) {
            assert_eq!(p.values[v].buffer, p.values[root[v]].buffer, "view %{v} is not in its root's buffer");
        }
    }
    // When each value is written: leaves before the first step, constants that are outputs after the last.
    let written = |v: usize| -> Option<i64> {
        range(v)?;
        match &g.nodes[v].op {
            Op::Param { .. } | Op::Input { .. } => Some(-1),
            Op::Const { .. } => Some(steps as i64),
            op if is_view(op) => None,
            _ => Some(step[v]? as i64),
        }
    };
    // The first later write that overlaps each value's bytes: (step, writer).
    let writes: Vec<(usize, i64, (Region, usize, usize))> =
        (0..n).filter_map(|v| Some((v, written(v)?, range(v)?))).collect();
    let mut clobber: Vec<Option<(i64, usize)>> = vec![None; n];
    for &(v, wv, (rv, lo, hi)) in &writes {
        for &(s, ws, (rs, lo2, hi2)) in &writes {
            if s != v && rs == rv && lo2 < hi && lo < hi2 && ws >= wv && clobber[v].is_none_or(|(c, _)| ws < c) {
                clobber[v] = Some((ws, s));
            }
        }
    }
    // A read at step t is sound if the value is still there, or if it is overwritten at t by an elementwise kernel
    // writing exactly over it (in place).
    let readable = |x: usize, t: usize| match clobber[x] {
        None => true,
        Some((c, _)) if c > t as i64 => true,
        Some((c, s)) if c == t as i64 => {
            let kernel_ok = members[t].iter().all(|&m| elementwise(&g.nodes[m].op))
                && members[t].iter().all(|&m| g.nodes[m].ty.numel() == g.nodes[s].ty.numel());
            kernel_ok && range(x) == range(s) && g.nodes[x].ty.numel() == g.nodes[s].ty.numel()
        }
        Some(_) => false,
    };
    let mut crossing = 0;
    for (t, ms) in members.iter().enumerate() {
        for &m in ms {
            for x in &g.nodes[m].inputs {
                let r = root[x.index()];
                if matches!(g.nodes[r].op, Op::Const { .. }) || step[r] == Some(t) {
                    continue; // folded constant, or produced inside this kernel
                }
                crossing += 1;
                assert!(range(r).is_some(), "kernel {t} reads %{r}, which has no buffer");
                assert!(readable(r, t), "kernel {t} reads %{r}, overwritten by {:?}", clobber[r]);
            }
        }
    }
    for o in &g.outputs {
        let r = root[o.value.index()];
        assert!(range(r).is_some(), "output {:?} has no buffer", o.kind);
        assert!(clobber[r].is_none(), "output {:?} (%{r}) overwritten by {:?}", o.kind, clobber[r]);
    }
    // Buffers whose lifetimes overlap never share bytes.
    let arena: Vec<_> = p.buffers.iter().filter(|b| b.region == Region::Arena).collect();
    for (i, a) in arena.iter().enumerate() {
        for b in &arena[i + 1..] {
            let live_together = a.start <= b.end && b.start <= a.end;
            let share = a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes;
            assert!(!(live_together && share), "{a:?} and {b:?} are live together and overlap");
        }
    }
    assert!(p.max_live_bytes <= p.arena_bytes);
    assert!(p.arena_bytes <= p.naive_bytes, "arena {} above naive {}", p.arena_bytes, p.naive_bytes);
    assert_eq!(p.peak_bytes, p.persistent_bytes + p.arena_bytes);
    crossing
}

fn leaf_bytes(g: &Graph, keep: impl Fn(&Op) -> bool) -> usize {
    g.nodes.iter().filter(|n| keep(&n.op)).map(|n| n.ty.bytes().div_ceil(ALIGN) * ALIGN).sum()
}

// ---- the mini model -----------------------------------------------------------------------------------------------

#[test]
fn mini_model_plan_is_sound_in_place_and_below_naive() {
    let g = mini(&SMALL);
    let p = plan(&g);
    eprintln!("{}", p.summary());
    assert!(check_plan(&g, &p) > 0);
    assert!(p.notes.is_empty(), "{:?}", p.notes);
    // AdamW in place: every update output sits in its parameter's (or state's) persistent buffer.
    let updates: Vec<_> = g.outputs.iter().filter(|o| matches!(o.kind, OutputKind::Update(_))).collect();
    assert_eq!(updates.len(), 3 * 2 * SMALL.layers, "A and B per layer, each with two moments");
    for o in &updates {
        let OutputKind::Update(name) = &o.kind else { unreachable!() };
        let param = g.param(name).unwrap();
        assert_eq!(
            p.values[o.value.index()].placement,
            Placement::InPlace { of: param, buffer: p.values[param.index()].buffer.unwrap() }
        );
        assert_eq!(p.buffer_of(o.value).unwrap().region, Region::Persistent);
    }
    assert_eq!(p.in_place_updates, updates.len());
    assert!(p.in_place > updates.len(), "some elementwise results should reuse a dying input");
    // Persistent memory: each parameter, state and input once.
    assert_eq!(
        p.param_bytes,
        leaf_bytes(&g, |op| matches!(op, Op::Param { role: Role::Frozen | Role::Trainable, .. }))
    );
    assert_eq!(p.state_bytes, leaf_bytes(&g, |op| matches!(op, Op::Param { role: Role::State, .. })));
    assert_eq!(p.input_bytes, leaf_bytes(&g, |op| matches!(op, Op::Input { .. })));
    assert_eq!(p.persistent_bytes, p.param_bytes + p.state_bytes + p.input_bytes);
    // Reuse pays: the arena is well below one buffer per value.
    assert!(p.arena_bytes < p.naive_bytes, "arena {} naive {}", p.arena_bytes, p.naive_bytes);
    assert!(p.peak_bytes < p.persistent_bytes + p.naive_bytes);
    assert!(p.summary().contains("memory: peak"));
}

#[test]
fn nf4_weights_are_planned_at_their_packed_size() {
    let q = mini(&Mini { nf4: true, ..SMALL });
    let f = mini(&SMALL);
    let (pq, pf) = (plan(&q), plan(&f));
    check_plan(&q, &pq);
    let name = "model.layers.0.mlp.up_proj.weight";
    let (wq, wf) = (q.param(name).unwrap(), f.param(name).unwrap());
    let (bq, bf) = (pq.buffer_of(wq).unwrap().bytes, pf.buffer_of(wf).unwrap().bytes);
    // 64·32 elements: 1024 code bytes + 32 absmax bytes + 4 + 4 second-level bytes, aligned; f32 is 8192.
    assert_eq!(q.ty(wq).bytes(), 64 * 32 / 2 + 32 + 4 + 4);
    assert_eq!(bq, q.ty(wq).bytes().div_ceil(ALIGN) * ALIGN);
    assert_eq!(bf, 64 * 32 * 4);
    assert_eq!(pf.param_bytes - pq.param_bytes, 2 * (bf - bq));
}

#[test]
fn a_reader_after_the_update_forces_a_copy() {
    // p1 = p − x is an update output, but p is read again afterwards: p1 cannot overwrite p.
    let mut b = Builder::new("late_reader");
    let p = b.param("p", Type::f32([8, 8]), Role::Trainable, Init::Load).unwrap();
    let x = b.input("x", Type::f32([8, 8])).unwrap();
    let e = b.op(Op::Exp {}, &[x]).unwrap();
    let p1 = b.sub(p, e).unwrap();
    let late = b.mul(p, e).unwrap();
    b.output(OutputKind::Update("p".into()), p1);
    b.output(OutputKind::Metric("late".into()), late);
    let g = b.finish();
    let plan = plan(&g);
    check_plan(&g, &plan);
    assert_eq!(plan.in_place_updates, 0);
    assert_eq!(plan.buffer_of(p1).unwrap().region, Region::Arena);
    assert!(plan.notes.iter().any(|n| n.contains("`p`")), "{:?}", plan.notes);
}

#[test]
fn values_inside_one_kernel_need_no_buffer() {
    // exp → silu → scale fused into one kernel: only the kernel's result is stored.
    let mut b = Builder::new("fused");
    let x = b.input("x", Type::f32([64, 64])).unwrap();
    let e = b.op(Op::Exp {}, &[x]).unwrap();
    let s = b.silu(e).unwrap();
    let y = b.scale(s, 3.0).unwrap();
    b.output(OutputKind::Metric("y".into()), y);
    let mut g = b.finish();
    let unfused = plan(&g);
    g.kernels = vec![Kernel { name: "exp_silu_scale".into(), nodes: vec![e, s, y] }];
    let fused = plan(&g);
    check_plan(&g, &fused);
    assert_eq!(fused.values[e.index()].placement, Placement::None);
    assert_eq!(fused.values[s.index()].placement, Placement::None);
    assert!(matches!(fused.values[y.index()].placement, Placement::Owns(_)));
    assert_eq!(fused.naive_bytes, 64 * 64 * 4);
    // Unfused, each step writes over its dying input: one buffer serves the whole chain.
    check_plan(&g_without_kernels(&g), &unfused);
    assert_eq!(unfused.arena_bytes, 64 * 64 * 4);
    assert_eq!(unfused.in_place, 2);
}

fn g_without_kernels(g: &Graph) -> Graph {
    Graph { kernels: vec![], ..g.clone() }
}

/// Groups the running and view nodes into contiguous kernels, cutting where `cuts` says.
fn group(g: &mut Graph, cuts: &[bool]) {
    let mut kernels: Vec<Kernel> = vec![];
    let mut current: Vec<ValueId> = vec![];
    for (i, node) in g.nodes.iter().enumerate() {
        if node.op.is_leaf() {
            continue;
        }
        current.push(ValueId(i as u32));
        if cuts[i % cuts.len()] {
            kernels.push(Kernel { name: format!("k{}", kernels.len()), nodes: std::mem::take(&mut current) });
        }
    }
    if !current.is_empty() {
        kernels.push(Kernel { name: format!("k{}", kernels.len()), nodes: current });
    }
    g.kernels = kernels;
}

// ---- random graphs ------------------------------------------------------------------------------------------------

/// A random graph over [4,8] / [8,4] / [32] / [] values from a list of op choices; outputs from `outs`.
fn random_graph(ops: &[(u8, u8, u8)], outs: &[u8]) -> Graph {
    let mut b = Builder::new("random");
    let p0 = b.param("p0", Type::f32([4, 8]), Role::Trainable, Init::Load).unwrap();
    let p1 = b.param("p1", Type::f32([4, 8]), Role::Trainable, Init::Load).unwrap();
    let x = b.input("x", Type::f32([4, 8])).unwrap();
    let step = b.input("step", Type::i32(Vec::<usize>::new())).unwrap();
    let mut pool = vec![p0, p1, x];
    let mut updated = [false, false];
    for &(kind, i, j) in ops {
        let a = pool[i as usize % pool.len()];
        let c = pool[j as usize % pool.len()];
        let same = b.ty(a).shape == b.ty(c).shape;
        let shape = b.ty(a).shape.clone();
        let v = match kind % 13 {
            0 if same => b.add(a, c),
            1 if same => b.mul(a, c),
            0 | 1 => b.sub(a, a),
            2 => b.silu(a),
            3 => b.scale(a, 0.5),
            4 => {
                let numel = b.ty(a).numel();
                b.reshape(a, &[numel])
            }
            5 if shape.len() == 2 => b.matmul(a, a, false, true),
            6 => {
                let axes: Vec<usize> = (0..shape.len()).collect();
                b.sum(a, &axes, false)
            }
            7 => b.stop_gradient(a),
            8 => b.dropout(a, step, 0.25, 7),
            9 => {
                let k = b.constant(1.5, b.ty(a).clone()).unwrap();
                b.add(a, k)
            }
            10 if shape.len() == 2 => b.transpose(a, &[1, 0]),
            11 | 12 if shape == [4, 8] && !updated[(kind % 13 - 11) as usize] => {
                let which = (kind % 13 - 11) as usize;
                updated[which] = true;
                let p = [p0, p1][which];
                let u = b.sub(p, a).unwrap();
                b.output(OutputKind::Update(format!("p{which}")), u);
                Ok(u)
            }
            _ => b.op(Op::Neg {}, &[a]),
        };
        pool.push(v.unwrap());
    }
    for (k, &o) in outs.iter().enumerate() {
        let v = pool[o as usize % pool.len()];
        b.output(OutputKind::Metric(format!("m{k}")), v);
    }
    let g = b.finish();
    ir::verify::verify(&g).unwrap();
    g
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_graphs_plan_soundly(
        ops in prop::collection::vec((any::<u8>(), any::<u8>(), any::<u8>()), 1..40),
        outs in prop::collection::vec(any::<u8>(), 0..4),
        cuts in prop::collection::vec(any::<bool>(), 1..8),
        fused in any::<bool>(),
    ) {
        let mut g = random_graph(&ops, &outs);
        if fused {
            group(&mut g, &cuts);
        }
        let p = plan(&g);
        check_plan(&g, &p);
    }

    #[test]
    fn mini_model_with_random_kernels_plans_soundly(cuts in prop::collection::vec(any::<bool>(), 1..12)) {
        let mut g = mini(&Mini { layers: 2, tokens: 8, hidden: 8, ffn: 16, vocab: 8, rank: 2, nf4: false });
        group(&mut g, &cuts);
        let p = plan(&g);
        prop_assert!(!p.per_node);
        check_plan(&g, &p);
    }
}

#[test]
fn plan_after_fusion_and_scheduling_is_sound() {
    // The real kernel passes: kernels become the steps, values inside a kernel need no buffer.
    let mut g = mini(&SMALL);
    let unfused = plan(&g);
    let mut pm = passes::PassManager::new(vec![Box::new(passes::fuse::Fuse), Box::new(passes::schedule::Schedule)]);
    pm.run(&mut g).unwrap();
    let fused = plan(&g);
    eprintln!("after fuse + schedule: {}", fused.summary());
    assert!(!fused.per_node, "{:?}", fused.notes);
    assert!(check_plan(&g, &fused) > 0);
    assert!(fused.steps < unfused.steps);
    assert!(fused.naive_bytes < unfused.naive_bytes, "fusion keeps values out of memory");
    assert_eq!(fused.persistent_bytes, unfused.persistent_bytes);
}
