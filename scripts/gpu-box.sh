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
#   bash scripts/gpu-box.sh prep OUTDIR               # start llama.cpp's builds and the bench
#                                                     # models' GGUF files in the background
#   bash scripts/gpu-box.sh once OUTDIR [models]      # `runner once --commit <sha>` on cuda:0
#                                                     # against the GPU's own HF references
#
# One sitting for the speed table (HF, llama.cpp and the engine on one machine): `prep` and
# `once` in a first call, `GGUF_STEPS=files,bench gguf` in a second, `bench` in a third; the
# machine must stay warm between them (the calls continue each other's work under /tmp).
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
lc=/tmp/lc   # llama.cpp's builds and the GGUF files, shared by the calls of one sitting
# what every gpu-gguf.py call is given: the runner, the tokenizer, llama.cpp's tree and binaries
gguf_args=(--runner ./runner --template /tmp/pbgguf-request.json --tok tok --llamacpp llama.cpp
  --quantize "$lc/cpu/bin/llama-quantize" --bench-bin "$lc/cuda/bin/llama-bench")
dev="${ONCE_DEVICE:-cuda:0}"   # the device `once` builds references and runs the engine on

# llama.cpp's CUDA build and a CPU-only llama-quantize, each once per machine, in their own
# process sessions (they outlive the call that starts them)
start_llamacpp_builds() {
  mkdir -p "$lc"
  for kind in cuda cpu; do
    if [[ ! -e "$lc/$kind.started" ]]; then
      touch "$lc/$kind.started"
      mode=build; [[ "$kind" == cpu ]] && mode=build-cpu
      setsid nohup bash scripts/gpu-llamacpp.sh "$mode" llama.cpp "$lc/$kind" 90 > "$lc/$kind.log" 2>&1 < /dev/null &
    fi
  done
}

case "$phase" in
  parity)
    python3 scripts/gpu-run.py parity --runner ./runner --out "$out" --template request.template.json \
      ${models:+--models "$models"} 2>&1 | tee "$out/run.log"
    ;;
  bench)
    bm="${models:-qwen3-0.6b,qwen3-4b-shape,qwen3-moe-3b-shape}"
    # models an earlier call of this sitting made (prep's GGUF files came from them) are kept
    [[ -f "$PARITYBENCH_CACHE/fixtures/models/qwen3-0.6b/config.json" ]] ||
      ./runner fixtures gen --models qwen3-0.6b > "$out/gen.log" 2>&1
    shapes="$(for m in $(echo "$bm" | tr ',' ' '); do
      [[ "$m" == *-shape && ! -f "/tmp/pbbench/$m/config.json" ]] && echo "$m"; done | paste -sd,)"
    [[ -z "$shapes" ]] || python3 scripts/gpu-bench-models.py --out /tmp/pbbench --tokenizer-dir tok \
      --models "$shapes" 2>&1 | tee -a "$out/gen.log"
    python3 scripts/gpu-run.py bench --runner ./runner --out "$out" --template request.template.json \
      --models "$bm" ${BENCH_RUNNERS:+--runners "$BENCH_RUNNERS"} ${BENCH_PROFILE:+--profile} 2>&1 | tee "$out/run.log"
    ;;
  prep)
    start_llamacpp_builds
    if [[ ! -e "$lc/files.started" ]]; then
      touch "$lc/files.started"
      # the files step waits for the CPU llama-quantize; `gguf` waits for this process
      setsid nohup bash -c 'python3 scripts/gpu-gguf.py files "$@"; touch "'"$lc"'/files.done"' gguf-files \
        --models "${models:-qwen3-0.6b,qwen3-4b-shape,qwen3-moe-3b-shape}" --out "$lc/files-out" "${gguf_args[@]}" \
        > "$lc/files.log" 2>&1 < /dev/null &
    fi
    echo "prep: llama.cpp builds and GGUF files started in the background (logs in $lc)"
    ;;
  once)
    # The GPU's own HF references in this machine's cache, then `runner once` of the commit the
    # carried runner was built from (repo.bundle, made by gpu-carry.sh) with the built-in engine
    # on cuda:0 against them; the SQLite database and the outcome come back.
    om="${models:-qwen3-dense,qwen3-moe,qwen3-moe-mixed,qwen2}"
    t0=$SECONDS
    ./runner fixtures build --device "$dev" --references hf --models "$om" > "$out/fixtures-build.txt" 2>&1
    echo "fixtures build (HF on $dev, $om): rc=$? in $((SECONDS - t0)) s" | tee -a "$out/fixtures-build.txt"
    if ! command -v git > /dev/null; then   # the carried git (gpu-carry.sh) where the box has none
      export PATH="$here/gitbin:$PATH" GIT_EXEC_PATH="$here/gitbin" LD_LIBRARY_PATH="$here/gitbin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    repo=/tmp/pbrepo
    [[ -d "$repo/.git" ]] || git -c advice.detachedHead=false clone -q repo.bundle "$repo"
    sha="$(git -C "$repo" rev-parse HEAD)"
    cat > /tmp/pb-gpu-once.toml <<EOT
# The built-in engine of $repo on this box's GPU. The runner binary was built on a CPU machine
# from this same commit (the box has no Rust toolchain), so the build step has nothing to do.
[engines.paritybench]
build = "true"
run = "$here/runner engine run --request {request} --out {out}"
device = "$dev"
timeout_s = 900
EOT
    t0=$SECONDS
    (cd "$repo" && "$here/runner" once --config /tmp/pb-gpu-once.toml --commit "$sha") > "$out/once.txt" 2> "$out/once.stderr.txt"
    rc=$?
    echo "runner once --commit $sha on $dev: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/once.txt"
    (cd "$repo" && "$here/runner" once --config /tmp/pb-gpu-once.toml --commit "$sha" --json) > "$out/once-again.json" 2>> "$out/once.stderr.txt"
    echo "second run of the same commit: exit $?" | tee -a "$out/once.txt"
    python3 -c 'import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))' \
      "$PARITYBENCH_CACHE/data/paritybench.sqlite" "$out/gpu-once.sqlite"
    grep -vE "^PASSED" "$out/once.txt" | tail -n 40
    ;;
  gguf)
    mkdir -p "$lc"
    if [[ -e "$lc/files.started" && ! -e "$lc/files.done" ]]; then   # prep's files step
      echo "waiting for prep's GGUF files ..."
      while [[ ! -e "$lc/files.done" ]]; do sleep 3; done
    fi
    start_llamacpp_builds
    export PB_GPU_RUN_REUSE=1   # finished dumps of an earlier call are compared, not run again
    # stopped (SIGINT, then SIGKILL) GGUF_BUDGET seconds in, so that what it saved still comes back
    timeout -k 10 -s INT "${GGUF_BUDGET:-560}" python3 scripts/gpu-gguf.py "${GGUF_STEPS:-files,check,parity,bench}" ${GGUF_MODELS:+--models "$GGUF_MODELS"} \
      --out "$out" "${gguf_args[@]}" 2>&1 | tee "$out/run.log"
    mkdir -p "$out/logs"
    cp "$lc"/*.log "$lc"/*.txt "$out/logs/" 2>/dev/null
    for b in cuda cpu; do cp "$lc/$b/build-times.txt" "$out/logs/build-times-$b.txt" 2>/dev/null; done
    for b in "$lc"/cuda "$lc"/cpu; do [[ -f "$b/build-times.txt" ]] && cat "$b/build-times.txt"; done
    [[ -f "$out/dequant-check.json" ]] && tail -n 20 "$out/logs/dequant-check.log"
    ;;
esac
if [[ -d "$out/logs" ]]; then tar czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$out/logs"; fi
