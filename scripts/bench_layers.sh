#!/usr/bin/env bash
# Compile time against depth: the Llama-2-7B QLoRA recipe with 4..512 layers. Equality saturation runs once per
# distinct region (layer 0, a generic layer, the rest), so its e-graph work stays flat; every other pass and the
# front end (DSL evaluation, quantization, LoRA insertion) must grow linearly with the graph. Prints a table and
# writes JSON with, per depth, the median wall time, the front end's time and each pass's time (of the median run).
# Usage: scripts/bench_layers.sh [runs] [out.json] [layers..]   (expects target/release/tunec)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
runs="${1:-3}"
out="${2:-target/bench/layers.json}"
shift $(( $# < 2 ? $# : 2 ))
depths=("$@")
[ ${#depths[@]} -gt 0 ] || depths=(4 8 16 32 64 128 256 512)
bin="${TUNEC_BIN:-target/release/tunec}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$(dirname "$out")"
printf '%-7s %9s %12s %12s %12s %10s %10s %14s\n' layers nodes median_ms front_end_ms passes_ms fuse_ms eqsat_ms eqsat_enodes
echo "{\"runs\": $runs, \"commit\": \"$(git rev-parse --short HEAD)\", \"binary\": \"$bin\", \"results\": [" > "$out"
first=1
for layers in "${depths[@]}"; do
  recipe="$tmp/llama2-7b-$layers.qlora.rs"
  sed "s/layers: 32/layers: $layers/" examples/llama2-7b.qlora.rs > "$recipe"
  rows=()
  for r in $(seq "$runs"); do
    t0=$(date +%s%N)
    "$bin" compile "$recipe" --emit none 2> "$tmp/err.$r" > /dev/null
    t1=$(date +%s%N)
    rows+=("$(( (t1 - t0) / 1000 )) $r")
  done
  # The median run's stderr: "front end X ms" and one line per pass with its time.
  read -r us median_run < <(printf '%s\n' "${rows[@]}" | sort -n | sed -n "$(( runs / 2 + 1 ))p")
  line=$(python3 - "$tmp/err.$median_run" "$layers" "$us" <<'EOF'
import json, re, sys
text = open(sys.argv[1]).read()
layers, us = int(sys.argv[2]), int(sys.argv[3])
head = re.search(r"(\d+) forward nodes -> (\d+) training-step nodes.*front end ([\d.]+) ms, total ([\d.]+) ms", text)
passes = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+(\S+)\s+\d+ ->\s+\d+ nodes\s+([\d.]+) ms", text, re.M)}
enodes = re.search(r"\((\d+) e-nodes", text)
row = {
    "layers": layers,
    "forward_nodes": int(head.group(1)),
    "nodes": int(head.group(2)),
    "median_ms": round(us / 1000, 1),
    "front_end_ms": float(head.group(3)),
    "passes_ms": round(sum(passes.values()), 1),
    "pass_ms": passes,
    "eqsat_enodes": int(enodes.group(1)) if enodes else None,
}
print(json.dumps(row))
EOF
)
  python3 -c "
import json, sys; r = json.loads(sys.argv[1]); p = r['pass_ms']
print('%-7s %9s %12s %12s %12s %10s %10s %14s' % (r['layers'], r['nodes'], r['median_ms'], r['front_end_ms'], r['passes_ms'],
      p.get('fuse', '-'), p.get('eqsat', '-'), r['eqsat_enodes']))" "$line"
  [ $first = 1 ] || echo "," >> "$out"; first=0
  echo "$line" >> "$out"
done
echo "]}" >> "$out"
echo "wrote $out"
