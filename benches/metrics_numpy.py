#!/usr/bin/env python3
"""The metrics of `runner compare` computed with numpy, on the data of `benches/metrics.rs`.

Reads the same safetensors files (memory-mapped, `logits` [P, V], f32 or f16) that the
criterion bench writes to $PARITYBENCH_BENCH_DIR (default /tmp/paritybench-bench; run the
criterion bench first), and computes per position, in float64 like the Rust kernels:
relative L2, cosine, NMSE, max |delta|, KL(ref || engine) with log-softmax on both sides, and
top-1/5/10 overlap. Prints seconds per metric family and for the full set (median of
--repeats), and a JSON line at the end for scripts.

    $PARITYBENCH_PYTHON benches/metrics_numpy.py [--rows 2048] [--repeats 3] [--dtype f32 f16]
"""

import argparse
import json
import os
import statistics
import struct
import time

import numpy as np

VOCAB = 151_936
CHUNK = 16  # rows per numpy call: [16, V] float64 temporaries of 19 MB


def open_logits(path):
    """The `logits` tensor of a safetensors file as a read-only memory map."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    info = header["logits"]
    dtype = {"F32": np.float32, "F16": np.float16}[info["dtype"]]
    start = 8 + n + info["data_offsets"][0]
    return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=tuple(info["shape"]))


def diff_metrics(a, b):
    """rel-L2, cosine, NMSE, max|delta| per row; a, b: [r, V] float64."""
    d = a - b
    dd = np.einsum("ij,ij->i", d, d)
    aa = np.einsum("ij,ij->i", a, a)
    bb = np.einsum("ij,ij->i", b, b)
    ab = np.einsum("ij,ij->i", a, b)
    return np.sqrt(dd / bb), ab / (np.sqrt(aa) * np.sqrt(bb)), dd / bb, np.abs(d).max(axis=1)


def log_softmax(x):
    m = x.max(axis=1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kld(a, b):
    """KL(softmax(b) || softmax(a)) per row, log-softmax of both sides in float64."""
    lp, lq = log_softmax(b), log_softmax(a)
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


def top10(x):
    """The 10 largest ids per row, descending (ties: lower id first)."""
    part = np.argpartition(-x, 10, axis=1)[:, :10]
    vals = np.take_along_axis(x, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, axis=1)


def topk_overlap(a, b):
    ta, tb = top10(a), top10(b)
    top1 = ta[:, 0] == tb[:, 0]
    o5 = np.array([len(set(x[:5]) & set(y[:5])) / 5 for x, y in zip(ta, tb)])
    o10 = np.array([len(set(x) & set(y)) / 10 for x, y in zip(ta, tb)])
    return top1, o5, o10


def run(a, b, which):
    """One pass over all rows computing the metric families in `which`; returns checksums."""
    out = []
    for s in range(0, a.shape[0], CHUNK):
        x = np.asarray(a[s : s + CHUNK], dtype=np.float64)
        y = np.asarray(b[s : s + CHUNK], dtype=np.float64)
        if "diff" in which:
            out.append(diff_metrics(x, y)[0].sum())
        if "kld" in which:
            out.append(kld(x, y).sum())
        if "topk" in which:
            out.append(topk_overlap(x, y)[1].sum())
    return float(np.sum(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048, help="the files' row count (as PARITYBENCH_BENCH_ROWS)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", nargs="+", default=["f32", "f16"])
    args = ap.parse_args()
    d = os.environ.get("PARITYBENCH_BENCH_DIR", "/tmp/paritybench-bench")
    results = {}
    for dt in args.dtype:
        a = open_logits(f"{d}/logits-a-{dt}-{args.rows}.safetensors")
        b = open_logits(f"{d}/logits-b-{dt}-{args.rows}.safetensors")
        nbytes = a.nbytes + b.nbytes
        for name, which in [("diff", {"diff"}), ("topk", {"topk"}), ("kld", {"kld"}), ("full", {"diff", "kld", "topk"})]:
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run(a, b, which)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            results[f"{dt}/{name}"] = {"median_s": med, "min_s": min(times), "max_s": max(times), "gb_s": nbytes / med / 1e9}
            print(f"numpy {dt:>3} {name:<5} median {med:8.3f} s  (min {min(times):.3f}, max {max(times):.3f}, "
                  f"n={len(times)})  {nbytes / med / 1e9:6.2f} GB/s of input", flush=True)
    print(json.dumps({"numpy": np.__version__, "rows": args.rows, "vocab": VOCAB, "results": results}))


if __name__ == "__main__":
    main()
