"""The argmax-only path of the llama.cpp adapter: `llama-server`, driven over HTTP.

Why it exists: a user who has only llama.cpp's binaries (no llama-cpp-python) can still be
compared by top-1 and top-k overlap. llama-server returns, per generated token, the top
`n_probs` tokens with probabilities taken from a softmax of the raw logits (before any
sampler, `post_sampling_probs: false`), sorted by logit. So:

- scoring: for each scored position p (ascending), one POST /completion with the token-id
  prefix `token_ids[:p+1]`, `n_predict: 1`, `n_probs: K`, `cache_prompt: true`; the slot's
  KV cache holds the previous prefix, so each request evaluates only the new tokens (O(T)
  in all). The one sampled token is forced to a plain ASCII one (see `top_k_at`: the server
  drops the probabilities of a token that ends in incomplete UTF-8). Writes `top_ids` i32
  [P, K] and `top_probs` f32 [P, K] instead of `logits`.
- greedy: POST /completion with the whole prompt, `n_predict: decode_steps`, the sampler
  chain reduced to `temperature` at 0 (first-max argmax in llama.cpp), `return_tokens`.
  When the model emits an end-of-generation token the server stops; the adapter then asks
  again with the tokens so far, so that exactly `decode_steps` greedy tokens come back, as
  on the library path (`ignore_eos` is not used: it biases EOG tokens to -inf and so changes
  the argmax).
- timings: per warm-up/timed run, with `cache_prompt: false` (the whole prompt is processed
  again): prefill_ms = the server's `prompt_ms`, decode_ms = its `predicted_ms` (the
  `predicted_n - 1` decode steps after the first token), ttft_ms = the wall time of an
  `n_predict: 1` request as a client sees it.

The server is started on a free 127.0.0.1 port, waited for on /health, and always stopped
(also on errors) by the context manager.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np

import pbproto

DEFAULT_TOP_K = 10
GREEDY = {"samplers": ["temperature"], "temperature": 0.0, "seed": 0}


class ServerError(Exception):
    """llama-server failed to start or answered with an error."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A llama-server child process on 127.0.0.1, stopped on exit from the `with` block."""

    def __init__(self, binary: str, model: str, n_ctx: int, n_batch: int, n_threads: int, timeout_s: int):
        self.binary, self.model = binary, model
        self.n_ctx, self.n_batch, self.n_threads, self.timeout_s = n_ctx, n_batch, n_threads, timeout_s
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        self.url = ""
        self.port = 0
        self.load_ms = 0.0

    def command(self, port: int) -> list[str]:
        return [
            self.binary, "-m", self.model, "--host", "127.0.0.1", "--port", str(port),
            "-c", str(self.n_ctx), "-b", str(self.n_batch), "-ub", str(self.n_batch),
            "-t", str(self.n_threads), "-tb", str(self.n_threads), "-np", "1", "-ngl", "0",
            "-fa", "off", "--no-webui", "--seed", "0", "--cache-ram", "0",
        ]

    def __enter__(self) -> "LlamaServer":
        if self.proc is None:
            self.start()
        return self

    def start(self) -> None:
        """Starts the server and waits until /health answers 200; ServerError otherwise."""
        port = self.port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command(port), stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.load_ms = (time.perf_counter() - t0) * 1e3

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        delay = 0.02
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"llama-server exited with status {self.proc.returncode} while loading {self.model}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while the model loads
            time.sleep(delay)  # polling a child process we do not control; no readiness pipe exists
            delay = min(delay * 2, 0.5)
        raise ServerError(f"llama-server did not become healthy within {self.timeout_s} s loading {self.model}: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass

    def peak_rss_bytes(self) -> int | None:
        """VmHWM of the server process (its peak resident set)."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, AttributeError):
            pass
        return None

    def log_tail(self, n: int = 600) -> str:
        try:
            self.log.flush()
            with open(self.log.name, "rb") as f:
                data = f.read()[-n:].decode(errors="replace")
            return " | ".join(l for l in data.splitlines() if l.strip())
        except OSError:
            return "(no log)"

    def post(self, endpoint: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + endpoint, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise ServerError(f"llama-server {endpoint} answered {e.code}: {e.read()[:400].decode(errors='replace')}")
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise ServerError(f"llama-server {endpoint} failed: {e}; log: {self.log_tail()}")


def plain_token(server: LlamaServer) -> int:
    """The id of the text "a": a token that is complete UTF-8 on its own."""
    ids = server.post("/tokenize", {"content": "a", "add_special": False}).get("tokens", [])
    if len(ids) != 1:
        raise ServerError(f"llama-server tokenizes 'a' as {ids}, expected one token")
    return int(ids[0])


def top_k_at(server: LlamaServer, prefix: list[int], k: int, force_id: int) -> tuple[list[int], list[float], int]:
    """Top-k (ids, probs) of the distribution predicting the token after `prefix`, and the
    number of prompt tokens the server evaluated for it.

    llama-server drops the probabilities of a generated token whose text ends in an
    incomplete UTF-8 sequence (it is never added to the slot's token list), so the sampled
    token is forced with a logit bias to `force_id`, a plain ASCII token. The reported
    probabilities are a softmax of the raw logits, taken before every sampler, so the bias
    does not touch them."""
    resp = server.post("/completion", {
        "prompt": prefix, "n_predict": 1, "n_probs": k, "cache_prompt": True,
        "post_sampling_probs": False, "return_tokens": True, **GREEDY,
        "logit_bias": [[force_id, 1000.0]],
    })
    probs = resp.get("completion_probabilities") or []
    if len(probs) != 1:
        raise ServerError(f"llama-server returned {len(probs)} completion_probabilities for n_predict 1")
    top = probs[0].get("top_logprobs") or []
    if len(top) != k:
        raise ServerError(f"llama-server returned {len(top)} top_logprobs, asked for n_probs {k}")
    ids = [int(t["id"]) for t in top]
    ps = [math.exp(t["logprob"]) if t.get("logprob") is not None else 0.0 for t in top]
    return ids, ps, int(resp.get("timings", {}).get("prompt_n", -1))


def greedy(server: LlamaServer, ids: list[int], n: int, cache_prompt: bool) -> tuple[list[int], dict]:
    """Exactly `n` greedy tokens after `ids` (continuing past end-of-generation tokens), and
    the server timings of the first request."""
    out: list[int] = []
    first_timings: dict = {}
    while True:
        resp = server.post("/completion", {
            "prompt": ids + out, "n_predict": n - len(out), "cache_prompt": cache_prompt or bool(out),
            "return_tokens": True, **GREEDY,
        })
        toks = [int(t) for t in resp.get("tokens", [])]
        if not first_timings:
            first_timings = resp.get("timings", {})
        out.extend(toks)
        if len(out) >= n or n == 0:
            return out[:n], first_timings
        if not toks or resp.get("stop_type") != "eos":
            raise ServerError(f"llama-server stopped after {len(out)} of {n} greedy tokens (stop_type {resp.get('stop_type')!r})")


def run_server(req: pbproto.Request, out_dir: str, path: str, header, binary: str, adapter) -> dict:
    if req.device != "cpu":
        raise adapter.AdapterError(f"{req.path}: invalid field `device`: {req.device!r}: the server path runs llama-server on cpu (-ngl 0)")
    n_vocab = header.n_vocab
    if n_vocab is None:
        raise adapter.AdapterError(f"{path}: no token_embd.weight tensor and no tokenizer.ggml.tokens; cannot tell n_vocab")
    adapter.check_vocab(req, n_vocab)
    k = int(req.options.get("top_k", DEFAULT_TOP_K))
    if k > n_vocab:
        raise adapter.AdapterError(f"{req.path}: invalid field `options.top_k`: {k} > n_vocab {n_vocab}")
    n_threads = req.options.get("n_threads") or os.cpu_count() or 1
    t_max = max(len(p["token_ids"]) for p in req.prompts)
    n_ctx = t_max + req.decode_steps + 1
    n_batch = max(t_max, 32)
    timeout = int(req.options.get("server_timeout_s", 300))
    sha = pbproto.sha256_file(path)
    version = adapter.server_version(binary)
    engine = {
        "name": adapter.ENGINE_NAME,
        "version": version,
        "backend": "llama-server-cpu",
        "device": "cpu",
        "device_name": adapter.cpu_name(),
        "versions": {
            "llama-server": version,
            "llama-server binary": os.path.abspath(binary),
            "sdist": os.environ.get("PARITYBENCH_LLAMACPP_SDIST", adapter.SDIST_DEFAULT),
            "llama.cpp build note": "version = build number (git rev-list --count of the vendored tree: 1 for the "
                                    "sdist's shallow .git, 0 without one) and commit",
        },
    }
    m = re.search(r"commit ([0-9a-f]+)", version)
    if m:
        engine["git_sha"] = adapter.tree_commit(m.group(1)) or m.group(1)
    manifest = pbproto.base_manifest(req, engine, adapter.model_info(path, header, n_vocab, sha))
    manifest["captures"] = adapter.capture_record(req, adapter.NO_CAPTURES_SERVER)
    server = LlamaServer(binary, path, n_ctx, n_batch, n_threads, timeout)
    try:
        server.start()
    except ServerError as e:
        raise adapter.AdapterError(f"{path}: {e}")
    with server:
        manifest["load_ms"] = server.load_ms
        manifest["extra"] = {
            "top_k_only": True, "top_k": k, "n_ctx": n_ctx, "n_batch": n_batch, "n_threads": n_threads,
            "server_command": server.command(server.port),
            "scoring": "one /completion per scored position on the token prefix, cache_prompt true "
                       "(the KV cache of the previous prefix is reused); probabilities are a softmax of raw logits",
        }
        writer = pbproto.DumpWriter(out_dir, manifest)
        i = -1
        try:
            for i, p in enumerate(req.prompts):
                writer.write_prompt(run_prompt_server(server, req, i, p, k))
        except (ServerError, OSError, ValueError, KeyError) as e:
            writer.fail(f"prompt {i}: {e}")
            raise adapter.AdapterError(f"{path}: llama-server failed on prompt {i}: {e}")
        writer.manifest["peak_rss_bytes"] = server.peak_rss_bytes()
        return writer.finish()


def run_prompt_server(server: LlamaServer, req: pbproto.Request, i: int, p: dict, k: int) -> pbproto.PromptResult:
    ids = list(p["token_ids"])
    positions = req.positions_of(i)
    n = req.decode_steps
    top_ids = np.zeros((len(positions), k), dtype=np.int32)  # [P, K]
    top_probs = np.zeros((len(positions), k), dtype=np.float32)  # [P, K]
    force_id = plain_token(server)
    for row, pos in enumerate(positions):
        tid, tp, _ = top_k_at(server, ids[: pos + 1], k, force_id)
        top_ids[row], top_probs[row] = tid, tp
    timings = {"prefill_ms": [], "decode_ms": [], "ttft_ms": []}
    generated: list[int] | None = None
    for run in range(req.warmup + req.repeats):
        if n > 0:
            t0 = time.perf_counter()
            greedy(server, ids, 1, cache_prompt=False)
            ttft = (time.perf_counter() - t0) * 1e3
        gen, t = greedy(server, ids, n, cache_prompt=False)
        if int(t.get("prompt_n", len(ids))) != len(ids):
            raise ServerError(f"llama-server evaluated {t.get('prompt_n')} of {len(ids)} prompt tokens with cache_prompt false")
        if run >= req.warmup:
            timings["prefill_ms"].append(float(t.get("prompt_ms", 0.0)))
            if n > 0:
                timings["ttft_ms"].append(ttft)
            if n > 1:
                timings["decode_ms"].append(float(t.get("predicted_ms", 0.0)))
            if generated is None:
                generated = gen
    timings["prefill_tokens"] = len(ids)
    timings["decode_tokens"] = max(n - 1, 0)
    match = None
    if isinstance(p.get("text"), str):
        tok = server.post("/tokenize", {"content": p["text"], "add_special": False, "parse_special": True})
        match = [int(t) for t in tok.get("tokens", [])] == ids
    return pbproto.PromptResult(
        index=i, id=str(p.get("id", i)), token_ids=ids, positions=positions, logits=None,
        generated=generated or [], timings=timings, tokenizer_match=match,
        peak_rss_bytes=server.peak_rss_bytes(), top_ids=top_ids, top_probs=top_probs,
    )
