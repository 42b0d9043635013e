#!/usr/bin/env python3
"""Every tensor llama.cpp's CPU backend computes for one prompt, bit for bit.

    $PARITYBENCH_PYTHON scripts/llamacpp-trace.py FILE.gguf OUT_DIR --tokens 1,2,3 [--decode N]
                        [--threads N] [--flash-attn]

Runs the prompt as one batch (as the llama.cpp reference adapter does: n_batch = n_ubatch =
the prompt length, f16 K/V cache, flash attention off unless asked) through llama-cpp-python's
low-level API with ggml's eval callback, then N greedy single-token steps, and writes:

- `OUT_DIR/index.json`: one entry per computed tensor, in graph order:
  `{"step", "name", "op", "type", "ne", "srcs", "file"}` (`step` 0 is the prompt batch, 1.. the
  decode steps; a name seen twice in a step gets `#1`, `#2`, ...);
- `OUT_DIR/NNNNN.bin`: the tensor's elements, contiguous, `ne[0]` fastest, in its own type
  (f32, f16, i32), read through its strides (views and permutes included);
- `OUT_DIR/logits.bin`: f32 `[steps, V]`-shaped logits of every evaluated token, as
  llama.cpp returned them with the callback on, and `logits-plain.bin` from a second run
  without it (the callback splits the graph at every node; the two must be identical).

For finding where an implementation first leaves llama.cpp's numerics, op by op.
"""
import argparse
import ctypes
import json
import os
import sys

import numpy as np
import llama_cpp as lc

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_NAME, GGML_MAX_OP_PARAMS = 4, 10, 64, 64


class GgmlTensor(ctypes.Structure):
    pass


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]

# ggml_type -> (numpy dtype, file tag); the types an f32 graph's activations take
TYPES = {0: (np.float32, "f32"), 1: (np.float16, "f16"), 26: (np.int32, "i32"), 30: (np.uint16, "bf16")}

_libggml = None


def op_name(op: int) -> str:
    global _libggml
    if _libggml is None:
        import glob
        libdir = os.path.join(os.path.dirname(lc.__file__), "lib")
        cands = sorted(glob.glob(os.path.join(libdir, "libggml-base.so*"))) or sorted(glob.glob(os.path.join(libdir, "libggml.so*")))
        _libggml = ctypes.CDLL(cands[0])
        _libggml.ggml_op_name.restype = ctypes.c_char_p
        _libggml.ggml_op_name.argtypes = [ctypes.c_int]
    return _libggml.ggml_op_name(op).decode()


def read_tensor(t: GgmlTensor) -> np.ndarray | None:
    if t.type not in TYPES or not t.data:
        return None
    dt, _ = TYPES[t.type]
    ne = [t.ne[i] for i in range(GGML_MAX_DIMS)]
    nb = [t.nb[i] for i in range(GGML_MAX_DIMS)]
    span = sum((ne[i] - 1) * nb[i] for i in range(GGML_MAX_DIMS)) + np.dtype(dt).itemsize
    buf = (ctypes.c_char * span).from_address(t.data)
    base = np.frombuffer(buf, dtype=np.uint8)
    a = np.lib.stride_tricks.as_strided(base.view(dt) if span % np.dtype(dt).itemsize == 0 else base[: span - span % np.dtype(dt).itemsize].view(dt),
                                        shape=ne[::-1], strides=nb[::-1])
    return np.ascontiguousarray(a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("out")
    ap.add_argument("--tokens", required=True, help="comma-separated token ids of the prompt")
    ap.add_argument("--decode", type=int, default=0, help="greedy single-token steps after the prompt")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--flash-attn", action="store_true")
    ap.add_argument("--n-ctx", type=int, default=0, help="context size (default: prompt + decode, as the adapter)")
    args = ap.parse_args()
    ids = [int(x) for x in args.tokens.split(",") if x.strip()]
    os.makedirs(args.out, exist_ok=True)

    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = lc.llama_model_load_from_file(args.gguf.encode(), mp)
    if not model:
        print(f"llamacpp-trace: {args.gguf}: llama.cpp could not load it", file=sys.stderr)
        return 2
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))

    index, seen, state = [], {}, {"step": 0}

    @lc.ggml_backend_sched_eval_callback
    def cb(tp, ask, _ud):
        if ask:
            return True
        t = ctypes.cast(tp, ctypes.POINTER(GgmlTensor)).contents
        a = read_tensor(t)
        if a is None:
            return True
        name = t.name.decode(errors="replace")
        key = (state["step"], name)
        n = seen.get(key, 0)
        seen[key] = n + 1
        if n:
            name = f"{name}#{n}"
        f = f"{len(index):05d}.bin"
        a.tofile(os.path.join(args.out, f))
        srcs = []
        for i in range(GGML_MAX_SRC):
            if t.src[i]:
                srcs.append(t.src[i].contents.name.decode(errors="replace"))
        index.append({"step": state["step"], "name": name, "op": op_name(t.op), "type": TYPES[t.type][1],
                      "ne": [int(t.ne[i]) for i in range(GGML_MAX_DIMS)], "srcs": srcs, "file": f,
                      "op_params": [int(x) for x in t.op_params[:8]]})
        return True

    def run(callback) -> np.ndarray:
        cp = lc.llama_context_default_params()
        cp.n_ctx = args.n_ctx or (len(ids) + args.decode)
        cp.n_batch = cp.n_ubatch = len(ids)
        cp.n_threads = cp.n_threads_batch = args.threads
        cp.flash_attn_type = 1 if args.flash_attn else 0
        if callback is not None:
            cp.cb_eval = callback
            cp.cb_eval_user_data = None
        ctx = lc.llama_init_from_model(model, cp)
        logits = []

        def decode(toks, first_pos):
            b = lc.llama_batch_init(len(toks), 0, 1)
            b.n_tokens = len(toks)
            for i, tok in enumerate(toks):
                b.token[i] = tok
                b.pos[i] = first_pos + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = 1
            rc = lc.llama_decode(ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            out = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(len(toks) * n_vocab,)).copy()
            lc.llama_batch_free(b)
            return out.reshape(len(toks), n_vocab)

        state["step"] = 0
        lg = decode(ids, 0)
        logits.append(lg)
        nxt = int(np.argmax(lg[-1]))
        for s in range(args.decode):
            state["step"] = s + 1
            lg = decode([nxt], len(ids) + s)
            logits.append(lg)
            nxt = int(np.argmax(lg[-1]))
        lc.llama_free(ctx)
        return np.concatenate(logits).astype(np.float32)

    traced = run(cb)
    plain = run(None)
    traced.tofile(os.path.join(args.out, "logits.bin"))
    plain.tofile(os.path.join(args.out, "logits-plain.bin"))
    same = bool(np.array_equal(traced.view(np.uint32), plain.view(np.uint32)))
    with open(os.path.join(args.out, "index.json"), "w") as fh:
        json.dump({"gguf": os.path.abspath(args.gguf), "tokens": ids, "decode": args.decode, "n_vocab": n_vocab,
                   "threads": args.threads, "flash_attn": args.flash_attn, "callback_changes_nothing": same,
                   "tensors": index}, fh, indent=0)
    print(f"llamacpp-trace: {len(index)} tensors in {args.out}; logits with and without the callback "
          f"{'identical' if same else 'DIFFER'}", file=sys.stderr)
    lc.llama_model_free(model)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
