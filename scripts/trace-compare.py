#!/usr/bin/env python3
"""How far a dump is from llama.cpp's own tensors, capture by capture, bit for bit.

    $PARITYBENCH_PYTHON scripts/trace-compare.py TRACE_DIR DUMP_DIR [--prompt 0]

TRACE_DIR comes from `scripts/llamacpp-trace.py` (the prompt as one batch); DUMP_DIR is a dump
of the same GGUF and token ids with `positions: all` and every capture. Prints, in graph order,
each capture point's llama.cpp tensor, the fraction of elements whose bits differ, and the
largest relative difference, then the same for the prompt's logits: the first row that is not
identical is where an implementation leaves llama.cpp's numerics.
"""
import argparse
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file


def trace_tensors(trace_dir: str, step: int = 0) -> tuple[dict, dict]:
    with open(os.path.join(trace_dir, "index.json")) as f:
        idx = json.load(f)
    out = {}
    for t in idx["tensors"]:
        if t["step"] != step:
            continue
        dt = {"f32": np.float32, "f16": np.float16, "i32": np.int32}[t["type"]]
        ne = [n for n in t["ne"]]
        a = np.fromfile(os.path.join(trace_dir, t["file"]), dtype=dt).reshape(ne[::-1])
        out[t["name"]] = (t, a)
    return idx, out


def capture_names(tensors: dict, n_layers: int) -> list[tuple[str, str]]:
    """(dump key, llama.cpp tensor name) in graph order."""
    pairs = [("hidden.embed.0", "embd")]
    by_src = {}
    for name, (t, _) in tensors.items():
        for s in t["srcs"]:
            by_src.setdefault(s, []).append(name)
    for layer in range(n_layers):
        o_proj = next((n for n, (t, _) in tensors.items() if t["op"] == "MUL_MAT"
                       and f"blk.{layer}.attn_output.weight" in t["srcs"]), None)
        moe = f"ffn_moe_logits-{layer}" in tensors
        pairs += [(f"hidden.attn_norm.{layer}", f"attn_norm-{layer}"), (f"hidden.attn_out.{layer}", o_proj),
                  (f"hidden.ffn_norm.{layer}", f"ffn_norm-{layer}")]
        if moe:
            pairs += [(f"hidden.moe_router.{layer}", f"ffn_moe_logits-{layer}"),
                      (f"hidden.moe_topk_ids.{layer}", f"ffn_moe_topk-{layer}")]
        pairs += [(f"hidden.ffn_out.{layer}", f"ffn_moe_out-{layer}" if moe else f"ffn_out-{layer}"),
                  (f"hidden.layer_out.{layer}", f"l_out-{layer}")]
    pairs.append(("hidden.final_norm.0", "result_norm"))
    pairs.append(("logits", "result_output"))
    return pairs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("dump")
    ap.add_argument("--prompt", type=int, default=0)
    args = ap.parse_args()
    idx, tensors = trace_tensors(args.trace)
    dump = load_file(os.path.join(args.dump, f"p{args.prompt}.safetensors"))
    if list(dump["token_ids"]) != idx["tokens"]:
        print("trace-compare: the dump's token ids are not the trace's", file=sys.stderr)
        return 2
    n_layers = 1 + max(int(k.rsplit(".", 1)[1]) for k in dump if k.startswith("hidden.layer_out."))
    first = None
    print(f"{'capture':<24} {'llama.cpp tensor':<22} {'bits differ':>12} {'max rel':>10}")
    for key, name in capture_names(tensors, n_layers):
        if key not in dump or name is None or name not in tensors:
            continue
        ref = tensors[name][1].reshape(dump[key].shape[0], -1)
        ours = dump[key]
        if ref.shape != ours.shape:
            print(f"{key:<24} {name:<22} shape {list(ours.shape)} vs {list(ref.shape)}")
            continue
        if ours.dtype == np.int32:
            diff = np.mean(ours != ref)
            rel = float("nan")
        else:
            diff = np.mean(ours.view(np.uint32) != ref.astype(np.float32).view(np.uint32))
            den = np.maximum(np.abs(ref).max(axis=-1, keepdims=True), 1e-30)
            rel = float(np.max(np.abs(ours - ref) / den))
        if diff and first is None:
            first = key
        print(f"{key:<24} {name:<22} {diff:>12.6f} {rel:>10.3g}")
    print(f"first capture that differs: {first or 'none (bit-identical)'}")
    return 0 if first is None else 1


if __name__ == "__main__":
    sys.exit(main())
