#!/usr/bin/env python3
"""Tables (markdown) from the results-parity.json / results-bench.json that gpu-run.py wrote.

Usage: gpu-summarize.py results-parity.json [MODEL]     parity (and MODEL's CUDA-vs-CPU layers)
       gpu-summarize.py results-bench.json                speed vs HF
       gpu-summarize.py results-gguf.json [dequant-check.json]   GGUF (scripts/gpu-gguf.py)

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


def gguf(res, check=None):
    """The GGUF tables: device dequantization vs host, parity per file type, llama.cpp vs engine."""
    out = []
    if check:
        out += ["| stored type | tensors | elements | elements differing (f32, f16, bf16 outputs) |", "|---|---|---|---|"]
        for t, v in sorted(check["by_type"].items()):
            out.append(f"| {t} | {v['tensors']} | {v['elements']:,} | {v['differing']} |")
        out.append("")
    rows = [k for k in res if k.endswith("/engine-cuda-vs-engine-cpu") or k.endswith("/gguf-vs-safetensors-cuda-f16")]
    if rows:
        out += ["| model | file | comparison | logits relL2 mean / max | worst capture relL2 max (tensor) | min cosine | "
                "top-1 margin-aware | greedy (8 steps) |", "|" + "---|" * 8]
        for k in rows:
            m, t, what = k.split("/")
            v = res[k]
            if "error" in v:
                out.append(f"| {m} | {t} | {what} | {v['error']} | | | | |")
                continue
            w = max(((x.get("rel_l2_max") or 0, n) for n, x in v["layers"].items()), default=(None, ""))
            g = v.get("greedy") or {}
            out.append(f"| {m} | {t} | {what} | {fmt(v['logits_rel_l2_mean'])} / {fmt(v['logits_rel_l2_max'])} | "
                       f"{fmt(w[0])} ({w[1]}) | {v['cosine_min']:.9f} | {v['top1_margin_aware']:.4f} | "
                       f"{g.get('full_matches')}/{g.get('prompts')} |")
        out.append("")
    bw = (res.get("bandwidth") or {}).get("copy_bytes_per_s")
    keys = [k for k in res if isinstance(res[k], dict) and "weight_bytes_per_token" in res[k]]
    if keys:
        out += [f"device-to-device copy bandwidth (read + write): {fmt(bw and bw / 1e9, '.0f')} GB/s "
                f"(after: {fmt((res.get('bandwidth_after') or {}).get('copy_bytes_per_s', 0) / 1e9, '.0f')} GB/s)", "",
                "| model | file | prefill tok/s llama.cpp / engine (ratio) | decode tok/s llama.cpp / engine (ratio) | "
                "peak GPU memory llama.cpp / engine | bytes per token llama.cpp / engine | decode roofline tok/s "
                "llama.cpp / engine | share of roofline llama.cpp / engine |", "|" + "---|" * 8]
        for k in keys:
            m, t = k.split("/")
            v = res[k]
            lc, en = v.get("llamacpp") or {}, v.get("engine") or {}
            f16 = res.get(f"{m}/F16", {}).get("weight_bytes_per_token")  # the engine reads f16 weights
            wb = v["weight_bytes_per_token"]
            roof_l, roof_e = (bw / wb if bw else None), (bw / f16 if bw and f16 else None)

            def ratio(a, b):
                return f"{b / a:.2f}" if a and b else "n/a"

            def share(x, r):
                return fmt(x / r if x and r else None, ".0%")

            gib = lambda b: fmt(b and b / 2**30, ".2f")  # noqa: E731
            out.append(
                f"| {m} | {t} | {fmt(lc.get('prefill_tok_s'), '.0f')} / {fmt(en.get('prefill_tok_s'), '.0f')} "
                f"({ratio(lc.get('prefill_tok_s'), en.get('prefill_tok_s'))}) | {fmt(lc.get('decode_tok_s'), '.1f')} / "
                f"{fmt(en.get('decode_tok_s'), '.1f')} ({ratio(lc.get('decode_tok_s'), en.get('decode_tok_s'))}) | "
                f"{gib(lc.get('peak_gpu_bytes_nvidia_smi'))} / {gib(en.get('peak_gpu_bytes'))} "
                f"({gib(en.get('peak_gpu_bytes_nvidia_smi'))}) GiB | {gib(wb)} / {gib(f16)} GiB | "
                f"{fmt(roof_l, '.0f')} / {fmt(roof_e, '.0f')} | {share(lc.get('decode_tok_s'), roof_l)} / "
                f"{share(en.get('decode_tok_s'), roof_e)} |")
    return "\n".join(out)


def main():
    res = json.loads(open(sys.argv[1]).read())
    if any(isinstance(v, dict) and ("weight_bytes_per_token" in v or "layers" in v) for v in res.values()) and \
            any(k.endswith("/engine-cuda-vs-engine-cpu") or "/F16" in k for k in res):
        check = json.loads(open(sys.argv[2]).read()) if len(sys.argv) > 2 else None
        print(gguf(res, check))
    elif "bandwidth" in res:
        print(bench(res))
    else:
        print(parity(res))
        if len(sys.argv) > 2:
            print()
            print(per_layer(res, sys.argv[2]))


if __name__ == "__main__":
    main()
