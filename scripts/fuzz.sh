#!/usr/bin/env bash
# Coverage-guided fuzzing of tunec's readers of untrusted input, on stable Rust (cargo-afl + AFL++):
#   scripts/fuzz.sh [seconds-per-target] [target…]     (default: 600 s each; targets: dsl plan gguf model_dir
#                                                       checkpoint data; `make fuzz`, and `make test` with 6 s)
# Builds fuzz/ with `cargo afl build --release` (its own workspace and target dir, fuzz/target), then runs one
# afl-fuzz at a time for the given seconds per target, seeded from fuzz/corpus/<target> (and its dictionary
# fuzz/dict/<target>.dict when there is one). Prints a table (executions, execs/s, corpus, edges, crashes, hangs)
# and writes target/fuzz/summary.json; AFL's outputs are in target/fuzz/out/<target>. Crashing inputs are copied to
# fuzz/regressions/<target>/ (named by content hash) and hanging ones to target/fuzz/hangs/<target>/; the script
# exits non-zero when any target crashed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
secs="${1:-600}"
shift || true
all=(dsl plan gguf model_dir checkpoint data)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
  [[ " ${all[*]} " == *" $t "* ]] || { echo "fuzz.sh: unknown target $t (${all[*]})" >&2; exit 2; }
done
[[ "$secs" =~ ^[0-9]+$ ]] || { echo "fuzz.sh: seconds must be a number, not $secs" >&2; exit 2; }

command -v cargo-afl >/dev/null 2>&1 || { echo "fuzz.sh: cargo-afl is missing (scripts/setup.sh installs it)" >&2; exit 2; }
# AFL++'s afl-fuzz: the one cargo-afl built (same version as the runtime linked into the targets), else Debian's.
afl_fuzz="$(ls -d "$HOME"/.local/share/afl.rs/rustc-*/afl.rs-*/afl/bin/afl-fuzz 2>/dev/null | tail -n 1 || true)"
[ -x "${afl_fuzz:-}" ] || afl_fuzz="$(command -v afl-fuzz || true)"
[ -x "${afl_fuzz:-}" ] || { echo "fuzz.sh: afl-fuzz is missing (scripts/setup.sh installs afl++)" >&2; exit 2; }

echo "== cargo afl build --release (fuzz/)"
(cd fuzz && cargo afl build --release --features afl --quiet $(printf -- '--bin %s ' "${targets[@]}"))

work="$root/target/fuzz"
mkdir -p "$work/out" "$work/tmp" "$work/hangs"
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_NO_AFFINITY=1 AFL_FAST_CAL=1
export AFL_NO_WARN_INSTABILITY=1
crashed=0
rows=()
json=()
stat() { sed -n "s/^$1 *: *//p" "$2" | head -n 1; }
for t in "${targets[@]}"; do
  out="$work/out/$t"
  rm -rf "$out" "$work/tmp/$t"
  mkdir -p "$work/tmp/$t"
  dict=()
  [ -f "fuzz/dict/$t.dict" ] && dict=(-x "fuzz/dict/$t.dict")
  # Per-execution limits: 2 s (the DSL target starts a thread with a 64 MiB stack per input), 4 GiB of address space
  # (a reader that allocates what a file claims aborts instead of taking the machine's memory).
  echo "== afl-fuzz $t for ${secs}s"
  TMPDIR="$work/tmp/$t" timeout -k 10 $((secs + 120)) "$afl_fuzz" -V "$secs" -i "fuzz/corpus/$t" -o "$out" \
    "${dict[@]}" -t 2000 -m 4096 -- "fuzz/target/release/$t" > "$work/$t.log" 2>&1 || {
    echo "fuzz.sh: afl-fuzz $t failed (rc $?); the end of $work/$t.log:" >&2
    tail -n 20 "$work/$t.log" >&2
  }
  stats="$out/default/fuzzer_stats"
  execs=0 eps=0 corpus=0 edges=0 cvg=0 crashes=0 hangs=0
  if [ -f "$stats" ]; then
    execs="$(stat execs_done "$stats")"
    eps="$(stat execs_per_sec "$stats")"
    corpus="$(stat corpus_count "$stats")"
    edges="$(stat edges_found "$stats")"
    cvg="$(stat bitmap_cvg "$stats")"
    crashes="$(stat saved_crashes "$stats")"
    [ -n "$crashes" ] || crashes="$(stat unique_crashes "$stats")"
    hangs="$(stat saved_hangs "$stats")"
    [ -n "$hangs" ] || hangs="$(stat unique_hangs "$stats")"
  fi
  for f in "$out"/default/crashes/id:*; do
    [ -f "$f" ] || continue
    mkdir -p "fuzz/regressions/$t"
    cp "$f" "fuzz/regressions/$t/crash-$(sha1sum "$f" | cut -c1-16)"
  done
  for f in "$out"/default/hangs/id:*; do
    [ -f "$f" ] || continue
    mkdir -p "$work/hangs/$t"
    cp "$f" "$work/hangs/$t/hang-$(sha1sum "$f" | cut -c1-16)"
  done
  [ "${crashes:-0}" -gt 0 ] && crashed=1
  rows+=("$(printf '%-11s %12s %9s %7s %7s %8s %8s %6s' "$t" "$execs" "$eps" "$corpus" "$edges" "${cvg% }" "${crashes:-0}" "${hangs:-0}")")
  json+=("$(printf '"%s": {"seconds": %s, "execs_done": %s, "execs_per_sec": %s, "corpus_count": %s, "edges_found": %s, "bitmap_cvg": "%s", "crashes": %s, "hangs": %s}' \
    "$t" "$secs" "${execs:-0}" "${eps:-0}" "${corpus:-0}" "${edges:-0}" "$cvg" "${crashes:-0}" "${hangs:-0}")")
done

printf '\n%-11s %12s %9s %7s %7s %8s %8s %6s\n' target executions execs/s corpus edges bitmap crashes hangs
printf '%s\n' "${rows[@]}"
{
  echo "{"
  for i in "${!json[@]}"; do
    sep=","
    [ "$i" -eq $((${#json[@]} - 1)) ] && sep=""
    echo "  ${json[$i]}$sep"
  done
  echo "}"
} > "$work/summary.json"
echo "summary: target/fuzz/summary.json"
if [ "$crashed" -ne 0 ]; then
  echo "fuzz.sh: crashes found; the inputs are in fuzz/regressions/<target>/ (replay: cargo test --manifest-path fuzz/Cargo.toml)" >&2
  exit 1
fi
