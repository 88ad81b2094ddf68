# Entry points: `make setup` installs the native toolchain (LLVM 22, MLIR 22, ptxas) and writes scripts/env.sh;
# every other target sources scripts/env.sh, so cargo finds LLVM/MLIR and the tests find ptxas.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.DEFAULT_GOAL := test

ENV := source scripts/env.sh

.PHONY: setup build test demo bench bench-cpu

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

# The IR goes to a file first so that `head` closing the pipe early cannot fail the recipe under pipefail,
# while a failing compile still does.
demo: setup
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
	echo "== the IR after every pass for the tiny LoRA recipe: target/demo/tiny.lora/"
	target/release/tunec compile examples/tiny.lora.rs --emit none --dump-all target/demo/tiny.lora

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
