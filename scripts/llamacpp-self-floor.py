#!/usr/bin/env python3
"""How far llama.cpp is from itself on one GGUF file: its two CPU attention paths.

llama.cpp's CPU backend computes attention either as separate products with an f16 K/V cache
(flash attention off: what the llama.cpp references of `runner fixtures build` use) or with
its flash-attention kernel (f16 V accumulation, online softmax). Both are llama.cpp, on the
same file, same threads. Their distance is the smallest bar an independent implementation of
llama.cpp's numerics can be held to without replicating its kernels bit for bit.

  $PARITYBENCH_PYTHON scripts/llamacpp-self-floor.py FILE.gguf REQUEST.json [--json OUT]

REQUEST.json: a fixture reference request (token ids and scored positions). Prints the mean
KL(FA off ‖ FA on), top-1 agreement and mean logits rel-L2 over the scored positions, and the
same for 1 thread vs 2 threads (which llama.cpp keeps bit-identical).
"""
import argparse
import json
import os

import numpy as np
import llama_cpp


def scored(req, p):
    pos = p.get("positions") or req.get("positions")
    n = len(p["token_ids"])
    return list(range(n)) if pos in (None, "all") else [i for i in pos if i < n]


def run(model, req, flash_attn, threads):
    llm = llama_cpp.Llama(model_path=model, n_ctx=1024, n_batch=1024, n_ubatch=1024, n_threads=threads,
                          n_threads_batch=threads, seed=0, verbose=False, n_gpu_layers=0,
                          flash_attn=flash_attn, logits_all=True)
    out = []
    for p in req["prompts"]:
        ids = p["token_ids"]
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float64)[scored(req, p)])
    return out


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def distance(a, b):
    kl, agree, n, rel = 0.0, 0, 0, []
    for x, y in zip(a, b):
        p, q = log_softmax(x), log_softmax(y)
        kl += float((np.exp(p) * (p - q)).sum())
        agree += int((x.argmax(-1) == y.argmax(-1)).sum())
        n += len(x)
        rel.extend(np.linalg.norm(x - y, axis=-1) / np.linalg.norm(x, axis=-1))
    return {"kld_mean": kl / n, "top1": agree / n, "rel_l2_mean": float(np.mean(rel)), "positions": n}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("request")
    ap.add_argument("--json")
    a = ap.parse_args()
    req = json.load(open(a.request))
    base = run(a.model, req, False, 2)
    res = {"file": os.path.basename(a.model), "llama-cpp-python": llama_cpp.__version__,
           "fa_on": distance(base, run(a.model, req, True, 2)),
           "one_thread": distance(base, run(a.model, req, False, 1))}
    f, t = res["fa_on"], res["one_thread"]
    print(f"{res['file']}: FA off vs on: KLD mean {f['kld_mean']:.3e}, top-1 {f['top1']:.4f}, rel-L2 mean "
          f"{f['rel_l2_mean']:.3e} | 2 vs 1 threads: KLD {t['kld_mean']:.1e}, top-1 {t['top1']:.4f} "
          f"({f['positions']} positions)")
    if a.json:
        json.dump(res, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
