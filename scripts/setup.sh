#!/usr/bin/env bash
# Installs, idempotently and only when missing, what a fresh Debian 12 machine lacks to build and test tunec:
#   - LLVM 22 + MLIR 22 (+ clang 22 for bindgen) from apt,
#   - ptxas from the PyPI wheel nvidia-cuda-nvcc-cu12 (extracted under ~/.cache/tunec/ptxas),
# and writes scripts/env.sh, which exports the LLVM/MLIR prefixes for cargo. Source that file (the Makefile does).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${TUNEC_CACHE:-$HOME/.cache/tunec}"
mkdir -p "$cache"
llvm=/usr/lib/llvm-22

say() { printf '[setup] %s\n' "$*" >&2; }

# --- LLVM 22 / MLIR 22 --------------------------------------------------------------------------------------------
need_apt=()
[ -x "$llvm/bin/llvm-config" ] || need_apt+=(llvm-22-dev)
[ -f "$llvm/lib/libMLIR.so" ] || [ -d "$llvm/include/mlir" ] || need_apt+=(libmlir-22-dev)
[ -x "$llvm/bin/mlir-tblgen" ] || need_apt+=(mlir-22-tools)
[ -f "$llvm/lib/libPolly.a" ] || need_apt+=(libpolly-22-dev)
[ -x "$llvm/bin/clang" ] || need_apt+=(clang-22)
[ -f /usr/include/zstd.h ] || need_apt+=(libzstd-dev)
[ -f /usr/include/zlib.h ] || need_apt+=(zlib1g-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "installing from apt: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" libzstd-dev zlib1g-dev >/dev/null
fi

# --- ptxas (standalone binary in the nvcc wheel) ------------------------------------------------------------------
ptxas="$cache/ptxas/nvidia/cuda_nvcc/bin/ptxas"
if [ ! -x "$ptxas" ]; then
  say "fetching ptxas from the nvidia-cuda-nvcc-cu12==12.9.86 wheel"
  tmp="$(mktemp -d)"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" nvidia-cuda-nvcc-cu12==12.9.86
  mkdir -p "$cache/ptxas"
  python3 - "$tmp"/*.whl "$cache/ptxas" <<'PY'
import sys, zipfile
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.endswith("bin/ptxas"):
            z.extract(n, out)
PY
  chmod +x "$ptxas"
  rm -rf "$tmp"
fi

# --- environment for the build --------------------------------------------------------------------------------------
cat > "$here/env.sh" <<ENV
# written by scripts/setup.sh
export LLVM_SYS_221_PREFIX=$llvm
export MLIR_SYS_220_PREFIX=$llvm
export TABLEGEN_220_PREFIX=$llvm
export LIBCLANG_PATH=$llvm/lib
export TUNEC_PTXAS=$ptxas
ENV
say "ok: LLVM/MLIR at $llvm, ptxas at $ptxas"
