#!/usr/bin/env python3
"""ggml's own activation quantizers and quantized dot products, called through ctypes.

    ggml_quant_dot.py IN.safetensors OUT.safetensors

Run by tests/quant_dot.rs with $PARITYBENCH_PYTHON. Loads the libggml-cpu shared library that
llama-cpp-python ships (the build the llama.cpp reference dumps come from), calls
`ggml_cpu_init`, and for every case `i` of IN:
  `w.i`  (u8)  one weight row in ggml type `type.i` (metadata: the ggml type id)
  `x.i`  (f32) one activation row
computes, with `ggml_get_type_traits_cpu(type)`:
  `q.i`   (u8)  `type_traits_cpu[vec_dot_type].from_float(x)`: the quantized activation row
  `dot.i` (f32) `type_traits_cpu[type].vec_dot(n, w, q)`
and writes them to OUT. The library is found in the installed `llama_cpp` package (`lib/`),
or in $PARITYBENCH_GGML_LIB_DIR. Exit 2 when it cannot be found or lacks the symbols.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path


class TypeTraitsCpu(ctypes.Structure):
    # ggml-cpu.h: struct ggml_type_traits_cpu
    _fields_ = [
        ("from_float", ctypes.c_void_p),
        ("vec_dot", ctypes.c_void_p),
        ("vec_dot_type", ctypes.c_int),
        ("nrows", ctypes.c_int64),
    ]


FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t,
                           ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
# (elements per block, bytes per block) of the activation types, ggml.c's type_traits
ACT_LAYOUT = {8: (32, 34), 9: (32, 36), 15: (256, 292)}


def lib_dir() -> Path:
    env = os.environ.get("PARITYBENCH_GGML_LIB_DIR")
    if env:
        return Path(env)
    import importlib.util
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        sys.exit("ggml_quant_dot.py: the llama_cpp package is not installed (runners/setup.sh installs it)")
    return Path(spec.origin).parent / "lib"


def load():
    d = lib_dir()
    base = sorted(d.glob("libggml-base.so*"))
    cpu = sorted(d.glob("libggml-cpu.so*"))
    if not base or not cpu:
        print(f"ggml_quant_dot.py: libggml-base.so / libggml-cpu.so not found in {d}: "
              f"{sorted(p.name for p in d.glob('*.so*'))}", file=sys.stderr)
        sys.exit(2)
    ctypes.CDLL(str(base[0]), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(str(cpu[0]), mode=ctypes.RTLD_GLOBAL)
    try:
        lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(TypeTraitsCpu)
        lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        lib.ggml_cpu_init.restype = None
    except AttributeError as e:
        print(f"ggml_quant_dot.py: {cpu[0]} lacks a symbol: {e}", file=sys.stderr)
        sys.exit(2)
    lib.ggml_cpu_init()
    return lib, cpu[0]


def main() -> None:
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    src, dst = sys.argv[1], sys.argv[2]
    lib, path = load()
    out: dict[str, np.ndarray] = {}
    with safe_open(src, framework="numpy") as f:
        meta = f.metadata() or {}
        n_cases = int(meta["cases"])
        for i in range(n_cases):
            ty = int(meta[f"type.{i}"])
            w = np.ascontiguousarray(f.get_tensor(f"w.{i}"), dtype=np.uint8)
            x = np.ascontiguousarray(f.get_tensor(f"x.{i}"), dtype=np.float32)
            tr = lib.ggml_get_type_traits_cpu(ty).contents
            vt = lib.ggml_get_type_traits_cpu(tr.vec_dot_type).contents
            if not tr.vec_dot or not vt.from_float or tr.vec_dot_type not in ACT_LAYOUT:
                print(f"ggml_quant_dot.py: type {ty}: no vec_dot/from_float (vec_dot_type {tr.vec_dot_type})",
                      file=sys.stderr)
                sys.exit(2)
            bs, ts = ACT_LAYOUT[tr.vec_dot_type]
            n = x.size
            q = np.zeros(n // bs * ts, dtype=np.uint8)
            FROM_FLOAT(vt.from_float)(x.ctypes.data, q.ctypes.data, n)
            s = ctypes.c_float(0.0)
            VEC_DOT(tr.vec_dot)(n, ctypes.byref(s), 0, w.ctypes.data, 0, q.ctypes.data, 0, 1)
            out[f"q.{i}"] = q
            out[f"dot.{i}"] = np.array([s.value], dtype=np.float32)
    save_file(out, dst, metadata={"library": str(path)})


if __name__ == "__main__":
    main()
