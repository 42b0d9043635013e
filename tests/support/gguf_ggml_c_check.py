#!/usr/bin/env python3
"""How far ggml's C dequantization is from gguf-py's (the spec our Rust code matches bit for bit).

Run with $PARITYBENCH_PYTHON after tests/support/gguf_make.py. Compiles a small harness
around ggml's `type_traits->to_float` twice:
  built   linked against the libggml-base.a that runners/setup.sh built (ggml-quants.c as
          llama.cpp's CMake compiles it: -O3 -std=gnu11, no -march)
  native  with ggml-quants.c recompiled -O3 -std=gnu11 -march=native, where GCC may contract
          `x*d + m` into a fused multiply-add (GNU C defaults to -ffp-contract=fast)
and prints, per ggml type, how many elements differ from gguf-py and by how many ulps, over
the reference tensors gguf_make.py wrote (random blocks of every type, and the model files). F32 has no to_float (a copy) and is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"
/* usage: harness TYPE N < blocks > floats */
int main(int argc, char ** argv) {
    if (argc != 3) return 2;
    enum ggml_type type = (enum ggml_type) atoi(argv[1]);
    long n = atol(argv[2]);
    size_t nbytes = ggml_row_size(type, n);
    void * in = malloc(nbytes);
    float * out = malloc(n * sizeof(float));
    if (fread(in, 1, nbytes, stdin) != nbytes) return 3;
    ggml_get_type_traits(type)->to_float(in, out, n);
    fwrite(out, sizeof(float), n, stdout);
    return 0;
}
"""


def build(tmp: Path, tree: Path, build_dir: Path, native: bool) -> Path:
    inc = [f"-I{tree}/ggml/include", f"-I{tree}/ggml/src"]
    src = tmp / "harness.c"
    src.write_text(HARNESS)
    exe = tmp / ("harness-native" if native else "harness-built")
    objs = []
    if native:
        obj = tmp / "ggml-quants-native.o"
        subprocess.run(["gcc", "-O3", "-std=gnu11", "-march=native", "-D_GNU_SOURCE", *inc, "-c",
                        str(tree / "ggml/src/ggml-quants.c"), "-o", str(obj)], check=True)
        objs = [str(obj), "-Wl,--allow-multiple-definition"]
    subprocess.run(["g++", "-O2", "-x", "c", str(src), "-x", "none", *inc, *objs,
                    str(build_dir / "ggml/src/libggml-base.a"), "-lm", "-lpthread", "-fopenmp", "-o", str(exe)],
                   check=True)
    return exe


def ulps(a, b):
    import numpy as np
    ia = a.view(np.int32).astype(np.int64)
    ib = b.view(np.int32).astype(np.int64)
    ia = np.where(ia < 0, -(2**31) - ia, ia)
    ib = np.where(ib < 0, -(2**31) - ib, ib)
    return np.abs(ia - ib)


def main() -> None:
    import numpy as np
    tree = Path(os.environ["PARITYBENCH_LLAMACPP"])
    build_dir = Path(os.environ["PARITYBENCH_LLAMACPP_BIN"]).parent
    sys.path.insert(0, str(tree / "gguf-py"))
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    root = Path(os.environ.get("PARITYBENCH_CACHE", Path.home() / ".cache/paritybench")) / "test-gguf"
    files = [root / "all-types.gguf"] + sorted(root.glob("qwen3-*/*.gguf"))
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        exes = {"built": build(tmp, tree, build_dir, False), "native": build(tmp, tree, build_dir, True)}
        stats: dict[tuple[str, str], list[int]] = {}
        for path in files:
            ref = load_file(str(path) + ".ref.safetensors")
            for tensor in GGUFReader(path).tensors:
                if tensor.name not in ref or tensor.tensor_type.name in ("Q3_K", "F32"):
                    continue
                want = ref[tensor.name].reshape(-1)
                raw = np.asarray(tensor.data).tobytes()
                for label, exe in exes.items():
                    r = subprocess.run([str(exe), str(int(tensor.tensor_type)), str(want.size)], input=raw,
                                       stdout=subprocess.PIPE, check=True)
                    got = np.frombuffer(r.stdout, dtype=np.float32)
                    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
                    d = ulps(got[~same], want[~same]) if (~same).any() else np.zeros(0, dtype=np.int64)
                    s = stats.setdefault((label, tensor.tensor_type.name), [0, 0, 0])
                    s[0] += want.size
                    s[1] += int((~same).sum())
                    s[2] = max(s[2], int(d.max()) if d.size else 0)
        for (label, ty), (n, diff, worst) in sorted(stats.items()):
            print(f"{label:6} {ty:5} elements {n:9d}  differ from gguf-py {diff:8d}  max ulp {worst}")


if __name__ == "__main__":
    main()
