#!/usr/bin/env python3
"""The llama.cpp reference adapter: makes llama.cpp speak the paritybench dump protocol.

    adapter.py describe
    adapter.py run --request REQ.json --out DIR [--llama-server PATH]

Two paths, chosen by the request's `options.backend`:
- `library` (default): llama-cpp-python with `logits_all=True`; full f32 logits [P, V] at every
  scored position, in `prefill` (the whole prompt in one `eval` batch) or `incremental` (one
  token per `eval` through the KV cache) mode, and greedy decode by first-max argmax.
- `server`: `llama-server` (llama_server.py) for users who have only the binaries; it gives
  top-k token ids and probabilities per scored position, not logits (docs/PROTOCOL.md,
  "Top-k only engines").

llama-cpp-python exposes no per-layer tensors, so every requested capture is recorded under
`captures.absent` with the reason. Errors that keep a run from being made exit 2 with one
line naming the file, field and value.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "common"))
sys.path.insert(0, HERE)

import pbproto  # noqa: E402
from gguf_meta import ASSUMED, GgufError, GgufHeader, read_header  # noqa: E402

ENGINE_NAME = "llama.cpp"
SDIST_DEFAULT = "llama-cpp-python 0.3.36 sha256:832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
OPTION_KEYS = {"backend", "n_threads", "top_k", "llama_server", "server_timeout_s", "flash_attn"}
NO_CAPTURES = ("llama-cpp-python exposes logits and pooled embeddings only; per-layer tensors "
               "would need a ggml eval callback in C, which this adapter does not install")
NO_CAPTURES_SERVER = "llama-server returns token probabilities only; it has no per-layer tensors"

class AdapterError(Exception):
    """A run that cannot be made; the message names the file/field/value."""


# ---------------------------------------------------------------------------------------
# describe


def describe() -> dict:
    info = {
        "name": ENGINE_NAME,
        "version": None,
        "git_sha": None,
        "backends": [],
        "capabilities": {
            "formats": ["gguf"],
            "modes": ["prefill", "incremental"],
            "dtypes": ["auto", "f32"],
            "devices": ["cpu"],
            "logits": True,
            "captures": [],
            "top_k_only_backends": ["server"],
            "options": sorted(OPTION_KEYS),
        },
        "versions": {},
    }
    try:
        import llama_cpp

        info["version"] = llama_cpp.__version__
        info["versions"] = library_versions(llama_cpp)
        info["git_sha"] = info["versions"].get("llama.cpp commit") or info["versions"].get("ggml commit")
        info["backends"].append(library_backend(llama_cpp))
        if llama_cpp.llama_supports_gpu_offload():
            info["capabilities"]["devices"].append("cuda")
    except ImportError as e:
        info["capabilities"]["library_unavailable"] = f"llama_cpp not importable: {e}"
    server = find_llama_server(None, {})
    if server:
        info["backends"].append("llama-server")
        info["versions"]["llama-server"] = server_version(server)
        info["version"] = info["version"] or info["versions"]["llama-server"]
    else:
        info["capabilities"]["server_unavailable"] = "no llama-server in $PARITYBENCH_LLAMACPP_BIN or PATH"
    return info


# ---------------------------------------------------------------------------------------
# provenance helpers


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_backend(llama_cpp) -> str:
    return "llama.cpp-cuda" if llama_cpp.llama_supports_gpu_offload() else "llama.cpp-cpu"


def ggml_version_and_commit() -> tuple[str | None, str | None]:
    """ggml_version()/ggml_commit() of the libggml that llama-cpp-python loaded."""
    try:
        import ctypes

        from llama_cpp._ggml import libggml

        out = []
        for fn in ("ggml_version", "ggml_commit"):
            f = getattr(libggml, fn)
            f.restype, f.argtypes = ctypes.c_char_p, []
            out.append(f().decode())
        return out[0], out[1]
    except (ImportError, AttributeError, OSError):
        return None, None


def library_versions(llama_cpp) -> dict:
    v = {
        "llama-cpp-python": llama_cpp.__version__,
        "sdist": os.environ.get("PARITYBENCH_LLAMACPP_SDIST", SDIST_DEFAULT),
    }
    gv, gc = ggml_version_and_commit()
    if gv:
        v["ggml"] = gv
    if gc:
        v["ggml commit"] = gc
        full = tree_commit(gc)
        if full:
            v["llama.cpp commit"] = full
    v.update(tree_build_info())
    # what ggml was compiled for decides which kernels (and so which bits) a run takes
    isa = os.environ.get("PARITYBENCH_LLAMACPP_ISA")
    if isa:
        v["isa"] = isa
    try:
        v["cpu features"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except (AttributeError, OSError):
        pass
    return v


def tree_commit(short: str) -> str | None:
    """The full sha of the tree in $PARITYBENCH_LLAMACPP, if it is the commit `short` that
    the library reports (the sdist carries the vendored submodule's .git)."""
    tree = os.environ.get("PARITYBENCH_LLAMACPP")
    if not tree:
        return None
    try:
        p = subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    full = p.stdout.strip()
    return full if p.returncode == 0 and full.startswith(short.split("-")[0]) else None


def tree_build_info() -> dict:
    """The llama.cpp build number and commit as the tree's build reports them.

    llama.cpp's cmake takes BUILD_NUMBER from `git rev-list --count HEAD`: the 0.3.36 sdist
    ships a one-commit shallow copy of the submodule's .git, so it reads 1 here (0 where
    the tree has no .git at all). It is recorded as reported, with that note."""
    server = find_llama_server(None, {})
    if not server:
        return {}
    return {
        "llama.cpp build": server_version(server),
        "llama.cpp build note": "build number = `git rev-list --count HEAD` of the vendored tree at build time "
                                "(1 for the sdist's shallow .git, 0 without one); the commit identifies the tree",
    }


def server_version(binary: str) -> str:
    """`llama-server --version` prints e.g. `version: 0.5.0-dev (build 1, commit 0c1e570)`;
    returns what follows `version:`."""
    try:
        p = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    for line in (p.stdout + p.stderr).splitlines():
        if line.startswith("version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def find_llama_server(cli_path: str | None, options: dict) -> str | None:
    for cand in (cli_path, options.get("llama_server")):
        if cand:
            return cand
    bin_dir = os.environ.get("PARITYBENCH_LLAMACPP_BIN")
    if bin_dir and os.path.isfile(os.path.join(bin_dir, "llama-server")):
        return os.path.join(bin_dir, "llama-server")
    from shutil import which

    return which("llama-server")


# ---------------------------------------------------------------------------------------
# request checks shared by both paths


def check_request(req: pbproto.Request) -> tuple[str, GgufHeader]:
    """Checks what the protocol parser leaves to the adapter; returns (model path, header)."""
    opts = req.options
    unknown = set(opts) - OPTION_KEYS
    if unknown:
        raise AdapterError(f"{req.path}: unknown field(s) in `options`: {sorted(unknown)} (known: {sorted(OPTION_KEYS)})")
    backend = opts.get("backend", "library")
    if backend not in ("library", "server"):
        raise AdapterError(f"{req.path}: invalid field `options.backend`: {backend!r} (library or server)")
    for key in ("n_threads", "top_k", "server_timeout_s"):
        if key in opts and (not isinstance(opts[key], int) or isinstance(opts[key], bool) or opts[key] < 1):
            raise AdapterError(f"{req.path}: invalid field `options.{key}`: {opts[key]!r} (a positive integer)")
    if "flash_attn" in opts:
        if not isinstance(opts["flash_attn"], bool):
            raise AdapterError(f"{req.path}: invalid field `options.flash_attn`: {opts['flash_attn']!r} (true or false)")
        if backend != "library":
            raise AdapterError(f"{req.path}: invalid field `options.flash_attn`: it applies to the library backend "
                               "(llama-server takes its own --flash-attn flag)")
    if req.dtype not in ("auto", "f32"):
        raise AdapterError(f"{req.path}: invalid field `dtype`: {req.dtype!r}: llama.cpp computes activations in f32 "
                           "with the weights as the GGUF stores them; ask for auto or f32 and pick the GGUF's quant instead")
    fmt = req.raw["model"].get("format")
    if fmt not in (None, "gguf"):
        raise AdapterError(f"{req.path}: invalid field `model.format`: {fmt!r}: llama.cpp reads gguf only")
    for key, default, least in (("decode_steps", 0, 0), ("warmup", 0, 0), ("repeats", 1, 1)):
        v = req.raw.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise AdapterError(f"{req.path}: invalid field `{key}`: {v!r} (an integer >= {least})")
    path = req.model_path
    if not os.path.exists(path):
        raise AdapterError(f"{path}: model file not found (request field `model.path`)")
    if os.path.isdir(path):
        raise AdapterError(f"{path}: `model.path` is a directory; llama.cpp needs a .gguf file (make one with runners/llamacpp/build_gguf.py)")
    try:
        header = read_header(path)
    except GgufError as e:
        raise AdapterError(f"{e} (request field `model.path`)")
    want = req.raw["model"].get("sha256")
    if want:
        got = pbproto.sha256_file(path)
        if got != want.lower():
            raise AdapterError(f"{path}: sha256 is {got}, request field `model.sha256` says {want}")
    return path, header


def check_vocab(req: pbproto.Request, n_vocab: int) -> None:
    for i, p in enumerate(req.prompts):
        bad = [t for t in p["token_ids"] if t >= n_vocab]
        if bad:
            raise AdapterError(f"{req.path}: `prompts[{i}].token_ids` holds id {bad[0]} >= n_vocab {n_vocab} of {req.model_path}")


def model_info(path: str, header: GgufHeader, n_vocab: int, sha256: str) -> dict:
    arch = header.architecture
    assumed = {}
    for hp, (key, value, why) in ASSUMED.get(arch, {}).items():
        if key is None or header.arch_key(key) is None:
            assumed[hp] = f"{json.dumps(value)}: {why} (the GGUF has no key for it)"
    info = {
        "path": os.path.abspath(path),
        "sha256": sha256,
        "format": "gguf",
        "quant": header.quant,
        "compute_dtype": "f32",
        "architecture": arch,
        "n_layers": header.arch_key("block_count"),
        "vocab_size": n_vocab,
    }
    if assumed:
        info["assumed"] = assumed
    return info


def capture_record(req: pbproto.Request, why: str) -> dict:
    points = req.capture_points()
    return {"points": [], "layers": [], "absent": {p: why for p in points}}


class LlamaLog:
    """Collects llama.cpp's error-level log lines (and prints nothing), so that a load
    failure can say why; llama-cpp-python's own exception only says that it failed."""

    def __init__(self, llama_cpp):
        import ctypes

        self.errors: list[str] = []
        self._last_level = 0

        # ggml.h of this tree: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the
        # previous line). llama-cpp-python's _logger.py still has the older numbering.
        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            line = text.decode("utf-8", errors="replace").strip()
            if level == 4 and line:
                self.errors.append(line)
            elif level == 5 and self._last_level == 4 and self.errors:
                self.errors[-1] += " " + line
            if level != 5:
                self._last_level = level

        self._callback = callback  # keep the ctypes thunk alive as long as llama.cpp may call it
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))

    def reason(self) -> str:
        """The most specific error line (llama_model_load's), else the last one."""
        for line in self.errors:
            if "error loading model" in line:
                return line
        return self.errors[-1] if self.errors else "no error message from llama.cpp"


def first_argmax(row: np.ndarray) -> int:
    """Greedy choice: the first index of the maximum (np.argmax's documented tie rule)."""
    return int(np.argmax(row))


# ---------------------------------------------------------------------------------------
# library path: llama-cpp-python, full logits


def run_library(req: pbproto.Request, out_dir: str, path: str, header: GgufHeader) -> dict:
    try:
        import llama_cpp
    except ImportError as e:
        raise AdapterError(f"llama_cpp (llama-cpp-python) is not importable ({e}); run runners/setup.sh, "
                           "or set `options.backend` to \"server\" to use llama-server")
    gpu = req.device.startswith("cuda")
    if req.device not in ("cpu",) and not (gpu and llama_cpp.llama_supports_gpu_offload()):
        raise AdapterError(f"{req.path}: invalid field `device`: {req.device!r}: this llama-cpp-python build "
                           f"({library_backend(llama_cpp)}) runs on cpu only")
    if gpu and req.device not in ("cuda", "cuda:0"):
        raise AdapterError(f"{req.path}: invalid field `device`: {req.device!r}: only cuda:0 is supported")
    n_threads = req.options.get("n_threads") or os.cpu_count() or 1
    # off by default: separate K·Q and V·softmax products over an f16 K/V cache; on: ggml's
    # flash-attention kernel (f16 accumulation of V, online softmax), llama.cpp's other path
    flash_attn = bool(req.options.get("flash_attn", False))
    t_max = max(len(p["token_ids"]) for p in req.prompts)
    n_ctx = t_max + req.decode_steps
    n_batch = t_max  # prefill: the whole prompt is one batch and one micro-batch

    sha = pbproto.sha256_file(path)
    log = LlamaLog(llama_cpp)
    t0 = time.perf_counter()
    try:
        llm = llama_cpp.Llama(
            model_path=path, logits_all=True, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
            n_threads=n_threads, n_threads_batch=n_threads, seed=0, verbose=False,
            n_gpu_layers=-1 if gpu else 0, flash_attn=flash_attn,
        )
    except (ValueError, RuntimeError) as e:
        raise AdapterError(f"{path}: llama.cpp could not load this GGUF: {log.reason()} ({e})")
    load_ms = (time.perf_counter() - t0) * 1e3
    n_vocab = llm.n_vocab()
    check_vocab(req, n_vocab)

    engine = {
        "name": ENGINE_NAME,
        "version": llama_cpp.__version__,
        "backend": library_backend(llama_cpp),
        "device": "cuda:0" if gpu else "cpu",
        "device_name": cpu_name(),
        "versions": library_versions(llama_cpp),
    }
    gc = engine["versions"].get("llama.cpp commit") or engine["versions"].get("ggml commit")
    if gc:
        engine["git_sha"] = gc
    manifest = pbproto.base_manifest(req, engine, model_info(path, header, n_vocab, sha))
    manifest["captures"] = capture_record(req, NO_CAPTURES)
    manifest["load_ms"] = load_ms
    manifest["extra"] = {
        "n_ctx": n_ctx, "n_batch": n_batch, "n_threads": n_threads, "flash_attn": flash_attn,
        "timing_note": "prefill_ms includes llama-cpp-python copying [T, V] logits into `scores`; "
                       "ttft_ms = prefill + first argmax; decode_ms covers the decode_steps-1 single-token evals after it",
    }
    writer = pbproto.DumpWriter(out_dir, manifest)
    try:
        for i, p in enumerate(req.prompts):
            writer.write_prompt(run_prompt_library(llm, req, i, p))
    except Exception as e:  # an engine failure mid-run: keep what finished, say why
        writer.fail(f"prompt {i}: {type(e).__name__}: {e}")
        raise AdapterError(f"{path}: llama.cpp failed on prompt {i} ({p.get('id')!r}): {e}")
    writer.manifest["peak_rss_bytes"] = pbproto.peak_rss_bytes()
    return writer.finish()


def run_prompt_library(llm, req: pbproto.Request, i: int, p: dict) -> pbproto.PromptResult:
    ids = list(p["token_ids"])
    positions = req.positions_of(i)
    n_steps = req.decode_steps
    T = len(ids)
    timings = {"prefill_ms": [], "decode_ms": [], "ttft_ms": []}
    logits, generated = None, []
    for run in range(req.warmup + req.repeats):
        timed = run >= req.warmup
        llm.reset()  # n_tokens = 0; the next eval drops every cached KV entry
        t0 = time.perf_counter()
        if req.mode == "prefill":
            llm.eval(ids)
        else:
            for tok in ids:
                llm.eval([tok])
        t1 = time.perf_counter()
        gen = []
        t2 = t3 = t1
        if n_steps > 0:
            nxt = first_argmax(llm.scores[T - 1])
            gen.append(nxt)
            t2 = time.perf_counter()
            for _ in range(n_steps - 1):
                llm.eval([nxt])
                nxt = first_argmax(llm.scores[llm.n_tokens - 1])
                gen.append(nxt)
            t3 = time.perf_counter()
        if timed:
            timings["prefill_ms"].append((t1 - t0) * 1e3)
            if n_steps > 0:
                timings["ttft_ms"].append((t2 - t0) * 1e3)
            if n_steps > 1:
                timings["decode_ms"].append((t3 - t2) * 1e3)
            if logits is None:
                # [P, V] f32: rows < T are not touched by decoding
                logits = np.array(llm.scores[positions, :], dtype=np.float32)
                generated = gen
    timings["prefill_tokens"] = T
    timings["decode_tokens"] = max(n_steps - 1, 0)
    match = None
    if isinstance(p.get("text"), str):
        match = llm.tokenize(p["text"].encode(), add_bos=False, special=True) == ids
    return pbproto.PromptResult(
        index=i, id=str(p.get("id", i)), token_ids=ids, positions=positions, logits=logits,
        generated=generated, timings=timings, tokenizer_match=match,
        peak_rss_bytes=pbproto.peak_rss_bytes(),
    )


# ---------------------------------------------------------------------------------------
# CLI


def cmd_run(args) -> int:
    req = pbproto.load_request(args.request)
    path, header = check_request(req)
    if req.options.get("backend", "library") == "server":
        import llama_server

        binary = find_llama_server(args.llama_server, req.options)
        if not binary or not os.path.isfile(binary):
            raise AdapterError(f"llama-server not found ({binary or 'set --llama-server, options.llama_server or PARITYBENCH_LLAMACPP_BIN'})")
        manifest = llama_server.run_server(req, args.out, path, header, binary, adapter=sys.modules[__name__])
    else:
        manifest = run_library(req, args.out, path, header)
    print(json.dumps({"out": args.out, "prompts": len(manifest["prompts"]), "complete": manifest["complete"]}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="adapter.py", description="paritybench adapter for llama.cpp")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("describe", help="print what this adapter can do, as JSON")
    run = sub.add_parser("run", help="run a request and write a dump")
    run.add_argument("--request", required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--llama-server", default=None, help="llama-server binary for options.backend=server")
    args = ap.parse_args(argv)
    if args.cmd == "describe":
        print(json.dumps(describe(), indent=2))
        return 0
    try:
        return cmd_run(args)
    except (pbproto.ProtocolError, AdapterError) as e:
        pbproto.fail(str(e))
    return 2


if __name__ == "__main__":
    sys.exit(main())
