#!/usr/bin/env bash
# The GPU check (issue 6), one script on the GPU host, under 8 minutes on one H100. Run it from the repository root
# with target/gpu-carry/ built by scripts/gpu-prepare.sh on the build machine (the GPU host needs no Rust toolchain):
#   (a) kernels: every kernel of the tiny LoRA/QLoRA/DoRA/QDoRA steps on the GPU vs the reference interpreter
#       (gpu_check: pass/fail, max relative error), and the 7B QLoRA step (r=16, 4x512) on the cuda backend vs the
#       cpu backend — every kernel of the 7B plan at its real shapes, compared through the step's loss and every
#       trainable parameter and optimizer state (cuda_step, 1 step);
#   (b) speed: QLoRA on the Llama-2-7B shape (r=16 on all linear layers, micro-batch 4 x 512 and 1 x 2048) — ours
#       (`tunec-runner bench --backend cuda --profile`, seeded random weights, the last step timed kernel by kernel
#       to show where it goes; plans with f32 SIMT GEMMs and with bf16
#       tensor-core GEMMs) vs PyTorch + transformers + PEFT + bitsandbytes (tests/bench/gpu_qlora_step.py, bf16
#       compute) in the same run: tokens/s, step time, MFU, device memory, ratio.
# A plan is native code: the plans were signed on the build machine with its key, so this host trusts each one only
# after checking it against plans.sha256 (`tunec-runner trust --sha256`, into a config dir of this run's own,
# TUNEC_HOME=target/gpu-work/tunec-home); a plan whose digest differs stops the script.
# Prints a table at the end and writes every number to the JSON file --json names. Each part has a time limit
# (`timeout`; exit 124 in its log) so the whole stays under 8 minutes; a part cut off shows as missing numbers.
#
# Usage: scripts/gpu-check.sh [--json PATH] [--steps N] [--smoke]
#   --smoke   no GPU: the same pipeline on the CPU with examples/tiny.qlora.rs's model (our cpu backend; the PyTorch
#             baseline with --device cpu --shape tiny, r=4, f32); builds what it needs here. This is how the script is
#             tested without a GPU; its numbers say nothing about GPU speed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
json=target/bench/gpu_check.json
steps=3
smoke=0
while [ $# -gt 0 ]; do
  case "$1" in
    --json) json="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --smoke) smoke=1; shift ;;
    *) echo "usage: scripts/gpu-check.sh [--json PATH] [--steps N] [--smoke]" >&2; exit 2 ;;
  esac
done
carry=target/gpu-carry
work=target/gpu-work
rm -rf "$work" && mkdir -p "$work" "$(dirname "$json")"
t_start=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - t_start )) s]"; }
# Trusts every plan of a sha256sum list (DIR LIST) in this run's config dir, checking each digest; stops on a mismatch.
export TUNEC_HOME="$PWD/$work/tunec-home"
trust_plans() {
  local sum name
  [ -f "$2" ] || { echo "error: $2 missing: run scripts/gpu-prepare.sh again (it lists the plans' SHA-256)" >&2; exit 2; }
  while read -r sum name; do
    "$runner" trust --sha256 "$sum" --note "gpu-check: $name" "$1/${name#\*}" >/dev/null \
      || { echo "error: $1/${name#\*}: not trusted (see above); not running it" >&2; exit 2; }
  done < "$2"
  echo "trusted $(wc -l < "$2") plans after checking their SHA-256 ($2)"
}

if [ "$smoke" = 1 ]; then
  source scripts/env.sh
  cargo build --release -q -p tunec -p runtime --bins
  runner=target/release/tunec-runner
  mkdir -p "$work/plans"
  # As on a GPU host: the plans are signed with another key (the "build machine's" config dir), then trusted by digest.
  build_home="$PWD/$work/build-home"
  TUNEC_HOME="$build_home" target/release/tunec compile examples/tiny.qlora.rs --target cpu \
    -o "$work/plans/tiny.qlora.plan" 2>&1 | grep -E "^wrote"
  TUNEC_HOME="$build_home" target/release/tunec compile examples/tiny.qlora.rs --target cpu --gemm-precision bf16 \
    -o "$work/plans/tiny.qlora.bf16.plan" 2>&1 | grep -E "^wrote"
  (cd "$work/plans" && sha256sum -- *.plan) > "$work/plans.sha256"
  trust_plans "$work/plans" "$work/plans.sha256"
  plans=("$work/plans/tiny.qlora.plan" "$work/plans/tiny.qlora.bf16.plan")
  backend=cpu
  venv="${TUNEC_REF_VENV:-$HOME/.cache/tunec/ref-venv}"
  [ -x "$venv/bin/python" ] || tests/bench/run.sh --help >/dev/null
  python="$venv/bin/python"
  peft_args=(--device cpu --shape tiny --configs 2x8 --rank 4 --dropout 0 --dtype f32)
  export OMP_NUM_THREADS=2
else
  [ -d "$carry" ] || { echo "error: $carry missing: run scripts/gpu-prepare.sh on the build machine and carry it" >&2; exit 2; }
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  runner="$carry/tunec-runner"
  trust_plans "$carry/plans" "$carry/plans.sha256"
  # bf16 tensor cores at both shapes and with per-block recompute; f32 SIMT is timed by cuda_step (the time budget).
  plans=("$carry"/plans/*.bf16.plan "$carry"/plans/*.bf16.recompute.plan)
  backend=cuda
  python=python3
  mkdir -p "$work/site" && tar xzf "$carry/bnb.tgz" -C "$work/site"
  # bitsandbytes 0.50 loads the library of torch's CUDA version, else the nearest of the same major version.
  export PYTHONPATH="$PWD/$work/site${PYTHONPATH:+:$PYTHONPATH}"
  peft_args=(--device cuda --shape 7b --configs 4x512,1x2048)

  echo "== (a) kernels: tiny recipes on the GPU vs the interpreter $(elapsed)"
  tar xzf "$carry/gpucheck.tgz" -C "$work"
  timeout 60 "$carry/gpu_check" "$work/gpucheck" > "$work/gpu_check.txt" 2>&1
  echo "gpu_check exit $?" >> "$work/gpu_check.txt"
  grep -E "^device|FAIL|ERROR|passed|exit" "$work/gpu_check.txt"
  echo "== (a) the 7B QLoRA step (4x512) on the cuda backend vs the cpu backend $(elapsed)"
  timeout 150 "$carry/cuda_step" "$carry/plans/llama2-7b.qlora.r16.4x512.plan" 1 > "$work/cuda_step_7b.txt" 2>&1
  echo "cuda_step exit $?" >> "$work/cuda_step_7b.txt"
  grep -vE "^  " "$work/cuda_step_7b.txt" | tail -20
fi

echo "== (b) ours: tunec-runner bench --backend $backend $(elapsed)"
for p in "${plans[@]}"; do
  name=$(basename "$p" .plan)
  timeout 50 "$runner" bench "$p" --backend "$backend" --steps "$steps" --warmup 1 --profile --json "$work/ours_$name.json" 2>&1 \
    | tee "$work/ours_$name.txt"
done
echo "== (b) PyTorch + transformers + PEFT + bitsandbytes $(elapsed)"
timeout 140 "$python" tests/bench/gpu_qlora_step.py "${peft_args[@]}" --steps "$steps" --warmup 1 --json "$work/peft.json" 2>&1 \
  | tee "$work/peft.txt" | grep -vE "Failed to load CPU gemm_4bit_forward"

echo "== summary $(elapsed)"
"$python" - "$work" "$json" "$smoke" <<'PY'
import glob, json, os, re, subprocess, sys, datetime
work, out, smoke = sys.argv[1], sys.argv[2], sys.argv[3] == "1"

def text(name):
    p = os.path.join(work, name)
    return open(p).read() if os.path.exists(p) else None

summary = {"date": datetime.date.today().isoformat(), "smoke": smoke}
try:
    summary["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or None
except OSError:
    summary["commit"] = None
kern = text("gpu_check.txt")
if kern is not None:
    m = re.search(r"(\d+) passed, (\d+) failed", kern)
    rels = [float(x) for x in re.findall(r"\s([0-9.]+e[-+]\d+)\s+(?:pass|FAIL)", kern)]
    summary["tiny_kernels"] = {"passed": int(m.group(1)) if m else None, "failed": int(m.group(2)) if m else None,
                               "max_rel_err": max(rels) if rels else None}
ours = {}
step = text("cuda_step_7b.txt")
if step is not None:
    m = re.search(r"(\d+) with elements outside", step)
    absd = [float(x) for x in re.findall(r"^\S+\s+\d+\s+([0-9.]+e[-+]\d+)", step, re.M)]
    t = re.search(r"median ([0-9.]+) ms \(min [0-9.]+ ms\), ([0-9.]+) tokens/s", step)
    if t:
        ours[("4x512", "f32")] = {"median_s": float(t.group(1)) / 1e3, "tokens_per_s": float(t.group(2)),
                                  "source": "cuda_step (5 timed steps)"}
    summary["step_7b_cuda_vs_cpu"] = {"pass": "PASS: cuda matches cpu" in step,
                                      "tensors_outside_tolerance": int(m.group(1)) if m else None,
                                      "max_abs_diff": max(absd) if absd else None}
for f in sorted(glob.glob(os.path.join(work, "ours_*.json"))):
    d = json.load(open(f))
    r = d["results"][0]
    base = os.path.basename(d["plan"])
    prec = ("bf16" if ".bf16." in base else "f32") + ("+rc" if ".recompute." in base else "")
    ours[(f"{d['micro_batch']}x{d['seq_len']}", prec)] = {**r, "plan": d["plan"], "recipe": d["recipe"], "gemm": prec}
peft = json.load(open(os.path.join(work, "peft.json"))) if os.path.exists(os.path.join(work, "peft.json")) else {}
peft_rows = {}
for r in peft.get("results", []):
    peft_rows[f"{r.get('batch')}x{r.get('seq')}"] = r
summary["ours"], summary["peft"] = {f"{c} {p}": v for (c, p), v in ours.items()}, peft

def g(d, *keys):
    for k in keys:
        if isinstance(d, dict) and d.get(k) is not None:
            return d[k]
    return None

rows = []
print(f"{'config':<9} {'gemm':<5} {'ours tok/s':>11} {'peft tok/s':>11} {'ratio':>6} {'ours s':>8} {'peft s':>8} "
      f"{'ours MFU':>9} {'peft MFU':>9} {'ours GiB':>9} {'peft GiB':>9}")
keys = sorted(set(ours) | {(c, "f32") for c in peft_rows if not any(k[0] == c for k in ours)})
for cfg, prec in keys:
    o, p = ours.get((cfg, prec), {}), peft_rows.get(cfg, {})
    ot, pt = g(o, "tokens_per_s"), g(p, "tokens_per_s", "tok_per_s")
    ratio = ot / pt if ot and pt else None
    om, pm = g(o, "mfu_nominal"), g(p, "mfu_nominal")
    # Ours: the device memory the backend allocated (all of its buffers); PyTorch: the peak of allocated tensors.
    ogib = (g(o, "allocated_bytes") or 0) / 2**30 or None
    pgib = g(p, "peak_allocated_GiB")
    fmt = lambda x, f: ("-" if x is None else format(x, f))
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    print(f"{cfg:<9} {prec:<5} {fmt(ot, '11.1f')} {fmt(pt, '11.1f')} {fmt(ratio, '6.2f')} {fmt(g(o, 'median_s'), '8.3f')} "
          f"{fmt(g(p, 'median_s'), '8.3f')} {pct(om):>9} {pct(pm):>9} "
          f"{fmt(ogib, '9.2f')} {fmt(pgib, '9.2f')}")
    rows.append({"config": cfg, "ours_gemm": prec, "ours_tokens_per_s": ot, "peft_tokens_per_s": pt, "ratio": ratio,
                 "ours_mfu": om, "peft_mfu": pm, "ours_allocated_gib": ogib, "peft_peak_allocated_gib": pgib,
                 "ours_peak_in_use_gib": (g(o, "peak_in_use_bytes") or 0) / 2**30 or None,
                 "peft_peak_reserved_gib": g(p, "peak_reserved_GiB"), "peft_error": g(p, "error")})
summary["table"] = rows
if "tiny_kernels" in summary:
    k = summary["tiny_kernels"]
    print(f"tiny-recipe kernels on the GPU: {k['passed']} passed, {k['failed']} failed, max rel err {k['max_rel_err']}")
if "step_7b_cuda_vs_cpu" in summary:
    s = summary["step_7b_cuda_vs_cpu"]
    print(f"7B step cuda vs cpu: {'PASS' if s['pass'] else 'FAIL'}, max abs diff {s['max_abs_diff']}")
json.dump(summary, open(out, "w"), indent=2)
print(f"wrote {out}")
PY
echo "done $(elapsed)"
