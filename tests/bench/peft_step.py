#!/usr/bin/env python3
"""The peer in tunec's CPU benchmark: one PyTorch + PEFT (+ bitsandbytes) training step on the SmolLM2-135M shape.

LoRA r=16 (alpha 32, dropout 0.05) on all 7 linear modules, micro-batch 4 x 256 tokens, f32, AdamW, on the CPU
with a fixed number of threads; random weights (the shape is what costs, not the values). QLoRA: the linear layers
as bitsandbytes nf4 with double quantization and f32 compute. Prints a table and writes JSON.

    tests/bench/run.sh            # sets up the venv and runs this with 2 threads
"""
import argparse, json, os, platform, statistics, sys, time

import torch


def build(quant: bool, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, max_position_embeddings=2048, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    if quant:
        import bitsandbytes as bnb
        from peft import prepare_model_for_kbit_training  # noqa: F401  (not used: we keep f32 everywhere)

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        for name, mod in list(model.named_modules()):
            for t in targets:
                if name.endswith(t) and isinstance(mod, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=torch.float32,
                                          compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4")
                    q = q.to("cpu")
                    parent = model.get_submodule(name.rsplit(".", 1)[0])
                    setattr(parent, t, q)
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    return model


def step_times(model, batch: int, seq: int, steps: int, warmup: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49152, (batch, seq), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return times, loss.item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--which", nargs="+", default=["lora", "qlora"])
    ap.add_argument("--json", default="target/bench/peft_cpu.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import peft, transformers
    rows = []
    for which in a.which:
        model = build(which == "qlora", 0)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        times, loss = step_times(model, a.batch, a.seq, a.steps, a.warmup, 1)
        tokens = a.batch * a.seq
        med = statistics.median(times)
        rows.append({"case": which, "median_s": med, "min_s": min(times), "max_s": max(times), "steps": a.steps,
                     "tokens_per_s": tokens / med, "trainable_params": trainable, "final_loss": loss})
        print(f"{which:<6} median {med:7.3f} s  min {min(times):7.3f}  max {max(times):7.3f}  "
              f"{tokens / med:7.1f} tok/s  trainable {trainable}", flush=True)
        del model
    out = {"peer": "pytorch+peft" + ("+bitsandbytes" if "qlora" in a.which else ""), "threads": a.threads,
           "batch": a.batch, "seq": a.seq, "torch": torch.__version__, "peft": peft.__version__,
           "transformers": transformers.__version__, "machine": platform.processor() or platform.machine(),
           "results": rows}
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    sys.exit(main())
