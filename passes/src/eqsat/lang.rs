//! The e-graph language, derived from the op table: an e-node is an `ir::Op` (with its attributes) plus children.
//! Two e-nodes match when their op text (mnemonic + attributes, and the declared type for leaves) is equal.
//! The analysis gives every e-class its IR type, inferred by the op table's own type rules.

use egg::{Analysis, DidMerge, EGraph, Id, Language};
use ir::{Graph, Op, Type, ValueId};
use std::cmp::Ordering;
use std::hash::{Hash, Hasher};

/// One e-node.
#[derive(Clone, Debug)]
pub struct TNode {
    pub op: Op,
    /// Declared type of a leaf (params, inputs, constants); `None` for computed ops.
    pub leaf_ty: Option<Type>,
    /// The op's identity: mnemonic, attributes, and the leaf type.
    key: String,
    pub children: Vec<Id>,
}

impl TNode {
    pub fn new(op: Op, leaf_ty: Option<Type>, children: Vec<Id>) -> TNode {
        let mut key = op.mnemonic().to_string();
        for (k, v) in op.attrs() {
            key.push_str(&format!(" {k}={v}"));
        }
        if let Some(t) = &leaf_ty {
            key.push_str(&format!(" : {t}"));
        }
        TNode { op, leaf_ty, key, children }
    }
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl PartialEq for TNode {
    fn eq(&self, o: &Self) -> bool {
        self.key == o.key && self.children == o.children
    }
}
impl Eq for TNode {}
impl Hash for TNode {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.key.hash(h);
        self.children.hash(h);
    }
}
impl PartialOrd for TNode {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for TNode {
    fn cmp(&self, o: &Self) -> Ordering {
        (&self.key, &self.children).cmp(&(&o.key, &o.children))
    }
}

impl Language for TNode {
    type Discriminant = String;
    fn discriminant(&self) -> String {
        self.key.clone()
    }
    fn matches(&self, other: &Self) -> bool {
        self.key == other.key && self.children.len() == other.children.len()
    }
    fn children(&self) -> &[Id] {
        &self.children
    }
    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

impl std::fmt::Display for TNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key)
    }
}

/// Every e-class's IR type (all e-nodes of a class have the same type; a rewrite that breaks this is a bug).
#[derive(Default)]
pub struct Types;

impl Analysis<TNode> for Types {
    type Data = Type;
    fn make(egraph: &mut EGraph<TNode, Self>, enode: &TNode, _id: Id) -> Type {
        let tys: Vec<&Type> = enode.children.iter().map(|&c| &egraph[c].data).collect();
        let decl = enode.leaf_ty.clone().unwrap_or_else(|| Type::f32(Vec::<usize>::new()));
        enode.op.infer(&tys, &decl).unwrap_or_else(|e| panic!("e-node `{}` does not type-check: {e}", enode.key))
    }
    fn merge(&mut self, a: &mut Type, b: Type) -> DidMerge {
        assert_eq!(*a, b, "a rewrite merged e-classes of different types");
        DidMerge(false, false)
    }
}

pub type TEGraph = EGraph<TNode, Types>;

/// Adds a graph's nodes to an e-graph; returns the e-class of every value.
pub fn add_graph(eg: &mut TEGraph, g: &Graph) -> Vec<Id> {
    let mut ids: Vec<Id> = Vec::with_capacity(g.nodes.len());
    for n in &g.nodes {
        let children = n.inputs.iter().map(|v: &ValueId| ids[v.index()]).collect();
        let leaf = n.op.is_leaf().then(|| n.ty.clone());
        ids.push(eg.add(TNode::new(n.op.clone(), leaf, children)));
    }
    ids
}

/// Adds one computed node.
pub fn add(eg: &mut TEGraph, op: Op, children: Vec<Id>) -> Id {
    eg.add(TNode::new(op, None, children))
}
