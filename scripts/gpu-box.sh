#!/usr/bin/env bash
# Runs on the GPU machine, from a folder holding: runner (release build, stripped), runners/,
# scripts/, fixtures/ (lock + suites), tok/ (the real Qwen3 tokenizer.json and its config) and
# request.template.json. No Rust and no network there: models are regenerated on the machine.
#
#   bash scripts/gpu-box.sh parity OUTDIR [models]    # seeded models, HF refs, engine, compare
#   bash scripts/gpu-box.sh bench OUTDIR [models]     # tok/s and peak memory, engine vs HF
#
# What it writes under OUTDIR: results-PHASE.json, nvidia-smi.txt, logs.tar.gz.
set -uo pipefail
phase="$1"; out="$2"; models="${3:-}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
mkdir -p "$out"
export PARITYBENCH_CACHE="${PARITYBENCH_CACHE:-/tmp/pbcache}"
export PARITYBENCH_PYTHON="${PARITYBENCH_PYTHON:-python3}"
export PARITYBENCH_TOKENIZER="$here/tok/tokenizer.json"
export PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
chmod +x ./runner
case "$phase" in
  parity)
    python3 scripts/gpu-run.py parity --runner ./runner --out "$out" --template request.template.json \
      ${models:+--models "$models"} 2>&1 | tee "$out/run.log"
    ;;
  bench)
    bm="${models:-qwen3-0.6b,qwen3-4b-shape,qwen3-moe-3b-shape}"
    ./runner fixtures gen --models qwen3-0.6b > "$out/gen.log" 2>&1
    python3 scripts/gpu-bench-models.py --out /tmp/pbbench --tokenizer-dir tok \
      --models "$(echo "$bm" | tr ',' '\n' | grep -- -shape | paste -sd,)" 2>&1 | tee -a "$out/gen.log"
    python3 scripts/gpu-run.py bench --runner ./runner --out "$out" --template request.template.json \
      --models "$bm" ${BENCH_RUNNERS:+--runners "$BENCH_RUNNERS"} 2>&1 | tee "$out/run.log"
    ;;
esac
tar czf "$out/logs.tar.gz" -C "$out" logs 2>/dev/null && rm -rf "$out/logs"
