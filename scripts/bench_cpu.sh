#!/usr/bin/env bash
# The CPU training-step benchmark (issue 4): SmolLM2-135M shape, LoRA r=16 on all 7 linear modules (and QLoRA: NF4
# with double quantization, f32 compute), micro-batch 4 x 256 tokens, f32, 2 threads, random weights:
#   tunec's cpu backend (the plan's generated host code)  vs  the reference interpreter (one step)
#   vs  PyTorch + PEFT (+ bitsandbytes for QLoRA) on the same shapes and threads (tests/bench/run.sh, its own venv).
# Run side by side on an otherwise idle machine. Prints a table and writes target/bench/cpu_step.json.
# Usage: scripts/bench_cpu.sh [steps] [--no-interp]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
steps="${1:-3}"
interp=1; [ "${2:-}" = "--no-interp" ] && interp=0
threads="${THREADS:-2}"
mkdir -p target/bench
bin=target/release/tunec
declare -A ours interp_s peer
for case in lora qlora; do
  plan="target/bench/smollm2-135m.$case.plan.bin"
  "$bin" compile "examples/smollm2-135m.$case.rs" --target cpu -o "$plan" 2>&1 | grep -E "^(codegen|wrote)" || true
  backends=(--backend cpu); [ "$interp" = 1 ] && backends+=(--backend interp)
  "$bin" bench "$plan" "${backends[@]}" --steps "$steps" --warmup 1 --threads "$threads" \
    --json "target/bench/tunec_$case.json" | tee "target/bench/tunec_$case.txt"
  ours[$case]=$(awk '$1 == "cpu" { print $4 }' "target/bench/tunec_$case.txt")
  interp_s[$case]=$(awk '$1 == "interp" { print $4 }' "target/bench/tunec_$case.txt")
done
THREADS="$threads" tests/bench/run.sh --steps "$steps" --json target/bench/peft_cpu.json | tee target/bench/peft_cpu.txt
for case in lora qlora; do
  peer[$case]=$(awk -v c="$case" '$1 == c { print $3 }' target/bench/peft_cpu.txt)
done
echo
printf '%-6s %14s %16s %18s %8s\n' case tunec_cpu_s interpreter_s pytorch_peft_s ratio
rows=()
for case in lora qlora; do
  o=${ours[$case]}; i=${interp_s[$case]:-}; p=${peer[$case]}
  ratio=$(awk -v o="$o" -v p="$p" 'BEGIN { printf "%.3f", o / p }')
  printf '%-6s %14s %16s %18s %8s\n' "$case" "$o" "${i:-n/a}" "$p" "$ratio"
  rows+=("{\"case\": \"$case\", \"tunec_cpu_s\": $o, \"interpreter_s\": ${i:-null}, \"pytorch_peft_s\": $p, \"ratio\": $ratio}")
done
{
  echo "{\"date\": \"$(date -u +%F)\", \"commit\": \"$(git rev-parse --short HEAD)\", \"threads\": $threads, \"steps\": $steps,"
  echo " \"shape\": \"SmolLM2-135M, LoRA r=16 on all linear layers, 4x256 tokens, f32\","
  echo " \"results\": [$(IFS=,; echo "${rows[*]}")]}"
} > target/bench/cpu_step.json
echo "wrote target/bench/cpu_step.json (ratio = tunec cpu step time / PyTorch+PEFT step time; goal <= 0.7)"
