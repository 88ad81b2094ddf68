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

# --- apt helpers -------------------------------------------------------------------------------------------------
# Root runs apt-get directly; anyone else goes through sudo.
if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo); fi
apt_updated=0
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if [ "$apt_updated" -eq 0 ]; then "${sudo[@]}" apt-get update -qq >/dev/null; apt_updated=1; fi
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

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
  "${sudo[@]}" apt-get update -qq >/dev/null; apt_updated=1
  # Stock bookworm has no LLVM 22: when no configured source offers it, add apt.llvm.org's bookworm-22 repository.
  if ! apt-cache show llvm-22-dev >/dev/null 2>&1; then
    say "llvm-22-dev not in the configured apt sources: adding apt.llvm.org (llvm-toolchain-bookworm-22)"
    apt_install ca-certificates curl gnupg
    "${sudo[@]}" mkdir -p /etc/apt/keyrings
    curl -fsSL https://apt.llvm.org/llvm-snapshot.gpg.key | "${sudo[@]}" gpg --dearmor --yes -o /etc/apt/keyrings/apt.llvm.org.gpg
    echo "deb [signed-by=/etc/apt/keyrings/apt.llvm.org.gpg] http://apt.llvm.org/bookworm/ llvm-toolchain-bookworm-22 main" \
      | "${sudo[@]}" tee /etc/apt/sources.list.d/apt.llvm.org-22.list >/dev/null
    apt_updated=0
  fi
  apt_install "${need_apt[@]}"
fi

# --- ptxas (standalone binary in the nvcc wheel) ------------------------------------------------------------------
ptxas="$cache/ptxas/nvidia/cuda_nvcc/bin/ptxas"
if [ ! -x "$ptxas" ]; then
  say "fetching ptxas from the nvidia-cuda-nvcc-cu12==12.9.86 wheel"
  # A fresh Debian 12 may lack python3 or pip (python3-pip). `pip download` only fetches the wheel, so PEP 668's
  # externally-managed-environment guard (which blocks `pip install`) does not get in the way.
  command -v python3 >/dev/null 2>&1 || apt_install python3
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: -d "$tmp" nvidia-cuda-nvcc-cu12==12.9.86
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
fi
"$ptxas" --version >/dev/null || { say "error: $ptxas does not run"; exit 1; }

# --- fuzzing: AFL++ (apt) and cargo-afl (crates.io), for scripts/fuzz.sh ----------------------------------------------
# cargo-afl builds its own AFL++ runtime for the installed rustc (`cargo afl config --build`) on first install; a rustc
# upgrade needs that step again, so it runs whenever this rustc's build is missing.
command -v afl-fuzz >/dev/null 2>&1 || { say "installing afl++ from apt"; apt_install afl++; }
if ! command -v cargo-afl >/dev/null 2>&1; then
  say "installing cargo-afl from crates.io"
  cargo install --quiet --locked cargo-afl
fi
rustc_id="$(rustc -V | sed -E 's/^rustc ([^ ]+) \(([0-9a-f]{7}).*/\1-\2/')"
if ! ls "$HOME/.local/share/afl.rs/rustc-$rustc_id"/*/afl/bin/afl-fuzz >/dev/null 2>&1; then
  say "building cargo-afl's AFL++ for rustc $rustc_id"
  cargo afl config --build --force >/dev/null
fi

# --- environment for the build --------------------------------------------------------------------------------------
# Rewritten on every run (same content when nothing changed), so a moved cache or prefix never leaves it stale.
cat > "$here/env.sh" <<ENV
# written by scripts/setup.sh
export LLVM_SYS_221_PREFIX=$llvm
export MLIR_SYS_220_PREFIX=$llvm
export TABLEGEN_220_PREFIX=$llvm
export LIBCLANG_PATH=$llvm/lib
export TUNEC_PTXAS=$ptxas
ENV
say "ok: LLVM/MLIR at $llvm, ptxas at $ptxas"
