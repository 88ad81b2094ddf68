//! The op set, declared once.
//!
//! Every op is one row of [`op_table!`]: its variant, text mnemonic, arity, attributes, and the rule that gives the
//! type of its result from the types of its inputs. The `Op` enum, the text syntax (mnemonic + attributes), the
//! verifier's type rules and (later) the e-graph language all derive from this table. The semantics of each op live
//! in one place: its arm in the interpreter (`interp.rs`).
//!
//! Conventions: `x: [..]` names input shapes. Matmuls are rank 2 (or rank 3 with equal batch). Hidden states are
//! `[tokens, hidden]`; attention and RoPE see `[batch, seq, heads, head_dim]`.

use crate::attr::{AttnArg, Attr, AttrLit, Init, Role};
use crate::infer::*;
use crate::types::{DType, Shape, Type};

/// How many inputs an op takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arity {
    Fixed(usize),
    AtLeast(usize),
}

impl Arity {
    pub fn accepts(self, n: usize) -> bool {
        match self {
            Arity::Fixed(k) => n == k,
            Arity::AtLeast(k) => n >= k,
        }
    }
}

macro_rules! op_table {
    ($(
        $(#[doc = $doc:literal])*
        $variant:ident $mn:literal arity($arity:expr) { $($field:ident : $fty:ty),* $(,)? }
            types |$ins:ident, $decl:ident| $rule:expr;
    )*) => {
        /// One operation of the IR (see the module docs for the table).
        #[derive(Clone, Debug, PartialEq)]
        pub enum Op {
            $( $(#[doc = $doc])* $variant { $($field: $fty),* }, )*
        }

        /// The op's kind without its attributes.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum OpKind { $($variant,)* }

        impl OpKind {
            /// Every kind, in table order.
            pub const ALL: &'static [OpKind] = &[$(OpKind::$variant,)*];
            pub fn mnemonic(self) -> &'static str {
                match self { $(OpKind::$variant => $mn,)* }
            }
            pub fn from_mnemonic(s: &str) -> Option<OpKind> {
                match s { $($mn => Some(OpKind::$variant),)* _ => None }
            }
        }

        impl Op {
            pub fn kind(&self) -> OpKind {
                match self { $(Op::$variant { .. } => OpKind::$variant,)* }
            }
            pub fn mnemonic(&self) -> &'static str {
                self.kind().mnemonic()
            }
            pub fn arity(&self) -> Arity {
                match self { $(Op::$variant { .. } => $arity,)* }
            }
            /// Attribute names and their text form, in declaration order.
            pub fn attrs(&self) -> Vec<(&'static str, String)> {
                match self {
                    $(Op::$variant { $($field),* } => vec![$((stringify!($field), {
                        let mut s = String::new();
                        Attr::write($field, &mut s);
                        s
                    })),*],)*
                }
            }
            /// Builds an op from its mnemonic and attribute literals (the text parser's entry point).
            pub fn from_parts(mnemonic: &str, attrs: &[(String, AttrLit)]) -> Result<Op, String> {
                let take = |name: &str| -> Result<&AttrLit, String> {
                    attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v)
                        .ok_or_else(|| format!("`{mnemonic}` needs attribute `{name}`"))
                };
                let kind = OpKind::from_mnemonic(mnemonic).ok_or_else(|| format!("unknown op `{mnemonic}`"))?;
                let op = match kind {
                    $(OpKind::$variant => Op::$variant {
                        $($field: <$fty as Attr>::from_lit(take(stringify!($field))?)
                            .map_err(|e| format!("attribute `{}` of `{}`: {e}", stringify!($field), $mn))?,)*
                    },)*
                };
                let known = op.attrs();
                if let Some((k, _)) = attrs.iter().find(|(k, _)| !known.iter().any(|(n, _)| n == k)) {
                    return Err(format!("`{mnemonic}` has no attribute `{k}`"));
                }
                Ok(op)
            }
            /// The type of the result given the input types. `declared` is the node's own type; leaves (params,
            /// inputs, constants) take it as given.
            #[allow(unused_variables)]
            pub fn infer(&self, inputs: &[&Type], declared: &Type) -> Result<Type, String> {
                if !self.arity().accepts(inputs.len()) {
                    return Err(format!("`{}` takes {:?} inputs, got {}", self.mnemonic(), self.arity(), inputs.len()));
                }
                match self {
                    $(Op::$variant { $($field),* } => {
                        let rule = |$ins: &[&Type], $decl: &Type| -> Result<Type, String> { $rule };
                        rule(inputs, declared)
                    })*
                }
            }
        }
    };
}

op_table! {
    // ---- leaves -------------------------------------------------------------------------------------------------
    /// A model parameter, named as in the Hugging Face checkpoint (`model.layers.0.self_attn.q_proj.weight`).
    Param "param" arity(Arity::Fixed(0)) { name: String, role: Role, init: Init }
        types |ins, decl| Ok(decl.clone());
    /// A per-step input (token ids, labels, positions, segment ids, learning rate, step).
    Input "input" arity(Arity::Fixed(0)) { name: String }
        types |ins, decl| Ok(decl.clone());
    /// A tensor filled with one value.
    Const "const" arity(Arity::Fixed(0)) { value: f64 }
        types |ins, decl| leaf_numeric(decl);

    // ---- layout -------------------------------------------------------------------------------------------------
    /// Same elements, new shape.
    Reshape "reshape" arity(Arity::Fixed(1)) { shape: Shape }
        types |ins, decl| reshape(ins[0], shape);
    /// Permutes axes: out.shape[i] = x.shape[perm[i]].
    Transpose "transpose" arity(Arity::Fixed(1)) { perm: Shape }
        types |ins, decl| transpose(ins[0], perm);
    /// Joins inputs along an axis.
    Concat "concat" arity(Arity::AtLeast(1)) { axis: usize }
        types |ins, decl| concat(ins, *axis);
    /// Elements `start..end` along an axis.
    Slice "slice" arity(Arity::Fixed(1)) { axis: usize, start: usize, end: usize }
        types |ins, decl| slice(ins[0], *axis, *start, *end);
    /// Broadcasts (numpy rules) to a larger shape.
    BroadcastTo "broadcast_to" arity(Arity::Fixed(1)) { shape: Shape }
        types |ins, decl| broadcast_to(ins[0], shape);
    /// Sums over the axes that broadcasting to x's shape would have added or stretched (the adjoint of broadcast_to).
    SumTo "sum_to" arity(Arity::Fixed(1)) { shape: Shape }
        types |ins, decl| sum_to(ins[0], shape);
    /// Converts between float dtypes (round to nearest even).
    Cast "cast" arity(Arity::Fixed(1)) { to: DType }
        types |ins, decl| cast(ins[0], *to);

    // ---- elementwise --------------------------------------------------------------------------------------------
    /// a + b (broadcasting)
    Add "add" arity(Arity::Fixed(2)) {} types |ins, decl| broadcast2(ins);
    /// a - b (broadcasting)
    Sub "sub" arity(Arity::Fixed(2)) {} types |ins, decl| broadcast2(ins);
    /// a · b (broadcasting)
    Mul "mul" arity(Arity::Fixed(2)) {} types |ins, decl| broadcast2(ins);
    /// a / b (broadcasting)
    Div "div" arity(Arity::Fixed(2)) {} types |ins, decl| broadcast2(ins);
    /// min(a, b) (broadcasting; not differentiated — used for gradient clipping)
    Minimum "minimum" arity(Arity::Fixed(2)) {} types |ins, decl| broadcast2(ins);
    /// max(a, b) (broadcasting; not differentiated)
    Maximum "maximum" arity(Arity::Fixed(2)) {} types |ins, decl| broadcast2(ins);
    /// −x
    Neg "neg" arity(Arity::Fixed(1)) {} types |ins, decl| float_unary(ins[0]);
    /// eˣ
    Exp "exp" arity(Arity::Fixed(1)) {} types |ins, decl| float_unary(ins[0]);
    /// ln x
    Log "log" arity(Arity::Fixed(1)) {} types |ins, decl| float_unary(ins[0]);
    /// √x
    Sqrt "sqrt" arity(Arity::Fixed(1)) {} types |ins, decl| float_unary(ins[0]);
    /// 1/√x
    Rsqrt "rsqrt" arity(Arity::Fixed(1)) {} types |ins, decl| float_unary(ins[0]);
    /// σ(x) = 1/(1+e⁻ˣ)
    Sigmoid "sigmoid" arity(Arity::Fixed(1)) {} types |ins, decl| float_unary(ins[0]);
    /// silu(x) = x·σ(x)
    Silu "silu" arity(Arity::Fixed(1)) {} types |ins, decl| float_unary(ins[0]);
    /// silu_bwd(dy, x) = dy · σ(x)·(1 + x·(1 − σ(x)))
    SiluBwd "silu_bwd" arity(Arity::Fixed(2)) {} types |ins, decl| same2(ins);
    /// swiglu(gate, up) = silu(gate) · up (Llama's MLP)
    Swiglu "swiglu" arity(Arity::Fixed(2)) {} types |ins, decl| same2(ins);
    /// c · x
    Scale "scale" arity(Arity::Fixed(1)) { c: f64 } types |ins, decl| float_unary(ins[0]);
    /// x, with no gradient flowing through (DoRA's detached weight norm).
    StopGradient "stop_gradient" arity(Arity::Fixed(1)) {} types |ins, decl| float_unary(ins[0]);

    // ---- reductions ---------------------------------------------------------------------------------------------
    /// Σ over `axes`; `keepdim` keeps them as size 1.
    Sum "sum" arity(Arity::Fixed(1)) { axes: Shape, keepdim: bool }
        types |ins, decl| sum(ins[0], axes, *keepdim);

    // ---- linear algebra -----------------------------------------------------------------------------------------
    /// op(a)·op(b) with op = transpose when the flag is set. a: [m,k] (ta: [k,m]), b: [k,n] (tb: [n,k]) → [m,n];
    /// rank 3 with equal batch is batched.
    MatMul "matmul" arity(Arity::Fixed(2)) { ta: bool, tb: bool }
        types |ins, decl| matmul(ins[0], ins[1], *ta, *tb);

    // ---- transformer ops ----------------------------------------------------------------------------------------
    /// table: [V,D], ids: i32[..] → [.., D]
    Embedding "embedding" arity(Arity::Fixed(2)) {}
        types |ins, decl| embedding(ins[0], ins[1]);
    /// Scatter-add of dy: [.., D] into [vocab, D] at ids (the adjoint of embedding).
    EmbeddingBwd "embedding_bwd" arity(Arity::Fixed(2)) { vocab: usize }
        types |ins, decl| embedding_bwd(ins[0], ins[1], *vocab);
    /// x · rsqrt(mean(x², last axis) + eps) · w; x: [.., D], w: [D]
    RmsNorm "rms_norm" arity(Arity::Fixed(2)) { eps: f64 }
        types |ins, decl| rms_norm(ins[0], ins[1]);
    /// ∂/∂x of rms_norm; (dy, x, w) → like x
    RmsNormBwdX "rms_norm_bwd_x" arity(Arity::Fixed(3)) { eps: f64 }
        types |ins, decl| { same2(&ins[..2])?; rms_norm(ins[1], ins[2]) };
    /// ∂/∂w of rms_norm; (dy, x) → [D]
    RmsNormBwdW "rms_norm_bwd_w" arity(Arity::Fixed(2)) { eps: f64 }
        types |ins, decl| rms_norm_bwd_w(ins[0], ins[1]);
    /// Rotary position embedding (HF's rotate_half layout); x: [B,T,H,hd], pos: i32[B,T]. `inverse` rotates by −θ
    /// (the adjoint).
    Rope "rope" arity(Arity::Fixed(2)) { theta: f64, inverse: bool }
        types |ins, decl| rope(ins[0], ins[1]);
    /// softmax(scale·q·kᵀ + mask)·v per head, GQA (H/KV query heads share a kv head). q: [B,T,H,hd],
    /// k, v: [B,T,KV,hd], seg: i32[B,T]; position i sees j iff seg equal and (j ≤ i when causal).
    Attention "attention" arity(Arity::Fixed(4)) { causal: bool, scale: f64 }
        types |ins, decl| attention(ins[0], ins[1], ins[2], ins[3]);
    /// Gradient of attention w.r.t. one of q, k, v; (dout, q, k, v, seg).
    AttentionBwd "attention_bwd" arity(Arity::Fixed(5)) { causal: bool, scale: f64, wrt: AttnArg }
        types |ins, decl| attention_bwd(ins, *wrt);
    /// softmax over the last axis
    Softmax "softmax" arity(Arity::Fixed(1)) {} types |ins, decl| float_unary(ins[0]);
    /// (dy, y) → y ⊙ (dy − Σ dy⊙y)
    SoftmaxBwd "softmax_bwd" arity(Arity::Fixed(2)) {} types |ins, decl| same2(ins);
    /// Mean over non-ignored rows of −log softmax(logits)[label]; logits: [N,V], labels: i32[N] → f32[]
    CrossEntropy "cross_entropy" arity(Arity::Fixed(2)) { ignore_index: i64 }
        types |ins, decl| cross_entropy(ins[0], ins[1]);
    /// (dloss: [], logits, labels) → dlogits = dloss·(softmax − onehot)/count on non-ignored rows
    CrossEntropyBwd "cross_entropy_bwd" arity(Arity::Fixed(3)) { ignore_index: i64 }
        types |ins, decl| cross_entropy_bwd(ins);

    // ---- quantization -------------------------------------------------------------------------------------------
    /// f32 weight → NF4 (bitsandbytes layout); `double_quant` = 0 keeps f32 absmax.
    Nf4Quantize "nf4_quantize" arity(Arity::Fixed(1)) { block: usize, double_quant: usize }
        types |ins, decl| nf4_quantize(ins[0], *block, *double_quant);
    /// NF4 → f32, same shape
    Nf4Dequantize "nf4_dequantize" arity(Arity::Fixed(1)) {}
        types |ins, decl| nf4_dequantize(ins[0]);

    // ---- fused ops (formed by the optimizer; each is defined by its decomposition, which the interpreter runs) ---
    /// matmul(x, nf4_dequantize(q), false, tb): the NF4 weight is dequantized inside the GEMM, never materialized.
    /// x: [m,k], q: nf4 [n,k] (tb) or [k,n] → [m,n]
    QMatMul "qmatmul" arity(Arity::Fixed(2)) { tb: bool }
        types |ins, decl| qmatmul(ins[0], ins[1], *tb);
    /// x·op(W) + s·u·op(B), op = transpose when `tb`: a GEMM with a rank-r epilogue (LoRA's B-projection folded
    /// into its base matmul; also dX = dY·W + g·A in the backward). W is f32 or NF4 (dequantized inside).
    /// x: [m,k], W: [n,k] (tb) or [k,n], u: [m,r], B: [n,r] (tb) or [r,n] → [m,n]
    LoraLinear "lora_linear" arity(Arity::Fixed(4)) { s: f64, tb: bool }
        types |ins, decl| lora_linear(ins, *tb);
    /// cross_entropy(matmul(h, W, false, true), labels) computed over vocabulary chunks of `chunk` rows of W, so the
    /// [N,V] logits are never materialized. h: [N,D], W: [V,D], labels: i32[N] → f32[]
    LinearCrossEntropy "linear_cross_entropy" arity(Arity::Fixed(3)) { ignore_index: i64, chunk: usize }
        types |ins, decl| linear_cross_entropy(ins[0], ins[1], ins[2]);
    /// ∂/∂h of linear_cross_entropy: cross_entropy_bwd(dloss, h·Wᵀ, labels)·W, chunked. (dloss, h, W, labels) → [N,D]
    LinearCrossEntropyBwd "linear_cross_entropy_bwd" arity(Arity::Fixed(4)) { ignore_index: i64, chunk: usize }
        types |ins, decl| { scalar_f32(ins[0])?; linear_cross_entropy(ins[1], ins[2], ins[3])?; Ok(ins[1].clone()) };

    // ---- training -----------------------------------------------------------------------------------------------
    /// Inverted dropout with a counter-based mask: keep element i iff hash(seed, step, i) ≥ p, scale kept by 1/(1−p).
    /// The same op with the same seed and step is its own adjoint. (x, step: i32[])
    Dropout "dropout" arity(Arity::Fixed(2)) { p: f64, seed: u64 }
        types |ins, decl| { scalar_i32(ins[1])?; float_unary(ins[0]) };
    /// AdamW moment: β·m + (1−β)·g (or g² when `square`); (m, g)
    AdamWMoment "adamw_moment" arity(Arity::Fixed(2)) { beta: f64, square: bool }
        types |ins, decl| same2(ins);
    /// AdamW parameter update as in torch.optim.AdamW: p·(1 − lr·wd) − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + eps);
    /// (p, m, v, lr: f32[], step: i32[]) with m, v already updated and step t ≥ 1.
    AdamWUpdate "adamw_update" arity(Arity::Fixed(5)) { beta1: f64, beta2: f64, eps: f64, weight_decay: f64 }
        types |ins, decl| adamw_update(ins);
}

impl Op {
    /// Whether the op has no inputs (params, inputs, constants).
    pub fn is_leaf(&self) -> bool {
        matches!(self, Op::Param { .. } | Op::Input { .. } | Op::Const { .. })
    }
}
