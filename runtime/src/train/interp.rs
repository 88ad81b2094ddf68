//! The reference interpreter as a training backend (`tunec run --backend interp`): the plan's graph run by
//! `ir::interp` (f32), parameters and inputs in an environment, updates written back after each step. Slow; for
//! checking the cpu backend on small models.

use ir::interp::{run, Env, Precision, Tensor, Value};
use ir::plan::Plan;
use ir::{Graph, OutputKind, Role};

use super::{Batch, StepBackend, StepInputs, Tensors, ACCUM_APPLY};

/// The interpreter with the parameters and inputs of a plan.
pub struct InterpBackend {
    graph: Graph,
    params: Vec<ir::plan::ParamBinding>,
    pub env: Env,
}

impl InterpBackend {
    pub fn new(plan: &Plan) -> InterpBackend {
        InterpBackend { graph: plan.graph.clone(), params: plan.params.clone(), env: Env::default() }
    }

    /// Sets a parameter (NF4 parameters are quantized by the interpreter as it reads them).
    pub fn set_param_f32(&mut self, name: &str, data: &[f32]) -> Result<(), String> {
        let p = self.params.iter().find(|p| p.name == name).ok_or_else(|| format!("no parameter `{name}`"))?;
        if p.shape.iter().product::<usize>() != data.len() {
            return Err(format!("parameter `{name}` has shape {:?}, not {} values", p.shape, data.len()));
        }
        self.env.params.insert(name.to_string(), Value::F(Tensor::from_f32(p.shape.clone(), data)));
        Ok(())
    }

    /// Materializes every parameter whose initializer is not `load` (as the cpu backend does).
    pub fn init_params(&mut self, seed: u64) -> Result<(), String> {
        for i in crate::cpu::init_order(self.params.iter()) {
            let p = &self.params[i];
            let src = |n: &str| self.env.params.get(n).cloned();
            let t = ir::init::materialize(&p.init, &p.name, &p.shape, seed, &src).map_err(|e| e.to_string())?;
            self.env.params.insert(p.name.clone(), Value::F(t));
        }
        Ok(())
    }
}

impl StepBackend for InterpBackend {
    fn set_inputs(&mut self, b: &Batch, lr: f32, step: u64) -> Result<(), String> {
        self.set_step_inputs(b, StepInputs::step(lr, step))
    }

    fn set_step_inputs(&mut self, b: &Batch, s: StepInputs) -> Result<(), String> {
        let shape_of = |name: &str| -> Option<Vec<usize>> {
            self.graph.nodes.iter().find_map(|n| match &n.op {
                ir::Op::Input { name: m } if m == name => Some(n.ty.shape.clone()),
                _ => None,
            })
        };
        for (name, data) in [
            ("input_ids", &b.input_ids),
            ("position_ids", &b.position_ids),
            ("segment_ids", &b.segment_ids),
            ("labels", &b.labels),
        ] {
            if let Some(shape) = shape_of(name) {
                self.env.inputs.insert(name.to_string(), Value::ints(shape, data.clone()));
            }
        }
        self.env.inputs.insert("lr".into(), Value::F(Tensor::scalar(s.lr as f64)));
        self.env.inputs.insert("opt_step".into(), Value::ints(vec![], vec![s.opt_step as i32]));
        self.env.inputs.insert("step".into(), Value::ints(vec![], vec![s.micro_step as i32]));
        let apply = if s.apply { 1.0 } else { 0.0 };
        self.env.inputs.insert(ACCUM_APPLY.into(), Value::F(Tensor::scalar(apply)));
        Ok(())
    }

    fn run_step(&mut self) -> Result<(f32, Option<f32>), String> {
        let vals = run(&self.graph, &self.env, Precision::F32).map_err(|e| format!("interpreter: {e}"))?;
        let (mut loss, mut grad_norm) = (f32::NAN, None);
        for o in &self.graph.outputs {
            let v = &vals[o.value.index()];
            match &o.kind {
                OutputKind::Loss => loss = v.as_f().map_or(f32::NAN, |t| t.data[0] as f32),
                OutputKind::Metric(m) if m == "grad_norm" => grad_norm = v.as_f().map(|t| t.data[0] as f32),
                OutputKind::Update(name) => {
                    self.env.params.insert(name.clone(), v.clone());
                }
                _ => {}
            }
        }
        Ok((loss, grad_norm))
    }

    fn state(&self) -> Result<Tensors, String> {
        let mut out = vec![];
        for p in self.params.iter().filter(|p| matches!(p.role, Role::Trainable | Role::State)) {
            let v = self
                .env
                .params
                .get(&p.name)
                .and_then(|v| v.as_f())
                .ok_or_else(|| format!("`{}` is not set", p.name))?;
            out.push((p.name.clone(), p.shape.clone(), v.to_f32()));
        }
        Ok(out)
    }

    fn set_state(&mut self, name: &str, data: &[f32]) -> Result<(), String> {
        self.set_param_f32(name, data)
    }

    fn first_nonfinite(&mut self) -> Result<Option<String>, String> {
        for p in &self.params {
            if let Some(t) = self.env.params.get(&p.name).and_then(|v| v.as_f()) {
                if let Some(i) = t.data.iter().position(|x| !x.is_finite()) {
                    return Ok(Some(format!("parameter `{}` holds {} at element {i}", p.name, t.data[i])));
                }
            }
        }
        let vals = run(&self.graph, &self.env, Precision::F32).map_err(|e| format!("interpreter: {e}"))?;
        for (i, v) in vals.iter().enumerate() {
            if let Some(t) = v.as_f() {
                if let Some(k) = t.data.iter().position(|x| !x.is_finite()) {
                    let n = &self.graph.nodes[i];
                    let label = n.label.as_deref().map(|l| format!(" of `{l}`")).unwrap_or_default();
                    return Ok(Some(format!(
                        "%{i} = {}{label} : {} holds {} at element {k}",
                        n.op.mnemonic(),
                        n.ty,
                        t.data[k]
                    )));
                }
            }
        }
        Ok(None)
    }
}
