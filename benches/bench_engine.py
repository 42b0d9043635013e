#!/usr/bin/env python3
"""Prefill and decode tok/s of the built-in engine vs llama.cpp on the same GGUF files.

For every file, in the same run and with the same thread count:
- llama.cpp: `llama-bench -m FILE -p PP -n TG -t THREADS -r REPEATS -o json` (its pp and tg
  tests: a PP-token prompt, and TG tokens decoded one at a time);
- the engine: `runner engine run` on a request with one prompt of PP token ids (fixed
  pseudo-random ids), `decode_steps = TG + 1`, `warmup 1`, `repeats REPEATS`, `options.threads
  THREADS`; the manifest's timings give prefill tok/s (`prefill_tokens / prefill_ms`) and
  decode tok/s (`decode_tokens / decode_ms`) per repeat.
- the roofline: the weight bytes a decoded token reads (every tensor once, the token
  embedding not at all unless it is tied to the output, MoE expert tensors times
  used/total experts) in the file's own types, which both engines read (the built-in engine
  keeps GGUF weights mapped in their types), divided by the memory bandwidth measured here
  (a numpy copy of 1 GiB, counting bytes read plus bytes written).

Prints a Markdown table (median, with min-max over the repeats) and writes JSON with --json.

    source /root/.cache/paritybench/setup.env
    $PARITYBENCH_PYTHON benches/bench_engine.py --runner target/release/runner \
        --llama-bench /work/bench-gguf/llama-bench/llama-bench --threads 2 --json /tmp/engine-bench.json
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def default_files():
    cache = Path(os.environ.get("PARITYBENCH_CACHE", "/root/.cache/paritybench")) / "fixtures" / "gguf"
    files = []
    for model in ["qwen3-dense", "qwen3-moe", "qwen2"]:
        for q in ["F16", "Q8_0", "Q4_K_M"]:
            files.append(cache / model / f"{model}-{q}.gguf")
    for q in ["F16", "Q8_0"]:
        files.append(Path("/work/bench-gguf/qwen3-0.6b") / f"qwen3-0.6b-{q}.gguf")
    return files


def copy_bandwidth(n_bytes=1 << 30, repeats=5):
    """Bytes moved (read + written) per second by a numpy copy of n_bytes, best of repeats."""
    src = np.ones(n_bytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def weight_bytes(path):
    """(bytes per decoded token as stored, same as f32, n_params) from the GGUF's tensors."""
    sys.path.insert(0, os.path.join(os.environ["PARITYBENCH_LLAMACPP"], "gguf-py"))
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()

    def field(name):
        f = r.fields.get(f"{arch}.{name}")
        return int(f.parts[-1][0]) if f is not None else None

    n_exp, n_used = field("expert_count"), field("expert_used_count")
    names = {t.name for t in r.tensors}
    stored = f32 = params = 0
    for t in r.tensors:
        n = int(t.n_elements)
        params += n
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue  # a decoded token reads one row of it
        share = n_used / n_exp if ("_exps" in t.name and n_exp) else 1.0
        stored += int(t.n_bytes) * share
        f32 += n * 4 * share
    return stored, f32, params


def llama_bench(binary, path, pp, tg, threads, repeats):
    cmd = [binary, "-m", str(path), "-p", str(pp), "-n", str(tg), "-t", str(threads), "-r", str(repeats), "-o", "json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res = {}
    for e in json.loads(out):
        key = "prefill" if e["n_prompt"] > 0 else "decode"
        res[key] = e["samples_ts"]
    return res, " ".join(cmd)


def engine_bench(runner, path, pp, tg, threads, repeats, work):
    rng = np.random.default_rng(0)
    ids = [int(x) for x in rng.integers(1000, 150000, size=pp)]
    req = {
        "schema": 1,
        "model": {"path": str(path)},
        "prompts": [{"id": "bench", "token_ids": ids}],
        "positions": [pp - 1],
        "decode_steps": tg + 1,
        "mode": "prefill",
        "device": "cpu",
        "warmup": 1,
        "repeats": repeats,
        "options": {"threads": threads},
    }
    rp = Path(work) / "request.json"
    rp.write_text(json.dumps(req))
    out = Path(work) / f"dump-{path.stem}-t{threads}-{abs(hash(str(runner)))}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [runner, "engine", "run", "--request", str(rp), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    m = json.loads((out / "manifest.json").read_text())
    p = m["prompts"][0]
    t = p["timings"]
    pre = [t["prefill_tokens"] / (ms / 1e3) for ms in t["prefill_ms"]]
    dec = [t["decode_tokens"] / (ms / 1e3) for ms in t["decode_ms"]]
    quant_dot = m.get("extra", {}).get("quant_dot")
    return {"prefill": pre, "decode": dec, "load_ms": t.get("load_ms"), "quant_dot": quant_dot}, " ".join(cmd)


def fmt(xs):
    if not xs:
        return "—"
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runner", default="target/release/runner")
    ap.add_argument("--baseline-runner", help="another build of the runner (e.g. the commit before a change), "
                    "measured in the same run right after --runner: the change's speed-up as a same-run ratio")
    ap.add_argument("--llama-bench", default="/work/bench-gguf/llama-bench/llama-bench")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts, each a full pass")
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("files", nargs="*", type=Path)
    args = ap.parse_args()
    files = args.files or default_files()

    bw = copy_bandwidth()
    load = os.getloadavg()
    print(f"memory bandwidth (numpy copy, read+write): {bw / 1e9:.1f} GB/s; load average {load[0]:.1f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pb-engine-bench-") as work:
        for threads in args.threads:
            for f in files:
                if not f.exists():
                    print(f"skip {f}: absent", flush=True)
                    continue
                stored, f32, params = weight_bytes(f)
                lb, lcmd = llama_bench(args.llama_bench, f, args.pp, args.tg, threads, args.repeats)
                eb, ecmd = engine_bench(args.runner, f, args.pp, args.tg, threads, args.repeats, work)
                base = None
                if args.baseline_runner:
                    base, _ = engine_bench(args.baseline_runner, f, args.pp, args.tg, threads, args.repeats, work)
                row = {
                    "file": f.name,
                    "threads": threads,
                    "params": params,
                    "bytes_per_token_stored": stored,
                    "bytes_per_token_f32": f32,
                    "roofline_llamacpp": bw / stored,
                    "roofline_engine": bw / stored,
                    "llamacpp": lb,
                    "engine": eb,
                    "baseline": base,
                    "llamacpp_command": lcmd,
                    "engine_command": ecmd,
                    "load_average": os.getloadavg()[0],
                }
                rows.append(row)
                print(
                    f"{f.name} t={threads}: pp llama.cpp {fmt(lb['prefill'])} engine {fmt(eb['prefill'])} | "
                    f"tg llama.cpp {fmt(lb['decode'])} engine {fmt(eb['decode'])} | "
                    f"roofline {bw / stored:.0f} | load {row['load_average']:.1f}"
                    + (f" | baseline pp {fmt(base['prefill'])} tg {fmt(base['decode'])}" if base else ""),
                    flush=True,
                )
    print()
    print(f"| file | threads | params | pp{args.pp} llama.cpp | pp{args.pp} engine | tg{args.tg} llama.cpp | tg{args.tg} engine "
          "| engine/llama.cpp (pp, tg) | roofline tg (both) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
        rp = med(r["engine"]["prefill"]) / med(r["llamacpp"]["prefill"])
        rt = med(r["engine"]["decode"]) / med(r["llamacpp"]["decode"])
        print(f"| {r['file']} | {r['threads']} | {r['params'] / 1e6:.0f} M | {fmt(r['llamacpp']['prefill'])} | {fmt(r['engine']['prefill'])} "
              f"| {fmt(r['llamacpp']['decode'])} | {fmt(r['engine']['decode'])} | {rp:.2f}, {rt:.2f} "
              f"| {r['roofline_llamacpp']:.0f} |")
    if args.baseline_runner:
        print()
        print(f"| file | threads | pp{args.pp} baseline | pp{args.pp} engine | tg{args.tg} baseline | tg{args.tg} engine | engine/baseline (pp, tg) |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
            b, e = r["baseline"], r["engine"]
            print(f"| {r['file']} | {r['threads']} | {fmt(b['prefill'])} | {fmt(e['prefill'])} | {fmt(b['decode'])} | {fmt(e['decode'])} "
                  f"| {med(e['prefill']) / med(b['prefill']):.2f}, {med(e['decode']) / med(b['decode']):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_bytes_s": bw, "threads": args.threads, "load_average_end": os.getloadavg(), "pp": args.pp,
                                               "tg": args.tg, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
