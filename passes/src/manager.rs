//! The `Pass` trait and the manager that runs a list of passes, verifying the graph after each one and keeping
//! the IR text after any pass that was asked for (`--dump-after`, `--dump-all`).

use ir::{text, verify, Graph};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("pass `{pass}` failed: {message}")]
    Failed { pass: &'static str, message: String },
    #[error("the IR does not verify after pass `{pass}`: {error}")]
    Verify { pass: &'static str, error: verify::VerifyError },
    #[error("the input IR does not verify: {0}")]
    Input(verify::VerifyError),
}

/// One transformation of a graph.
pub trait Pass {
    fn name(&self) -> &'static str;
    /// Rewrites the graph; returns a one-line summary of what changed (for reports).
    fn run(&self, g: &mut Graph) -> Result<String, String>;
    /// Named numbers from the last run, for machine-readable reports (`--report-json`).
    fn metrics(&self) -> Vec<(String, String)> {
        vec![]
    }
}

/// What one pass did.
#[derive(Clone, Debug)]
pub struct PassReport {
    pub pass: &'static str,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub seconds: f64,
    pub summary: String,
    pub metrics: Vec<(String, String)>,
}

/// Runs passes in order; verifies after each; keeps dumps on request.
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    dump_after: Vec<String>,
    dump_all: bool,
    pub dumps: Vec<(String, String)>,
    pub reports: Vec<PassReport>,
}

impl PassManager {
    pub fn new(passes: Vec<Box<dyn Pass>>) -> PassManager {
        PassManager { passes, dump_after: vec![], dump_all: false, dumps: vec![], reports: vec![] }
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Keeps the IR text after the named pass (`input` names the graph before any pass).
    pub fn dump_after(&mut self, pass: &str) {
        self.dump_after.push(pass.to_string());
    }

    /// Keeps the IR text after every pass.
    pub fn dump_all(&mut self) {
        self.dump_all = true;
    }

    fn maybe_dump(&mut self, name: &str, g: &Graph) {
        if self.dump_all || self.dump_after.iter().any(|d| d == name) {
            self.dumps.push((name.to_string(), text::print(g)));
        }
    }

    pub fn run(&mut self, g: &mut Graph) -> Result<(), PassError> {
        verify::verify(g).map_err(PassError::Input)?;
        self.maybe_dump("input", g);
        let passes = std::mem::take(&mut self.passes);
        for p in &passes {
            let before = g.nodes.len();
            let t = Instant::now();
            let summary = p.run(g).map_err(|message| PassError::Failed { pass: p.name(), message })?;
            let seconds = t.elapsed().as_secs_f64();
            verify::verify(g).map_err(|error| PassError::Verify { pass: p.name(), error })?;
            self.reports.push(PassReport {
                pass: p.name(),
                nodes_before: before,
                nodes_after: g.nodes.len(),
                seconds,
                summary,
                metrics: p.metrics(),
            });
            self.maybe_dump(p.name(), g);
        }
        self.passes = passes;
        Ok(())
    }
}
