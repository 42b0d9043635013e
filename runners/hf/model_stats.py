#!/usr/bin/env python3
"""Statistics of the seeded models over a prompt suite, measured with HF transformers.

The seeded models are random; their initialisation is meant to make them sharp enough that
an engine bug shows (see src/fixtures/models.rs). This script measures that, per model:

- top-1 probability at the suite's scored positions (median, p10, p90), the spread of the
  logits over the vocabulary, how many distinct tokens win, and how often the winner is the
  input token itself (a tied embedding can make a random model just echo its input);
- attention entropy (eager attention, `output_attentions`) over every query position >= 1,
  in nats and as a fraction of the uniform entropy log(number of keys), overall and per layer;
- how much each layer moves the residual stream: ||out - in|| / ||in|| per decoder layer;
- for MoE layers, how often each expert is chosen (top-k over every token of the suite).

    model_stats.py [--models a,b] [--models-dir DIR] [--suite FILE] [--check-targets]
                   [--write-lock fixtures/models.lock.json]

`--check-targets` exits 1 if a model misses the targets (median top-1 in [0.1, 0.6],
attention entropy at most 0.8 of uniform, every expert used with uneven counts, every layer
moving the residual by at least 0.1). `--write-lock` stores the stats in the lock, after
checking that the model files are exactly those the lock records.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SMALL_MODELS = ("qwen3-dense", "qwen3-moe", "qwen3-moe-mixed", "qwen2")

TARGET_TOP1 = (0.1, 0.6)
TARGET_ATTN_FRAC_MAX = 0.8
TARGET_LAYER_UPDATE_MIN = 0.1
TARGET_EXPERT_UNEVEN = 1.5  # max count / min count within a layer


def default_models_dir() -> Path:
    cache = os.environ.get("PARITYBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "paritybench")
    return Path(cache) / "fixtures" / "models"


def load_suite(path: Path) -> list[dict]:
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                prompts.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"model_stats: {path}:{n}: {e}")
    return prompts


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def r4(x: float) -> float:
    """Four significant digits: stable across machines, enough to read."""
    return float(f"{x:.4g}")


def measure(model_dir: Path, prompts: list[dict]) -> dict:
    """Loads a generated model (f32, eager attention) and measures it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    return measure_model(model.eval(), prompts)


def measure_model(model, prompts: list[dict]) -> dict:
    """The statistics of one loaded model (eager attention) over the suite's prompts."""
    import torch

    layers = model.model.layers

    routed: dict[int, list] = {}
    updates: dict[int, list] = {i: [] for i in range(len(layers))}
    hooks = []

    def router_hook(i):
        def hook(_module, _args, output):
            routed.setdefault(i, []).append(output[2].reshape(-1).tolist())
        return hook

    def layer_hook(i):
        def hook(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            d = (y.double() - x.double()).norm(dim=-1) / x.double().norm(dim=-1)
            updates[i].extend(d.reshape(-1).tolist())
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and type(gate).__name__.endswith("Router"):
            hooks.append(gate.register_forward_hook(router_hook(i)))

    top1, logit_std, winners, repeats = [], [], [], 0
    ent_sum = [0.0] * len(layers)
    frac_sum = [0.0] * len(layers)
    n_rows = [0] * len(layers)
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p["token_ids"]], dtype=torch.long)
            t = ids.shape[1]
            pos = list(range(t)) if p["positions"] == "all" else p["positions"]
            out = model(input_ids=ids, output_attentions=True, use_cache=False)
            logits = out.logits[0, pos].double()  # [P, V]
            probs = torch.softmax(logits, dim=-1)
            top1.extend(probs.max(dim=-1).values.tolist())
            best = probs.argmax(dim=-1).tolist()
            winners.extend(best)
            repeats += sum(int(b == p["token_ids"][q]) for b, q in zip(best, pos))
            logit_std.extend(logits.std(dim=-1, unbiased=False).tolist())
            uniform = torch.log(torch.arange(1, t + 1, dtype=torch.float64))  # [T] keys per query
            for li, att in enumerate(out.attentions):
                a = att[0].double()  # [H, T, T]
                ent = -(a * torch.log(a.clamp_min(1e-300))).sum(dim=-1)  # [H, T]
                ent, u = ent[:, 1:], uniform[1:]
                ent_sum[li] += ent.sum().item()
                frac_sum[li] += (ent / u).sum().item()
                n_rows[li] += ent.numel()
    for h in hooks:
        h.remove()

    top1_t = torch.tensor(top1, dtype=torch.float64)
    stats = {
        "n_positions": len(top1),
        "median_top1_prob": r4(top1_t.median().item()),
        "p10_top1_prob": r4(top1_t.quantile(0.1).item()),
        "p90_top1_prob": r4(top1_t.quantile(0.9).item()),
        "distinct_top1_fraction": r4(len(set(winners)) / len(winners)),
        "top1_is_input_fraction": r4(repeats / len(winners)),
        "mean_logit_std": r4(sum(logit_std) / len(logit_std)),
        "attention_entropy_mean": r4(sum(ent_sum) / sum(n_rows)),
        "attention_entropy_frac_of_uniform": r4(sum(frac_sum) / sum(n_rows)),
        "attention_entropy_frac_per_layer": [r4(f / n) for f, n in zip(frac_sum, n_rows)],
        "layer_update_ratio": [r4(sum(v) / len(v)) for _, v in sorted(updates.items())],
    }
    if routed:
        n_experts = model.config.num_experts
        usage = {}
        for li, chunks in sorted(routed.items()):
            counts = [0] * n_experts
            for chunk in chunks:
                for e in chunk:
                    counts[e] += 1
            usage[str(li)] = counts
        stats["expert_usage"] = usage
    return stats


def misses(stats: dict) -> list[str]:
    """The targets a model misses (empty when it meets them all)."""
    out = []
    lo, hi = TARGET_TOP1
    if not lo <= stats["median_top1_prob"] <= hi:
        out.append(f"median top-1 prob {stats['median_top1_prob']} outside [{lo}, {hi}]")
    if stats["attention_entropy_frac_of_uniform"] > TARGET_ATTN_FRAC_MAX:
        out.append(f"attention entropy {stats['attention_entropy_frac_of_uniform']} of uniform > {TARGET_ATTN_FRAC_MAX}")
    for i, r in enumerate(stats["layer_update_ratio"]):
        if r < TARGET_LAYER_UPDATE_MIN:
            out.append(f"layer {i} moves the residual by only {r}")
    for layer, counts in stats.get("expert_usage", {}).items():
        if min(counts) == 0:
            out.append(f"layer {layer}: expert {counts.index(0)} never chosen ({counts})")
        elif max(counts) / min(counts) < TARGET_EXPERT_UNEVEN:
            out.append(f"layer {layer}: expert usage too even ({counts})")
    return out


def model_files(model_dir: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(model_dir.iterdir()) if p.is_file()}


def write_lock(lock_path: Path, results: dict[str, dict], files: dict[str, dict]) -> None:
    lock = json.loads(lock_path.read_text(encoding="utf-8"))
    for name, stats in results.items():
        entry = lock["models"].get(name)
        if entry is None:
            sys.exit(f"model_stats: {lock_path} has no entry for {name}: run `runner fixtures gen --update-lock` first")
        if entry["files"] != files[name]:
            sys.exit(f"model_stats: {name}'s files differ from {lock_path}: regenerate the model "
                     f"(`runner fixtures gen`) before recording its stats")
        entry["stats"] = stats
    text = json.dumps(lock, indent=2, sort_keys=True, ensure_ascii=False)
    # Write floats the way the Rust side (serde_json/ryu) does, so the two never churn the file.
    text = re.sub(r"(\d)e([+-])0*(\d)", lambda m: f"{m.group(1)}e{'-' if m.group(2) == '-' else ''}{m.group(3)}", text)
    tmp = lock_path.with_suffix(".json.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(lock_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(SMALL_MODELS))
    ap.add_argument("--models-dir", type=Path, default=default_models_dir())
    ap.add_argument("--suite", type=Path, default=REPO / "fixtures" / "suites" / "default.jsonl")
    ap.add_argument("--check-targets", action="store_true")
    ap.add_argument("--write-lock", type=Path, metavar="LOCK")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = load_suite(args.suite)
    results, files, failed = {}, {}, False
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model_dir = args.models_dir / name
        if not (model_dir / "config.json").is_file():
            sys.exit(f"model_stats: {model_dir} is not a generated model (run `runner fixtures gen`)")
        stats = measure(model_dir, prompts)
        stats["measured_with"] = {"torch": torch.__version__, "transformers": transformers.__version__}
        results[name] = stats
        files[name] = model_files(model_dir)
        bad = misses(stats)
        failed |= bool(bad)
        print(json.dumps({"model": name, **stats}), flush=True)
        for b in bad:
            print(f"model_stats: {name}: {b}", file=sys.stderr)
    if args.write_lock:
        write_lock(args.write_lock, results, files)
        print(f"model_stats: wrote stats of {', '.join(results)} into {args.write_lock}", file=sys.stderr)
    return 1 if (failed and args.check_targets) else 0


if __name__ == "__main__":
    sys.exit(main())
