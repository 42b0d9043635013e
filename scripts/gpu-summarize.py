#!/usr/bin/env python3
"""Tables (markdown) from the results-parity.json / results-bench.json that gpu-run.py wrote.

Usage: gpu-summarize.py results-parity.json [results-bench.json]

Parity, per model and dtype: the floor (HF SDPA vs HF eager, same GPU, same sitting), the
engine on CUDA vs HF eager, their ratio (acceptance: <= 2), the worst per-capture ratio, the
margin-aware top-1 and the minimum cosine of the logits (the seeds' gate: >= 0.99).
"""

import json
import sys


def fmt(x, spec=".2e"):
    return "n/a" if x is None else format(x, spec)


def parity(res):
    out = ["| model | dtype | floor relL2 mean / max | engine vs HF eager mean / max | ratio (mean, max) | "
           "worst capture ratio (tensor) | same, floor > 0 only | top-1 margin-aware | min cosine |", "|" + "---|" * 9]
    models = sorted({k.split("/")[0] for k in res if "/" in k})
    for m in models:
        for dt in ("f32", "f16", "bf16"):
            f, e = res.get(f"{m}/{dt}/floor-hf-sdpa-vs-eager"), res.get(f"{m}/{dt}/engine-vs-hf-eager")
            if not f or not e or "error" in f or "error" in e:
                out.append(f"| {m} | {dt} | {(f or {}).get('error', '')} | {(e or {}).get('error', 'missing')} | | | | | |")
                continue
            rm = e["logits_rel_l2_mean"] / max(f["logits_rel_l2_mean"], 1e-12)
            rx = e["logits_rel_l2_max"] / max(f["logits_rel_l2_max"], 1e-12)
            # floors clamped at 1e-6 as `runner compare --min-floor` does; the captures before
            # the first attention (embed, attn_norm.0) have a zero floor by construction
            worst, wt, worst_pos, wpt = 0.0, "", 0.0, ""
            for t, v in e["layers"].items():
                fl = f["layers"].get(t, {}).get("rel_l2")
                if v.get("rel_l2") is None or fl is None:
                    continue
                r = v["rel_l2"] / max(fl, 1e-6)
                if r > worst:
                    worst, wt = r, t
                if fl > 0 and r > worst_pos:
                    worst_pos, wpt = r, t
            out.append(f"| {m} | {dt} | {fmt(f['logits_rel_l2_mean'])} / {fmt(f['logits_rel_l2_max'])} | "
                       f"{fmt(e['logits_rel_l2_mean'])} / {fmt(e['logits_rel_l2_max'])} | {rm:.2f}, {rx:.2f} | "
                       f"{worst:.2f} ({wt}) | {worst_pos:.2f} ({wpt}) | {e['top1_margin_aware']:.4f} | {e['cosine_min']:.6f} |")
    out += ["", "| model | engine CUDA f32 vs engine CPU f32: logits relL2 max | worst layer relL2 (tensor) | "
            "CUDA f16 run twice: relL2 max | CUDA incremental vs prefill: relL2 max |", "|---|---|---|---|---|"]
    for m in models:
        c = res.get(f"{m}/f32/engine-cuda-vs-engine-cpu") or {}
        rep = res.get(f"{m}/f16/engine-cuda-repeat") or {}
        inc = res.get(f"{m}/f32/engine-cuda-incremental-vs-prefill") or {}
        worst = max(((v.get("rel_l2_max") or 0, t) for t, v in c.get("layers", {}).items()), default=(None, ""))
        out.append(f"| {m} | {fmt(c.get('logits_rel_l2_max'))} | {fmt(worst[0])} ({worst[1]}) | "
                   f"{fmt(rep.get('logits_rel_l2_max'))} | {fmt(inc.get('logits_rel_l2_max'))} |")
    return "\n".join(out)


def per_layer(res, m):
    c = res.get(f"{m}/f32/engine-cuda-vs-engine-cpu") or {}
    rows = ["| tensor | relL2 mean | relL2 max | min cosine |", "|---|---|---|---|"]
    for t, v in c.get("layers", {}).items():
        rows.append(f"| {t} | {fmt(v.get('rel_l2'))} | {fmt(v.get('rel_l2_max'))} | {fmt(v.get('cosine_min'), '.7f')} |")
    return "\n".join(rows)


def bench(res):
    bw = (res.get("bandwidth") or {}).get("copy_bytes_per_s")
    out = [f"device-to-device copy bandwidth (read + write): {fmt(bw and bw / 1e9, '.0f')} GB/s", "",
           "| model | runner | prefill tok/s | decode tok/s | peak GPU memory | weights fp16 | decode roofline tok/s | "
           "share of roofline |", "|" + "---|" * 8]
    for k, v in res.items():
        if not k.startswith("bench-") or "error" in v:
            if k.startswith("bench-"):
                out.append(f"| {k} | {v.get('error')} | | | | | | |")
            continue
        m, runner = k[len("bench-"):].split("-hf-") if "-hf-" in k else k[len("bench-"):].split("-engine-")
        runner = ("hf " if "-hf-" in k else "engine ") + runner
        roof = bw / v["weight_bytes_fp16"] if bw and v.get("weight_bytes_fp16") else None
        share = v["decode_tok_s"] / roof if roof and v.get("decode_tok_s") else None
        out.append(f"| {m} | {runner} | {fmt(v.get('prefill_tok_s'), '.0f')} | {fmt(v.get('decode_tok_s'), '.1f')} | "
                   f"{fmt(v.get('peak_gpu_bytes') and v['peak_gpu_bytes'] / 2**30, '.2f')} GiB | "
                   f"{fmt(v['weight_bytes_fp16'] / 2**30, '.2f')} GiB | {fmt(roof, '.0f')} | {fmt(share, '.0%')} |")
    return "\n".join(out)


def main():
    res = json.loads(open(sys.argv[1]).read())
    if "bandwidth" in res:
        print(bench(res))
    else:
        print(parity(res))
        if len(sys.argv) > 2:
            print()
            print(per_layer(res, sys.argv[2]))


if __name__ == "__main__":
    main()
