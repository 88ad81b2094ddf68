#!/usr/bin/env bash
# Compile-time benchmark: wall time of `tunec compile <recipe> --emit none` (the whole process: start-up, DSL,
# all passes, verification after each) and of the full compile `tunec compile <recipe> -o plan.bin` (plus code
# generation: PTX for sm_80 and sm_90, the host library, the plan written), N runs per recipe. Prints a table and
# writes JSON.
# Usage: scripts/bench_compile.sh [runs] [out.json]   (expects target/release/tunec; `make bench` builds it)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs="${1:-10}"
out="${2:-target/bench/compile.json}"
bin=target/release/tunec
mkdir -p "$(dirname "$out")"
recipes=(examples/llama2-7b.qlora.rs examples/llama2-7b.lora.rs examples/smollm2-135m.lora.rs examples/tiny.lora.rs)
printf '%-34s %6s %10s %10s %10s %8s %14s %12s\n' recipe runs median_ms min_ms max_ms nodes full_median_ms full_max_ms
echo "{\"runs\": $runs, \"commit\": \"$(git rev-parse --short HEAD)\", \"date\": \"$(date -u +%F)\", \"results\": [" > "$out"
first=1
for r in "${recipes[@]}"; do
  times=()
  for _ in $(seq "$runs"); do
    t0=$(date +%s%N)
    summary=$("$bin" compile "$r" --emit none 2>&1 >/dev/null)
    summary=${summary%%$'\n'*}
    t1=$(date +%s%N)
    times+=($(( (t1 - t0) / 1000 )))
  done
  full=()
  plan=$(mktemp -d)/plan.bin
  for _ in $(seq "$runs"); do
    t0=$(date +%s%N)
    "$bin" compile "$r" -o "$plan" >/dev/null 2>&1
    t1=$(date +%s%N)
    full+=($(( (t1 - t0) / 1000 )))
  done
  rm -rf "$(dirname "$plan")"
  fsorted=($(printf '%s\n' "${full[@]}" | sort -n))
  fmed=${fsorted[$(( runs / 2 ))]}; fmax=${fsorted[$(( runs - 1 ))]}
  nodes=$(sed -E 's/.*-> ([0-9]+) training-step nodes.*/\1/' <<<"$summary")
  sorted=($(printf '%s\n' "${times[@]}" | sort -n))
  med=${sorted[$(( runs / 2 ))]}; min=${sorted[0]}; max=${sorted[$(( runs - 1 ))]}
  ms() { awk "BEGIN { printf \"%.1f\", $1 / 1000 }"; }
  printf '%-34s %6s %10s %10s %10s %8s %14s %12s\n' "$r" "$runs" "$(ms "$med")" "$(ms "$min")" "$(ms "$max")" "$nodes" \
    "$(ms "$fmed")" "$(ms "$fmax")"
  [ $first = 1 ] || echo "," >> "$out"; first=0
  echo "{\"recipe\": \"$r\", \"median_ms\": $(ms "$med"), \"min_ms\": $(ms "$min"), \"max_ms\": $(ms "$max"), \"training_step_nodes\": $nodes, \"full_compile_median_ms\": $(ms "$fmed"), \"full_compile_max_ms\": $(ms "$fmax")}" >> "$out"
done
echo "]}" >> "$out"
echo "wrote $out"
