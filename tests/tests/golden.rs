//! Golden parity with the outside reference: the tiny Llama of `tests/reference/make_llama_fixtures.py`, built by
//! HF transformers + PEFT (+ bitsandbytes NF4 for the q-cases) in f32, against our DSL recipe run by the reference
//! interpreter with the same weights: logits, loss and every adapter gradient within 1e-4 (inf-norm relative,
//! max|ours − ref| / max|ref|); NF4 codes, scales and dequantized weights bit-exact.

use ir::interp::{run, Precision, Value};
use ir::nf4::Nf4Scales;
use ir::OutputKind;
use passes::autodiff::{differentiate, Wrt};
use tests::fixture::Fixture;
use tests::{compile_example, rel_err};

const TOL: f64 = 1e-4;

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn golden(case: &str, example: &str) {
    let fx = Fixture::load(&format!("llama_{case}.safetensors"), "tunec-golden-llama", "1");
    let recipe = compile_example(example);
    let mut step = recipe.forward.clone();
    differentiate(&mut step, Wrt::Trainable).unwrap();
    ir::verify::verify(&step).unwrap();
    let env = fx.llama_env();
    let vals = run(&step, &env, Precision::F32).unwrap_or_else(|e| panic!("{case}: {e}"));
    let get = |k: &OutputKind| vals[step.output(k).unwrap().index()].as_f().unwrap().data.clone();

    let logits = get(&OutputKind::Logits);
    let e = rel_err(&logits, &f64s(&fx.f32("logits").1));
    assert!(e < TOL, "{case}: logits differ from HF by {e:e}");
    let loss = get(&OutputKind::Loss);
    let e = rel_err(&loss, &f64s(&fx.f32("loss").1));
    assert!(e < TOL, "{case}: loss {} vs HF {:?}: {e:e}", loss[0], fx.f32("loss").1);

    let mut checked = 0;
    for name in fx.names() {
        let Some(param) = name.strip_prefix("grad.") else { continue };
        let ours = get(&OutputKind::Grad(param.to_string()));
        let e = rel_err(&ours, &f64s(&fx.f32(&name).1));
        assert!(e < TOL, "{case}: gradient of {param} differs from PEFT by {e:e}");
        checked += 1;
    }
    let trainable = step.outputs.iter().filter(|o| matches!(o.kind, OutputKind::Grad(_))).count();
    assert!(checked > 0 && checked == trainable, "{case}: checked {checked} gradients, the graph has {trainable}");
}

#[test]
fn lora_tied_matches_peft() {
    golden("lora", "tiny.lora.rs");
}

#[test]
fn rslora_matches_peft() {
    golden("lora_rslora", "tiny.lora-rslora.rs");
}

#[test]
fn qlora_matches_peft_bitsandbytes() {
    golden("qlora", "tiny.qlora.rs");
}

#[test]
fn dora_matches_peft() {
    golden("dora", "tiny.dora.rs");
}

#[test]
fn qdora_matches_peft_bitsandbytes() {
    golden("qdora", "tiny.qdora.rs");
}

/// Our NF4 quantization of each base weight equals what bitsandbytes stored in the model: packed codes, double-quant
/// codes, second-level scales and offset, and the dequantized weight, bit for bit.
#[test]
fn nf4_weights_equal_bitsandbytes_bit_for_bit() {
    for case in ["qlora", "qdora"] {
        let fx = Fixture::load(&format!("llama_{case}.safetensors"), "tunec-golden-llama", "1");
        let modules: Vec<String> = fx
            .names()
            .iter()
            .filter_map(|n| n.strip_prefix("nf4.").and_then(|m| m.strip_suffix(".packed")).map(str::to_string))
            .collect();
        assert_eq!(modules.len(), 14, "{case}: 7 quantized linears × 2 layers");
        for m in modules {
            let (shape, w) = fx.f32(&format!("weights.{m}.weight"));
            let q = ir::nf4::quantize(&w, &shape, 64, Some(256));
            assert_eq!(q.packed, fx.u8(&format!("nf4.{m}.packed")), "{case} {m}: packed codes");
            let Nf4Scales::Double { codes, absmax2, offset, .. } = &q.scales else { panic!("not double-quantized") };
            assert_eq!(codes, &fx.u8(&format!("nf4.{m}.absmax_codes")), "{case} {m}: absmax codes");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(absmax2), bits(&fx.f32(&format!("nf4.{m}.absmax2")).1), "{case} {m}: absmax2");
            assert_eq!(offset.to_bits(), fx.f32(&format!("nf4.{m}.offset")).1[0].to_bits(), "{case} {m}: offset");
            let deq = ir::nf4::dequantize(&q);
            assert_eq!(bits(&deq), bits(&fx.f32(&format!("nf4.{m}.dequant")).1), "{case} {m}: dequantized");
            // The interpreter's quantize-on-load path gives the same tensor.
            let _ = Value::Q(q);
        }
    }
}

/// PEFT's initialisation, materialized by `ir::init` from the inits our PEFT transforms declare: DoRA's magnitude is
/// the row norm of the base weight (of the dequantized NF4 weight for QDoRA), as PEFT computed it in the fixtures;
/// LoRA's A is U(−1/√in, 1/√in) and B is zero.
#[test]
fn peft_initialisation_matches_the_reference() {
    use ir::init::materialize;
    use ir::{Init, Op};
    for (case, example) in [("dora", "tiny.dora.rs"), ("qdora", "tiny.qdora.rs")] {
        let fx = Fixture::load(&format!("llama_{case}.safetensors"), "tunec-golden-llama", "1");
        let g = compile_example(example).forward;
        let env = fx.llama_env();
        let mut checked = 0;
        for (v, name, _) in g.params() {
            let Op::Param { init, .. } = &g.node(v).op else { unreachable!() };
            // The base weights as the graph declares them: NF4 ones quantized, as the interpreter loads them.
            let source = |n: &str| {
                let p = g.param(n)?;
                let t = env.params.get(n)?.as_f()?.clone();
                Some(match g.ty(p).dtype {
                    ir::DType::Nf4(f) => Value::Q(ir::nf4::quantize(
                        &t.to_f32(),
                        &t.shape,
                        f.block as usize,
                        f.double_quant.map(|b| b as usize),
                    )),
                    _ => Value::F(t),
                })
            };
            match init {
                Init::RowNorm { .. } => {
                    let ours = materialize(init, name, &g.ty(v).shape, 0, &source).unwrap();
                    let peft = fx.tensor(&format!("adapter.{name}"));
                    let e = rel_err(&ours.data, &peft.data);
                    assert!(e < 1e-6, "{case}: {name} magnitude differs from PEFT's by {e:e}");
                    checked += 1;
                }
                Init::KaimingUniform { .. } => {
                    let t = materialize(init, name, &g.ty(v).shape, 0, &source).unwrap();
                    let bound = 1.0 / (g.ty(v).shape[1] as f64).sqrt();
                    assert!(t.data.iter().all(|x| x.abs() <= bound * (1.0 + 1e-6)), "{name}");
                }
                Init::Zeros => assert!(name.ends_with("lora_B.weight"), "{name} starts at zero"),
                _ => {}
            }
        }
        assert_eq!(checked, 14, "{case}: one magnitude per adapted module");
    }
}
