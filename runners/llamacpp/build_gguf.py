#!/usr/bin/env python3
"""Builds the GGUF files of an HF checkpoint with llama.cpp's own tools, and checks them.

    build_gguf.py --model DIR --out OUT [--name NAME] [--quants Q8_0,Q4_K_M,Q5_K_M,Q6_K]
                  [--extra BF16,F32,Q4_0,Q4_1,Q5_0,Q5_1] [--json FILE] [--force]
                  [--check-only] [--cross-check] [--allow-hparam-mismatch]

Why it exists: the built-in engine's GGUF loader and dequantizers are only tested if real
files with real blocks of every type exist, made by the same llama.cpp tree that produces
the reference logits (one sdist, runners/setup.sh). Steps:

1. `convert_hf_to_gguf.py --outtype f16` (and `bf16`/`f32` when asked), run by the venv
   python with the tree's gguf-py first on the path -> `<out>/<name>-F16.gguf`.
2. `llama-quantize <name>-F16.gguf <name>-<QUANT>.gguf <QUANT>` for each quant.
3. Inspection of every file: sha256, size, tensor types present (tensor and block counts:
   n_elements / block size), every tensor's type and shape, the model's metadata. Parsed by
   gguf_meta.py, whose type tables are checked against the tree's gguf-py
   (GGMLQuantizationType, GGML_QUANT_SIZES, LlamaFileType); `--cross-check` also reads every
   file with the tree's GGUFReader and compares (GGUFReader takes ~10 s per file to build
   objects for a 150k-entry vocabulary, so it is not the default).
4. Checks, each a loud failure (exit 1):
   - a quantized file holds no blocks of its own type (llama-quantize silently falls back,
     e.g. Q4_K -> Q5_0, when a row length is not a multiple of 256);
   - a checkpoint hyper-parameter that reached the file with another value, or did not
     reach it and llama.cpp assumes something else (e.g. `norm_topk_prob` false, which the
     qwen3moe graph ignores). Those that did not reach the file are always reported.
   `--allow-hparam-mismatch` turns the second into a warning.

`--check-only` builds nothing: it inspects and checks the files that are there (e.g. GGUFs
made elsewhere). The JSON report goes to stdout and, when building, to
`<out>/<name>.gguf.json`. A file is rebuilt only when the checkpoint or the tree changed, or
the file is not the one last recorded (or with --force).
Exit codes: 0 built and checked, 1 a check failed, 2 could not run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from gguf_meta import ASSUMED, FILE_TYPES, TENSOR_TYPES, ArrayInfo, GgufError, read_header  # noqa: E402

DEFAULT_QUANTS = ["Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K"]
CONVERT_TYPES = {"F16": "f16", "BF16": "bf16", "F32": "f32"}
QUANTIZE_TYPES = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
                  "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"}
# The tensor type a file named by its quant must hold blocks of.
PRIMARY_TYPE = {
    "F16": "F16", "BF16": "BF16", "F32": "F32", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1",
    "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K",
}
# Metadata worth reporting besides every `{arch}.*` key.
GENERAL_KEYS = ("general.architecture", "general.file_type", "general.quantization_version",
                "general.alignment", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.tokens")
# config.json key -> GGUF key suffix under `{arch}.`
HPARAM_KEYS = {
    "num_hidden_layers": "block_count",
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "max_position_embeddings": "context_length",
    "num_experts": "expert_count",  # transformers 5.x writes it as num_local_experts
    "num_experts_per_tok": "expert_used_count",
    "moe_intermediate_size": "expert_feed_forward_length",
    "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
    "norm_topk_prob": "expert_weights_norm",
    "decoder_sparse_step": None,
    "mlp_only_layers": None,
}


class BuildError(Exception):
    """The tools could not run (exit 2)."""


class CheckFailed(Exception):
    """A file was built but is not what its name promises (exit 1)."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def log(msg: str) -> None:
    print(f"[build_gguf] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# tools


def tool_paths(args) -> tuple[str, str, str]:
    tree = args.llamacpp or os.environ.get("PARITYBENCH_LLAMACPP")
    bin_dir = args.bin or os.environ.get("PARITYBENCH_LLAMACPP_BIN")
    python = args.python or os.environ.get("PARITYBENCH_PYTHON") or sys.executable
    if not tree or not os.path.isfile(os.path.join(tree, "convert_hf_to_gguf.py")):
        raise BuildError(f"no llama.cpp tree with convert_hf_to_gguf.py at {tree!r} (set PARITYBENCH_LLAMACPP or --llamacpp; runners/setup.sh makes one)")
    if not bin_dir or not os.path.isfile(os.path.join(bin_dir, "llama-quantize")):
        raise BuildError(f"no llama-quantize in {bin_dir!r} (set PARITYBENCH_LLAMACPP_BIN or --bin)")
    return tree, os.path.join(bin_dir, "llama-quantize"), python


def run_tool(cmd: list[str], env: dict | None, what: str) -> None:
    log(f"{what}: {' '.join(cmd)}")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-8:])
        raise BuildError(f"{what} failed with status {p.returncode}: {tail}")


def convert(tree: str, python: str, model_dir: str, out: str, outtype: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(tree, "gguf-py") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NO_LOCAL_GGUF", None)
    tmp = out + ".tmp"
    run_tool([python, os.path.join(tree, "convert_hf_to_gguf.py"), model_dir, "--outtype", outtype,
              "--outfile", tmp], env, f"convert {os.path.basename(out)}")
    os.replace(tmp, out)


def quantize(quantize_bin: str, src: str, out: str, qtype: str, threads: int) -> None:
    tmp = out + ".tmp"
    run_tool([quantize_bin, src, tmp, qtype, str(threads)], None, f"quantize {os.path.basename(out)}")
    os.replace(tmp, out)


# ---------------------------------------------------------------------------------------
# inspection


def gguf_module(tree: str):
    sys.path.insert(0, os.path.join(tree, "gguf-py"))
    import gguf  # the tree's own gguf-py

    return gguf


def check_type_tables(gguf) -> None:
    """gguf_meta's type tables must be the tree's (GGMLQuantizationType, GGML_QUANT_SIZES,
    LlamaFileType), or block counts would be wrong."""
    for tid, (name, block, nbytes) in TENSOR_TYPES.items():
        t = gguf.GGMLQuantizationType(tid)
        if t.name != name or gguf.GGML_QUANT_SIZES[t] != (block, nbytes):
            raise BuildError(f"gguf_meta.TENSOR_TYPES[{tid}] = {name} {block}/{nbytes}, the tree's gguf-py says {t.name} {gguf.GGML_QUANT_SIZES[t]}")
    for fid, name in FILE_TYPES.items():
        if gguf.LlamaFileType(fid).name.removeprefix("MOSTLY_").removeprefix("ALL_") != name:
            raise BuildError(f"gguf_meta.FILE_TYPES[{fid}] = {name}, the tree's gguf-py says {gguf.LlamaFileType(fid).name}")


def meta_value(gguf, v):
    """A metadata value for the report; arrays of more than 16 items become their length."""
    if isinstance(v, ArrayInfo):
        if v.items is None:
            return {"array_of": gguf.GGUFValueType(v.item_type).name, "length": v.length}
        return v.items
    if isinstance(v, float):
        return float(f"{v:.9g}")  # f32 storage: print what was stored, not binary noise
    return v


def inspect(gguf, path: str, quant: str) -> dict:
    """The report of one file. Parsed by gguf_meta (GGUFReader needs ~10 s per file to build
    its objects for 300k vocabulary strings); `--cross-check` compares with GGUFReader."""
    try:
        h = read_header(path)
    except GgufError as e:
        raise BuildError(str(e))
    arch = h.architecture
    meta = {}
    for key, v in h.kv.items():
        if key in GENERAL_KEYS or (arch and key.startswith(arch + ".")):
            meta[key] = meta_value(gguf, v)
    if "general.file_type" in meta:
        meta["general.file_type.name"] = h.quant
    types: dict[str, dict] = {}
    tensors = {}
    for t in h.tensors:
        name, block, nbytes = TENSOR_TYPES[t.type_id]
        entry = types.setdefault(name, {"tensors": 0, "blocks": 0, "bytes": 0, "block_size": block})
        entry["tensors"] += 1
        entry["blocks"] += t.n_elements // block
        entry["bytes"] += t.n_elements // block * nbytes
        tensors[t.name] = {"type": name, "shape": list(t.dims)}
    return {
        "file": os.path.basename(path),
        "path": os.path.abspath(path),
        "quant": quant,
        "sha256": sha256_file(path),
        "size": h.file_size,
        "tensor_types": dict(sorted(types.items())),
        "metadata": meta,
        "tensors": tensors,
    }


def cross_check(gguf, rep: dict) -> list[str]:
    """Differences between the report and the tree's GGUFReader on the same file."""
    r = gguf.GGUFReader(rep["path"])
    problems = []
    theirs = {t.name: {"type": t.tensor_type.name, "shape": [int(d) for d in t.shape]} for t in r.tensors}
    if theirs != rep["tensors"]:
        diff = sorted(k for k in set(theirs) | set(rep["tensors"]) if theirs.get(k) != rep["tensors"].get(k))
        problems.append(f"{rep['path']}: GGUFReader sees other tensors: {diff[:5]}")
    for t in r.tensors:
        if int(t.n_bytes) != int(t.n_elements) // gguf.GGML_QUANT_SIZES[t.tensor_type][0] * gguf.GGML_QUANT_SIZES[t.tensor_type][1]:
            problems.append(f"{rep['path']}: tensor {t.name} has {t.n_bytes} bytes in GGUFReader")
    for key, want in rep["metadata"].items():
        if key == "general.file_type.name":
            continue
        f = r.fields.get(key)
        if f is None:
            problems.append(f"{rep['path']}: GGUFReader has no key {key}")
            continue
        if isinstance(want, dict) and "length" in want:
            got = {"array_of": f.types[-1].name, "length": len(f.data)}
        else:
            got = f.contents()
            got = float(f"{got:.9g}") if isinstance(got, float) else got
        if got != want:
            problems.append(f"{rep['path']}: key {key} is {got!r} in GGUFReader, {want!r} here")
    return problems


def check_blocks(rep: dict) -> list[str]:
    """Failures: the file's own type has no blocks. Also lists 2-D tensors that fell back to
    another type because their row length is not a multiple of the type's block size."""
    quant = rep["quant"]
    primary = PRIMARY_TYPE.get(quant)
    problems = []
    if primary and rep["tensor_types"].get(primary, {}).get("blocks", 0) == 0:
        present = {k: v["blocks"] for k, v in rep["tensor_types"].items()}
        problems.append(f"{rep['path']}: a {quant} file holds no {primary} blocks (blocks by type: {present}); "
                        "(llama-quantize falls back to another type, silently, where row lengths are not multiples of the block size)")
    if primary and primary.endswith("_K"):
        rep["fallback_tensors"] = {
            name: t for name, t in rep["tensors"].items()
            if len(t["shape"]) >= 2 and t["shape"][0] % 256 != 0 and not t["type"].endswith("_K")
        }
    return problems


# ---------------------------------------------------------------------------------------
# hyper-parameters: checkpoint vs file


def text_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)
    if "num_experts" not in cfg and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg["num_local_experts"]  # transformers 5.x name for Qwen3-MoE
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]  # transformers 5.x writes it under rope_parameters
    return cfg


def same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-6 * max(abs(float(a)), abs(float(b)), 1e-30)
    return a == b


def compare_hparams(cfg: dict, rep: dict) -> dict:
    meta, tensors = rep["metadata"], rep["tensors"]
    arch = meta.get("general.architecture")
    assumed = ASSUMED.get(arch, {})
    out: dict[str, dict] = {}
    for key, suffix in HPARAM_KEYS.items():
        if key not in cfg or cfg[key] is None:
            continue
        gkey = f"{arch}.{suffix}" if suffix else None
        entry = {"config": cfg[key], "gguf_key": gkey}
        if gkey and gkey in meta:
            entry["gguf"] = meta[gkey]
            entry["status"] = "match" if same(cfg[key], meta[gkey]) else "mismatch"
        else:
            entry["status"] = "not_in_file"
            if key in assumed:
                _, value, why = assumed[key]
                entry["llama_cpp_assumes"] = value
                entry["why"] = why
                entry["agrees"] = same(cfg[key], value)
            elif key == "head_dim":
                derived = cfg["hidden_size"] // cfg["num_attention_heads"]
                entry["llama_cpp_assumes"] = derived
                entry["why"] = "n_embd / n_head when attention.key_length is absent"
                entry["agrees"] = cfg[key] == derived
        out[key] = entry
    # what the tensor directory says
    if "vocab_size" in cfg and "token_embd.weight" in tensors:
        rows = tensors["token_embd.weight"]["shape"][1]
        out["vocab_size"] = {"config": cfg["vocab_size"], "gguf_key": "token_embd.weight rows", "gguf": rows,
                             "status": "match" if rows == cfg["vocab_size"] else "mismatch"}
    if "tie_word_embeddings" in cfg:
        tied_in_file = "output.weight" not in tensors
        out["tie_word_embeddings"] = {"config": cfg["tie_word_embeddings"], "gguf_key": "absence of output.weight",
                                      "gguf": tied_in_file,
                                      "status": "match" if tied_in_file == bool(cfg["tie_word_embeddings"]) else "mismatch"}
    if "attention_bias" in cfg:
        has_bias = "blk.0.attn_q.bias" in tensors
        out["attention_bias"] = {"config": cfg["attention_bias"], "gguf_key": "presence of blk.0.attn_q.bias",
                                 "gguf": has_bias,
                                 "status": "match" if has_bias == bool(cfg["attention_bias"]) else "mismatch"}
    return out


def hparam_problems(hp: dict) -> list[str]:
    bad = []
    for key, e in hp.items():
        if e["status"] == "mismatch":
            bad.append(f"{key}: config {e['config']!r}, file {e['gguf_key']} = {e['gguf']!r}")
        elif e["status"] == "not_in_file" and e.get("agrees") is False:
            bad.append(f"{key}: config {e['config']!r} did not reach the file and llama.cpp assumes {e['llama_cpp_assumes']!r} ({e['why']})")
    return bad


# ---------------------------------------------------------------------------------------
# build


def checkpoint_fingerprint(model_dir: str) -> dict:
    files = {}
    for name in sorted(os.listdir(model_dir)):
        p = os.path.join(model_dir, name)
        if os.path.isfile(p) and (name.endswith((".json", ".safetensors", ".txt", ".model")) or name == "tokenizer.model"):
            files[name] = sha256_file(p)
    return files


def wanted_types(args) -> list[str]:
    """F16 first (every quant is made from it), then the requested types, each once."""
    asked = [q.strip().upper() for q in f"{args.quants},{args.extra or ''}".split(",") if q.strip()]
    for q in asked:
        if q not in CONVERT_TYPES and q not in QUANTIZE_TYPES:
            raise BuildError(f"unknown type {q!r} (convert: {sorted(CONVERT_TYPES)}; quantize: {sorted(QUANTIZE_TYPES)})")
    if args.check_only:
        return list(dict.fromkeys(asked))
    return list(dict.fromkeys(["F16"] + asked))


def make_files(args, model_dir: str, tree: str, quantize_bin: str, python: str,
               paths: dict[str, str], inputs: dict, previous: dict | None) -> dict[str, float]:
    """Runs convert/quantize for every file that is not the one last recorded; returns
    seconds per file made."""
    up_to_date = previous is not None and previous.get("inputs") == inputs
    threads = args.threads or os.cpu_count() or 1
    timings = {}
    for q, p in paths.items():
        prev = (previous or {}).get("files", {}).get(q, {})
        if up_to_date and os.path.isfile(p) and prev.get("sha256") == sha256_file(p):
            log(f"{os.path.basename(p)} is up to date")
            continue
        t0 = time.perf_counter()
        if q in CONVERT_TYPES:
            convert(tree, python, model_dir, p, CONVERT_TYPES[q])
        else:
            quantize(quantize_bin, paths["F16"], p, q, threads)
        timings[q] = round(time.perf_counter() - t0, 3)
        if q == "F16":
            up_to_date = False  # every quant is made from this file: remake them all
    return timings


def build(args) -> dict:
    model_dir = os.path.abspath(args.model)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise BuildError(f"{model_dir}: no config.json (--model must be an HF checkpoint directory)")
    tree, quantize_bin, python = tool_paths(args)
    name = args.name or os.path.basename(model_dir.rstrip("/"))
    wanted = wanted_types(args)
    if not wanted:
        raise BuildError("no types to check (--quants/--extra are empty)")
    paths = {q: os.path.join(args.out, f"{name}-{q}.gguf") for q in wanted}
    record_path = os.path.join(args.out, f"{name}.gguf.json")
    inputs = {
        "checkpoint": model_dir,
        "checkpoint_files": checkpoint_fingerprint(model_dir),
        "llamacpp_tree": tree,
        "sdist": os.environ.get("PARITYBENCH_LLAMACPP_SDIST", "unknown"),
        "quantize": quantize_bin,
    }
    timings = {}
    if args.check_only:
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise BuildError(f"--check-only: no such file(s): {missing}")
    else:
        os.makedirs(args.out, exist_ok=True)
        previous = None
        if os.path.isfile(record_path) and not args.force:
            with open(record_path) as f:
                previous = json.load(f)
        timings = make_files(args, model_dir, tree, quantize_bin, python, paths, inputs, previous)

    gguf = gguf_module(tree)
    check_type_tables(gguf)
    files, problems = {}, []
    for q in wanted:
        rep = inspect(gguf, paths[q], q)
        problems += check_blocks(rep)
        if args.cross_check:
            problems += cross_check(gguf, rep)
        files[q] = rep
    # every file of one conversion carries the same metadata and tensor names
    hp = compare_hparams(text_config(model_dir), files[wanted[0]])
    hp_bad = hparam_problems(hp)
    report = {
        "name": name,
        "inputs": inputs,
        "types": wanted,
        "files": files,
        "hparams": hp,
        "not_in_file": sorted(k for k, e in hp.items() if e["status"] == "not_in_file"),
        "build_seconds": timings,
        "problems": problems + [f"hyper-parameter {b}" for b in hp_bad],
    }
    if not args.check_only:
        with open(record_path + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(record_path + ".tmp", record_path)
    if problems or (hp_bad and not args.allow_hparam_mismatch):
        raise CheckFailed("; ".join(report["problems"]))
    for b in hp_bad:
        log(f"warning: hyper-parameter {b}")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="build_gguf.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF checkpoint directory (config.json, safetensors, tokenizer)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--name", help="file name stem (default: the checkpoint directory's name)")
    ap.add_argument("--quants", default=",".join(DEFAULT_QUANTS), help="llama-quantize types, comma-separated")
    ap.add_argument("--extra", default="", help="more types: BF16, F32 (converted) or Q4_0, Q4_1, Q5_0, Q5_1, ... (quantized)")
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    ap.add_argument("--check-only", action="store_true", help="build nothing: inspect and check the files OUT/NAME-<TYPE>.gguf of --quants/--extra")
    ap.add_argument("--allow-hparam-mismatch", action="store_true", help="warn instead of failing on hyper-parameters that differ")
    ap.add_argument("--cross-check", action="store_true", help="also read every file with the tree's GGUFReader and compare (slow: ~10 s a file)")
    ap.add_argument("--threads", type=int, default=0, help="llama-quantize threads (default: all cores)")
    ap.add_argument("--llamacpp", help="llama.cpp source tree (default: $PARITYBENCH_LLAMACPP)")
    ap.add_argument("--bin", help="directory with llama-quantize (default: $PARITYBENCH_LLAMACPP_BIN)")
    ap.add_argument("--python", help="python for convert_hf_to_gguf.py (default: $PARITYBENCH_PYTHON, else this one)")
    args = ap.parse_args(argv)
    try:
        report = build(args)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f"check failed: {e}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
