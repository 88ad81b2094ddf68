#!/usr/bin/env python3
"""Checks that an adapter saved by tunec loads into Hugging Face PEFT and reproduces tunec's logits.

Usage (the Rust test `tests/tests/peft_adapter.rs` writes the directory and runs this with the reference venv):

    ~/.cache/tunec/ref-venv/bin/python tests/reference/check_adapter.py DIR

DIR holds
  base/     the base model as a Hugging Face directory: config.json + model.safetensors (f32);
  adapter/  what tunec's training run wrote: adapter_config.json + adapter_model.safetensors;
  ids.json  {"quant": "nf4" | null, "input_ids": [[...]], "logits_shape": [B, T, V], "logits": [flat f32]}:
            the token batch and tunec's logits for it (reference interpreter, base + trained adapter).

The script
  1. loads the base with transformers (f32, eager attention; with "quant": "nf4" through BitsAndBytesConfig:
     nf4, double quant, f32 compute — the QLoRA path) and requires 0 missing / 0 unexpected base keys;
  2. loads the adapter the way users do, `PeftModel.from_pretrained(base, DIR/adapter)`, and counts
       missing    — adapter parameters of the PEFT model (`get_peft_model_state_dict`, the saved form) absent from
                    the file, plus what PEFT itself reports missing (`from_pretrained`'s warning / load result);
       unexpected — file keys that the PEFT model has no parameter for (`set_peft_model_state_dict`'s
                    `unexpected_keys`, plus the set difference), shape mismatches included;
     and checks that every loaded tensor equals the file's bit for bit;
  3. runs the model (eval mode, no grad, dropout off) on the ids and compares with tunec's logits:
     rel_err = max|ours − peft| / max|peft| ≤ 1e-4. It also reports how far the adapter moves the logits
     (adapter_effect, against the base with the adapter disabled) and requires it to be clearly non-zero, so a
     silently ignored adapter cannot pass.

Prints one JSON line (prefixed "check_adapter: ") and exits 1 when any check fails, 2 on a usage error.

bitsandbytes caveat (see tests/reference/README.md): in eval mode with no grad, on a CPU with AVX512-BF16,
`Linear4bit.forward` repacks the weight and runs a bf16 kernel. The script turns that path off per layer
(`support_avx512bf16_for_cpu = False`), so the 4-bit base term is `x · dequant(W)ᵀ` in f32 as in training.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

import peft
import transformers
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from safetensors import safe_open
from transformers import BitsAndBytesConfig, LlamaForCausalLM

TOL = 1e-4
MIN_EFFECT = 1e-3  # the trained adapter must move the logits by at least this (relative)
PREFIX = "base_model.model."


def load_base(base_dir: Path, quant: str | None):
    kwargs = dict(dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        kwargs["device_map"] = "cpu"
    elif quant is not None:
        raise SystemExit(f"check_adapter: unknown quant {quant!r}")
    model, info = LlamaForCausalLM.from_pretrained(str(base_dir), **kwargs)
    keys = ("missing_keys", "unexpected_keys", "mismatched_keys")
    problems = {k: sorted(map(str, v)) for k, v in info.items() if k in keys and v}
    return model, problems


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(sys.argv[1])
    spec = json.loads((root / "ids.json").read_text())
    quant = spec.get("quant")
    adapter_dir = root / "adapter"
    torch.manual_seed(0)

    base, base_problems = load_base(root / "base", quant)
    n4bit = 0
    if quant == "nf4":
        import bitsandbytes as bnb

        for name, m in base.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                n4bit += 1
                qs = m.weight.quant_state
                assert qs.quant_type == "nf4" and qs.nested and qs.blocksize == 64, name
                assert m.compute_dtype == torch.float32, name
                m.support_avx512bf16_for_cpu = False  # see the module docs: keep the f32 dequantize + matmul path

    # 2. PEFT's own loader, warnings recorded (from_pretrained warns about missing keys rather than returning them).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    missing_warnings = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]

    file_sd = load_peft_weights(str(adapter_dir), device="cpu")
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        raw_keys = set(f.keys())
    # save_embedding_layers=False: no Hub lookup of the base model (the tiny base has no name there).
    model_sd = get_peft_model_state_dict(model, save_embedding_layers=False)  # the adapter parameters as saved
    missing = set(model_sd) - raw_keys
    unexpected = raw_keys - set(model_sd)
    # The loader's own verdict, on a fresh load of the same file (loads the same values again). Its keys name the
    # adapter (`…lora_A.default.weight`, `…lora_magnitude_vector.default.weight`): map them back to the saved form.
    load_result = set_peft_model_state_dict(model, file_sd, adapter_name="default")

    def saved_form(k: str) -> str:
        k = k.replace(".default", "")
        return k[: -len(".weight")] if k.endswith("lora_magnitude_vector.weight") else k

    missing |= {saved_form(k) for k in load_result.missing_keys if "lora_" in k}
    unexpected |= {k.replace(".default", "") for k in load_result.unexpected_keys}
    missing = sorted(missing)
    unexpected = sorted(unexpected)
    if missing_warnings and not missing:
        missing = [f"(from_pretrained warning) {m}" for m in missing_warnings]

    # Every parameter PEFT holds equals the file's tensor (shape and values).
    after = get_peft_model_state_dict(model, save_embedding_layers=False)
    value_mismatch = []
    for k, v in after.items():
        if k in file_sd and (v.shape != file_sd[k].shape or not torch.equal(v.float().cpu(), file_sd[k].float())):
            value_mismatch.append(k)
    cfg = model.peft_config["default"]
    wrapped = sum(1 for _, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))

    # 3. Logits.
    ids = torch.tensor(spec["input_ids"], dtype=torch.int64)
    ours = torch.tensor(spec["logits"], dtype=torch.float64).reshape(spec["logits_shape"])
    model.eval()
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    with torch.no_grad():
        peft_logits = model(input_ids=ids).logits.double()
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits.double()
    scale = peft_logits.abs().max().item()
    rel_err = (ours - peft_logits).abs().max().item() / scale
    effect = (peft_logits - base_logits).abs().max().item() / scale

    ok = (
        not base_problems
        and not missing
        and not unexpected
        and not value_mismatch
        and rel_err <= TOL
        and effect >= MIN_EFFECT
        and wrapped > 0
        and len(file_sd) > 0
    )
    report = {
        "ok": ok,
        "missing": len(missing),
        "unexpected": len(unexpected),
        "rel_err": rel_err,
        "adapter_effect": effect,
        "adapter_tensors": len(raw_keys),
        "peft_lora_layers": wrapped,
        "bnb_4bit_layers": n4bit,
        "use_dora": cfg.use_dora,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "dropout_p": sorted(set(dropouts)),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    if missing:
        report["missing_keys"] = missing
    if unexpected:
        report["unexpected_keys"] = unexpected
    if value_mismatch:
        report["value_mismatch"] = value_mismatch
    if base_problems:
        report["base_load"] = base_problems
    print("check_adapter: " + json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
