#!/usr/bin/env bash
# llama.cpp with CUDA on a GPU machine that has nvcc, cmake and ninja but no network.
#
#   bash scripts/gpu-llamacpp.sh trim DEST     # here: a trimmed source tree (< 40 MiB) from the
#                                              # one sdist setup.sh unpacked into the cache
#   bash scripts/gpu-llamacpp.sh build SRC BUILD [ARCH]   # on the GPU machine: llama-bench,
#                                              # llama-quantize (CUDA, sm_ARCH, default 90)
#   bash scripts/gpu-llamacpp.sh build-cpu SRC BUILD      # llama-quantize alone without CUDA
#                                              # (minutes sooner; quantizing runs on the CPU anyway)
#
# The tree keeps what the CUDA build of llama-bench and llama-quantize and the conversion
# script need: ggml (CPU and CUDA backends only), src, include, common, vendor, cmake, the two
# tools, convert_hf_to_gguf.py with conversion/ and gguf-py. tools/CMakeLists.txt is replaced
# by one that adds only those two tools; nothing else is changed. `trim` writes
# DEST/SOURCE.txt naming the sdist and its sha256, so a result can say which llama.cpp it ran.
# `build` prints the configure and build times and writes them to BUILD/build-times.txt once
# the binaries are linked (BUILD.failed.txt with the error instead), logs in BUILD.*.log.
set -euo pipefail
cmd="${1:?usage: gpu-llamacpp.sh trim DEST | build SRC BUILD [ARCH] | build-cpu SRC BUILD}"

case "$cmd" in
  trim)
    dest="${2:?trim DEST}"
    cache="${PARITYBENCH_CACHE:-$HOME/.cache/paritybench}"
    sdist="$(ls -d "$cache"/llamacpp/llama_cpp_python-*/ | head -n1)"
    src="$sdist/vendor/llama.cpp"
    [[ -f "$src/CMakeLists.txt" ]] || { echo "gpu-llamacpp: no llama.cpp tree under $cache/llamacpp (run runners/setup.sh)" >&2; exit 2; }
    rm -rf "$dest"
    mkdir -p "$dest/ggml/src" "$dest/tools"
    cp -a "$src"/{CMakeLists.txt,LICENSE,cmake,src,include,common,vendor,gguf-py,conversion,convert_hf_to_gguf.py} "$dest/"
    cp -a "$src"/ggml/{CMakeLists.txt,cmake,include} "$dest/ggml/"
    # ggml/src: its own files and the two backends built (the others are only added when enabled)
    find "$src/ggml/src" -maxdepth 1 -type f -exec cp -a {} "$dest/ggml/src/" \;
    cp -a "$src"/ggml/src/{ggml-cpu,ggml-cuda} "$dest/ggml/src/"
    cp -a "$src"/tools/{llama-bench,quantize} "$dest/tools/"
    cat > "$dest/tools/CMakeLists.txt" <<'EOF'
# trimmed by scripts/gpu-llamacpp.sh: only the tools the GPU benchmarks use
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
add_subdirectory(quantize)
EOF
    # vendor/miniaudio (4 MiB) is only used by tools/mtmd; keep an empty target for its CMakeLists
    rm -rf "$dest/vendor/miniaudio"/*
    printf 'add_library(miniaudio INTERFACE)\nadd_library(vendor::miniaudio ALIAS miniaudio)\n' > "$dest/vendor/miniaudio/CMakeLists.txt"
    find "$dest" -name '__pycache__' -prune -exec rm -rf {} +
    ver="$(basename "$sdist")"
    sha="$(sha256sum "$cache"/dl/"$ver".tar.gz 2>/dev/null | cut -d' ' -f1 || true)"
    echo "$ver (vendor/llama.cpp) sdist sha256:${sha:-unknown}, trimmed by scripts/gpu-llamacpp.sh" > "$dest/SOURCE.txt"
    du -sh "$dest"
    ;;
  build|build-cpu)
    src="${2:?build SRC BUILD}"; build="${3:?build SRC BUILD}"; arch="${4:-90}"
    jobs="$(nproc)"
    if [[ "$cmd" == build ]]; then
      command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
      backend=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DGGML_CUDA_FA_ALL_QUANTS=OFF -DGGML_CUDA_NCCL=OFF)
      targets=(llama-bench llama-quantize)
      what="CUDA (sm_$arch)"
    else
      backend=(-DGGML_CUDA=OFF)
      targets=(llama-quantize)
      what="CPU only"
    fi
    t0=$(date +%s)
    cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "${backend[@]}" \
      -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
      -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON > "$build.configure.log" 2>&1 \
      || { tail -40 "$build.configure.log" | tee "$build.failed.txt"; exit 1; }
    t1=$(date +%s)
    cmake --build "$build" -j "$jobs" --target "${targets[@]}" > "$build.build.log" 2>&1 \
      || { { grep -m5 -B2 -A8 -i 'error' "$build.build.log"; tail -20 "$build.build.log"; } | tee "$build.failed.txt"; exit 1; }
    t2=$(date +%s)
    echo "llama.cpp $what (${targets[*]}): configure $((t1 - t0)) s, build $((t2 - t1)) s with $jobs jobs" | tee "$build/build-times.txt"
    ;;
  *)
    echo "gpu-llamacpp: unknown command $cmd (trim | build | build-cpu)" >&2; exit 2
    ;;
esac
