#!/usr/bin/env python3
"""GGUF on a CUDA GPU: the built-in engine's device dequantization, its parity per type, and
its speed against llama.cpp built with CUDA on the same files, same GPU, same sitting.

Runs on the GPU machine with a prebuilt `runner` and a trimmed llama.cpp tree
(scripts/gpu-llamacpp.sh trim); no Rust and no network there. Steps are idempotent (a step
whose outputs exist is skipped), so a second call on a machine still warm continues where
the first stopped, and one on a fresh machine redoes what it needs.

  files   seeded models (`runner fixtures gen`), realistic-size random checkpoints
          (gpu-bench-models.py), GGUF via convert_hf_to_gguf.py (F32/F16/BF16) and
          llama-quantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K_M, Q5_K_M, Q6_K)
  check   `runner engine dequant-check`: every tensor of the seeded models' GGUF files
          dequantized on the GPU (to f32, f16, bf16) vs the host, bit for bit
  parity  per file type: engine CUDA f32 vs engine CPU f32 on the same GGUF (the same
          dequantized weights: only summation order differs), and engine CUDA f16 on the F16
          GGUF vs on the safetensors checkpoint (the same f16 weights: identical dumps)
  bench   llama-bench (CUDA, all layers offloaded, flash attention auto) and the engine
          (CUDA, f16) on the same GGUF files: prefill 512 tokens, decode 128 tokens after a
          512-token context; peak GPU memory; the bandwidth roofline

Usage: gpu-gguf.py files|check|parity|bench ... --runner PATH --out DIR --llamacpp SRC
       --quantize BIN --bench-bin BIN
"""

import argparse
import concurrent.futures as cf
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("gpu_run", HERE / "gpu-run.py")
gpu_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_run)
log, sh = gpu_run.log, gpu_run.sh

SEEDED = ["qwen3-dense", "qwen3-moe", "qwen3-0.6b"]
BENCH_SHAPES = ["qwen3-4b-shape", "qwen3-moe-3b-shape"]
# every type the engine dequantizes, through the tool that makes it
CHECK_QUANTS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M", "Q6_K"]
MAIN_QUANTS = ["Q8_0", "Q4_K_M"]


class Files:
    def __init__(self, args):
        self.cache = Path(os.environ["PARITYBENCH_CACHE"])
        self.models = self.cache / "fixtures" / "models"
        self.bench = Path(args.bench_dir)
        self.gguf = Path(args.gguf_dir)
        self.gguf.mkdir(parents=True, exist_ok=True)

    def model_dir(self, m):
        return self.bench / m if m in BENCH_SHAPES else self.models / m

    def file(self, m, t):
        return self.gguf / f"{m}-{t}.gguf"


def wanted(args):
    """(model, [outtypes from convert], [quant presets], quantize source type)."""
    seeded = [m for m in args.models.split(",") if m in SEEDED]
    shapes = [m for m in args.models.split(",") if m in BENCH_SHAPES]
    plan = []
    for m in seeded:
        if m == "qwen3-dense":
            plan.append((m, ["F32", "F16", "BF16"], CHECK_QUANTS, "F32"))
        else:
            plan.append((m, ["F32", "F16"], MAIN_QUANTS, "F32"))
    for m in shapes:
        plan.append((m, ["F16"], MAIN_QUANTS, "F16"))
    return plan


def wait_built(binary, seconds):
    """Waits for a binary that scripts/gpu-llamacpp.sh is building into BUILD/bin: it is done
    when BUILD/build-times.txt exists, failed when BUILD.failed.txt does."""
    build = Path(binary).parent.parent
    deadline = time.time() + seconds
    while time.time() < deadline:
        if (build / "build-times.txt").exists():
            return True
        if Path(f"{build}.failed.txt").exists():
            return False
        time.sleep(3)
    return False


def step_files(ctx, args, res):
    f = Files(args)
    t0 = time.time()
    seeded = [m for m in args.models.split(",") if m in SEEDED]
    shapes = [m for m in args.models.split(",") if m in BENCH_SHAPES]
    missing = [m for m in seeded if not (f.models / m / "config.json").exists()]
    if missing:
        rc, s = sh([ctx.runner, "fixtures", "gen", "--models", ",".join(missing)], ctx.logs / "fixtures-gen.log")
        log(f"fixtures gen {missing}: rc={rc} {s:.1f}s")
        res["fixtures_gen"] = {"rc": rc, "seconds": s, "models": missing}
    missing = [m for m in shapes if not (f.bench / m / "config.json").exists()]
    if missing:
        rc, s = sh([sys.executable, HERE / "gpu-bench-models.py", "--out", f.bench, "--tokenizer-dir", args.tok,
                    "--models", ",".join(missing)], ctx.logs / "bench-models.log")
        log(f"bench models {missing}: rc={rc} {s:.1f}s")
        res["bench_models"] = {"rc": rc, "seconds": s}
    conv = Path(args.llamacpp) / "convert_hf_to_gguf.py"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(args.llamacpp) / "gguf-py") + ":" + env.get("PYTHONPATH", "")
    jobs = []
    for m, outtypes, _, _ in wanted(args):
        for t in outtypes:
            if not f.file(m, t).exists():
                jobs.append((m, t))

    def convert(job):
        m, t = job
        tmp = f.file(m, t).with_suffix(".tmp")
        rc, s = sh([sys.executable, conv, f.model_dir(m), "--outtype", t.lower(), "--outfile", tmp],
                   ctx.logs / f"convert-{m}-{t}.log", env=env)
        if rc == 0:
            tmp.rename(f.file(m, t))
        log(f"convert {m} {t}: rc={rc} {s:.1f}s")
        return (f"{m}-{t}", {"rc": rc, "seconds": s})

    with cf.ThreadPoolExecutor(max_workers=4) as ex:
        res.setdefault("convert", {}).update(dict(ex.map(convert, jobs)))
    # llama-quantize: wait for the binary (built beside this run)
    qb = Path(args.quantize)
    if not wait_built(qb, args.wait):
        res["quantize"] = {"error": f"{qb} not built (see its build log)"}
        return
    qjobs = []
    for m, _, quants, src in wanted(args):
        for q in quants:
            if not f.file(m, q).exists() and f.file(m, src).exists():
                qjobs.append((m, q, src))

    def quantize(job):
        m, q, src = job
        tmp = f.file(m, q).with_suffix(".tmp")
        rc, s = sh([qb, f.file(m, src), tmp, q, str(max(1, os.cpu_count() // 4))], ctx.logs / f"quantize-{m}-{q}.log")
        if rc == 0:
            tmp.rename(f.file(m, q))
        log(f"quantize {m} {q}: rc={rc} {s:.1f}s")
        return (f"{m}-{q}", {"rc": rc, "seconds": s})

    with cf.ThreadPoolExecutor(max_workers=4) as ex:
        res.setdefault("quantize", {}).update(dict(ex.map(quantize, qjobs)))
    res["files_seconds"] = time.time() - t0
    res["files"] = {p.name: p.stat().st_size for p in sorted(f.gguf.glob("*.gguf"))}


def step_check(ctx, args, res):
    f = Files(args)
    files = []
    for m, outtypes, quants, _ in wanted(args):
        if m in BENCH_SHAPES:
            continue
        for t in outtypes + quants:
            if m == "qwen3-0.6b" and t == "F32":
                continue  # 3 GB of f32; F32 tensors are checked in every other file
            if f.file(m, t).exists():
                files.append(f.file(m, t))
    done = ctx.work / "dequant-check.done.json"
    if done.exists():
        res["dequant_check"] = json.loads(done.read_text())
        log("dequant-check: done in an earlier call")
        return
    out = ctx.work / "dequant-check.json"
    rc, s = sh([ctx.runner, "engine", "dequant-check", "--device", "cuda:0", "--json", out, *files],
               ctx.logs / "dequant-check.log")
    log(f"dequant-check of {len(files)} files: rc={rc} {s:.1f}s")
    r = {"rc": rc, "seconds": s, "files": [p.name for p in files],
         "output": (ctx.logs / "dequant-check.log").read_text()[-3000:]}
    if out.exists():
        r["by_type"] = json.loads(out.read_text()).get("by_type")
        shutil.copy(out, ctx.out / "dequant-check.json")
    res["dequant_check"] = r
    if rc in (0, 1):
        done.write_text(json.dumps(r))


def step_parity(ctx, args, res):
    f = Files(args)
    for m in [x for x in args.parity_models.split(",") if x]:
        for t in ["F16"] + MAIN_QUANTS:
            g = f.file(m, t)
            if not g.exists():
                res[f"{m}/{t}"] = {"error": f"{g.name} missing"}
                continue
            ds = dict(decode_steps=args.parity_decode_steps)
            cu = ctx.run_engine(f"{m}-{t}-engine-cuda-f32", gpu_run.request(args.template, g, "cuda:0", "f32", **ds))
            cpu = ctx.run_engine(f"{m}-{t}-engine-cpu-f32", gpu_run.request(args.template, g, "cpu", "f32", **ds))
            ctx.compare(f"{m}/{t}/engine-cuda-vs-engine-cpu", cu, cpu)
            if cu:
                man = json.loads((cu / "manifest.json").read_text())
                ctx.results[f"{m}/{t}/compute"] = man.get("extra", {}).get("compute")
        ds = dict(decode_steps=args.parity_decode_steps)
        a = ctx.run_engine(f"{m}-F16-engine-cuda-f16",
                           gpu_run.request(args.template, f.file(m, "F16"), "cuda:0", "f16", **ds))
        b = ctx.run_engine(f"{m}-st-engine-cuda-f16", gpu_run.request(args.template, f.model_dir(m), "cuda:0", "f16", **ds))
        ctx.compare(f"{m}/F16/gguf-vs-safetensors-cuda-f16", a, b)
        ctx.save("gguf")


class GpuMemPoller:
    """Peak `memory.used` of GPU 0 (nvidia-smi, every 50 ms) while a process runs, minus the
    level before it started: what llama-bench holds (it reports no memory itself)."""

    def __init__(self):
        self.base = self.read()
        self.peak = self.base
        self.stop = False
        self.t = threading.Thread(target=self.loop, daemon=True)

    @staticmethod
    def read():
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True).stdout.strip()
            return int(out.splitlines()[0]) * (1 << 20) if out else 0
        except (OSError, ValueError):
            return 0

    def loop(self):
        while not self.stop:
            self.peak = max(self.peak, self.read())
            time.sleep(0.05)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *a):
        self.stop = True
        self.t.join()


def gguf_weight_bytes(path):
    """Bytes of the weights read per decoded token from a GGUF file: every tensor but the
    token embedding (one row is read), plus the embedding when it is also the output."""
    sys.path.insert(0, str(Path(ARGS.llamacpp) / "gguf-py"))
    import gguf  # noqa: PLC0415 - from the carried llama.cpp tree

    r = gguf.GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    total = sum(v for k, v in sizes.items() if k != "token_embd.weight")
    if "output.weight" not in sizes:
        total += sizes.get("token_embd.weight", 0)
    return total, sizes.get("token_embd.weight", 0)


def step_bench(ctx, args, res):
    f = Files(args)
    bb = Path(args.bench_bin)
    if wait_built(bb, args.wait):
        res["llamacpp_build"] = (bb.parent.parent / "build-times.txt").read_text().strip()
    else:
        res["llamacpp_build"] = {"error": f"{bb} not built"}
    res["bandwidth"] = gpu_run.measure_bandwidth()
    over = gpu_run.bench_overrides(args.template, args.prompt_tokens, args.decode_steps)
    n = args.prompt_tokens
    done_path = ctx.work / "bench.done.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    for m in [x for x in args.bench_models.split(",") if x]:
        for t in ["F16"] + MAIN_QUANTS:
            g = f.file(m, t)
            key = f"{m}/{t}"
            if key in done:
                res[key] = done[key]
                continue
            if not g.exists():
                res[key] = {"error": f"{g.name} missing"}
                continue
            wb, emb = gguf_weight_bytes(g)
            r = {"file_bytes": g.stat().st_size, "weight_bytes_per_token": wb, "embedding_bytes": emb}
            # llama.cpp: prefill 512 at depth 0, decode 128 at depth 512
            if (bb.parent.parent / "build-times.txt").exists():
                out = ctx.logs / f"llama-bench-{m}-{t}.json"
                cmd = [bb, "-m", g, "-ngl", "99", "-p", str(n), "-n", "0", "-r", "3", "-o", "json"]
                cmd2 = [bb, "-m", g, "-ngl", "99", "-p", "0", "-n", str(args.decode_steps), "-d", str(n), "-r", "3",
                        "-o", "json"]
                rows = []
                with GpuMemPoller() as mem:
                    for c in (cmd, cmd2):
                        p = subprocess.run(list(map(str, c)), capture_output=True, text=True, timeout=300)
                        with open(out, "a") as fh:
                            fh.write("$ " + " ".join(map(str, c)) + "\n" + p.stdout + "\n" + p.stderr[-4000:] + "\n")
                        if p.returncode == 0:
                            rows += json.loads(p.stdout)
                pp = [x for x in rows if x.get("n_prompt") == n and x.get("n_gen") == 0]
                tg = [x for x in rows if x.get("n_gen") == args.decode_steps]
                r["llamacpp"] = {
                    "prefill_tok_s": pp[0]["avg_ts"] if pp else None,
                    "prefill_tok_s_stddev": pp[0]["stddev_ts"] if pp else None,
                    "decode_tok_s": tg[0]["avg_ts"] if tg else None,
                    "decode_tok_s_stddev": tg[0]["stddev_ts"] if tg else None,
                    "peak_gpu_bytes_nvidia_smi": mem.peak - mem.base,
                    "build": (rows[0].get("build_commit"), rows[0].get("backends")) if rows else None,
                    "gpu_info": rows[0].get("gpu_info") if rows else None,
                    "flash_attn": rows[0].get("flash_attn") if rows else None,
                }
                log(f"llama-bench {key}: {r['llamacpp']}")
            # the engine on the same file, f16 on the device
            name = f"bench-{m}-{t}-engine-cuda-f16"
            with GpuMemPoller() as mem:
                d = ctx.run_engine(name, gpu_run.request(args.template, g, "cuda:0", "f16", **over))
            if d is not None:
                man = json.loads((d / "manifest.json").read_text())
                tm = man["prompts"][0]["timings"]
                med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
                pre, dec = med(tm.get("prefill_ms") or []), med(tm.get("decode_ms") or [])
                r["engine"] = {
                    "prefill_tok_s": tm["prefill_tokens"] / (pre / 1000) if pre else None,
                    "decode_tok_s": tm["decode_tokens"] / (dec / 1000) if dec else None,
                    "prefill_ms_all": tm.get("prefill_ms"), "decode_ms_all": tm.get("decode_ms"),
                    "peak_gpu_bytes": man.get("peak_gpu_bytes"),
                    "peak_gpu_bytes_nvidia_smi": mem.peak - mem.base,
                    "load_ms": man.get("load_ms"),
                    "compute": man.get("extra", {}).get("compute"),
                }
                log(f"engine {key}: {r['engine']}")
            res[key] = r
            if "engine" in r and ("llamacpp" in r or not (bb.parent.parent / "build-times.txt").exists()):
                done[key] = r
                done_path.write_text(json.dumps(done))
            ctx.save("gguf")
    res["bandwidth_after"] = gpu_run.measure_bandwidth()


def make_template(path, suite, runner):
    """A request for the whole suite (token ids only, every capture at every layer, 32 greedy
    decode steps), as `runner fixtures build` writes for references."""
    caps = json.loads(subprocess.run([str(runner), "engine", "describe"], capture_output=True, text=True,
                                     check=True).stdout)["capabilities"]["captures"]
    prompts = []
    for line in Path(suite).read_text().splitlines():
        if line.strip():
            p = json.loads(line)
            prompts.append({"id": p["id"], "token_ids": p["token_ids"], "positions": p.get("positions", "all")})
    req = {"schema": 1, "model": {"path": ""}, "prompts": prompts, "positions": "all",
           "captures": {"points": caps, "layers": "all"}, "decode_steps": 32, "mode": "prefill",
           "device": "cpu", "dtype": "f32", "warmup": 0, "repeats": 1}
    Path(path).write_text(json.dumps(req))


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("steps", help="comma-separated: files,check,parity,bench")
    ap.add_argument("--runner", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/pbgpu")
    ap.add_argument("--template", required=True, help="request template (made from --suite if absent)")
    ap.add_argument("--suite", default=str(HERE.parent / "fixtures" / "suites" / "default.jsonl"))
    ap.add_argument("--tok", required=True)
    ap.add_argument("--llamacpp", required=True, help="the trimmed llama.cpp source tree")
    ap.add_argument("--quantize", required=True, help="llama-quantize binary")
    ap.add_argument("--bench-bin", required=True, help="llama-bench binary (CUDA)")
    ap.add_argument("--wait", type=int, default=900, help="seconds to wait for a binary being built")
    ap.add_argument("--models", default="qwen3-dense,qwen3-moe,qwen3-0.6b,qwen3-4b-shape,qwen3-moe-3b-shape")
    ap.add_argument("--parity-models", default="qwen3-0.6b,qwen3-moe")
    ap.add_argument("--bench-models", default="qwen3-0.6b,qwen3-4b-shape,qwen3-moe-3b-shape")
    ap.add_argument("--bench-dir", default="/tmp/pbbench")
    ap.add_argument("--gguf-dir", default="/tmp/pbgguf")
    ap.add_argument("--parity-decode-steps", type=int, default=8, help="greedy steps of the parity runs")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=128)
    args = ARGS = ap.parse_args()
    os.environ.update({k: v for k, v in gpu_run.lib_env().items() if k == "LD_LIBRARY_PATH"})
    ns = argparse.Namespace(runner=args.runner, out=args.out, work=args.work)
    ctx = gpu_run.Ctx(ns)
    if not Path(args.template).exists():
        make_template(args.template, args.suite, ctx.runner)
    res = ctx.results
    steps = args.steps.split(",")
    try:
        for s in steps:
            t = time.time()
            log(f"step {s}")
            {"files": step_files, "check": step_check, "parity": step_parity, "bench": step_bench}[s](ctx, args, res)
            res.setdefault("step_seconds", {})[s] = time.time() - t
            ctx.save("gguf")
    finally:
        ctx.save("gguf")
        log("results written")


if __name__ == "__main__":
    main()
