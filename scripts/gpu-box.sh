#!/usr/bin/env bash
# Runs on the GPU machine, from a folder holding: runner (release build, stripped), runners/,
# scripts/, fixtures/ (lock + suites), tok/ (the real Qwen3 tokenizer.json and its config) and
# request.template.json. No Rust and no network there: models are regenerated on the machine.
#
#   bash scripts/gpu-box.sh parity OUTDIR [models]    # seeded models, HF refs, engine, compare
#   bash scripts/gpu-box.sh bench OUTDIR [models]     # tok/s and peak memory, engine vs HF
#   bash scripts/gpu-box.sh gguf OUTDIR               # GGUF files, device dequantization check,
#                                                     # parity per type, engine vs llama.cpp (CUDA)
#                                                     # on the same files (scripts/gpu-gguf.py)
#
# The gguf phase also needs llama.cpp/ (scripts/gpu-llamacpp.sh trim): its CUDA build and a
# CPU-only llama-quantize start in the background in their own process sessions, and every
# step skips what an earlier call on the same (still warm) machine finished, so a second
# `gguf` call goes on where the first was stopped by its time limit.
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
  gguf)
    lc=/tmp/lc
    mkdir -p "$lc"
    for kind in cuda cpu; do
      if [[ ! -e "$lc/$kind.started" ]]; then
        touch "$lc/$kind.started"
        mode=build; [[ "$kind" == cpu ]] && mode=build-cpu
        setsid nohup bash scripts/gpu-llamacpp.sh "$mode" llama.cpp "$lc/$kind" 90 > "$lc/$kind.log" 2>&1 < /dev/null &
      fi
    done
    export PB_GPU_RUN_REUSE=1   # finished dumps of an earlier call are compared, not run again
    # stopped (SIGINT, then SIGKILL) GGUF_BUDGET seconds in, so that what it saved still comes back
    timeout -k 10 -s INT "${GGUF_BUDGET:-560}" python3 scripts/gpu-gguf.py "${GGUF_STEPS:-files,check,parity,bench}" ${GGUF_MODELS:+--models "$GGUF_MODELS"} \
      --runner ./runner --out "$out" \
      --template /tmp/pbgguf-request.json --tok tok --llamacpp llama.cpp \
      --quantize "$lc/cpu/bin/llama-quantize" --bench-bin "$lc/cuda/bin/llama-bench" 2>&1 | tee "$out/run.log"
    mkdir -p "$out/logs"
    cp "$lc"/*.log "$lc"/*.txt "$out/logs/" 2>/dev/null
    for b in cuda cpu; do cp "$lc/$b/build-times.txt" "$out/logs/build-times-$b.txt" 2>/dev/null; done
    for b in "$lc"/cuda "$lc"/cpu; do [[ -f "$b/build-times.txt" ]] && cat "$b/build-times.txt"; done
    [[ -f "$out/dequant-check.json" ]] && tail -n 20 "$out/logs/dequant-check.log"
    ;;
esac
tar czf "$out/logs.tar.gz" -C "$out" logs 2>/dev/null && rm -rf "$out/logs"
