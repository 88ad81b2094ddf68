#!/usr/bin/env python3
"""Golden-reference fixtures for tunec's Llama LoRA / rsLoRA / QLoRA / DoRA / QDoRA training step.

Builds a tiny Hugging Face LlamaForCausalLM (float32, CPU, eager attention), wraps it with PEFT, sets the adapter
weights to seeded non-zero values, runs ONE forward + backward in train mode and writes, per case,
tests/fixtures/llama_<case>.safetensors holding the inputs, the f32 base weights, the adapter weights, their
gradients, the logits, the loss and (4-bit cases) the bitsandbytes NF4 storage of every quantized layer.

A sanity section re-derives everything from the stored tensors with an independent plain-torch implementation
(Llama forward, LoRA/DoRA algebra, HF loss, NF4 + double-quant decode and encode) and asserts agreement, so the
fixture is also an executable statement of the semantics tunec must reproduce.

Run through tests/reference/run.sh (which provides the pinned venv). See tests/reference/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import bitsandbytes as bnb
import peft
import safetensors
import transformers
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

FORMAT = "tunec-golden-llama"
VERSION = "1"
SEED = 1234  # base weights use SEED, inputs SEED + 1, adapters SEED + 2 (identical across cases)
BATCH, SEQ = 2, 8
N_MASKED = 3  # first positions of every row whose label is -100

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

MODEL = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    hidden_act="silu",
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=64,
    attention_bias=False,
    mlp_bias=False,
    attention_dropout=0.0,
)

CASES = {
    "lora": dict(tie_word_embeddings=True, r=4, lora_alpha=8, use_rslora=False, use_dora=False, targets=ALL7, quant=False),
    "lora_rslora": dict(tie_word_embeddings=False, r=8, lora_alpha=16, use_rslora=True, use_dora=False,
                        targets=["q_proj", "v_proj"], quant=False),
    "qlora": dict(tie_word_embeddings=False, r=4, lora_alpha=16, use_rslora=False, use_dora=False, targets=ALL7, quant=True),
    "dora": dict(tie_word_embeddings=False, r=4, lora_alpha=8, use_rslora=False, use_dora=True, targets=ALL7, quant=False),
    "qdora": dict(tie_word_embeddings=False, r=4, lora_alpha=16, use_rslora=False, use_dora=True, targets=ALL7, quant=True),
}

NF4_BLOCKSIZE = 64
NF4_ABSMAX_BLOCKSIZE = 256  # double quantization block (bitsandbytes' fixed value)

# bitsandbytes NF4 codebook as written in /work/shared/FACTS.md (checked against bnb below).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------------------------------------------
# byte-reproducible safetensors writer (safetensors.torch.save_file orders __metadata__ keys at random)
# ----------------------------------------------------------------------------------------------------------------

ST_DTYPES = {torch.float32: "F32", torch.int64: "I64", torch.uint8: "U8"}


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        data = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(hjson).to_bytes(8, "little"))
        f.write(hjson)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)
    # read back with the official loader
    with safe_open(path, "pt") as f:
        assert f.metadata() == metadata and set(f.keys()) == set(tensors)
        for name in tensors:
            assert torch.equal(f.get_tensor(name), tensors[name]), name


# ----------------------------------------------------------------------------------------------------------------
# model construction
# ----------------------------------------------------------------------------------------------------------------

def hf_config(case: dict) -> LlamaConfig:
    return LlamaConfig(**MODEL, tie_word_embeddings=case["tie_word_embeddings"])


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")  # input_layernorm, post_attention_layernorm, model.norm


def build_f32_model(case: dict) -> tuple[LlamaForCausalLM, dict[str, torch.Tensor]]:
    """Seeded f32 model. Returns the model and {hf_name: f32 weight} (tied lm_head listed once, as embed_tokens)."""
    torch.manual_seed(SEED)  # only for the (overwritten) default init
    model = LlamaForCausalLM._from_config(hf_config(case), attn_implementation="eager", dtype=torch.float32)
    g = torch.Generator().manual_seed(SEED)
    weights = {}
    with torch.no_grad():
        # named_parameters() de-duplicates the tied lm_head; lm_head (when untied) comes last, so every other
        # weight is identical across cases.
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if is_norm(name) else 0.1 * noise)
            weights[name] = p.detach().clone()
    if case["tie_word_embeddings"]:
        assert "lm_head.weight" not in weights
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert "lm_head.weight" in weights
    assert model.config._attn_implementation == "eager"
    return model, weights


def quantized_copy(model: LlamaForCausalLM, tmpdir: str) -> LlamaForCausalLM:
    """Save the f32 model and reload it the way users load QLoRA bases: transformers + BitsAndBytesConfig."""
    model.save_pretrained(tmpdir)
    qcfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    qmodel = LlamaForCausalLM.from_pretrained(
        tmpdir, quantization_config=qcfg, dtype=torch.float32, device_map="cpu", attn_implementation="eager"
    )
    return qmodel


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    input_ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), generator=g, dtype=torch.int64)
    labels = input_ids.clone()
    labels[:, :N_MASKED] = -100
    return input_ids, labels


def lora_modules(peft_model) -> list[tuple[str, torch.nn.Module]]:
    out = []
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            assert name.startswith(PEFT_PREFIX), name
            out.append((name[len(PEFT_PREFIX):], mod))
    return out


def set_adapter_weights(mods) -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (the bound of kaiming_uniform_(a=sqrt(5)), PEFT's default), B ~ N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        for _, mod in mods:
            A = mod.lora_A["default"].weight
            B = mod.lora_B["default"].weight
            bound = 1.0 / math.sqrt(A.shape[1])
            A.copy_((torch.rand(A.shape, generator=g) * 2.0 - 1.0) * bound)
            B.copy_(0.1 * torch.randn(B.shape, generator=g))


# ----------------------------------------------------------------------------------------------------------------
# independent re-implementation (used by the sanity checks only)
# ----------------------------------------------------------------------------------------------------------------

def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, theta):
    # x: [B, H, T, D]; HF "rotate_half" convention (pairs i and i + D/2).
    T, D = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def manual_forward(t: dict, case: dict, adapters: dict, base_w: dict):
    """Plain-torch forward from stored tensors. base_w: module -> effective base weight W (dequantized for 4-bit)."""
    H, nH, nKV, hd = MODEL["hidden_size"], MODEL["num_attention_heads"], MODEL["num_key_value_heads"], MODEL["head_dim"]
    eps, theta = MODEL["rms_norm_eps"], MODEL["rope_theta"]
    r, alpha = case["r"], case["lora_alpha"]
    s = alpha / math.sqrt(r) if case["use_rslora"] else alpha / r

    def linear(x, module):
        W = base_w[module]
        if module not in adapters:
            return x @ W.T
        A, B = adapters[module]["lora_A"], adapters[module]["lora_B"]
        y = x @ W.T + s * (x @ A.T) @ B.T
        if case["use_dora"]:
            n = torch.linalg.norm(W + s * (B @ A), dim=1).detach()
            y = (adapters[module]["magnitude"] / n) * y
        return y

    ids = t["input_ids"]
    Bsz, T = ids.shape
    x = t["weights.model.embed_tokens.weight"][ids]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for layer in range(MODEL["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        h = rms_norm(x, t[f"weights.{p}.input_layernorm.weight"], eps)
        q = linear(h, f"{p}.self_attn.q_proj").view(Bsz, T, nH, hd).transpose(1, 2)
        k = linear(h, f"{p}.self_attn.k_proj").view(Bsz, T, nKV, hd).transpose(1, 2)
        v = linear(h, f"{p}.self_attn.v_proj").view(Bsz, T, nKV, hd).transpose(1, 2)
        q, k = rope(q, theta), rope(k, theta)
        k = k.repeat_interleave(nH // nKV, dim=1)  # query head i uses kv head i // (nH / nKV)
        v = v.repeat_interleave(nH // nKV, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(Bsz, T, nH * hd)
        x = x + linear(o, f"{p}.self_attn.o_proj")
        h = rms_norm(x, t[f"weights.{p}.post_attention_layernorm.weight"], eps)
        m = F.silu(linear(h, f"{p}.mlp.gate_proj")) * linear(h, f"{p}.mlp.up_proj")
        x = x + linear(m, f"{p}.mlp.down_proj")
    x = rms_norm(x, t["weights.model.norm.weight"], eps)
    head = t["weights.lm_head.weight"] if "weights.lm_head.weight" in t else t["weights.model.embed_tokens.weight"]
    logits = x @ head.T
    return logits


def manual_loss(logits, labels):
    lg = logits[:, :-1].reshape(-1, logits.shape[-1])
    lb = labels[:, 1:].reshape(-1)
    keep = lb != -100
    logp = torch.log_softmax(lg[keep].double(), dim=-1)
    return -logp[torch.arange(int(keep.sum())), lb[keep]].mean()


def np_nf4_encode(w: np.ndarray, blocksize: int):
    """FACTS.md / bnb CPU encode: absmax per block, scaled = w * (1/absmax) clamped to [-1, 1], code = bucketize on
    the f32 midpoints of the codebook (value exactly on a midpoint -> lower code), even element in the high nibble."""
    flat = w.reshape(-1).astype(np.float32)
    blocks = flat.reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    scaled = np.clip(blocks * (np.float32(1.0) / absmax)[:, None], -1, 1).reshape(-1).astype(np.float32)
    mids = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
    codes = np.searchsorted(mids, scaled, side="left").astype(np.uint8)  # == torch.bucketize(right=False)
    packed = ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)
    return packed, absmax


def np_double_quant(absmax: np.ndarray, code2: np.ndarray, blocksize: int, offset=None):
    """offset = mean(absmax); (absmax - offset) blockwise(256) onto the signed dynamic map by nearest value.

    bnb takes the offset from torch's f32 `mean()`, whose summation order is torch's vectorised CPU reduction (it
    depends on the SIMD width), so a portable reimplementation can be off by an ulp; pass bnb's offset to compare
    the rest bit for bit."""
    if offset is None:
        offset = np.float32(absmax.astype(np.float64).mean())
    offset = np.float32(offset)
    x = (absmax - offset).astype(np.float32)
    n_blocks = -(-x.size // blocksize)
    codes = np.empty(x.size, dtype=np.uint8)
    absmax2 = np.empty(n_blocks, dtype=np.float32)
    scaled_all = np.empty(x.size, dtype=np.float32)
    for b in range(n_blocks):
        seg = x[b * blocksize:(b + 1) * blocksize]
        a2 = np.abs(seg).max()
        absmax2[b] = a2
        scaled = (seg / a2).astype(np.float32)  # bnb's C kernel divides (common.cpp quantize_block)
        scaled_all[b * blocksize:(b + 1) * blocksize] = scaled
        codes[b * blocksize:(b + 1) * blocksize] = np.abs(scaled[:, None] - code2[None, :]).argmin(axis=1)
    return codes, absmax2, offset, scaled_all


# bnb's CPU 8-bit blockwise quantizer (csrc/common.cpp quantize_block) finds the interval with BinSearch's
# "Direct2" lookup and then only compares with the right neighbour; near a midpoint between two adjacent
# dynamic-map values it can pick the farther one. Measured on a 1e8-point sweep of [-1, 1] (bnb 0.50.2, x86-64):
# every disagreement with the true nearest value lies within 1.52e-5 of the midpoint, i.e. bnb's value is at most
# ~3.1e-5 (in absmax2-normalised units) farther than the nearest. tunec may round to the true nearest value.
DQ_NEAR_TIE = 4e-5


def dq_codes_agree(bnb_codes, ref_codes, scaled, code2) -> tuple[bool, int]:
    diff = bnb_codes != ref_codes
    extra = np.abs(scaled - code2[bnb_codes]) - np.abs(scaled - code2[ref_codes])
    return bool(np.all(extra[diff] <= DQ_NEAR_TIE)), int(diff.sum())


def np_nf4_decode(packed, absmax_codes, absmax2, offset, code2, shape, blocksize=NF4_BLOCKSIZE):
    absmax = code2[absmax_codes] * absmax2[np.arange(absmax_codes.size) // NF4_ABSMAX_BLOCKSIZE] + offset
    codes = np.empty(packed.size * 2, dtype=np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0xF
    w = NF4_CODE[codes] * np.repeat(absmax.astype(np.float32), blocksize)
    return w.reshape(shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------------------------

def make_case(name: str, case: dict, outdir: str, tmproot: str) -> dict:
    f32_model, weights = build_f32_model(case)
    if case["quant"]:
        model = quantized_copy(f32_model, os.path.join(tmproot, name))
        del f32_model
    else:
        model = f32_model

    # ---- quantization really is bnb NF4 + double quant on every targeted linear, nothing else
    quant_modules = []
    for mname, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            quant_modules.append(mname)
            qs = mod.weight.quant_state
            assert case["quant"], mname
            assert mname.split(".")[-1] in ALL7, mname
            assert qs.quant_type == "nf4" and qs.nested and qs.blocksize == NF4_BLOCKSIZE, (mname, qs.quant_type)
            assert qs.state2.blocksize == NF4_ABSMAX_BLOCKSIZE and qs.dtype == torch.float32
            assert mod.compute_dtype == torch.float32 and mod.weight.compress_statistics
            assert mod.weight.dtype == torch.uint8
    if case["quant"]:
        assert len(quant_modules) == 7 * MODEL["num_hidden_layers"], quant_modules
        assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
        assert model.model.embed_tokens.weight.dtype == torch.float32
    for pname, p in model.named_parameters():
        if not isinstance(p, bnb.nn.Params4bit):
            assert p.dtype == torch.float32, pname

    lcfg = LoraConfig(
        r=case["r"], lora_alpha=case["lora_alpha"], lora_dropout=0.0, target_modules=list(case["targets"]),
        bias="none", task_type="CAUSAL_LM", use_rslora=case["use_rslora"], use_dora=case["use_dora"],
    )
    pm = get_peft_model(model, lcfg)
    mods = lora_modules(pm)
    assert len(mods) == len(case["targets"]) * MODEL["num_hidden_layers"], [m for m, _ in mods]
    scaling = case["lora_alpha"] / (math.sqrt(case["r"]) if case["use_rslora"] else case["r"])
    for mname, mod in mods:
        assert mod.scaling["default"] == scaling, (mname, mod.scaling["default"], scaling)
        assert isinstance(mod.lora_dropout["default"], torch.nn.Identity)
        if case["quant"]:
            assert type(mod).__module__ == "peft.tuners.lora.bnb" and type(mod).__name__ == "Linear4bit", type(mod)
        else:
            assert type(mod).__module__ == "peft.tuners.lora.layer" and type(mod).__name__ == "Linear", type(mod)
        assert ("default" in mod.lora_magnitude_vector) == case["use_dora"]
        # PEFT's own init (before we touch anything): B = 0, A kaiming-uniform
        assert torch.count_nonzero(mod.lora_B["default"].weight) == 0

    # ---- effective base weight per linear (dequantized for 4-bit), and DoRA magnitude init check
    def base_weight(mod):
        base = mod.get_base_layer()
        if isinstance(base, bnb.nn.Linear4bit):
            assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
            return bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).detach().clone()
        return base.weight.detach().clone()

    eff_w = {mname: base_weight(mod) for mname, mod in mods}
    for mname in quant_modules:
        m = pm.get_submodule(PEFT_PREFIX + mname)
        eff_w.setdefault(mname, base_weight(m))
    for hname, w in weights.items():  # untargeted, unquantized linears: W itself
        mname = hname[: -len(".weight")]
        if mname.split(".")[-1] in ALL7:
            eff_w.setdefault(mname, w)
    assert len(eff_w) == 7 * MODEL["num_hidden_layers"]
    if not case["quant"]:
        for mname, W in eff_w.items():
            assert torch.equal(W, weights[mname + ".weight"]), mname
    if case["use_dora"]:
        for mname, mod in mods:
            mag = mod.lora_magnitude_vector["default"].weight
            # created while B == 0, so m = ||W||_row (dequantized W for 4-bit layers); we keep it as is
            assert torch.allclose(mag, torch.linalg.norm(eff_w[mname], dim=1), rtol=0, atol=1e-6), mname

    set_adapter_weights(mods)

    # ---- the training step
    input_ids, labels = inputs()
    pm.train()
    for m in pm.modules():
        if isinstance(m, torch.nn.Dropout):
            assert m.p == 0.0
    trainable = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    want = 2 * len(mods) + (len(mods) if case["use_dora"] else 0)
    assert len(trainable) == want, [n for n, _ in trainable]
    out = pm(input_ids=input_ids, labels=labels)
    out.loss.backward()
    logits = out.logits.detach().clone()
    loss = out.loss.detach().clone()
    assert logits.shape == (BATCH, SEQ, MODEL["vocab_size"]) and logits.dtype == torch.float32

    tensors: dict[str, torch.Tensor] = {"input_ids": input_ids, "labels": labels}
    for hname, w in weights.items():
        tensors[f"weights.{hname}"] = w
    adapters = {}
    for mname, mod in mods:
        A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        tensors[f"adapter.{mname}.lora_A.weight"] = A.detach().clone()
        tensors[f"adapter.{mname}.lora_B.weight"] = B.detach().clone()
        tensors[f"grad.{mname}.lora_A.weight"] = A.grad.detach().clone()
        tensors[f"grad.{mname}.lora_B.weight"] = B.grad.detach().clone()
        assert A.shape == (case["r"], mod.in_features) and B.shape == (mod.out_features, case["r"])
        assert torch.count_nonzero(A.grad) > 0 and torch.count_nonzero(B.grad) > 0, mname
        adapters[mname] = {"lora_A": A.detach().clone(), "lora_B": B.detach().clone()}
        if case["use_dora"]:
            mag = mod.lora_magnitude_vector["default"].weight
            tensors[f"adapter.{mname}.lora_magnitude_vector"] = mag.detach().clone()
            tensors[f"grad.{mname}.lora_magnitude_vector"] = mag.grad.detach().clone()
            assert mag.shape == (mod.out_features,)
            adapters[mname]["magnitude"] = mag.detach().clone()
    tensors["logits"] = logits
    tensors["loss"] = loss.reshape(())

    # ---- NF4 storage of every quantized layer
    code2 = None
    for mname in quant_modules:
        base = pm.get_submodule(PEFT_PREFIX + mname).get_base_layer()
        qs = base.weight.quant_state
        assert not getattr(qs, "packing_format_for_cpu", False)
        tensors[f"nf4.{mname}.packed"] = base.weight.data.detach().reshape(-1).clone()
        tensors[f"nf4.{mname}.absmax_codes"] = qs.absmax.detach().reshape(-1).clone()
        tensors[f"nf4.{mname}.absmax2"] = qs.state2.absmax.detach().reshape(-1).float().clone()
        tensors[f"nf4.{mname}.offset"] = qs.offset.detach().reshape(1).float().clone()
        tensors[f"nf4.{mname}.dequant"] = eff_w[mname]
        assert tensors[f"nf4.{mname}.packed"].dtype == torch.uint8
        assert tensors[f"nf4.{mname}.absmax_codes"].dtype == torch.uint8
        assert tuple(qs.shape) == tuple(weights[mname + ".weight"].shape)
        code2 = qs.state2.code.detach().float().numpy()
        assert np.array_equal(qs.code.detach().float().numpy(), NF4_CODE), "NF4 codebook differs from FACTS.md"

    sanity(name, case, tensors, adapters, eff_w, quant_modules, code2, pm, scaling)

    meta_config = dict(MODEL)
    meta_config.update(
        tie_word_embeddings=case["tie_word_embeddings"],
        batch=BATCH, seq=SEQ, seed=SEED, masked_prefix=N_MASKED,
        lora=dict(r=case["r"], lora_alpha=case["lora_alpha"], lora_dropout=0.0, use_rslora=case["use_rslora"],
                  use_dora=case["use_dora"], target_modules=list(case["targets"]), scaling=scaling),
        quant=(dict(quant_type="nf4", blocksize=NF4_BLOCKSIZE, double_quant=True,
                    absmax_blocksize=NF4_ABSMAX_BLOCKSIZE, compute_dtype="float32",
                    modules=quant_modules) if case["quant"] else None),
    )
    metadata = {
        "format": FORMAT, "version": VERSION, "case": name, "config": json.dumps(meta_config, sort_keys=True),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "bitsandbytes": bnb.__version__, "safetensors": safetensors.__version__,
    }
    path = os.path.join(outdir, f"llama_{name}.safetensors")
    write_safetensors(path, tensors, metadata)
    return {"case": name, "path": path, "bytes": os.path.getsize(path), "loss": float(loss),
            "tensors": len(tensors)}


# ----------------------------------------------------------------------------------------------------------------
# sanity: everything we rely on, re-derived independently from the stored tensors
# ----------------------------------------------------------------------------------------------------------------

def sanity(name, case, t, adapters, eff_w, quant_modules, code2, pm, scaling):
    # 1. scaling
    want = case["lora_alpha"] / math.sqrt(case["r"]) if case["use_rslora"] else case["lora_alpha"] / case["r"]
    assert scaling == want

    # 2. HF loss == mean CE of logits[:, :-1] vs labels[:, 1:] over labels != -100
    ml = manual_loss(t["logits"], t["labels"])
    assert abs(float(ml) - float(t["loss"])) < 1e-5, (float(ml), float(t["loss"]))
    n_items = int((t["labels"][:, 1:] != -100).sum())
    assert n_items == BATCH * (SEQ - N_MASKED)

    # 3. NF4: bnb's storage == FACTS.md encode of the f32 weights (so transformers quantized OUR f32 weights, with
    #    no cast on the way), bnb's dequant == FACTS.md decode, Linear4bit forward == x @ dequant^T.
    dq_near_ties = n_dq_codes = 0
    if quant_modules:
        assert np.array_equal(code2, bnb.functional.create_dynamic_map(signed=True).float().numpy())
        for mname in quant_modules:
            w = t[f"weights.{mname}.weight"].numpy()
            packed = t[f"nf4.{mname}.packed"].numpy()
            absmax_codes = t[f"nf4.{mname}.absmax_codes"].numpy()
            absmax2 = t[f"nf4.{mname}.absmax2"].numpy()
            offset = t[f"nf4.{mname}.offset"].numpy()[0]
            deq = t[f"nf4.{mname}.dequant"].numpy()
            ref_packed, ref_absmax = np_nf4_encode(w, NF4_BLOCKSIZE)
            assert np.array_equal(packed, ref_packed), (mname, int((packed != ref_packed).sum()))
            # offset: f32 mean of the absmax; equal to the exact mean up to torch's summation order (<= 2 ulp)
            exact = np.float32(ref_absmax.astype(np.float64).mean())
            assert abs(float(offset) - float(exact)) <= 2 * float(np.spacing(exact)), (mname, offset, exact)
            ref_codes2, ref_absmax2, _, scaled = np_double_quant(ref_absmax, code2, NF4_ABSMAX_BLOCKSIZE, offset)
            ok, n_diff = dq_codes_agree(absmax_codes, ref_codes2, scaled, code2)
            assert ok, (mname, n_diff)
            dq_near_ties += n_diff
            assert np.array_equal(absmax2, ref_absmax2), mname
            # with the exactly rounded mean instead of bnb's, the same holds
            alt_codes2, _, _, alt_scaled = np_double_quant(ref_absmax, code2, NF4_ABSMAX_BLOCKSIZE, offset=exact)
            assert dq_codes_agree(absmax_codes, alt_codes2, alt_scaled, code2)[0], mname
            n_dq_codes += absmax_codes.size
            assert absmax_codes.size == w.size // NF4_BLOCKSIZE
            assert absmax2.size == -(-absmax_codes.size // NF4_ABSMAX_BLOCKSIZE)
            dec = np_nf4_decode(packed, absmax_codes, absmax2, offset, code2, w.shape)
            assert np.array_equal(dec, deq), (mname, np.abs(dec - deq).max())  # bit-exact
            base = pm.get_submodule(PEFT_PREFIX + mname).get_base_layer()
            x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(7))
            with torch.no_grad():
                was = base.training
                base.train()  # the CPU repacking path only triggers in eval mode; stay on the training path
                y = base(x)
                base.train(was)
            assert torch.allclose(y, x @ t[f"nf4.{mname}.dequant"].T, rtol=0, atol=1e-5), mname

    # 4. independent plain-torch forward/backward from the stored tensors reproduces logits, loss and gradients
    leaf = {}
    for mname, a in adapters.items():
        leaf[mname] = {k: v.clone().requires_grad_(True) for k, v in a.items()}
    logits = manual_forward(t, case, leaf, eff_w)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), t["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)
    loss.backward()
    dl = (logits.detach() - t["logits"]).abs().max().item()
    assert dl < 1e-4, f"{name}: manual logits differ by {dl}"
    assert abs(loss.item() - t["loss"].item()) < 1e-5, (loss.item(), t["loss"].item())
    worst = 0.0
    for mname, a in leaf.items():
        pairs = [("lora_A", f"grad.{mname}.lora_A.weight"), ("lora_B", f"grad.{mname}.lora_B.weight")]
        if case["use_dora"]:
            pairs.append(("magnitude", f"grad.{mname}.lora_magnitude_vector"))
        for k, key in pairs:
            g_ref = t[key]
            err = (a[k].grad - g_ref).abs().max().item() / max(g_ref.abs().max().item(), 1e-12)
            worst = max(worst, err)
            assert err < 1e-4, f"{name}: {key} relative error {err}"
    print(f"  [{name}] sanity ok: loss {t['loss'].item():.6f}, manual logits max|d| {dl:.2e}, "
          f"grads max rel err {worst:.2e}"
          + (f", double-quant codes off the true nearest (near-tie) {dq_near_ties}/{n_dq_codes}" if n_dq_codes else ""),
          flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "fixtures")))
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()

    torch.set_num_threads(1)  # deterministic reduction order
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    os.makedirs(args.out, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"bitsandbytes {bnb.__version__}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="tunec-llama-ref-") as tmproot:
        for name in args.cases:
            results.append(make_case(name, CASES[name], args.out, tmproot))
    for r in results:
        print(f"{r['case']:12s} loss {r['loss']:.6f}  {r['bytes']:7d} bytes  {r['tensors']:4d} tensors  {r['path']}")


if __name__ == "__main__":
    sys.exit(main())
