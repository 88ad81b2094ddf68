#!/usr/bin/env bash
# The Python peer of the CPU benchmark: creates the reference venv if missing (same one as tests/reference/run.sh),
# then times PyTorch + PEFT (+ bitsandbytes) training steps on the SmolLM2-135M shape. Args go to peft_step.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
venv="${TUNEC_REF_VENV:-$HOME/.cache/tunec/ref-venv}"
if ! "$venv/bin/python" -c "import torch, transformers, peft, bitsandbytes" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.15.0 transformers==5.23.0 peft==0.21.2 bitsandbytes==0.50.2 safetensors numpy accelerate
fi
OMP_NUM_THREADS="${THREADS:-2}" exec "$venv/bin/python" tests/bench/peft_step.py --threads "${THREADS:-2}" "$@"
