#!/usr/bin/env bash
# Compile time against depth: the Llama-2-7B QLoRA recipe with 4..64 layers. Equality saturation runs once per
# distinct region (layer 0, a generic layer, the rest), so its e-graph work stays flat; the linear passes
# (front end, autodiff, fusion) grow with the graph. Prints a table and writes JSON.
# Usage: scripts/bench_layers.sh [runs] [out.json]   (expects target/release/tunec)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs="${1:-5}"
out="${2:-target/bench/layers.json}"
bin=target/release/tunec
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$(dirname "$out")"
printf '%-7s %9s %12s %14s %16s %14s\n' layers nodes median_ms eqsat_regions eqsat_saturated eqsat_enodes
echo "{\"runs\": $runs, \"commit\": \"$(git rev-parse --short HEAD)\", \"results\": [" > "$out"
first=1
for layers in 4 8 16 32 64; do
  recipe="$tmp/llama2-7b-$layers.qlora.rs"
  sed "s/layers: 32/layers: $layers/" examples/llama2-7b.qlora.rs > "$recipe"
  times=()
  for _ in $(seq "$runs"); do
    t0=$(date +%s%N)
    "$bin" compile "$recipe" --emit none --report-json "$tmp/r.json" 2>/dev/null
    t1=$(date +%s%N)
    times+=($(( (t1 - t0) / 1000 )))
  done
  sorted=($(printf '%s\n' "${times[@]}" | sort -n))
  med=$(awk "BEGIN { printf \"%.1f\", ${sorted[$(( runs / 2 ))]} / 1000 }")
  read -r nodes regions distinct enodes < <(python3 -c "
import json; j = json.load(open('$tmp/r.json')); e = j['eqsat']
print(j['nodes'], e['regions'], e['distinct_regions'], e['nodes'])")
  printf '%-7s %9s %12s %14s %16s %14s\n' "$layers" "$nodes" "$med" "$regions" "$distinct" "$enodes"
  [ $first = 1 ] || echo "," >> "$out"; first=0
  echo "{\"layers\": $layers, \"nodes\": $nodes, \"median_ms\": $med, \"eqsat_regions\": $regions, \"eqsat_saturated\": $distinct, \"eqsat_enodes\": $enodes}" >> "$out"
done
echo "]}" >> "$out"
echo "wrote $out"
