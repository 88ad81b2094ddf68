//! Equality saturation (egg): rewrites the training step with the rules in `rules/` and extracts the cheapest
//! equivalent program under a target's cost model.
//!
//! Repeated transformer blocks are optimized once: the graph is cut into regions (one per `model.layers.{i}`, plus
//! the rest), each region becomes a small standalone graph with its imports as inputs, its parameters renamed to
//! `model.layers.#.…` and its dropout seeds numbered; regions that print the same are the same problem, so the
//! first one is saturated and extracted and the others reuse that result with their own names and seeds.
//! Compile time therefore does not grow with the number of layers.

pub mod extract;
pub mod lang;
pub mod rules;

use crate::target::Target;
use crate::Pass;
use egg::Id;
use ir::{Builder, Graph, Node, Op, Output, OutputKind, Type, ValueId};
use lang::{add_graph, TEGraph, Types};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bounds on one saturation run.
#[derive(Clone, Debug)]
pub struct Limits {
    pub nodes: usize,
    pub iterations: usize,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { nodes: 50_000, iterations: 12, time: Duration::from_secs(2) }
    }
}

/// What the runs did (summed over regions; `stop_reason` is the first limit hit, else "saturated").
#[derive(Clone, Debug, Default)]
pub struct EqsatStats {
    pub regions: usize,
    pub distinct_regions: usize,
    pub nodes: usize,
    pub iterations: usize,
    pub stop_reason: String,
    pub seconds: f64,
    pub rule_hits: BTreeMap<&'static str, usize>,
    /// Modeled seconds of the regions before and after (each distinct region once).
    pub cost_before: f64,
    pub cost_after: f64,
}

pub struct Eqsat {
    pub target: Target,
    pub limits: Limits,
    pub stats: Mutex<EqsatStats>,
}

impl Eqsat {
    pub fn new(target: Target) -> Eqsat {
        Eqsat { target, limits: Limits::default(), stats: Mutex::new(EqsatStats::default()) }
    }
}

impl Pass for Eqsat {
    fn name(&self) -> &'static str {
        "eqsat"
    }
    fn run(&self, g: &mut Graph) -> Result<String, String> {
        let t0 = Instant::now();
        let mut stats = EqsatStats::default();
        *g = optimize(g, &self.target, &self.limits, &mut stats)?;
        stats.seconds = t0.elapsed().as_secs_f64();
        let hits: Vec<String> = stats.rule_hits.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
        let summary = format!(
            "{} regions, {} saturated ({} e-nodes, {} iterations, {}); {}",
            stats.regions,
            stats.distinct_regions,
            stats.nodes,
            stats.iterations,
            stats.stop_reason,
            hits.join(", ")
        );
        *self.stats.lock().expect("stats lock") = stats;
        Ok(summary)
    }
    fn metrics(&self) -> Vec<(String, String)> {
        let s = self.stats.lock().expect("stats lock");
        vec![
            ("nodes".into(), s.nodes.to_string()),
            ("iterations".into(), s.iterations.to_string()),
            ("stop_reason".into(), s.stop_reason.clone()),
            ("seconds".into(), format!("{:.6}", s.seconds)),
            ("regions".into(), s.regions.to_string()),
            ("distinct_regions".into(), s.distinct_regions.to_string()),
        ]
    }
}

/// Saturates one standalone graph and extracts the cheapest equivalent (outputs kept, in order).
pub fn saturate_and_extract(g: &Graph, target: &Target, limits: &Limits, stats: &mut EqsatStats) -> Graph {
    saturate_and_extract_keyed(g, target, limits, stats).0
}

/// [`saturate_and_extract`], also returning for every node of the result its position in `g`'s order (fractional
/// for new nodes: just before their first user).
pub fn saturate_and_extract_keyed(
    g: &Graph,
    target: &Target,
    limits: &Limits,
    stats: &mut EqsatStats,
) -> (Graph, Vec<f64>) {
    let t0 = Instant::now();
    let mut eg = TEGraph::new(Types);
    let ids = add_graph(&mut eg, g);
    eg.rebuild();
    let rules = rules::all();
    let mut stop = "saturated".to_string();
    let mut iters = 0;
    loop {
        if iters >= limits.iterations {
            stop = format!("iteration limit ({})", limits.iterations);
            break;
        }
        iters += 1;
        let mut changed = 0;
        for r in &rules {
            let n = (r.apply)(&mut eg);
            eg.rebuild();
            *stats.rule_hits.entry(r.name).or_default() += n;
            changed += n;
        }
        if changed == 0 {
            break;
        }
        if eg.total_number_of_nodes() > limits.nodes {
            stop = format!("node limit ({})", limits.nodes);
            break;
        }
        if t0.elapsed() > limits.time {
            stop = format!("time limit ({:?})", limits.time);
            break;
        }
    }
    stats.nodes += eg.total_number_of_nodes();
    stats.iterations = stats.iterations.max(iters);
    if stats.stop_reason.is_empty() || stats.stop_reason == "saturated" {
        stats.stop_reason = stop;
    }
    let roots: Vec<Id> = g.outputs.iter().map(|o| ids[o.value.index()]).collect();
    let mut original = HashMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let children = n.inputs.iter().map(|v| eg.find(ids[v.index()])).collect();
        let leaf = n.op.is_leaf().then(|| n.ty.clone());
        original.entry(eg.find(ids[i])).or_insert_with(|| lang::TNode::new(n.op.clone(), leaf, children));
    }
    let choice = extract::choose(&eg, target, &roots, &original);
    stats.cost_before += choice.original_cost;
    stats.cost_after += choice.cost;
    // Keys: original positions; labels: from the original nodes of each class.
    let mut key: HashMap<Id, f64> = HashMap::new();
    let mut label: HashMap<Id, Option<String>> = HashMap::new();
    for (i, &id) in ids.iter().enumerate() {
        let c = eg.find(id);
        key.entry(c).or_insert(i as f64);
        label.entry(c).or_insert_with(|| g.nodes[i].label.clone());
    }
    // Params and inputs stay, in their original order, whether used or not: they are the interface.
    let mut out = Graph::new(g.name.clone());
    let mut vid: HashMap<Id, ValueId> = HashMap::new();
    let mut keys: Vec<f64> = vec![];
    for (i, n) in g.nodes.iter().enumerate() {
        if matches!(n.op, Op::Param { .. } | Op::Input { .. }) {
            vid.insert(eg.find(ids[i]), ValueId(out.nodes.len() as u32));
            out.nodes.push(n.clone());
            keys.push(i as f64);
        }
    }
    let mut inherited: HashMap<Id, Option<String>> = HashMap::new();
    for e in extract::emit_order(&eg, &choice, &roots, &key) {
        if vid.contains_key(&e.class) {
            continue;
        }
        let l = label.get(&e.class).cloned().or_else(|| inherited.get(&e.class).cloned()).flatten();
        for c in &e.node.children {
            inherited.entry(eg.find(*c)).or_insert_with(|| l.clone());
        }
        let node = extract::to_node(&eg, &e, &vid, l);
        vid.insert(e.class, ValueId(out.nodes.len() as u32));
        out.nodes.push(node);
        keys.push(e.key);
    }
    // Children are emitted before parents, but labels were inherited top-down: fill in labels of new nodes from
    // their first user.
    let n = out.nodes.len();
    for i in (0..n).rev() {
        if let Some(l) = out.nodes[i].label.clone() {
            for k in out.nodes[i].inputs.clone() {
                let child = &mut out.nodes[k.index()];
                if child.label.is_none() && !child.op.is_leaf() {
                    child.label = Some(l.clone());
                }
            }
        }
    }
    out.outputs =
        g.outputs.iter().map(|o| Output { kind: o.kind.clone(), value: vid[&eg.find(ids[o.value.index()])] }).collect();
    (out, keys)
}

/// The layer index in a label or parameter name (`model.layers.12.mlp` → 12).
fn layer_of(s: &str) -> Option<usize> {
    let rest = &s[s.find("model.layers.")? + "model.layers.".len()..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// `model.layers.{layer}` → `model.layers.#` wherever the index is complete (not a prefix of a longer number).
fn normalize(s: &str, layer: usize) -> String {
    let pat = format!("model.layers.{layer}");
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(&pat) {
        let after = &rest[i + pat.len()..];
        out.push_str(&rest[..i]);
        if after.starts_with(|c: char| c.is_ascii_digit()) {
            out.push_str(&pat);
        } else {
            out.push_str("model.layers.#");
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

fn denormalize(s: &str, layer: usize) -> String {
    s.replace("model.layers.#", &format!("model.layers.{layer}"))
}

/// One region cut out as a standalone graph.
struct Region {
    layer: Option<usize>,
    /// Original values the region reads from outside (`import{j}` inputs), in order of first use.
    imports: Vec<ValueId>,
    /// Original values the region defines that are used outside it (`export{j}` outputs).
    exports: Vec<ValueId>,
    /// Dropout seeds in order of appearance (the standalone graph numbers them 0, 1, ...).
    seeds: Vec<u64>,
    graph: Graph,
    /// For every node of `graph`, the original position it stands for (leaves: the next member's).
    position: Vec<f64>,
}

fn cut_regions(g: &Graph) -> Vec<Region> {
    let region_of = |v: ValueId| -> Option<usize> {
        let n = g.node(v);
        match &n.op {
            Op::Param { .. } | Op::Input { .. } => None, // interface leaves: imported by every region
            _ => n.label.as_deref().and_then(layer_of),
        }
    };
    // Region key: Some(layer) or None for the rest; interface leaves belong to no region.
    let mut members: BTreeMap<Option<usize>, Vec<ValueId>> = BTreeMap::new();
    for v in g.ids() {
        if !matches!(g.node(v).op, Op::Param { .. } | Op::Input { .. }) {
            members.entry(region_of(v)).or_default().push(v);
        }
    }
    let mut owner: HashMap<ValueId, Option<usize>> = HashMap::new();
    for (k, vs) in &members {
        for v in vs {
            owner.insert(*v, *k);
        }
    }
    let mut used_outside: HashMap<ValueId, bool> = HashMap::new();
    for v in g.ids() {
        for &i in &g.node(v).inputs {
            if owner.get(&i).is_some_and(|o| Some(o) != owner.get(&v)) {
                used_outside.insert(i, true);
            }
        }
    }
    for o in &g.outputs {
        used_outside.insert(o.value, true);
    }
    let mut regions = vec![];
    for (layer, vs) in members {
        let mut b = Builder::new(match layer {
            Some(_) => "model.layers.#".to_string(),
            None => "rest".to_string(),
        });
        let mut map: HashMap<ValueId, ValueId> = HashMap::new();
        let (mut imports, mut exports, mut seeds) = (vec![], vec![], vec![]);
        let norm = |s: &str| layer.map_or(s.to_string(), |l| normalize(s, l));
        for &v in &vs {
            let n = g.node(v);
            let mut inputs = vec![];
            for &i in &n.inputs {
                if let Some(&m) = map.get(&i) {
                    inputs.push(m);
                    continue;
                }
                let src = g.node(i);
                let m = match &src.op {
                    // A parameter of this layer stays a parameter (rules look at names and roles).
                    Op::Param { name, role, init } if layer.is_some() && layer_of(name) == layer => {
                        let op = Op::Param { name: norm(name), role: *role, init: init.clone() };
                        b.graph.push(op, vec![], Some(src.ty.clone()), None).expect("param")
                    }
                    _ => {
                        imports.push(i);
                        b.input(&format!("import{}", imports.len() - 1), src.ty.clone()).expect("import")
                    }
                };
                map.insert(i, m);
                inputs.push(m);
            }
            let op = match &n.op {
                Op::Dropout { p, seed } => {
                    seeds.push(*seed);
                    Op::Dropout { p: *p, seed: seeds.len() as u64 - 1 }
                }
                op => op.clone(),
            };
            let label = n.label.as_deref().map(norm);
            let m = b.graph.push(op, inputs, n.op.is_leaf().then(|| n.ty.clone()), label).expect("region node");
            map.insert(v, m);
            if used_outside.contains_key(&v) {
                exports.push(v);
                b.output(OutputKind::Metric(format!("export{}", exports.len() - 1)), m);
            }
        }
        let graph = b.finish();
        // Members map to their own original positions; the leaves the region added, to the next member's.
        let mut position = vec![f64::NAN; graph.nodes.len()];
        for (&orig, &local) in &map {
            if !matches!(g.node(orig).op, Op::Param { .. } | Op::Input { .. }) {
                position[local.index()] = orig.index() as f64;
            }
        }
        let mut next = vs.last().map_or(0.0, |v| v.index() as f64);
        for p in position.iter_mut().rev() {
            if p.is_nan() {
                *p = next;
            } else {
                next = *p;
            }
        }
        regions.push(Region { layer, imports, exports, seeds, graph, position });
    }
    regions
}

/// Optimizes a whole training step, region by region, with reuse of identical regions.
pub fn optimize(g: &Graph, target: &Target, limits: &Limits, stats: &mut EqsatStats) -> Result<Graph, String> {
    let regions = cut_regions(g);
    stats.regions = regions.len();
    let param_ids: HashMap<&str, ValueId> = g.params().into_iter().map(|(v, n, _)| (n, v)).collect();
    let mut cache: HashMap<String, (Graph, Vec<f64>)> = HashMap::new();
    // Rewritten regions, instantiated: nodes whose inputs are either original leaves/exports or local indices.
    enum Src {
        Orig(ValueId),
        Local(usize),
    }
    struct Pending {
        node: Node,
        inputs: Vec<Src>,
        key: f64,
    }
    let mut pending: Vec<Pending> = vec![];
    let mut export_map: HashMap<ValueId, usize> = HashMap::new();
    for r in &regions {
        let text = ir::text::print(&r.graph);
        let (opt, keys) = match cache.get(&text) {
            Some(o) => o.clone(),
            None => {
                let o = saturate_and_extract_keyed(&r.graph, target, limits, stats);
                ir::verify::verify(&o.0).map_err(|e| format!("region {:?}: {e}", r.layer))?;
                stats.distinct_regions += 1;
                cache.insert(text, o.clone());
                o
            }
        };
        // Map the rewritten region back: imports → original values, params → original params, seeds → real seeds.
        let mut local: HashMap<ValueId, usize> = HashMap::new();
        let mut src_of: HashMap<ValueId, Src> = HashMap::new();
        // Keys: a node's region-local position maps to the original position it stands for (the fraction keeps
        // new nodes just before their first user).
        let global_key = |k: f64| -> f64 {
            let i = (k.floor().max(0.0) as usize).min(r.position.len().saturating_sub(1));
            r.position.get(i).copied().unwrap_or(f64::MAX) + (k - k.floor())
        };
        for (i, n) in opt.nodes.iter().enumerate() {
            let v = ValueId(i as u32);
            match &n.op {
                Op::Input { name } => {
                    let j: usize =
                        name.trim_start_matches("import").parse().map_err(|_| format!("bad import {name}"))?;
                    src_of.insert(v, Src::Orig(r.imports[j]));
                }
                Op::Param { name, .. } => {
                    let real = r.layer.map_or(name.clone(), |l| denormalize(name, l));
                    let p =
                        *param_ids.get(real.as_str()).ok_or_else(|| format!("region parameter {real} not found"))?;
                    src_of.insert(v, Src::Orig(p));
                }
                _ => {
                    let mut node = n.clone();
                    if let Op::Dropout { p, seed } = node.op {
                        node.op = Op::Dropout { p, seed: r.seeds[seed as usize] };
                    }
                    if let (Some(l), Some(lab)) = (r.layer, &node.label) {
                        node.label = Some(denormalize(lab, l));
                    }
                    let inputs = n
                        .inputs
                        .iter()
                        .map(|i| match src_of.get(i) {
                            Some(Src::Orig(o)) => Src::Orig(*o),
                            Some(Src::Local(l)) => Src::Local(*l),
                            None => unreachable!("input defined before use"),
                        })
                        .collect();
                    pending.push(Pending { node, inputs, key: global_key(keys[i]) });
                    local.insert(v, pending.len() - 1);
                    src_of.insert(v, Src::Local(pending.len() - 1));
                }
            }
        }
        for o in &opt.outputs {
            let OutputKind::Metric(name) = &o.kind else { continue };
            let j: usize = name.trim_start_matches("export").parse().map_err(|_| format!("bad export {name}"))?;
            let l = match src_of.get(&o.value) {
                Some(Src::Local(l)) => *l,
                _ => return Err(format!("export {j} of region {:?} is not computed by the region", r.layer)),
            };
            export_map.insert(r.exports[j], l);
        }
    }
    // Assemble: interface leaves first, then every pending node in key order as soon as its inputs exist.
    let mut out = Graph::new(g.name.clone());
    let mut orig_to_new: HashMap<ValueId, ValueId> = HashMap::new();
    for v in g.ids() {
        if matches!(g.node(v).op, Op::Param { .. } | Op::Input { .. }) {
            orig_to_new.insert(v, ValueId(out.nodes.len() as u32));
            out.nodes.push(g.node(v).clone());
        }
    }
    let resolve = |s: &Src| -> Result<Result<ValueId, usize>, String> {
        match s {
            Src::Orig(o) => match orig_to_new.get(o) {
                Some(n) => Ok(Ok(*n)),
                None => export_map.get(o).map(|l| Err(*l)).ok_or_else(|| format!("{o} is neither a leaf nor exported")),
            },
            Src::Local(l) => Ok(Err(*l)),
        }
    };
    let np = pending.len();
    let mut deps: Vec<Vec<usize>> = vec![vec![]; np];
    let mut users: Vec<Vec<usize>> = vec![vec![]; np];
    for (i, p) in pending.iter().enumerate() {
        for s in &p.inputs {
            if let Err(l) = resolve(s)? {
                deps[i].push(l);
                users[l].push(i);
            }
        }
    }
    let mut indeg: Vec<usize> = deps.iter().map(|d| d.len()).collect();
    let mut ready: BTreeMap<(u64, usize), ()> = BTreeMap::new();
    let key_of = |i: usize| pending[i].key.to_bits();
    for (i, _) in indeg.iter().enumerate().filter(|(_, &d)| d == 0) {
        ready.insert((key_of(i), i), ());
    }
    let mut new_id: Vec<Option<ValueId>> = vec![None; np];
    while let Some(((_, i), ())) = ready.pop_first() {
        let p = &pending[i];
        let inputs = p
            .inputs
            .iter()
            .map(|s| match resolve(s) {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(l)) => new_id[l].ok_or_else(|| "dependency not yet emitted".to_string()),
                Err(e) => Err(e),
            })
            .collect::<Result<Vec<_>, _>>()?;
        new_id[i] = Some(ValueId(out.nodes.len() as u32));
        out.nodes.push(Node { inputs, ..p.node.clone() });
        for &u in &users[i] {
            indeg[u] -= 1;
            if indeg[u] == 0 {
                ready.insert((key_of(u), u), ());
            }
        }
    }
    if new_id.iter().any(Option::is_none) {
        return Err("regions depend on each other in a cycle".into());
    }
    for o in &g.outputs {
        let value = match orig_to_new.get(&o.value) {
            Some(v) => *v,
            None => new_id[*export_map.get(&o.value).ok_or("output not exported")?].expect("emitted"),
        };
        out.outputs.push(Output { kind: o.kind.clone(), value });
    }
    let _ = Type::f32(vec![]);
    Ok(out)
}

/// The standalone text of every region (for debugging reuse).
pub fn debug_region_texts(g: &Graph) -> Vec<String> {
    cut_regions(g).iter().map(|r| ir::text::print(&r.graph)).collect()
}
