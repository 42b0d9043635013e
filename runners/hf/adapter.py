#!/usr/bin/env python3
"""The HF transformers reference adapter: runs a checkpoint with transformers and writes a dump.

paritybench judges every engine against references; this is the reference everyone agrees
on, so it runs the modeling code as transformers ships it (no re-implementation) and reads
every capture point through forward hooks on transformers' own modules:

    embed        model.embed_tokens                      output            [P, H]
    attn_norm    layers[i].input_layernorm               output            [P, H]
    attn_out     layers[i].self_attn                     output[0]         [P, H]  (after o_proj)
    ffn_norm     layers[i].post_attention_layernorm      output            [P, H]
    moe_router   layers[i].mlp.gate (the top-k router)   output[0] logits  [P, E]  (before softmax)
    moe_topk_ids layers[i].mlp.gate                      output[2] indices [P, k]  (HF's order)
    ffn_out      layers[i].mlp                           output            [P, H]  (before the add)
    layer_out    layers[i]                               output            [P, H]
    final_norm   model.norm                              output            [P, H]

(`output_hidden_states` cannot give `layer_out` of the last layer: its last entry is taken
after the final norm.)

    python runners/hf/adapter.py describe
    python runners/hf/adapter.py run --request REQ.json --out DIR

Exit codes: 0 the dump is complete; 2 could not run (bad request, model, token id); 1 the
engine failed after the dump was started (finished prompts stay usable, the manifest holds
the error). See runners/hf/README.md for the options.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import struct
import sys
import time
from dataclasses import dataclass, field

# cuBLAS reads this once, when CUDA starts: without it deterministic algorithms cannot be
# used for matrix products on the GPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# Models are local directories: never reach for the hub, and keep stderr for errors.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
import pbproto  # noqa: E402
from pbproto import CAPTURE_POINTS, GLOBAL_CAPTURES, MOE_CAPTURES, ProtocolError  # noqa: E402

ENGINE_NAME = "hf-transformers"
ATTENTION_IMPLS = ("sdpa", "eager")
EXPERTS_IMPLS = ("eager", "grouped_mm", "batched_mm")
OPTION_KEYS = ("attention", "experts", "threads")
DTYPES = pbproto.DTYPES

# safetensors header dtype -> protocol dtype name
_ST_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "F64": "f64"}


class BadInput(Exception):
    """A request, option, model file or token id this adapter cannot run; exit 2."""


# ---------------------------------------------------------------------------------------------
# Request options and model files (checked before anything is loaded)
# ---------------------------------------------------------------------------------------------


@dataclass
class Options:
    attention: str = "sdpa"
    experts: str = "eager"
    threads: int | None = None


def parse_options(req: pbproto.Request) -> Options:
    raw = req.options
    unknown = sorted(set(raw) - set(OPTION_KEYS))
    if unknown:
        raise BadInput(f"{req.path}: unknown field(s) {['options.' + k for k in unknown]} (known: {list(OPTION_KEYS)})")
    opts = Options()
    if "attention" in raw:
        if raw["attention"] not in ATTENTION_IMPLS:
            raise BadInput(f"{req.path}: invalid field `options.attention`: {raw['attention']!r} (one of {list(ATTENTION_IMPLS)})")
        opts.attention = raw["attention"]
    if "experts" in raw:
        if raw["experts"] not in EXPERTS_IMPLS:
            raise BadInput(f"{req.path}: invalid field `options.experts`: {raw['experts']!r} (one of {list(EXPERTS_IMPLS)})")
        opts.experts = raw["experts"]
    if "threads" in raw and raw["threads"] is not None:
        t = raw["threads"]
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise BadInput(f"{req.path}: invalid field `options.threads`: {t!r} (a positive integer)")
        opts.threads = t
    return opts


@dataclass
class ModelFiles:
    dir: str
    config: str
    weights: list[str]  # safetensors files, in file-name order
    tokenizer: str | None


def locate_model(req: pbproto.Request) -> ModelFiles:
    m = req.raw["model"]
    path = m["path"]
    fmt = m.get("format")
    if fmt is not None and fmt != "safetensors":
        raise BadInput(f"{req.path}: invalid field `model.format`: {fmt!r} (this adapter reads safetensors checkpoints)")
    if not os.path.isdir(path):
        what = "a file, not a checkpoint directory" if os.path.exists(path) else "no such directory"
        raise BadInput(f"{req.path}: field `model.path`: {path}: {what}")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise BadInput(f"{config}: missing (model.path must hold a transformers checkpoint)")
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        weights = [single]
    elif os.path.isfile(index):
        try:
            with open(index) as f:
                shard_names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise BadInput(f"{index}: not a readable safetensors index: {e}")
        weights = [os.path.join(path, n) for n in shard_names]
        for w in weights:
            if not os.path.isfile(w):
                raise BadInput(f"{w}: missing (named by {index})")
    else:
        raise BadInput(f"{single}: missing (nor is there a model.safetensors.index.json)")
    tok = m.get("tokenizer")
    if tok is not None:
        if not os.path.isfile(tok):
            raise BadInput(f"{req.path}: field `model.tokenizer`: {tok}: no such file")
    else:
        beside = os.path.join(path, "tokenizer.json")
        tok = beside if os.path.isfile(beside) else None
    return ModelFiles(path, config, weights, tok)


def weights_sha256(files: list[str]) -> str:
    """sha256 of model.safetensors; for a sharded checkpoint, of all shards' bytes
    concatenated in file-name order (one stream, not a hash of hashes)."""
    import hashlib

    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def checkpoint_dtype(files: list[str]) -> str:
    """The storage dtype holding most parameters, read from the safetensors headers."""
    counts: dict[str, int] = {}
    for p in files:
        try:
            with open(p, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise BadInput(f"{p}: not a readable safetensors file: {e}")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for d in info["shape"]:
                numel *= d
            counts[info["dtype"]] = counts.get(info["dtype"], 0) + numel
    if not counts:
        raise BadInput(f"{files[0]}: holds no tensors")
    top = max(counts, key=lambda k: counts[k])
    if top not in _ST_DTYPES:
        raise BadInput(f"{files[0]}: weights stored as {top}; this adapter runs f32/f16/bf16 checkpoints")
    return _ST_DTYPES[top]


def parse_device(req: pbproto.Request):
    import torch

    dev = req.device
    if dev == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", dev)
    if not m:
        raise BadInput(f"{req.path}: invalid field `device`: {dev!r} (cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise BadInput(f"{req.path}: field `device`: {dev!r} asked for, but torch sees no CUDA device")
    idx = int(m.group(1) or 0)
    if idx >= torch.cuda.device_count():
        raise BadInput(f"{req.path}: field `device`: {dev!r}, but only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", idx)


# ---------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([\d.]+)", f.read())
            if m:
                return m.group(1)
    except OSError:
        pass
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            line = out.stdout.strip().splitlines()
            if out.returncode == 0 and line:
                return line[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def library_versions() -> dict:
    import numpy
    import safetensors
    import tokenizers
    import torch
    import transformers

    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "tokenizers": tokenizers.__version__,
    }
    if torch.version.cuda:
        v["torch_cuda"] = torch.version.cuda
    return v


def engine_info(device, attention: str) -> dict:
    import torch
    import transformers

    info = {
        "name": ENGINE_NAME,
        "version": transformers.__version__,
        "backend": f"torch-{attention}",
        "device": str(device),
        "versions": library_versions(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        drv = nvidia_driver()
        info["driver"] = f"CUDA {torch.version.cuda}" + (f", driver {drv}" if drv else "")
        cudnn = torch.backends.cudnn.version()
        if cudnn:
            info["versions"]["cudnn"] = str(cudnn)
        cap = torch.cuda.get_device_capability(device)
        info["versions"]["compute_capability"] = f"{cap[0]}.{cap[1]}"
    else:
        info["device_name"] = cpu_model()
    return info


# ---------------------------------------------------------------------------------------------
# Capture hooks
# ---------------------------------------------------------------------------------------------


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _router_part(i: int):
    def pick(out):
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise RuntimeError(f"MoE router returned {type(out).__name__}, expected (logits, scores, indices)")
        return out[i]
    return pick


def _is_moe_block(mlp) -> bool:
    return hasattr(mlp, "gate") and hasattr(mlp, "experts")


class Recorder:
    """Forward hooks that keep the rows of the scored positions while `rows` is set.

    Rows stay on the device (gathered, not copied to the host) so that the timed run that
    records them pays as little as possible for it; `take` moves them to numpy afterwards.
    """

    def __init__(self):
        self.rows = None  # LongTensor [r] of sequence indices to keep, or None: record nothing
        self.buf: dict[str, list] = {}
        self.handles = []

    def attach(self, module, name: str, pick) -> None:
        def hook(_module, _args, output):
            if self.rows is None:
                return
            t = pick(output)
            t = t.reshape(-1, t.shape[-1])  # [B*S, X] with B = 1
            self.buf.setdefault(name, []).append(t.index_select(0, self.rows))
        self.handles.append(module.register_forward_hook(hook))

    def clear(self) -> None:
        self.rows = None
        self.buf = {}

    def take(self) -> dict:
        import numpy as np
        import torch

        out = {}
        for name, parts in self.buf.items():
            t = torch.cat(parts, dim=0)
            if name.startswith("hidden.moe_topk_ids."):
                out[name] = t.to(torch.int32).cpu().numpy()
            else:
                out[name] = t.float().cpu().numpy().astype(np.float32, copy=False)
        self.clear()
        return out


def install_captures(model, points: list[str], layers: list[int], rec: Recorder) -> tuple[list[str], dict]:
    """Hooks every requested point on the requested layers. Returns (points recorded,
    absent {point: why}) — a point the model has on no layer at all is absent."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    arch = model.config.model_type
    blocks = list(base.layers)
    recorded, absent = [], {}
    for point in points:
        if point == "embed":
            rec.attach(base.embed_tokens, "hidden.embed.0", _first)
            recorded.append(point)
            continue
        if point == "final_norm":
            rec.attach(base.norm, "hidden.final_norm.0", _first)
            recorded.append(point)
            continue
        if point in MOE_CAPTURES:
            moe_layers = [i for i, b in enumerate(blocks) if _is_moe_block(b.mlp)]
            if not moe_layers:
                absent[point] = f"{arch} has no MoE layers"
                continue
            pick = _router_part(0 if point == "moe_router" else 2)
            for i in layers:
                if i in moe_layers:
                    rec.attach(blocks[i].mlp.gate, f"hidden.{point}.{i}", pick)
            recorded.append(point)
            continue
        for i in layers:
            b = blocks[i]
            module = {
                "attn_norm": b.input_layernorm,
                "attn_out": b.self_attn,
                "ffn_norm": b.post_attention_layernorm,
                "ffn_out": b.mlp,
                "layer_out": b,
            }[point]
            rec.attach(module, f"hidden.{point}.{i}", _first)
        recorded.append(point)
    return recorded, absent


# ---------------------------------------------------------------------------------------------
# Running one prompt
# ---------------------------------------------------------------------------------------------


@dataclass
class RunOutput:
    logits: object = None  # tensor [P, V] on the device, compute dtype
    generated: list = field(default_factory=list)
    prefill_ms: float = 0.0
    ttft_ms: float | None = None
    decode_ms: float | None = None


class Runner:
    def __init__(self, model, device, mode: str, decode_steps: int, rec: Recorder):
        self.model = model
        self.device = device
        self.mode = mode
        self.decode_steps = decode_steps
        self.rec = rec

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _step(self, token: int, cache):
        import torch

        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        return self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]  # [V]

    def run(self, token_ids: list[int], positions: list[int], record: bool) -> RunOutput:
        """One full pass: the prompt (prefill or incremental), then greedy decode."""
        import torch

        out = RunOutput()
        cache = self._new_cache()
        T = len(token_ids)
        self._sync()
        t0 = time.perf_counter()
        if self.mode == "prefill":
            keep = positions if positions[-1] == T - 1 else positions + [T - 1]
            keep_t = torch.tensor(keep, dtype=torch.long, device=self.device)
            if record:
                self.rec.rows = torch.tensor(positions, dtype=torch.long, device=self.device)
            ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True,
                                logits_to_keep=keep_t).logits[0]  # [len(keep), V]
            self.rec.rows = None
            scored, last = logits[: len(positions)], logits[-1]
        else:
            scored_set = set(positions)
            row0 = torch.zeros(1, dtype=torch.long, device=self.device)
            rows = []
            last = None
            for t, tok in enumerate(token_ids):
                keep = t in scored_set
                self.rec.rows = row0 if (record and keep) else None
                last = self._step(tok, cache)
                if keep:
                    rows.append(last)
            self.rec.rows = None
            scored = torch.stack(rows)  # [P, V]
        self._sync()
        t1 = time.perf_counter()
        out.prefill_ms = (t1 - t0) * 1e3
        out.logits = scored if record else None
        if self.decode_steps > 0:
            nxt = int(torch.argmax(last).item())  # the first maximal index
            out.ttft_ms = (time.perf_counter() - t0) * 1e3
            out.generated.append(nxt)
            t2 = time.perf_counter()
            for _ in range(self.decode_steps - 1):
                nxt = int(torch.argmax(self._step(nxt, cache)).item())
                out.generated.append(nxt)
            self._sync()
            out.decode_ms = (time.perf_counter() - t2) * 1e3
        return out


# ---------------------------------------------------------------------------------------------
# describe / run
# ---------------------------------------------------------------------------------------------


def describe() -> dict:
    import torch
    import transformers

    backends = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "name": ENGINE_NAME,
        "version": transformers.__version__,
        "git_sha": None,
        "backends": backends,
        "dtypes": list(DTYPES),
        "attention": list(ATTENTION_IMPLS),
        "experts": list(EXPERTS_IMPLS),
        "architectures": ["qwen2", "qwen3", "qwen3_moe"],
        "versions": library_versions(),
        "capabilities": {
            "captures": list(CAPTURE_POINTS),
            "modes": ["prefill", "incremental"],
            "decode": True,
            "logits": "full",
            "tokenizer": True,
            "options": {
                "attention": "sdpa (default) | eager",
                "experts": "eager (default) | grouped_mm | batched_mm  (MoE expert kernels)",
                "threads": "torch CPU threads (default: torch's choice)",
            },
        },
    }


def configure_torch(opts: Options) -> None:
    import torch

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.set_float32_matmul_precision("highest")
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
        try:
            torch.set_num_interop_threads(opts.threads)
        except RuntimeError:
            pass  # only settable before the first parallel work; intra-op threads are what count


def load_tokenizer(path: str | None):
    if path is None:
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises its own exception type
        raise BadInput(f"{path}: not a readable tokenizer.json: {e}")


def check_ids(req: pbproto.Request, i: int, V: int) -> None:
    p = req.prompts[i]
    for pos, t in enumerate(p["token_ids"]):
        if t >= V:
            raise BadInput(f"{req.path}: field `prompts[{i}].token_ids`: prompt {p['id']!r} position {pos} "
                           f"holds token id {t}, outside the vocabulary of {V} rows")


def run(request_path: str, out_dir: str) -> int:
    try:
        req = pbproto.load_request(request_path)
        opts = parse_options(req)
        files = locate_model(req)
        if os.path.exists(os.path.join(out_dir, "manifest.json")):
            raise BadInput(f"{out_dir}: already holds a dump (manifest.json); refusing to overwrite it")
        quant = checkpoint_dtype(files.weights)
        sha = weights_sha256(files.weights)
        want = req.raw["model"].get("sha256")
        if want and want.lower() != sha:
            raise BadInput(f"{req.path}: field `model.sha256`: {want} does not match the weights {files.weights[0]}"
                           f"{' (+ shards)' if len(files.weights) > 1 else ''}: {sha}")
        tokenizer = load_tokenizer(files.tokenizer)
        device = parse_device(req)
    except (ProtocolError, BadInput) as e:
        pbproto.fail(str(e))

    configure_torch(opts)
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    compute = quant if req.dtype == "auto" else req.dtype
    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}.get(compute)
    if torch_dtype is None:
        pbproto.fail(f"{files.weights[0]}: checkpoint dtype {compute} cannot be computed in; ask for f32, f16 or bf16")

    t0 = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(files.dir)
        kwargs = {"dtype": torch_dtype, "attn_implementation": opts.attention}
        if getattr(config, "num_experts", 0):
            kwargs["experts_implementation"] = opts.experts
        model = AutoModelForCausalLM.from_pretrained(files.dir, **kwargs)
        model.to(device)
        model.eval()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # transformers raises many kinds; the message says which file/field
        pbproto.fail(f"{files.dir}: could not load the model with transformers {transformers.__version__}: "
                     f"{type(e).__name__}: {e}")
    load_ms = (time.perf_counter() - t0) * 1e3

    V = int(model.get_output_embeddings().weight.shape[0])
    n_layers = int(config.num_hidden_layers)
    rec = Recorder()
    layers = req.capture_layers(n_layers)
    points, absent = install_captures(model, req.capture_points(), layers, rec)

    manifest = pbproto.base_manifest(
        req,
        engine=engine_info(device, opts.attention),
        model={
            "path": files.dir,
            "sha256": sha,
            "format": "safetensors",
            "quant": quant,
            "compute_dtype": compute,
            "architecture": config.model_type,
            "n_layers": n_layers,
            "vocab_size": V,
        },
        tokenizer={"add_bos": False, **({"sha256": pbproto.sha256_file(files.tokenizer)} if files.tokenizer else {})},
    )
    manifest["captures"] = {"points": points, "layers": layers, "absent": absent}
    manifest["load_ms"] = load_ms
    manifest["extra"] = {
        "attention": opts.attention,
        "experts": opts.experts if getattr(config, "num_experts", 0) else None,
        "torch_threads": torch.get_num_threads(),
        "tf32": False,
        "deterministic_algorithms": True,
        "sha256_of": "model.safetensors" if len(files.weights) == 1
                     else "all shards concatenated in file-name order",
        "decode_timing": "decode_ms covers decode_steps-1 forward passes after the first token; "
                         "decode_tokens counts them",
    }
    try:
        writer = pbproto.DumpWriter(out_dir, manifest)
    except (ProtocolError, OSError) as e:
        pbproto.fail(str(e))

    runner = Runner(model, device, req.mode, req.decode_steps, rec)
    peak_gpu_all = 0
    with torch.inference_mode():
        for i, p in enumerate(req.prompts):
            try:
                check_ids(req, i, V)
            except BadInput as e:
                writer.fail(str(e))
                pbproto.fail(str(e))
            try:
                result = run_prompt(runner, req, i, p, tokenizer, rec)
            except Exception as e:  # any engine failure: keep what is finished, say what broke
                msg = f"prompt {p['id']!r} (index {i}): {type(e).__name__}: {e}"
                writer.fail(msg)
                pbproto.fail(msg, code=1)
            peak_gpu_all = max(peak_gpu_all, result.peak_gpu_bytes or 0)
            writer.write_prompt(result)
    writer.manifest["peak_rss_bytes"] = pbproto.peak_rss_bytes()
    if device.type == "cuda":
        writer.manifest["peak_gpu_bytes"] = peak_gpu_all
    writer.finish()
    return 0


def run_prompt(runner: Runner, req: pbproto.Request, i: int, p: dict, tokenizer, rec: Recorder):
    import torch

    ids = list(p["token_ids"])
    positions = req.positions_of(i)
    if runner.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runner.device)
    rec.clear()
    for _ in range(req.warmup):
        runner.run(ids, positions, record=False)
    prefill_ms, decode_ms, ttft_ms = [], [], []
    first = None
    for r in range(req.repeats):
        o = runner.run(ids, positions, record=(r == 0))
        if r == 0:
            first = o
            hidden = rec.take()
            logits = o.logits.float().cpu().numpy()
        prefill_ms.append(o.prefill_ms)
        if o.ttft_ms is not None:
            ttft_ms.append(o.ttft_ms)
        if o.decode_ms is not None and req.decode_steps > 1:
            decode_ms.append(o.decode_ms)
    timings = {
        "prefill_ms": prefill_ms,
        "decode_ms": decode_ms,
        "prefill_tokens": len(ids),
        "decode_tokens": max(req.decode_steps - 1, 0),
        "ttft_ms": ttft_ms,
    }
    match = None
    if tokenizer is not None and p.get("text") is not None:
        match = tokenizer.encode(p["text"], add_special_tokens=False).ids == ids
    return pbproto.PromptResult(
        index=i,
        id=p["id"],
        token_ids=ids,
        positions=positions,
        logits=logits,
        generated=first.generated,
        hidden=hidden,
        timings=timings,
        tokenizer_match=match,
        peak_rss_bytes=pbproto.peak_rss_bytes(),
        peak_gpu_bytes=torch.cuda.max_memory_allocated(runner.device) if runner.device.type == "cuda" else None,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="adapter.py", description="paritybench HF transformers reference adapter")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("describe", help="print the adapter's capabilities as JSON")
    r = sub.add_parser("run", help="run a request and write a dump")
    r.add_argument("--request", required=True, help="REQ.json (docs/PROTOCOL.md)")
    r.add_argument("--out", required=True, help="dump directory to create")
    args = ap.parse_args(argv)
    if args.cmd == "describe":
        print(json.dumps(describe(), indent=2))
        return 0
    return run(args.request, args.out)


if __name__ == "__main__":
    sys.exit(main())
