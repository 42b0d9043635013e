#!/usr/bin/env python3
"""Parity and speed of the built-in engine on a CUDA GPU, against HF transformers on the same GPU.

Runs on the GPU machine with a prebuilt `runner` (no Rust there). Two phases, each fits one
short session on the machine:

  parity  regenerate the seeded models (`runner fixtures gen`), HF references on CUDA
          (FP32 with TF32 off, FP16, BF16; eager and SDPA), the engine on CUDA in the same
          dtypes (prefill, plus one incremental run), the engine on CPU (f32), then
          `runner compare` for: HF eager vs SDPA (the floor), engine vs HF eager, engine CUDA
          vs engine CPU (per layer), engine CUDA run twice (repeatability).
  bench   prefill / decode tok/s and peak GPU memory of the engine vs HF (FP16, eager and
          SDPA) on realistic-size models: the seeded qwen3-0.6b, and dense / MoE Qwen3 shapes
          written on the machine by scripts/gpu-bench-models.py (random weights: speed only).

Usage: gpu-run.py parity|bench --runner PATH --out DIR [--models a,b] [--template REQ.json]
Everything it writes goes under --out: results.json, summary.md, and logs/.
"""

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def log(msg):
    print(f"[gpu-run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd, logfile, env=None, timeout=None):
    """Runs cmd, output to logfile; returns (rc, seconds)."""
    t = time.time()
    with open(logfile, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        try:
            rc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.time() - t


def request(template, model_dir, device, dtype, mode="prefill", attention=None, **over):
    r = json.loads(Path(template).read_text())
    r["model"] = {"path": str(model_dir)}
    # local smoke test of this script on a machine without a GPU: PB_GPU_RUN_DEVICE=cpu
    # PB_GPU_RUN_SMOKE=1 (two prompts, four decode steps)
    if os.environ.get("PB_GPU_RUN_DEVICE") and device.startswith("cuda"):
        device = os.environ["PB_GPU_RUN_DEVICE"]
    if os.environ.get("PB_GPU_RUN_SMOKE"):
        r["prompts"] = r["prompts"][:2]
        r["decode_steps"] = 4
    r["device"] = device
    r["dtype"] = dtype
    r["mode"] = mode
    r["warmup"] = 0
    r["repeats"] = 1
    r["options"] = {"attention": attention} if attention else {}
    r.update(over)
    return r


class Ctx:
    def __init__(self, args):
        self.runner = Path(args.runner).resolve()
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve()
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.py = os.environ.get("PARITYBENCH_PYTHON", sys.executable)
        self.adapter = REPO / "runners" / "hf" / "adapter.py"
        self.results = {}

    def save(self, phase):
        """Results so far (a run cut short by a time limit keeps what it finished)."""
        (self.out / f"results-{phase}.json").write_text(json.dumps(self.results, indent=1, default=str))

    def reused(self, name):
        """With PB_GPU_RUN_REUSE=1 (script development), a finished dump is not run again."""
        d = self.work / name
        if os.environ.get("PB_GPU_RUN_REUSE") and (d / "manifest.json").exists():
            return json.loads((d / "manifest.json").read_text()).get("complete") and d
        return None

    def run_hf(self, name, req):
        if self.reused(name):
            return self.work / name
        rp = self.work / f"{name}.request.json"
        rp.write_text(json.dumps(req))
        d = self.work / name
        shutil.rmtree(d, ignore_errors=True)
        rc, s = sh([self.py, self.adapter, "run", "--request", rp, "--out", d], self.logs / f"{name}.log")
        log(f"{name}: rc={rc} {s:.1f}s")
        return d if rc == 0 else None

    def run_engine(self, name, req, env=None):
        if self.reused(name):
            return self.work / name
        rp = self.work / f"{name}.request.json"
        rp.write_text(json.dumps(req))
        d = self.work / name
        shutil.rmtree(d, ignore_errors=True)
        rc, s = sh([self.runner, "engine", "run", "--request", rp, "--out", d], self.logs / f"{name}.log",
                   env=None if env is None else {**os.environ, **env})
        log(f"{name}: rc={rc} {s:.1f}s")
        return d if rc == 0 else None

    def compare(self, name, a, b, extra=()):
        """`runner compare A B --json [extra]`; extra e.g. --save-floors F, or --floors F
        --tie-from-floors (ties judged by the pair's own noise, as `runner once` does)."""
        if a is None or b is None:
            self.results[name] = {"error": "a dump is missing"}
            return None
        p = self.logs / f"cmp-{name.replace('/', '__')}.json"
        with open(p, "w") as f:
            rc = subprocess.run([str(self.runner), "compare", str(a), str(b), "--json", *map(str, extra)], stdout=f,
                                stderr=subprocess.PIPE, text=True).returncode
        if rc not in (0, 1):
            self.results[name] = {"error": f"compare rc={rc}"}
            return None
        d = json.loads(p.read_text())
        o = d["overall"]
        layers = {}
        for L in o.get("layers", []):
            v = L["values"].get("float") or L["values"].get("int") or {}
            layers[L["tensor"]] = {"rel_l2": v.get("rel_l2"), "rel_l2_max": v.get("rel_l2_max"),
                                   "cosine_min": v.get("worst_cosine"), "match": v.get("match_rate")}
        s = o["summary"]
        r = {
            "logits_rel_l2_mean": s["rel_l2_mean"], "logits_rel_l2_max": s["rel_l2_max"],
            "cosine_min": s["cosine_min"], "kld_mean": s["kld"]["mean"],
            "top1": s["top1"]["rate"], "top1_margin_aware": s["top1_margin_aware"]["rate"],
            "greedy": o.get("greedy"), "layers": layers, "tie_threshold": d["settings"]["tie_threshold"],
            "engine": d["engine"], "reference": d["reference"],
        }
        self.results[name] = r
        log(f"compare {name}: logits relL2 mean {r['logits_rel_l2_mean']:.3e} max {r['logits_rel_l2_max']:.3e} "
            f"cos min {r['cosine_min']:.6f} top1(margin) {r['top1_margin_aware']:.4f}")
        return r


def lib_env():
    """LD_LIBRARY_PATH with the folders holding libcublas and libnvrtc (CUDA 13)."""
    dirs = []
    roots = ["/usr/local/nvidia", "/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
    try:
        import site
        roots += [str(Path(p) / "nvidia") for p in site.getsitepackages()]
    except Exception:
        pass
    for root in roots:
        for lib in ("libcuda.so.1", "libcublas.so.13", "libnvrtc.so.13", "libcublasLt.so.13"):
            for hit in Path(root).rglob(lib) if Path(root).exists() else []:
                if str(hit.parent) not in dirs:
                    dirs.append(str(hit.parent))
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(dirs + [env.get("LD_LIBRARY_PATH", "")])
    return env


def parity(ctx, args):
    models = args.models.split(",")
    t0 = time.time()
    rc, s = sh([ctx.runner, "fixtures", "gen", "--models", ",".join(models)], ctx.logs / "fixtures-gen.log")
    log(f"fixtures gen {models}: rc={rc} {s:.1f}s")
    ctx.results["fixtures_gen"] = {"rc": rc, "seconds": s}
    if rc != 0:
        return
    mdir = Path(os.environ["PARITYBENCH_CACHE"]) / "fixtures" / "models"
    dtypes = [("fp32", "f32"), ("fp16", "f16"), ("bf16", "bf16")]
    for m in models:
        md = mdir / m
        hf_jobs = {f"{m}-hf-{dn}-{att}": request(args.template, md, "cuda:0", dt, attention=att)
                   for dn, dt in dtypes for att in ("eager", "sdpa")}
        eng_jobs = {f"{m}-engine-cuda-{dt}": request(args.template, md, "cuda:0", dt) for _, dt in dtypes}
        eng_jobs[f"{m}-engine-cuda-f16-again"] = request(args.template, md, "cuda:0", "f16")
        eng_jobs[f"{m}-engine-cuda-f32-incremental"] = request(args.template, md, "cuda:0", "f32", mode="incremental")
        eng_jobs[f"{m}-engine-cpu-f32"] = request(args.template, md, "cpu", "f32")
        with cf.ThreadPoolExecutor(max_workers=6) as ex:
            hf = dict(zip(hf_jobs, ex.map(lambda kv: ctx.run_hf(*kv), hf_jobs.items())))
        with cf.ThreadPoolExecutor(max_workers=3) as ex:
            eng = dict(zip(eng_jobs, ex.map(lambda kv: ctx.run_engine(*kv), eng_jobs.items())))
        for dn, dt in dtypes:
            # the floor pair's noise also sets the ties of the engine's margin-aware top-1
            fl = ctx.work / f"floors-{m}-{dt}.json"
            ctx.compare(f"{m}/{dt}/floor-hf-sdpa-vs-eager", hf[f"{m}-hf-{dn}-sdpa"], hf[f"{m}-hf-{dn}-eager"],
                        ["--save-floors", fl])
            ties = ["--floors", fl, "--tie-from-floors"] if fl.exists() else []
            ctx.compare(f"{m}/{dt}/engine-vs-hf-eager", eng[f"{m}-engine-cuda-{dt}"], hf[f"{m}-hf-{dn}-eager"], ties)
            ctx.compare(f"{m}/{dt}/engine-vs-hf-sdpa", eng[f"{m}-engine-cuda-{dt}"], hf[f"{m}-hf-{dn}-sdpa"], ties)
        ctx.compare(f"{m}/f32/engine-cuda-vs-engine-cpu", eng[f"{m}-engine-cuda-f32"], eng[f"{m}-engine-cpu-f32"])
        ctx.compare(f"{m}/f32/engine-cpu-vs-hf-eager", eng[f"{m}-engine-cpu-f32"], hf[f"{m}-hf-fp32-eager"])
        ctx.compare(f"{m}/f16/engine-cuda-repeat", eng[f"{m}-engine-cuda-f16-again"], eng[f"{m}-engine-cuda-f16"])
        ctx.compare(f"{m}/f32/engine-cuda-incremental-vs-prefill", eng[f"{m}-engine-cuda-f32-incremental"],
                    eng[f"{m}-engine-cuda-f32"])
        man = eng.get(f"{m}-engine-cuda-f16")
        if man:
            ctx.results[f"{m}/engine-manifest"] = json.loads((man / "manifest.json").read_text())["engine"]
        log(f"model {m} done at +{time.time() - t0:.0f}s")
        ctx.save("parity")


def bench_overrides(template, prompt_tokens, decode_steps):
    """Request fields of a timed run: one prompt of `prompt_tokens` ids (the template's ids,
    repeated), no captures, greedy decode, warmup 1, repeats 3."""
    tmpl = json.loads(Path(template).read_text())
    ids = [t for p in tmpl["prompts"] for t in p["token_ids"]]
    n = prompt_tokens
    ids = (ids * (n // len(ids) + 1))[:n]
    prompt = [{"id": f"bench-{n}", "token_ids": ids, "positions": [n - 1]}]
    return dict(prompts=prompt, captures={"points": [], "layers": []}, decode_steps=decode_steps,
                warmup=1, repeats=3)


def bench(ctx, args):
    """Timed runs: one long prompt, greedy decode; warmup 1, repeats 3."""
    mdir = Path(args.bench_dir)
    over = bench_overrides(args.template, args.prompt_tokens, args.decode_steps)
    ctx.results["bandwidth"] = measure_bandwidth()
    for m in args.models.split(","):
        md = mdir / m
        if not md.exists():
            md = Path(os.environ["PARITYBENCH_CACHE"]) / "fixtures" / "models" / m
        runs = {
            f"bench-{m}-engine-cuda-f16": ("engine", request(args.template, md, "cuda:0", "f16", **over)),
            f"bench-{m}-hf-fp16-eager": ("hf", request(args.template, md, "cuda:0", "f16", attention="eager", **over)),
            f"bench-{m}-hf-fp16-sdpa": ("hf", request(args.template, md, "cuda:0", "f16", attention="sdpa", **over)),
        }
        for name, (kind, req) in runs.items():
            if not any(name.endswith(r) for r in args.runners.split(",")):
                continue
            d = ctx.run_hf(name, req) if kind == "hf" else ctx.run_engine(name, req)
            if d is None:
                ctx.results[name] = {"error": "run failed"}
                continue
            man = json.loads((d / "manifest.json").read_text())
            t = man["prompts"][0]["timings"]
            med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None
            pre, dec = med(t.get("prefill_ms") or []), med(t.get("decode_ms") or [])
            r = {
                "prefill_tokens": t.get("prefill_tokens"), "prefill_ms": pre,
                "prefill_tok_s": t["prefill_tokens"] / (pre / 1000) if pre else None,
                "decode_tokens": t.get("decode_tokens"), "decode_ms": dec,
                "decode_tok_s": t["decode_tokens"] / (dec / 1000) if dec else None,
                "peak_gpu_bytes": man.get("peak_gpu_bytes"), "load_ms": man.get("load_ms"),
                "weight_bytes_fp16": model_bytes(md),
            }
            ctx.results[name] = r
            ctx.save("bench")
            log(f"{name}: prefill {r['prefill_tok_s']} tok/s decode {r['decode_tok_s']} tok/s peak {r['peak_gpu_bytes']}")
            if args.profile and kind == "engine":
                # the same request once more, step by step (PARITYBENCH_CUDA_PROFILE; slower, so untimed)
                tsv = ctx.work / f"{name}.profile.tsv"
                preq = {**req, "warmup": 1, "repeats": 1, "decode_steps": min(32, args.decode_steps)}
                if ctx.run_engine(f"{name}-profile", preq, env={"PARITYBENCH_CUDA_PROFILE": str(tsv)}) and tsv.exists():
                    ctx.results[name]["profile_tsv"] = tsv.read_text()
                    ctx.save("bench")
                    log(tsv.read_text())


def model_bytes(md):
    """Bytes of the weights in fp16 (parameters x 2), from the safetensors headers."""
    total = 0
    for f in sorted(Path(md).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            hdr = json.loads(fh.read(n))
        for k, v in hdr.items():
            if k != "__metadata__":
                c = 1
                for s in v["shape"]:
                    c *= s
                total += c * 2
    return total


def measure_bandwidth():
    """Device-to-device copy bandwidth (bytes read + written per second), through torch."""
    try:
        import torch
        x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        for _ in range(3):
            y.copy_(x)
        torch.cuda.synchronize()
        t = time.time()
        for _ in range(10):
            y.copy_(x)
        torch.cuda.synchronize()
        bw = 2 * x.numel() * 10 / (time.time() - t)
        del x, y
        torch.cuda.empty_cache()
        return {"copy_bytes_per_s": bw}
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return {"error": str(e)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["parity", "bench"])
    ap.add_argument("--runner", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/pbgpu")
    ap.add_argument("--models", default="qwen3-dense,qwen3-moe,qwen3-moe-mixed,qwen2")
    ap.add_argument("--template", required=True)
    ap.add_argument("--bench-dir", default="/tmp/pbbench")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--runners", default="hf-fp16-eager,hf-fp16-sdpa,engine-cuda-f16",
                    help="bench: which of the runs to make, by name suffix")
    ap.add_argument("--profile", action="store_true",
                    help="bench: after each engine run, one more with PARITYBENCH_CUDA_PROFILE (step times)")
    args = ap.parse_args()
    os.environ.update({k: v for k, v in lib_env().items() if k == "LD_LIBRARY_PATH"})
    log(f"LD_LIBRARY_PATH={os.environ['LD_LIBRARY_PATH']}")
    ctx = Ctx(args)
    try:
        (parity if args.phase == "parity" else bench)(ctx, args)
    finally:
        ctx.save(args.phase)
        log("results written")


if __name__ == "__main__":
    main()
