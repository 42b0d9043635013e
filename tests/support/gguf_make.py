#!/usr/bin/env python3
"""Test data for the GGUF loader (tests/gguf.rs), made with the real tools.

Run with $PARITYBENCH_PYTHON after `source /tmp/setup.env` (runners/setup.sh). Writes into
$PARITYBENCH_CACHE/test-gguf/ (default ~/.cache/paritybench/test-gguf/):

  qwen3-dense/hf/                  a small HF Qwen3 (fixed torch seed), f32 safetensors, with
                                   the real tokenizer.json + tokenizer_config.json
  qwen3-dense/qwen3-dense-F32.gguf convert_hf_to_gguf.py --outtype f32 (also F16, BF16)
  qwen3-dense/qwen3-dense-Q4_K_M.gguf  llama-quantize from the F32 file (also Q8_0, Q4_0,
                                   Q4_1, Q5_0, Q5_1, Q5_K_M, Q6_K)
  qwen3-dense/<file>.ref.safetensors   gguf-py's reference dequantization
                                   (gguf.quants.dequantize) of the file's tensors: every
                                   tensor whole, except token_embd/output, of which rows
                                   0..96 and the last 32 rows are stored as `NAME#rows=A-B`;
                                   `__metadata__` maps each name to its ggml type name
  qwen3-dense/<file>.meta.json     gguf-py's reading of the metadata and tensor table
  qwen3-moe/...                    the same for a small Qwen3-MoE (4 experts, top-2)
  all-types.gguf (+ .ref.safetensors, .meta.json)
                                   written by gguf-py's GGUFWriter: metadata of every value
                                   type (nested arrays, arrays of strings), and for each
                                   supported ggml type a tensor of random block bytes
                                   (arbitrary scales: NaN, inf, subnormal f16 included)
  tokenizer_cases.json             strings and the ids transformers' tokenizer gives them
  .stamp                           inputs' hash; a rerun with the same inputs does nothing

Exits non-zero naming what failed (e.g. a K-quant file that holds no K blocks).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SEED = 20260101
QUANTS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M", "Q6_K"]
OUTTYPES = ["f32", "f16", "bf16"]
# The ggml type a quantization preset must put into the file, at least once.
MUST_CONTAIN = {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
                "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
                "F32": "F32", "F16": "F16", "BF16": "BF16"}
BIG = ("token_embd.weight", "output.weight")
HEAD_ROWS, TAIL_ROWS = 96, 32

TOKENIZER_CASES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing   ",
    "line one\nline two\r\n\tindented\n\n\nend",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // C++",
    "fn main() { println!(\"{:?}\", vec![1, 2, 3]); }",
    "我想在apple工作1314151天～",
    "日本語のテキストと漢字、カタカナ。한국어 문장도 있습니다.",
    "Привет, как дела? Ελληνικά κείμενα. עברית. العربية",
    "Emoji: 🚀 😶‍🌫️ 🦙🦙 👍🏽 ✅ 🇫🇷",
    "Numbers: 3 33 333 3333 33333 3.14159 1e-6 0x1F 1,000,000 -42",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nLet me think.\n</think>\n\nThe answer is 42.<|endoftext|>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "Combining: e\u0301 vs \u00e9, A\u030a vs \u00c5",
    "\u200bzero\u200bwidth\u00a0nbsp\ufeffbom",
    "------======= ''''''```````\"\"\"\"......!!!!!!??????",
    "ក្នុងការ ហើយ ពិសេស 😁",
    "",
    " ",
    "a",
]


def log(msg: str) -> None:
    print(f"[gguf_make] {msg}", file=sys.stderr, flush=True)


def env_path(name: str) -> Path:
    v = os.environ.get(name)
    if not v:
        sys.exit(f"gguf_make: ${name} is not set (source /tmp/setup.env, written by runners/setup.sh)")
    return Path(v)


def file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(cmd: list[str]) -> None:
    log(" ".join(str(c) for c in cmd))
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-8000:])
        sys.exit(f"gguf_make: command failed with exit code {r.returncode}: {' '.join(map(str, cmd))}")


# ---- models -------------------------------------------------------------------------------

def common_config() -> dict:
    return dict(vocab_size=151936, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)


def make_hf(kind: str, out: Path, tok_dir: Path) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(SEED)
    if kind == "qwen3-dense":
        model = Qwen3ForCausalLM(Qwen3Config(intermediate_size=512, **common_config()))
    else:
        # head_dim is not in Qwen3MoeConfig's signature but real Qwen3-MoE config.json files
        # carry it, and convert_hf_to_gguf.py writes attention.key_length only from it
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=256, num_experts=4,
                                                  num_experts_per_tok=2, norm_topk_prob=True,
                                                  decoder_sparse_step=1, mlp_only_layers=[], **common_config()))
        assert model.config.head_dim == 64, "head_dim did not reach the config"
    # Norm weights are ones at init; perturb them so that a swapped or skipped norm shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(torch.float32).eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, tmp / f)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# ---- reference dequantization -------------------------------------------------------------

def reference(gguf_path: Path) -> dict[str, str]:
    """Write <file>.ref.safetensors and <file>.meta.json; return {ggml type: count}."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    reader = GGUFReader(gguf_path)
    tensors: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    counts: dict[str, int] = {}
    table = []
    for t in reader.tensors:
        qtype = t.tensor_type
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        # gguf-py's shape for t.data is numpy order (dims reversed); rows are the first axis
        shape = [int(x) for x in reversed(t.shape)]
        table.append({"name": t.name, "type": qtype.name, "dims": [int(x) for x in t.shape],
                      "offset": int(t.data_offset), "n_bytes": int(t.n_bytes)})
        data = np.asarray(t.data)

        def deq(d: np.ndarray) -> np.ndarray:
            with np.errstate(all="ignore"):  # random blocks have inf/NaN scales on purpose
                return np.ascontiguousarray(dequantize(d, qtype), dtype=np.float32)

        if t.name in BIG and shape[0] > HEAD_ROWS + TAIL_ROWS:
            rows = shape[0]
            for a, b in ((0, HEAD_ROWS), (rows - TAIL_ROWS, rows)):
                key = f"{t.name}#rows={a}-{b}"
                tensors[key] = deq(data[a:b])
                types[key] = qtype.name
        else:
            tensors[t.name] = deq(data).reshape(shape)
            types[t.name] = qtype.name
    save_file(tensors, str(gguf_path) + ".ref.safetensors", metadata=types)

    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            n = len(field.data)
            item = field.types[1] if len(field.types) > 1 else None
            entry = {"type": "array", "item_type": item.name if item is not None else None}
            if item != GGUFValueType.ARRAY:
                entry["len"] = n
            if n <= 64 and item != GGUFValueType.ARRAY:
                entry["value"] = field.contents()
            elif item == GGUFValueType.STRING:
                entry["first"] = field.contents(0)
                entry["last"] = field.contents(n - 1)
        else:
            entry = {"type": vtype.name, "value": field.contents()}
        meta[name] = entry
    with open(str(gguf_path) + ".meta.json", "w") as f:
        json.dump({"alignment": int(reader.alignment), "data_offset": int(reader.data_offset),
                   "metadata": meta, "tensors": table}, f, indent=1, ensure_ascii=False, default=float)
    return counts


def make_model(kind: str, root: Path, llamacpp: Path, bindir: Path, tok_dir: Path, python: str) -> None:
    d = root / kind
    d.mkdir(parents=True, exist_ok=True)
    hf = d / "hf"
    if not (hf / "config.json").exists():
        log(f"creating HF model {kind}")
        make_hf(kind, hf, tok_dir)
    convert = llamacpp / "convert_hf_to_gguf.py"
    for outtype in OUTTYPES:
        dst = d / f"{kind}-{outtype.upper()}.gguf"
        if not dst.exists():
            tmp = dst.with_suffix(".tmp")
            run([python, str(convert), str(hf), "--outtype", outtype, "--outfile", str(tmp)])
            tmp.rename(dst)
    src = d / f"{kind}-F32.gguf"
    for q in QUANTS:
        dst = d / f"{kind}-{q}.gguf"
        if not dst.exists():
            tmp = dst.with_suffix(".tmp")
            run([str(bindir / "llama-quantize"), str(src), str(tmp), q])
            tmp.rename(dst)
    for name in [f"{kind}-{t.upper()}" for t in OUTTYPES] + [f"{kind}-{q}" for q in QUANTS]:
        path = d / f"{name}.gguf"
        counts = reference(path)
        preset = name[len(kind) + 1:]
        must = MUST_CONTAIN[preset]
        if counts.get(must, 0) == 0:
            sys.exit(f"gguf_make: {path} holds no {must} tensor (types: {counts})")
        log(f"{path.name}: {counts}")


# ---- a file with every value type and random blocks of every supported ggml type ----------

def make_all_types(root: Path) -> None:
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as T

    path = root / "all-types.gguf"
    rng = np.random.default_rng(SEED)
    w = gguf.GGUFWriter(str(path) + ".tmp", arch="testarch")
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4000000000)
    w.add_int32("test.i32", -2000000000)
    w.add_float32("test.f32", 0.1)
    w.add_uint64("test.u64", 18000000000000000000)
    w.add_int64("test.i64", -9000000000000000000)
    w.add_float64("test.f64", 0.1)
    w.add_bool("test.bool_true", True)
    w.add_bool("test.bool_false", False)
    w.add_string("test.string", "héllo ✓ 世界")
    # add_string skips empty strings; the format allows them
    w.add_key_value("test.empty_string", "", gguf.GGUFValueType.STRING)
    w.add_array("test.array_i32", [1, -2, 3])
    w.add_array("test.array_f32", [0.5, -1.25])
    w.add_array("test.array_str", ["a", "", "Ġthe", "<|im_start|>"])
    w.add_array("test.array_nested", [[1, 2], [3]])
    w.add_array("test.array_bool", [True, False, True])
    w.add_key_value("test.array_u8", [1, 2, 255], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    w.add_key_value("test.array_u64", [1, 2 ** 63], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT64)
    w.add_key_value("test.array_f64", [1.5, -0.1], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT64)

    rows = 8
    # plain floats: real values, with the awkward ones included
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, -1e-45, 65504.0, 1e-8], dtype=np.float32)
    base = np.concatenate([special, rng.standard_normal(rows * 512 - special.size).astype(np.float32)]).reshape(rows, 512)
    w.add_tensor("plain.f32", base)
    w.add_tensor("plain.f16", base.astype(np.float16))
    w.add_tensor("plain.bf16", gguf.quants.quantize(base, T.BF16), raw_dtype=T.BF16)
    w.add_tensor("plain.vector", rng.standard_normal(64).astype(np.float32))
    w.add_tensor("plain.3d", rng.standard_normal((2, 3, 64)).astype(np.float32))
    # quantized from real values with gguf-py's quantizers (the types that have one); the
    # first block is all zeros (scale 0), the second holds one large value
    finite = rng.standard_normal((rows, 512)).astype(np.float32)
    finite[0, :32] = 0.0
    finite[0, 40] = 1000.0
    for t in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        w.add_tensor(f"quant.{t.name}", gguf.quants.quantize(finite, t), raw_dtype=t)
    # random bytes: every bit pattern of scales and quants, all types
    for t in (T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K):
        block, size = gguf.GGML_QUANT_SIZES[t]
        n_blocks = rows * 512 // block
        raw = rng.integers(0, 256, size=(rows, n_blocks // rows * size), dtype=np.uint8)
        w.add_tensor(f"random.{t.name}", raw, raw_dtype=t)
    # a type the engine does not dequantize, to test the error
    block, size = gguf.GGML_QUANT_SIZES[T.Q3_K]
    w.add_tensor("unsupported.Q3_K", rng.integers(0, 256, size=(2, 2 * size), dtype=np.uint8), raw_dtype=T.Q3_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    Path(str(path) + ".tmp").rename(path)
    reference(path)


def make_tokenizer_cases(root: Path, tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cases = [{"text": s, "ids": tok(s, add_special_tokens=False)["input_ids"]} for s in TOKENIZER_CASES]
    with open(root / "tokenizer_cases.json", "w") as f:
        json.dump({"tokenizer_sha256": file_sha256(tok_dir / "tokenizer.json"), "cases": cases}, f,
                  indent=1, ensure_ascii=False)


def main() -> None:
    cache = Path(os.environ.get("PARITYBENCH_CACHE", Path.home() / ".cache" / "paritybench"))
    llamacpp = env_path("PARITYBENCH_LLAMACPP")
    bindir = env_path("PARITYBENCH_LLAMACPP_BIN")
    tokenizer = env_path("PARITYBENCH_TOKENIZER")
    root = cache / "test-gguf"
    root.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(llamacpp / "gguf-py"))

    inputs = hashlib.sha256()
    inputs.update(Path(__file__).read_bytes())
    inputs.update(os.environ.get("PARITYBENCH_LLAMACPP_SDIST", str(llamacpp)).encode())
    inputs.update(file_sha256(tokenizer).encode())
    stamp_value = inputs.hexdigest()
    stamp = root / ".stamp"

    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text().strip() == stamp_value:
            log(f"{root} is up to date")
            return
        log(f"building test data in {root}")
        for p in root.iterdir():  # inputs changed (or a previous run failed): start clean
            if p.name != ".lock":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        make_all_types(root)
        make_tokenizer_cases(root, tokenizer.parent)
        for kind in ("qwen3-dense", "qwen3-moe"):
            make_model(kind, root, llamacpp, bindir, tokenizer.parent, sys.executable)
        stamp.write_text(stamp_value + "\n")
        log("done")


if __name__ == "__main__":
    main()
