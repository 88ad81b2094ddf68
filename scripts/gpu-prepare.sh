#!/usr/bin/env bash
# Builds everything scripts/gpu-check.sh needs on a GPU host (which has no Rust toolchain and takes small uploads)
# into target/gpu-carry/ (about 50 MiB; the device tool carries at most 64 MiB):
#   tunec-runner (stripped)           the slim runner: `bench` times plans on the cuda backend
#   gpu_check, cuda_step (stripped)   kernel cases vs the interpreter; whole steps on the GPU vs the cpu backend
#   gpucheck.tgz                      every kernel of the tiny LoRA/QLoRA/DoRA/QDoRA steps with reference outputs
#   plans/*.plan                      the 7B QLoRA benchmark plans (tests/bench/recipes: r=16): 4x512 with f32 SIMT
#                                     GEMMs; 4x512 and 1x2048 with bf16 tensor-core GEMMs (`--gemm-precision bf16`);
#                                     4x512 bf16 with per-block activation recompute (less memory)
#   plans.sha256                      the plans' SHA-256 (sha256sum format): a plan is native code, and the GPU host
#                                     (another user, another key) runs one only after `tunec-runner trust --sha256`
#                                     has checked it against this list (scripts/gpu-check.sh does)
#   bnb.tgz                           bitsandbytes 0.50.2 (CUDA 12.6/12.8/13.0/13.2 libraries only) for the PEFT baseline
# Usage: scripts/gpu-prepare.sh      (then carry target/gpu-carry and run scripts/gpu-check.sh there)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
out=target/gpu-carry
rm -rf "$out" && mkdir -p "$out/plans"
cargo build --release -q -p tunec -p runtime --bins --example gpu_check --example cuda_step
for b in target/release/tunec-runner target/release/examples/gpu_check target/release/examples/cuda_step; do
  strip -o "$out/$(basename "$b")" "$b"
done
rm -rf target/gpucheck
cargo run --release -q -p codegen --example dump_gpu_cases -- target/gpucheck
tar czf "$out/gpucheck.tgz" -C target gpucheck
# f32 SIMT GEMMs at 4x512 (cuda_step's 7B check and timing); bf16 tensor cores at both shapes.
r=tests/bench/recipes/llama2-7b.qlora.r16.4x512.rs
target/release/tunec compile "$r" -o "$out/plans/$(basename "$r" .rs).plan" 2>&1 | grep -E "^(codegen|wrote)"
for r in tests/bench/recipes/*.rs; do
  target/release/tunec compile "$r" --gemm-precision bf16 -o "$out/plans/$(basename "$r" .rs).bf16.plan" 2>&1 \
    | grep -E "^(codegen|wrote)"
done
# The memory-lean variant: per-block activation recompute (what gradient checkpointing is to PEFT).
r=tests/bench/recipes/llama2-7b.qlora.r16.4x512.rs
target/release/tunec compile "$r" --gemm-precision bf16 --recompute per-block \
  -o "$out/plans/$(basename "$r" .rs).bf16.recompute.plan" 2>&1 | grep -E "^(codegen|wrote)"
# The digests the GPU host checks before it trusts the plans (they are signed with this machine's key, not its).
(cd "$out/plans" && sha256sum -- *.plan) > "$out/plans.sha256"
cat "$out/plans.sha256"
# bitsandbytes from the reference venv (tests/bench/run.sh creates it), without the ROCm/XPU/old-CUDA libraries.
venv="${TUNEC_REF_VENV:-$HOME/.cache/tunec/ref-venv}"
if ! "$venv/bin/python" -c "import bitsandbytes" 2>/dev/null; then
  tests/bench/run.sh --help >/dev/null
fi
site=$("$venv/bin/python" -c "import bitsandbytes, os; print(os.path.dirname(os.path.dirname(bitsandbytes.__file__)))")
tar czf "$out/bnb.tgz" -C "$site" --exclude='__pycache__' --exclude='libbitsandbytes_rocm*' \
  --exclude='libbitsandbytes_xpu*' --exclude='libbitsandbytes_cuda11*' --exclude='libbitsandbytes_cuda12[0-5]*' \
  bitsandbytes $(cd "$site" && ls -d bitsandbytes-*.dist-info)
du -sh "$out"; ls -la "$out" "$out/plans"
