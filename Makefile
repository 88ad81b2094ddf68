# Entry points: `make setup` installs the native toolchain (LLVM 22, MLIR 22, ptxas) and writes scripts/env.sh;
# every other target sources scripts/env.sh, so cargo finds LLVM/MLIR and the tests find ptxas.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.DEFAULT_GOAL := test

ENV := source scripts/env.sh

.PHONY: setup build test demo

setup:
	scripts/setup.sh

build: setup
	$(ENV)
	cargo build --workspace --all-targets

test: setup
	$(ENV)
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace

# The IR goes to a file first so that `head` closing the pipe early cannot fail the recipe under pipefail,
# while a failing compile still does.
demo: setup
	$(ENV)
	cargo build --release -p tunec
	mkdir -p target/demo
	cargo run --release -p tunec -- compile examples/llama2-7b.qlora.rs --emit ir > target/demo/llama2-7b.qlora.ir
	head -n 60 target/demo/llama2-7b.qlora.ir
