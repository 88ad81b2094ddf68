#!/usr/bin/env python3
"""The PyTorch peer in tunec's GPU benchmark: QLoRA training steps of HF transformers + PEFT + bitsandbytes.

What it measures: the wall time of whole training steps (forward, loss, backward, clip_grad_norm_ 1.0, AdamW lr 2e-4,
zero_grad) on a Llama-2-7B-shaped model with random weights, one timing per micro-batch x sequence-length config,
with the device synchronized before each clock read. The base model is built directly on the device in the compute
dtype (HF weight init skipped, parameters drawn from N(0, 0.02), norms 1); every q/k/v/o/gate/up/down projection is
then replaced by a bitsandbytes nf4 Linear4bit (double quantization, compute dtype as given) quantized on the device.
Embedding, norms and lm_head stay dense and frozen. LoRA (PEFT, task CAUSAL_LM) goes on all 7 projections; PEFT
keeps the adapter weights in f32. `use_cache` is off (a training run). prepare_model_for_kbit_training is only called
with --gradient-checkpointing, which is then enabled the standard QLoRA way: prepare_model_for_kbit_training(
use_gradient_checkpointing=True, use_reentrant=False); note that it also upcasts the dense frozen weights (embedding,
norms, lm_head) to f32, as it does in every QLoRA recipe that uses it.

Per config: median / min step seconds, tokens/s (B*T / median), peak device memory (max allocated and max reserved
since the config started, GiB; null on the CPU), final loss, and MFU:

    FLOPs per step = tokens * (4*N + 12*L*d*T)

N = parameters of the base model's linear layers including lm_head (the frozen matmul weights; embedding excluded),
L layers, d hidden size, T sequence length: forward 2N + backward-dX 2N for the frozen base, attention forward 4*L*d*T
plus backward 8*L*d*T per token (the PaLM accounting; LoRA's own FLOPs and checkpointing recompute are not counted).
MFU = FLOPs per step / median step seconds / peak, against two peaks: the nominal dense bf16 peak of the device
(from its name; null when unknown) and a measured one (best of timed 8192x8192 bf16 matmuls; on the CPU a 1024x1024
f32 matmul, just so the field is filled). The measured copy bandwidth (device-to-device, read + write bytes) is the
floor reference for memory-bound work. A config that fails (e.g. out of memory) is reported and the others still run.

    python tests/bench/gpu_qlora_step.py --json target/bench/qlora_gpu.json                 # H100, 7B, bf16
    OMP_NUM_THREADS=2 python tests/bench/gpu_qlora_step.py --device cpu --shape tiny --configs 2x32,1x64
"""
import argparse, contextlib, gc, json, os, platform, statistics, sys, time, traceback

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=False, max_position_embeddings=4096),
    # examples/tiny.qlora.rs's model (scripts/gpu-check.sh --smoke times both on it).
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 max_position_embeddings=4096),
}
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
# Nominal dense (no sparsity) bf16 tensor-core peaks, FLOP/s, matched in order against torch.cuda.get_device_name().
NOMINAL_BF16_PEAKS = [("H100 PCIe", 756.5e12), ("H100 NVL", 835.5e12), ("H200 NVL", 835.5e12),
                      ("H100", 989.4e12), ("H200", 989.4e12)]
MFU_DEFINITION = ("FLOPs/step = B*T*(4*N + 12*L*d*T), N = base linear params incl. lm_head (embedding excluded); "
                  "MFU = FLOPs/step / median step s / peak FLOP/s")
GiB = 1024 ** 3

try:
    from transformers.initialization import no_init_weights  # transformers >= 5
except ImportError:
    from transformers.modeling_utils import no_init_weights  # transformers 4.x


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device, reps, tries=5):
    """Best per-call seconds of `reps` back-to-back calls of fn, over `tries` timings (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(tries):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def measure_peaks(device):
    """Measured matmul FLOP/s and copy bandwidth of the device, taken before the model is built."""
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    mm_s = best_time(lambda: torch.matmul(a, b, out=c), device, reps=10 if cuda else 3)
    del a, b, c
    nbytes = GiB if cuda else 64 * 2 ** 20
    src = torch.empty(nbytes, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_s = best_time(lambda: dst.copy_(src), device, reps=10 if cuda else 3)
    del src, dst
    nominal = None
    if cuda:
        name = torch.cuda.get_device_name(device)
        nominal = next((peak for key, peak in NOMINAL_BF16_PEAKS if key in name), None)
    return {"nominal_bf16_flops": nominal,
            "measured_matmul_flops": 2 * n ** 3 / mm_s,
            "measured_matmul": f"{'bf16' if cuda else 'f32'} {n}x{n} @ {n}x{n}, best of 5",
            "measured_copy_GBps": 2 * nbytes / copy_s / 1e9,
            "measured_copy": f"{nbytes // 2 ** 20} MiB device-to-device copy_, read + write bytes, best of 5"}


def build(args, device, dtype):
    """The QLoRA model: dense Llama on the device, targeted projections to nf4, LoRA on top. Returns (model, N)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[args.shape], attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(args.seed)
    # Allocated straight on the device in the compute dtype with HF/torch init skipped (so the memory is
    # uninitialised), then filled on the device: the 7B model builds in seconds without touching host RAM.
    with torch.device(device), default_dtype(dtype), no_init_weights():
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
            else:
                p.fill_(1.0)  # RMSNorm weights
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))

    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS and isinstance(m, torch.nn.Linear)]
    for name in names:
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        dense = getattr(parent, child)
        q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
        # Params4bit.to(device) quantizes on the device; the dense weight goes once `dense` is dropped.
        q.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", module=q).to(device)
        setattr(parent, child, q)
        del dense
    # What from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True)) sets; PEFT reads it to wrap the
    # Linear4bit layers with its bnb LoRA layer (without it they would get the generic nn.Linear one).
    model.is_loaded_in_4bit = True
    model.requires_grad_(False)
    if args.gradient_checkpointing:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=TARGETS,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    return model, n_linear


def run_config(model, trainable, batch, seq, args, device, vocab):
    """Times warmup + steps training steps on one seeded random batch; returns (step seconds, final loss)."""
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times, loss.item()


def parse_configs(s):
    """'4x512,1x2048' -> [(4, 512), (1, 2048)]."""
    out = []
    for item in s.split(","):
        try:
            b, t = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad config {item!r}: expected BxT, e.g. 4x512")
        if b < 1 or t < 1:
            raise argparse.ArgumentTypeError(f"bad config {item!r}: B and T must be positive")
        out.append((b, t))
    return out


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype")
    ap.add_argument("--configs", type=parse_configs, default="4x512,1x2048", help="comma list of BxT")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per config")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per config before the measured ones")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="prepare_model_for_kbit_training with gradient checkpointing (use_reentrant=False)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="target/bench/qlora_gpu.json")
    args = ap.parse_args()

    import bitsandbytes, peft, transformers

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cuda = device.type == "cuda"
    device_name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    shape = SHAPES[args.shape]
    L, d, vocab = shape["num_hidden_layers"], shape["hidden_size"], shape["vocab_size"]

    peaks = measure_peaks(device)
    nominal, measured = peaks["nominal_bf16_flops"], peaks["measured_matmul_flops"]
    t0 = time.perf_counter()
    model, n_linear = build(args, device, dtype)
    sync(device)
    build_s = time.perf_counter() - t0
    model_mem = torch.cuda.memory_allocated(device) / GiB if cuda else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    print(f"{device_name}: {args.shape} QLoRA nf4, {args.dtype}, r={args.rank} alpha={args.alpha} "
          f"dropout={args.dropout:g}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; "
          f"built in {build_s:.1f} s, model {fmt(model_mem, '.2f')} GiB, trainable {n_trainable}",
          flush=True)

    rows = []
    for batch, seq in args.configs:
        for p in trainable:  # a failed config may have left gradients behind
            p.grad = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        row = {"batch": batch, "seq": seq, "tokens": batch * seq, "steps": args.steps, "error": None}
        try:
            times, loss = run_config(model, trainable, batch, seq, args, device, vocab)
        except Exception as e:  # noqa: BLE001 - e.g. torch.OutOfMemoryError: record it and go on with the next config
            if not isinstance(e, torch.OutOfMemoryError):
                traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"{batch}x{seq}: {row['error']}", flush=True)
        else:
            med = statistics.median(times)
            flops = batch * seq * (4 * n_linear + 12 * L * d * seq)
            row.update({"median_s": med, "min_s": min(times), "max_s": max(times), "step_s": times,
                        "tokens_per_s": batch * seq / med, "final_loss": loss, "flops_per_step": flops,
                        "model_tflops_per_s": flops / med / 1e12,
                        "mfu_nominal": flops / med / nominal if nominal else None,
                        "mfu_measured": flops / med / measured})
            print(f"{batch}x{seq}: median {med:.4f} s, {batch * seq / med:.1f} tok/s, loss {loss:.4f}", flush=True)
        row["peak_allocated_GiB"] = torch.cuda.max_memory_allocated(device) / GiB if cuda else None
        row["peak_reserved_GiB"] = torch.cuda.max_memory_reserved(device) / GiB if cuda else None
        rows.append(row)

    print(f"\nMFU: {MFU_DEFINITION}")
    print(f"peaks: nominal bf16 {fmt(nominal / 1e12 if nominal else None, '.1f')} "
          f"TFLOP/s, measured matmul {measured / 1e12:.2f} TFLOP/s ({peaks['measured_matmul']}), "
          f"copy {peaks['measured_copy_GBps']:.1f} GB/s")
    head = (f"{'BxT':>9} {'median s':>9} {'min s':>9} {'tok/s':>9} {'alloc GiB':>9} {'resv GiB':>9} {'loss':>7} "
            f"{'TFLOP/s':>8} {'MFU nom':>8} {'MFU meas':>8}")
    print(head)
    for r in rows:
        cfg = f"{r['batch']}x{r['seq']}"
        mem = f"{fmt(r['peak_allocated_GiB'], '9.2f'):>9} {fmt(r['peak_reserved_GiB'], '9.2f'):>9}"
        if r["error"]:
            print(f"{cfg:>9} {'-':>9} {'-':>9} {'-':>9} {mem}  {r['error'][:80]}")
            continue
        print(f"{cfg:>9} {r['median_s']:9.4f} {r['min_s']:9.4f} {r['tokens_per_s']:9.1f} {mem} {r['final_loss']:7.4f} "
              f"{r['model_tflops_per_s']:8.2f} {fmt(r['mfu_nominal'], '8.1%'):>8} {r['mfu_measured']:8.1%}")

    out = {"peer": "pytorch+peft+bitsandbytes (QLoRA nf4)", "device": device_name, "device_type": device.type,
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
           "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "python": platform.python_version(),
           "shape": args.shape, "model": {**shape, "base_linear_params": n_linear,
                                          "trainable_params": n_trainable},
           "settings": {"dtype": args.dtype, "rank": args.rank, "alpha": args.alpha, "dropout": args.dropout,
                        "target_modules": TARGETS, "quant": "nf4, double quantization",
                        "lora_dtype": str(trainable[0].dtype).removeprefix("torch."), "attn": "sdpa",
                        "gradient_checkpointing": args.gradient_checkpointing,
                        "prepare_model_for_kbit_training": args.gradient_checkpointing,
                        "optimizer": "AdamW lr 2e-4", "clip_grad_norm": 1.0, "steps": args.steps,
                        "warmup": args.warmup, "seed": args.seed},
           "build_s": build_s, "model_memory_GiB": model_mem,
           "mfu_definition": MFU_DEFINITION, "peaks": peaks, "results": rows}
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json}")
    return 0 if any(r["error"] is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
