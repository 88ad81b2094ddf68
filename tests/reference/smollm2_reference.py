"""Reference outputs of transformers for SmolLM2-135M-Instruct as tunec imports it from GGUF.

It loads the directory written by `tunec import` (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) with transformers, so it checks at the same time that transformers accepts what the import
writes, and records in tests/fixtures/smollm2_reference.json:

- the chat prompt for "What is the capital of France?" (apply_chat_template, add_generation_prompt=True) and its ids;
- the ids of a few texts (digits, Unicode, code, whitespace runs, special tokens);
- per prompt position, the 8 largest logits (ids and values), and at the last position the logits of every 97th id;
- the greedy continuation (24 new tokens, stopping at <|im_end|>) and its text.

The Rust test `smollm2_gguf_imports_and_answers_paris` (runtime/tests/import.rs) imports the GGUF itself and compares
its tokenizer, chat prompt, logits and greedy tokens with this file. Not run by run.sh (it needs an imported model):

    scripts/fetch_assets.sh
    cargo run --release -p tunec -- import ~/.cache/tunec/assets/smollm2.gguf --out /tmp/smollm2
    ~/.cache/tunec/ref-venv/bin/python tests/reference/smollm2_reference.py --model /tmp/smollm2

CPU, float32, eager attention; takes a few seconds.
"""

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

QUESTION = "What is the capital of France?"
TEXTS = [
    "Hello world! 12345 tokens, naïve café 🎉",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "<|im_start|>user\nHi<|im_end|>\n",
    "   leading spaces and trailing   ",
    "2024-05-17: 3.14159 × 10^6",
]
TOP_K = 8
VOCAB_STRIDE = 97
NEW_TOKENS = 24


def main():
    root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="directory written by `tunec import`")
    ap.add_argument("--out", default=str(root / "tests/fixtures/smollm2_reference.json"))
    ap.add_argument("--gguf", default=os.path.join(os.environ.get("TUNEC_ASSETS", os.path.expanduser("~/.cache/tunec/assets")), "smollm2.gguf"))
    args = ap.parse_args()

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    model.eval()

    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_start|>") == 1, "<|im_start|> must be id 1"

    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0]  # [T, V]
        top = torch.topk(logits, TOP_K, dim=-1)
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        )
    generated = out[0, len(prompt_ids):].tolist()
    answer = tok.decode(generated, skip_special_tokens=True)
    assert "Paris" in answer, answer

    sha = hashlib.sha256(Path(args.gguf).read_bytes()).hexdigest() if Path(args.gguf).exists() else None
    fixture = {
        "format": "tunec-smollm2-reference",
        "version": 1,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "gguf_sha256": sha,
        "question": QUESTION,
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "texts": [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in TEXTS],
        "top_k": {"ids": top.indices.tolist(), "values": top.values.tolist()},
        "last_logits_stride": VOCAB_STRIDE,
        "last_logits": logits[-1, ::VOCAB_STRIDE].tolist(),
        "greedy_ids": generated,
        "greedy_text": answer,
    }
    Path(args.out).write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: answer {answer!r}, {len(prompt_ids)} prompt tokens")


if __name__ == "__main__":
    main()
