#!/usr/bin/env bash
# Regenerate tunec's golden-reference fixtures (tests/fixtures/*.safetensors) with PyTorch / transformers / PEFT /
# bitsandbytes. Only needed when a fixture has to change: the fixtures are committed and the Rust tests never use
# this venv.
#
#   tests/reference/run.sh            # every tests/reference/make_*.py
#
# The venv lives at $TUNEC_REF_VENV (default ~/.cache/tunec/ref-venv). It is created when missing, and the pinned
# packages are installed only when importing them fails. CPU only.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${TUNEC_REF_VENV:-$HOME/.cache/tunec/ref-venv}"
PY="$VENV/bin/python"

PINS=(torch==2.15.0 transformers==5.23.0 peft==0.21.2 bitsandbytes==0.50.2 safetensors numpy accelerate)
IMPORTS="import torch, transformers, peft, bitsandbytes, safetensors, numpy, accelerate"

if [ ! -x "$PY" ]; then
    echo "run.sh: creating venv $VENV" >&2
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
fi
if ! "$PY" -c "$IMPORTS" >/dev/null 2>&1; then
    echo "run.sh: installing ${PINS[*]} into $VENV" >&2
    "$PY" -m pip install --upgrade pip
    "$PY" -m pip install "${PINS[@]}"
    "$PY" -c "$IMPORTS"
fi

# The fixtures record the versions that made them; say so when they are not the pinned ones.
"$PY" - <<'EOF' || true
import importlib.metadata as md
want = {"torch": "2.15.0", "transformers": "5.23.0", "peft": "0.21.2", "bitsandbytes": "0.50.2"}
for pkg, ver in want.items():
    have = md.version(pkg)
    if have.split("+")[0] != ver:
        print(f"run.sh: WARNING: {pkg} {have} installed, fixtures are pinned to {ver}")
EOF

cd "$ROOT"
shopt -s nullglob
scripts=("$HERE"/make_*.py)
if [ ${#scripts[@]} -eq 0 ]; then
    echo "run.sh: no tests/reference/make_*.py found" >&2
    exit 1
fi
failed=()
for script in "${scripts[@]}"; do
    echo "== ${script#"$ROOT"/}"
    if ! "$PY" "$script"; then
        failed+=("${script#"$ROOT"/}")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "run.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "run.sh: all fixtures regenerated under tests/fixtures/"
