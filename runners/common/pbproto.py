"""The paritybench dump protocol, Python side (mirrors src/protocol in the Rust crate).

An adapter reads a request (REQ.json), runs its engine, and writes a dump directory:
`manifest.json` plus one `p{i}.safetensors` shard per prompt, each written as its prompt
finishes. The manifest is marked `complete: true` last, so an engine that dies half-way
still leaves its finished prompts usable.

Shard tensors: `token_ids` i32 [T], `positions` i32 [P], `logits` f32 [P, V], `generated`
i32 [N], `hidden.{capture}.{layer}` [P, .] (`moe_topk_ids` is i32).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

CAPTURE_POINTS = (
    "embed",
    "attn_norm",
    "attn_out",
    "ffn_norm",
    "moe_router",
    "moe_topk_ids",
    "ffn_out",
    "layer_out",
    "final_norm",
)
GLOBAL_CAPTURES = ("embed", "final_norm")
MOE_CAPTURES = ("moe_router", "moe_topk_ids")

_REQUEST_KEYS = {
    "schema", "model", "prompts", "positions", "captures", "decode_steps", "mode",
    "device", "dtype", "warmup", "repeats", "options",
}


class ProtocolError(Exception):
    """A request or dump that does not follow the protocol; the message names the field."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Request:
    raw: dict
    path: str

    @property
    def model_path(self) -> str:
        return self.raw["model"]["path"]

    @property
    def mode(self) -> str:
        return self.raw["mode"]

    @property
    def device(self) -> str:
        return self.raw.get("device", "cpu")

    @property
    def dtype(self) -> str:
        return self.raw.get("dtype", "auto")

    @property
    def decode_steps(self) -> int:
        return int(self.raw.get("decode_steps", 0))

    @property
    def warmup(self) -> int:
        return int(self.raw.get("warmup", 0))

    @property
    def repeats(self) -> int:
        return int(self.raw.get("repeats", 1))

    @property
    def options(self) -> dict:
        return self.raw.get("options", {}) or {}

    @property
    def prompts(self) -> list[dict]:
        return self.raw["prompts"]

    def capture_points(self) -> list[str]:
        return list((self.raw.get("captures") or {}).get("points", []))

    def capture_layers(self, n_layers: int) -> list[int]:
        layers = (self.raw.get("captures") or {}).get("layers", "all")
        if layers == "all":
            return list(range(n_layers))
        return [int(l) for l in layers if 0 <= int(l) < n_layers]

    def positions_of(self, i: int) -> list[int]:
        p = self.prompts[i]
        spec = p.get("positions", self.raw.get("positions", "all"))
        if spec == "all" or spec is None:
            return list(range(len(p["token_ids"])))
        return [int(x) for x in spec]

    def sha256(self) -> str:
        """sha256 of the request file's bytes (what the manifest's `request_sha256` holds)."""
        return sha256_file(self.path)


def load_request(path: str) -> Request:
    """Reads and validates REQ.json; errors name the file and the field."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ProtocolError(f"{path}: no such request file")
    except json.JSONDecodeError as e:
        raise ProtocolError(f"{path}: malformed JSON: {e}")
    if not isinstance(raw, dict):
        raise ProtocolError(f"{path}: a request is a JSON object")
    unknown = set(raw) - _REQUEST_KEYS
    if unknown:
        raise ProtocolError(f"{path}: unknown field(s) {sorted(unknown)}")
    for key in ("schema", "model", "prompts", "mode"):
        if key not in raw:
            raise ProtocolError(f"{path}: missing field `{key}`")
    if raw["schema"] != SCHEMA_VERSION:
        raise ProtocolError(f"{path}: request schema {raw['schema']} is not supported (adapter speaks {SCHEMA_VERSION})")
    if raw["mode"] not in ("prefill", "incremental"):
        raise ProtocolError(f"{path}: invalid field `mode`: {raw['mode']!r} (prefill or incremental)")
    if not isinstance(raw["model"], dict) or "path" not in raw["model"]:
        raise ProtocolError(f"{path}: invalid field `model`: needs a `path`")
    if not raw["prompts"]:
        raise ProtocolError(f"{path}: invalid field `prompts`: no prompts")
    _check_fields(path, raw)
    req = Request(raw, path)
    seen = set()
    for i, p in enumerate(raw["prompts"]):
        if not isinstance(p, dict):
            raise ProtocolError(f"{path}: invalid field `prompts[{i}]`: a prompt is a JSON object")
        unknown = set(p) - _PROMPT_KEYS
        if unknown:
            raise ProtocolError(f"{path}: unknown field(s) {sorted(f'prompts[{i}].{k}' for k in unknown)}")
        if not isinstance(p.get("id"), str):
            raise ProtocolError(f"{path}: invalid field `prompts[{i}].id`: needs a string, got {p.get('id')!r}")
        ids = p.get("token_ids")
        if not isinstance(ids, list) or not ids or not all(_is_uint(t) for t in ids):
            raise ProtocolError(f"{path}: invalid field `prompts[{i}].token_ids`: needs non-negative integers")
        if "positions" in p and not _is_positions(p["positions"]):
            raise ProtocolError(f"{path}: invalid field `prompts[{i}].positions`: \"all\" or a list of non-negative integers")
        if p.get("id") in seen:
            raise ProtocolError(f"{path}: invalid field `prompts[{i}]`: duplicate prompt id {p.get('id')!r}")
        seen.add(p.get("id"))
        pos = req.positions_of(i)
        if not pos or any(b <= a for a, b in zip(pos, pos[1:])) or pos[-1] >= len(ids) or pos[0] < 0:
            raise ProtocolError(f"{path}: invalid field `prompts[{i}].positions`: must be ascending indices into {len(ids)} tokens")
    for c in req.capture_points():
        if c not in CAPTURE_POINTS:
            raise ProtocolError(f"{path}: invalid field `captures.points`: unknown capture {c!r}")
    return req


_MODEL_KEYS = {"path", "sha256", "format", "tokenizer"}
_PROMPT_KEYS = {"id", "token_ids", "text", "chat", "positions"}
_CAPTURE_KEYS = {"points", "layers"}
DTYPES = ("auto", "f32", "f16", "bf16")


def _is_uint(x: Any) -> bool:
    # bool is an int subclass in Python; JSON true/false are not token ids
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_positions(x: Any) -> bool:
    return x == "all" or (isinstance(x, list) and all(_is_uint(v) for v in x))


def _check_fields(path: str, raw: dict) -> None:
    """What the Rust side's serde types reject (deny_unknown_fields, u32, enums), so that a
    request one side accepts the other accepts too."""
    model = raw["model"]
    if not isinstance(model.get("path"), str):
        raise ProtocolError(f"{path}: invalid field `model.path`: needs a string")
    unknown = set(model) - _MODEL_KEYS
    if unknown:
        raise ProtocolError(f"{path}: unknown field(s) {sorted('model.' + k for k in unknown)}")
    if not isinstance(raw["prompts"], list):
        raise ProtocolError(f"{path}: invalid field `prompts`: needs a list")
    if "positions" in raw and not _is_positions(raw["positions"]):
        raise ProtocolError(f"{path}: invalid field `positions`: \"all\" or a list of non-negative integers")
    caps = raw.get("captures")
    if caps is not None:
        if not isinstance(caps, dict):
            raise ProtocolError(f"{path}: invalid field `captures`: needs an object")
        unknown = set(caps) - _CAPTURE_KEYS
        if unknown:
            raise ProtocolError(f"{path}: unknown field(s) {sorted('captures.' + k for k in unknown)}")
        if not isinstance(caps.get("points", []), list):
            raise ProtocolError(f"{path}: invalid field `captures.points`: needs a list")
        if not _is_positions(caps.get("layers", "all")):
            raise ProtocolError(f"{path}: invalid field `captures.layers`: \"all\" or a list of non-negative integers")
    for key in ("decode_steps", "warmup"):
        if key in raw and not _is_uint(raw[key]):
            raise ProtocolError(f"{path}: invalid field `{key}`: {raw[key]!r} (a non-negative integer)")
    if "repeats" in raw and not (_is_uint(raw["repeats"]) and raw["repeats"] >= 1):
        raise ProtocolError(f"{path}: invalid field `repeats`: {raw['repeats']!r} (must be at least 1)")
    if "dtype" in raw and raw["dtype"] not in DTYPES:
        raise ProtocolError(f"{path}: invalid field `dtype`: {raw['dtype']!r} (one of {list(DTYPES)})")
    if "device" in raw and not isinstance(raw["device"], str):
        raise ProtocolError(f"{path}: invalid field `device`: needs a string such as \"cpu\" or \"cuda:0\"")
    if "options" in raw and raw["options"] is not None and not isinstance(raw["options"], dict):
        raise ProtocolError(f"{path}: invalid field `options`: needs an object")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class PromptResult:
    index: int
    id: str
    token_ids: list[int]
    positions: list[int]
    logits: np.ndarray | None  # [P, V]
    generated: list[int]
    hidden: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [P, .]
    timings: dict = field(default_factory=dict)
    tokenizer_match: bool | None = None
    peak_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    # top-k-only engines (docs/PROTOCOL.md): written instead of `logits`
    top_ids: np.ndarray | None = None  # [P, K] i32, descending by probability
    top_probs: np.ndarray | None = None  # [P, K] f32


class DumpWriter:
    """Writes a dump directory prompt by prompt (see the module doc)."""

    def __init__(self, out_dir: str, manifest: dict):
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(os.path.join(out_dir, "manifest.json")):
            raise ProtocolError(f"{out_dir}: already holds a dump (manifest.json); refusing to overwrite it")
        self.dir = out_dir
        self.manifest = dict(manifest)
        self.manifest["schema"] = SCHEMA_VERSION
        self.manifest["complete"] = False
        self.manifest["prompts"] = []
        self._write_manifest()

    def write_prompt(self, r: PromptResult) -> None:
        from safetensors.numpy import save_file

        name = f"p{r.index}.safetensors"
        path = os.path.join(self.dir, name)
        tmp = os.path.join(self.dir, f".{name}.tmp")
        P = len(r.positions)
        tensors = {
            "token_ids": np.asarray(r.token_ids, dtype=np.int32),
            "positions": np.asarray(r.positions, dtype=np.int32),
            "generated": np.asarray(r.generated, dtype=np.int32),
        }
        if r.logits is not None:
            tensors["logits"] = np.ascontiguousarray(r.logits, dtype=np.float32)
        if r.top_ids is not None:
            tensors["top_ids"] = np.ascontiguousarray(r.top_ids, dtype=np.int32)
        if r.top_probs is not None:
            tensors["top_probs"] = np.ascontiguousarray(r.top_probs, dtype=np.float32)
        for k, v in r.hidden.items():
            v = np.ascontiguousarray(v)
            if k.startswith("hidden.moe_topk_ids."):
                v = v.astype(np.int32)
            elif v.dtype not in (np.float32, np.float16):
                v = v.astype(np.float32)
            tensors[k] = v
        for k, v in tensors.items():
            if k in ("logits", "top_ids", "top_probs") or k.startswith("hidden."):
                if v.ndim != 2 or v.shape[0] != P:
                    raise ProtocolError(f"{path}: tensor `{k}` has shape {list(v.shape)}, expected [{P}, .]")
        save_file(tensors, tmp)
        os.replace(tmp, path)
        self.manifest["prompts"].append({
            "index": r.index,
            "id": r.id,
            "file": name,
            "n_tokens": len(r.token_ids),
            "n_positions": P,
            "n_generated": len(r.generated),
            "timings": {
                "prefill_ms": list(r.timings.get("prefill_ms", [])),
                "decode_ms": list(r.timings.get("decode_ms", [])),
                "prefill_tokens": int(r.timings.get("prefill_tokens", len(r.token_ids))),
                "decode_tokens": int(r.timings.get("decode_tokens", len(r.generated))),
                **({"ttft_ms": list(r.timings["ttft_ms"])} if r.timings.get("ttft_ms") else {}),
            },
            "sha256": sha256_file(path),
            **({"tokenizer_match": r.tokenizer_match} if r.tokenizer_match is not None else {}),
            **({"peak_rss_bytes": int(r.peak_rss_bytes)} if r.peak_rss_bytes is not None else {}),
            **({"peak_gpu_bytes": int(r.peak_gpu_bytes)} if r.peak_gpu_bytes is not None else {}),
        })
        self._write_manifest()

    def finish(self) -> dict:
        self.manifest["complete"] = True
        self._write_manifest()
        return self.manifest

    def fail(self, error: str) -> dict:
        self.manifest["complete"] = False
        self.manifest["error"] = error
        self._write_manifest()
        return self.manifest

    def _write_manifest(self) -> None:
        path = os.path.join(self.dir, "manifest.json")
        tmp = os.path.join(self.dir, ".manifest.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.manifest, f, indent=2)
        os.replace(tmp, path)


def base_manifest(req: Request, engine: dict, model: dict, tokenizer: dict | None = None) -> dict:
    """The manifest fields every adapter fills the same way."""
    return {
        "schema": SCHEMA_VERSION,
        "complete": False,
        "engine": engine,
        "model": model,
        "tokenizer": tokenizer or {"add_bos": False},
        "mode": req.mode,
        "request_sha256": req.sha256(),
        "prompt_ids": [p["id"] for p in req.prompts],
        "prompts": [],
        "captures": {"points": [], "layers": [], "absent": {}},
        "command": list(sys.argv),
        "created_utc": utc_now(),
    }


def peak_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def fail(msg: str, code: int = 2) -> "NoReturn":  # noqa: F821
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)
