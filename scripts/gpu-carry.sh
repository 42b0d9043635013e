#!/usr/bin/env bash
# The folder that travels to a GPU machine (no Rust, no network there), made here:
#
#   bash scripts/gpu-carry.sh DEST       # e.g. .carry/gpu in the checkout the device tool sends
#
# DEST gets: runner (target/release/runner, stripped: build it first with `cargo build
# --release`), scripts/, runners/, fixtures/ (lock and suites), tok/ (the Qwen3 tokenizer that
# runners/setup.sh fetched), llama.cpp/ (scripts/gpu-llamacpp.sh trim, about 20 MiB),
# repo.bundle (this repository's HEAD, for `runner once --commit` there: build the runner from
# a clean HEAD) and gitbin/ (this machine's git and its libpcre2, for a box without git).
# On the machine: `cd DEST && bash scripts/gpu-box.sh gguf "$OUT"` (see gpu-box.sh).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:?usage: gpu-carry.sh DEST}"
cache="${PARITYBENCH_CACHE:-$HOME/.cache/paritybench}"
[[ -x "$repo/target/release/runner" ]] || { echo "gpu-carry: no $repo/target/release/runner (cargo build --release)" >&2; exit 2; }
[[ -f "$cache/tokenizer/tokenizer.json" ]] || { echo "gpu-carry: no tokenizer in $cache/tokenizer (runners/setup.sh)" >&2; exit 2; }
rm -rf "$dest"
mkdir -p "$dest/tok"
cp -a "$repo/scripts" "$repo/runners" "$repo/fixtures" "$dest/"
find "$dest" -name __pycache__ -prune -exec rm -rf {} +
cp "$repo/target/release/runner" "$dest/runner"
strip "$dest/runner"
cp "$cache/tokenizer/tokenizer.json" "$cache/tokenizer/tokenizer_config.json" "$dest/tok/"
bash "$repo/scripts/gpu-llamacpp.sh" trim "$dest/llama.cpp" > /dev/null
[[ -z "$(git -C "$repo" status --porcelain --untracked-files=no)" ]] ||
  echo "gpu-carry: WARNING: uncommitted changes: the runner was not built from HEAD" >&2
git -C "$repo" bundle create "$dest/repo.bundle" HEAD 2> /dev/null
# the request the parity and bench phases start from (the suite's prompts and token ids)
tmpl="$cache/fixtures/refs/default/qwen3-dense/hf-fp16-sdpa.request.json"
if [[ -f "$tmpl" ]]; then cp "$tmpl" "$dest/request.template.json"
else echo "gpu-carry: WARNING: no $tmpl (runner fixtures build): parity and bench need request.template.json" >&2; fi
mkdir -p "$dest/gitbin"
cp "$(command -v git)" "$dest/gitbin/git"
cp "$(ldd "$(command -v git)" | awk '/libpcre2-8/ { print $3 }')" "$dest/gitbin/"
du -sh "$dest"
