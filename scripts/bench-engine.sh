#!/usr/bin/env bash
# The built-in engine vs llama.cpp, prefill and decode tok/s on the same GGUF files, same
# thread count, same run (benches/bench_engine.py does the measuring; this makes its inputs).
#
#   scripts/bench-engine.sh [--threads N] [--repeats N] [FILE.gguf ...]
#
# Needs `source /root/.cache/paritybench/setup.env` (PARITYBENCH_PYTHON, PARITYBENCH_LLAMACPP,
# PARITYBENCH_LLAMACPP_BIN, PARITYBENCH_CACHE). Work files go to $BENCH_DIR (default
# /work/bench-gguf), never into the fixture cache:
# - llama-bench, compiled from the llama.cpp tree against the static libraries of the
#   existing llama.cpp build (which ships no llama-bench);
# - qwen3-0.6b F16 and Q8_0 GGUF, made with convert_hf_to_gguf.py and llama-quantize from
#   the fixture's safetensors checkpoint.
set -euo pipefail
: "${PARITYBENCH_PYTHON:?source setup.env first}" "${PARITYBENCH_LLAMACPP:?}" "${PARITYBENCH_LLAMACPP_BIN:?}" "${PARITYBENCH_CACHE:?}"
BENCH_DIR=${BENCH_DIR:-/work/bench-gguf}
cd "$(dirname "$0")/.."
mkdir -p "$BENCH_DIR/llama-bench" "$BENCH_DIR/qwen3-0.6b"

LB="$BENCH_DIR/llama-bench/llama-bench"
if [[ ! -x $LB ]]; then
  src=$PARITYBENCH_LLAMACPP
  lib=$(dirname "$PARITYBENCH_LLAMACPP_BIN")   # the build directory (bin/ is inside it)
  inc=(-I"$src/tools/llama-bench" -I"$src/common" -I"$src/vendor" -I"$src/include" -I"$src/ggml/include")
  echo "building $LB" >&2
  c++ -DGGML_USE_CPU -DLLAMA_SUBPROCESS "${inc[@]}" -O3 -DNDEBUG -c "$src/tools/llama-bench/llama-bench.cpp" -o "$BENCH_DIR/llama-bench/llama-bench.o"
  c++ -DGGML_USE_CPU -DLLAMA_SUBPROCESS "${inc[@]}" -O3 -DNDEBUG -c "$src/tools/llama-bench/main.cpp" -o "$BENCH_DIR/llama-bench/main.o"
  c++ -O3 "$BENCH_DIR/llama-bench/main.o" "$BENCH_DIR/llama-bench/llama-bench.o" \
    "$lib/common/libllama-common.a" "$lib/common/libllama-common-base.a" "$lib/vendor/cpp-httplib/libcpp-httplib.a" \
    -lssl -lcrypto "$lib/src/libllama.a" "$lib/ggml/src/libggml.a" -ldl "$lib/ggml/src/libggml-cpu.a" \
    "$lib/ggml/src/libggml-base.a" -lm -lgomp -lpthread -o "$LB"
fi

G="$BENCH_DIR/qwen3-0.6b"
if [[ ! -f $G/qwen3-0.6b-F16.gguf ]]; then
  "$PARITYBENCH_PYTHON" "$PARITYBENCH_LLAMACPP/convert_hf_to_gguf.py" "$PARITYBENCH_CACHE/fixtures/models/qwen3-0.6b" \
    --outtype f16 --outfile "$G/qwen3-0.6b-F16.gguf"
fi
if [[ ! -f $G/qwen3-0.6b-Q8_0.gguf ]]; then
  "$PARITYBENCH_LLAMACPP_BIN/llama-quantize" "$G/qwen3-0.6b-F16.gguf" "$G/qwen3-0.6b-Q8_0.gguf" Q8_0
fi

cargo build --release --bin runner
uptime
exec "$PARITYBENCH_PYTHON" benches/bench_engine.py --runner target/release/runner --llama-bench "$LB" "$@"
