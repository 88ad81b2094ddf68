//! Common-subexpression elimination: nodes with the same op, attributes and inputs compute the same value; later
//! copies are replaced by the first. (Parameters and inputs are unique by name and never merged.)

use crate::Pass;
use ir::{Graph, Op, ValueId};
use std::collections::HashMap;

pub struct Cse;

impl Pass for Cse {
    fn name(&self) -> &'static str {
        "cse"
    }
    fn run(&self, g: &mut Graph) -> Result<String, String> {
        let mut seen: HashMap<(String, Vec<ValueId>, String), ValueId> = HashMap::new();
        let mut replace: Vec<ValueId> = g.ids().collect();
        let mut merged = 0;
        for i in 0..g.nodes.len() {
            let n = &mut g.nodes[i];
            for v in &mut n.inputs {
                *v = replace[v.index()];
            }
            if matches!(n.op, Op::Param { .. } | Op::Input { .. }) {
                continue;
            }
            let attrs: Vec<String> = n.op.attrs().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
            let key = (format!("{} {}", n.op.mnemonic(), attrs.join(",")), n.inputs.clone(), n.ty.to_string());
            match seen.get(&key) {
                Some(&first) => {
                    replace[i] = first;
                    merged += 1;
                }
                None => {
                    seen.insert(key, ValueId(i as u32));
                }
            }
        }
        for o in &mut g.outputs {
            o.value = replace[o.value.index()];
        }
        let removed = g.remove_dead();
        Ok(format!("merged {merged} duplicate nodes ({removed} removed)"))
    }
}
