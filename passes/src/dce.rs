//! Dead-code elimination: drops every node that no output depends on (parameters and inputs stay: they are the
//! program's interface).

use crate::Pass;
use ir::Graph;

pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }
    fn run(&self, g: &mut Graph) -> Result<String, String> {
        let removed = g.remove_dead();
        Ok(format!("removed {removed} dead nodes"))
    }
}
