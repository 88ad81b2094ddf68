"""Reference dequantization of GGUF block types by llama.cpp's own Python package `gguf` (gguf-py, numpy
implementations of ggml-quants.c), written to tests/fixtures/gguf_blocks.json for runtime/tests/import.rs
(`gguf_blocks_match_gguf_py`).

Each case is a few blocks of random bytes (with finite f16 scales) of one type, and what gguf-py dequantizes them to.
Not run by run.sh (it needs the `gguf` package, not pinned in the reference venv):

    python3 -m pip install --no-deps --target /tmp/ggufpy gguf==0.19.0
    PYTHONPATH=/tmp/ggufpy ~/.cache/tunec/ref-venv/bin/python tests/reference/gguf_blocks_reference.py
"""

import json
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

# type: (blocks, byte offsets of f16 scales inside a block)
CASES = {
    T.Q8_0: (2, [0]),
    T.Q4_0: (2, [0]),
    T.Q4_1: (2, [0, 2]),
    T.Q5_0: (2, [0]),
    T.Q5_1: (2, [0, 2]),
    T.Q4_K: (1, [0, 2]),
    T.Q5_K: (1, [0, 2]),
    T.Q6_K: (1, [208]),
}


def main():
    rng = np.random.default_rng(20240517)
    cases = []
    for qtype, (blocks, scale_offsets) in CASES.items():
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(blocks, block_bytes), dtype=np.uint8)
        for b in range(blocks):
            for off in scale_offsets:
                raw[b, off:off + 2] = np.frombuffer(np.float16(rng.uniform(-0.1, 0.1)).tobytes(), dtype=np.uint8)
        values = dequantize(raw.reshape(-1), qtype).reshape(-1).astype(np.float32)
        assert values.size == blocks * block_elems and np.all(np.isfinite(values))
        cases.append({"type": qtype.name, "bytes": raw.reshape(-1).tolist(), "values": [float(v) for v in values]})
    out = Path(__file__).resolve().parents[2] / "tests/fixtures/gguf_blocks.json"
    fixture = {"format": "tunec-gguf-blocks", "version": 1, "gguf_py": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0", "cases": cases}
    out.write_text(json.dumps(fixture) + "\n")
    print(f"wrote {out}: {', '.join(c['type'] for c in cases)}")


if __name__ == "__main__":
    main()
