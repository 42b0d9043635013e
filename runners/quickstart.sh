#!/usr/bin/env bash
# The main job on a fresh machine, on the embedded default (SQLite):
#   1. the reference toolchain (Python venv with torch/transformers, llama.cpp from one sdist,
#      the Qwen3 tokenizer), cached in $PARITYBENCH_CACHE (default ~/.cache/paritybench)
#   2. the fixtures: seeded models, GGUF files, reference dumps, noise floors (cached)
#   3. `runner once --commit HEAD`: build this repository's engine at HEAD, run the suite,
#      compare with every reference, judge against contracts/, store in SQLite, print.
# Usage: bash runners/quickstart.sh [REV]
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash runners/setup.sh)"
# Build into the target directory `runner once` builds the engine in (shared across commits):
# its own build at HEAD then reuses every compiled dependency.
export CARGO_TARGET_DIR="$PARITYBENCH_CACHE/targets/paritybench"
cargo build --release --locked --bin runner
runner="$CARGO_TARGET_DIR/release/runner"
status=0
"$runner" fixtures build || status=$?
if [[ $status -eq 2 ]]; then exit 2; fi
if [[ $status -eq 1 ]]; then echo "warning: a reference cross-check failed (see the table above); continuing" >&2; fi
exec "$runner" once --commit "${1:-HEAD}"
