"""Tests of the llama.cpp adapter and the GGUF pipeline, on real tools and real models.

Two small HF checkpoints are generated with transformers (fixed torch seed, the real Qwen3
tokenizer beside them), converted and quantized once per session by build_gguf.py, and
then driven through adapter.py as a subprocess, exactly as the runner drives it. HF
transformers' fp32 logits are computed in-process for the cross-engine check.

Tolerances, and why (2 decoder layers, logits of std ~0.3 over 151,936 entries):
- prefill vs incremental: relative L2 < 2e-3 per position. Both are the same f32 graph
  with F16 weights; llama.cpp's CPU matmuls round activations to f16 (2^-11 ~ 4.9e-4
  relative) along different kernel paths for a batch of T and a batch of 1.
- F16 vs HF fp32: median relative L2 < 3e-3 (f16 weights and f16 activations, as above)
  and top-1 agreement >= 0.9 (a few positions have top-1/top-2 margins below 1e-3).
- Q8_0 vs F16: median relative L2 < 3e-2. Q8_0 stores each block of 32 with a step of
  absmax/127 (~0.5 % rms of a Gaussian weight) and llama.cpp quantizes activations to Q8_0
  for the dot products too; ~7 matrix products in sequence give ~2 %. It must also be
  well below Q4_K_M's error, which is ~10x larger.

Run: source /tmp/setup.env && $PARITYBENCH_PYTHON -m pytest runners/llamacpp -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ADAPTER = os.path.join(HERE, "adapter.py")
BUILD = os.path.join(HERE, "build_gguf.py")
PY = sys.executable
N_VOCAB = 151936
DECODE_STEPS = 8
QUANTS = {"dense": "Q8_0,Q4_K_M,Q5_K_M,Q6_K", "moe": "Q8_0,Q4_K_M"}
TEXT = ("The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four "
        "papers that changed physics: the photoelectric effect, Brownian motion, special relativity, "
        "and mass-energy equivalence.")


def require_env() -> dict:
    missing = [k for k in ("PARITYBENCH_LLAMACPP", "PARITYBENCH_LLAMACPP_BIN", "PARITYBENCH_TOKENIZER")
               if not os.environ.get(k)]
    if missing:
        pytest.fail(f"{missing} not set: run runners/setup.sh and `source` its exports first")
    return os.environ


# ---------------------------------------------------------------------------------------
# fixtures: checkpoints, GGUFs, prompt, dumps


def save_tokenizer(dst: str) -> None:
    src = os.path.dirname(require_env()["PARITYBENCH_TOKENIZER"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def make_checkpoint(path: str, kind: str) -> str:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(vocab_size=N_VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6, max_position_embeddings=4096,
                  tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  bos_token_id=151643, eos_token_id=151645)
    torch.manual_seed(0)
    if kind == "dense":
        model = Qwen3ForCausalLM(Qwen3Config(intermediate_size=512, **common))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            intermediate_size=512, moe_intermediate_size=256, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **common))
    model = model.to(torch.float32).eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    save_tokenizer(path)
    return path


def build(model_dir: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, BUILD, "--model", model_dir, "--out", out, *extra],
                          capture_output=True, text=True)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """{kind: (checkpoint dir, build report)} for `dense` and `moe`."""
    require_env()
    root = tmp_path_factory.mktemp("llamacpp")
    out = {}
    for kind, name in (("dense", "tiny-qwen3"), ("moe", "tiny-qwen3-moe")):
        ckpt = make_checkpoint(str(root / "hf" / name), kind)
        p = build(ckpt, str(root / "gguf" / name), "--quants", QUANTS[kind])
        assert p.returncode == 0, p.stderr[-3000:]
        out[kind] = (ckpt, json.loads(p.stdout))
    return out


@pytest.fixture(scope="session")
def prompt_ids():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(require_env()["PARITYBENCH_TOKENIZER"])
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    assert 30 <= len(ids) <= 64
    return ids


def gguf(models, kind: str, quant: str) -> str:
    return models[kind][1]["files"][quant]["path"]


def write_request(path, model: str, prompts: list[dict], **fields) -> str:
    req = {"schema": 1, "model": {"path": model}, "prompts": prompts, "mode": "prefill", **fields}
    with open(path, "w") as f:
        json.dump(req, f)
    return str(path)


def run_adapter(tmp_path, model: str, ids: list[int], tag: str, text: str | None = None, **fields):
    """Runs adapter.py on one prompt as a subprocess; returns (manifest, tensors of p0)."""
    from safetensors.numpy import load_file

    prompt = {"id": "p", "token_ids": ids, **({"text": text} if text else {})}
    req = write_request(tmp_path / f"{tag}.json", model, [prompt], **fields)
    out = tmp_path / f"dump-{tag}"
    p = subprocess.run([PY, ADAPTER, "run", "--request", req, "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    return manifest, load_file(str(out / manifest["prompts"][0]["file"]))


@pytest.fixture(scope="session")
def dump(models, prompt_ids, tmp_path_factory):
    """dump(kind, quant, mode) -> (manifest, tensors): the standard request (all positions,
    the prompt's text, DECODE_STEPS greedy steps), run once per session per key."""
    root = tmp_path_factory.mktemp("dumps")
    cache = {}

    def get(kind: str, quant: str, mode: str):
        key = (kind, quant, mode)
        if key not in cache:
            cache[key] = run_adapter(root, gguf(models, kind, quant), prompt_ids, "-".join(key), text=TEXT,
                                     mode=mode, decode_steps=DECODE_STEPS)
        return cache[key]

    return get


def run_error(tmp_path, req_path: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, ADAPTER, "run", "--request", req_path, "--out", str(tmp_path / "err-dump")],
                          capture_output=True, text=True)


def rel_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row ||a - b|| / ||b||, in f64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def hf_logits(ckpt: str, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()  # [T, V]


# ---------------------------------------------------------------------------------------
# the GGUF pipeline


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_quantized_files_hold_blocks_of_their_type(models, kind):
    files = models[kind][1]["files"]
    expect = {"Q8_0": "Q8_0", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
    for quant in QUANTS[kind].split(","):
        rep, ktype = files[quant], expect[quant]
        assert rep["metadata"]["general.file_type.name"] == quant
        entry = rep["tensor_types"][ktype]
        assert entry["blocks"] > 0, (quant, rep["tensor_types"])
        # blocks = elements / block size, summed over the tensors of that type
        n = sum(int(np.prod(t["shape"])) for t in rep["tensors"].values() if t["type"] == ktype)
        assert entry["blocks"] * entry["block_size"] == n
        assert entry["bytes"] > 0
        if ktype.endswith("_K"):
            assert rep["fallback_tensors"] == {}
    assert set(files["F16"]["tensor_types"]) == {"F16", "F32"}
    # Q4_K_M is llama.cpp's mixture: Q4_K, with Q6_K for output and half of attn_v/ffn_down
    assert set(files["Q4_K_M"]["tensor_types"]) == {"Q4_K", "Q6_K", "F32"}


def test_moe_hyper_parameters_are_reported(models):
    rep = models["moe"][1]
    meta = rep["files"]["F16"]["metadata"]
    assert meta["general.architecture"] == "qwen3moe"
    assert meta["qwen3moe.expert_count"] == 4
    assert meta["qwen3moe.expert_used_count"] == 2
    assert meta["qwen3moe.expert_feed_forward_length"] == 256
    assert meta["tokenizer.ggml.pre"] == "qwen2" and meta["tokenizer.ggml.tokens"]["length"] == N_VOCAB
    hp = rep["hparams"]
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "num_hidden_layers",
                "hidden_size", "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps",
                "vocab_size", "tie_word_embeddings"):
        assert hp[key]["status"] == "match", (key, hp[key])
    # the converter writes no key for these; llama.cpp's qwen3moe graph assumes what this config says
    assert rep["not_in_file"] == ["decoder_sparse_step", "mlp_only_layers", "norm_topk_prob"]
    assert hp["norm_topk_prob"]["llama_cpp_assumes"] is True and hp["norm_topk_prob"]["agrees"] is True
    assert rep["problems"] == []


def test_a_hyper_parameter_llama_cpp_ignores_fails_the_check(models, tmp_path):
    """norm_topk_prob false does not reach the GGUF and llama.cpp renormalises anyway: the
    file computes another model, so the check fails loudly (exit 1)."""
    ckpt = tmp_path / "moe-no-norm"
    shutil.copytree(models["moe"][0], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["norm_topk_prob"] = False
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(gguf(models, "moe", "F16"), out / "moe-no-norm-F16.gguf")
    p = build(str(ckpt), str(out), "--check-only", "--quants", "F16")
    assert p.returncode == 1, p.stderr[-2000:]
    assert "norm_topk_prob: config False did not reach the file and llama.cpp assumes True" in p.stderr


def test_a_k_quant_file_without_k_blocks_fails_the_check(models, tmp_path):
    """What a silent llama-quantize fallback leaves: a file named Q4_K_M without Q4_K blocks
    (here a real Q8_0 file under that name)."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(gguf(models, "dense", "Q8_0"), out / "tiny-qwen3-Q4_K_M.gguf")
    p = build(models["dense"][0], str(out), "--check-only", "--quants", "Q4_K_M")
    assert p.returncode == 1, p.stderr[-2000:]
    assert "tiny-qwen3-Q4_K_M.gguf: a Q4_K_M file holds no Q4_K blocks" in p.stderr and "Q8_0" in p.stderr


def test_inspection_agrees_with_gguf_py_reader(models):
    """The fast header reader and the tree's GGUFReader see the same tensors and metadata."""
    sys.path.insert(0, HERE)
    import build_gguf

    gg = build_gguf.gguf_module(os.environ["PARITYBENCH_LLAMACPP"])
    build_gguf.check_type_tables(gg)
    rep = models["moe"][1]["files"]["Q4_K_M"]
    assert build_gguf.cross_check(gg, rep) == []


# ---------------------------------------------------------------------------------------
# the library path: full logits


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_prefill_and_incremental_agree(dump, prompt_ids, kind):
    mp, tp = dump(kind, "F16", "prefill")
    mi, ti = dump(kind, "F16", "incremental")
    T = len(prompt_ids)
    assert tp["logits"].shape == (T, N_VOCAB) and tp["logits"].dtype == np.float32
    assert np.isfinite(tp["logits"]).all()
    err = rel_l2(ti["logits"], tp["logits"])
    assert err.max() < 2e-3, err.max()
    assert (tp["logits"].argmax(-1) == ti["logits"].argmax(-1)).mean() >= 0.95
    assert tp["generated"].tolist() == ti["generated"].tolist() and len(tp["generated"]) == DECODE_STEPS
    assert (tp["positions"] == np.arange(T)).all() and tp["token_ids"].tolist() == prompt_ids
    rec = mp["prompts"][0]
    assert len(rec["timings"]["prefill_ms"]) == 1 and rec["timings"]["decode_tokens"] == DECODE_STEPS - 1
    assert rec["timings"]["ttft_ms"][0] >= rec["timings"]["prefill_ms"][0]
    assert rec["tokenizer_match"] is True
    assert mp["mode"] == "prefill" and mi["mode"] == "incremental"


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_f16_matches_hf_fp32(models, dump, prompt_ids, kind):
    _, t = dump(kind, "F16", "prefill")
    ref = hf_logits(models[kind][0], prompt_ids)
    agree = (t["logits"].argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= 0.9, agree
    err = rel_l2(t["logits"], ref)
    assert np.median(err) < 3e-3, err


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_q8_0_is_close_to_f16(dump, kind):
    _, f16 = dump(kind, "F16", "prefill")
    _, q8 = dump(kind, "Q8_0", "prefill")
    _, q4 = dump(kind, "Q4_K_M", "prefill")
    e8, e4 = np.median(rel_l2(q8["logits"], f16["logits"])), np.median(rel_l2(q4["logits"], f16["logits"]))
    assert e8 < 3e-2, e8
    assert e8 < e4 / 4, (e8, e4)  # a pipeline that mixed the files up would not show this
    assert (q8["logits"].argmax(-1) == f16["logits"].argmax(-1)).mean() >= 0.9


def test_manifest_records_provenance_and_absent_captures(models, prompt_ids, tmp_path):
    model = gguf(models, "moe", "Q4_K_M")
    last = len(prompt_ids) - 1
    m, t = run_adapter(tmp_path, model, prompt_ids, "prov", positions=[0, 5, last],
                       captures={"points": ["attn_out", "moe_router"], "layers": "all"}, warmup=1, repeats=2)
    e, mo = m["engine"], m["model"]
    assert e["name"] == "llama.cpp" and e["backend"] == "llama.cpp-cpu" and e["device"] == "cpu"
    assert e["version"] == e["versions"]["llama-cpp-python"] == "0.3.36"
    assert e["versions"]["sdist"].endswith("sha256:832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
    assert "build" in e["versions"]["llama.cpp build"]
    # ggml_commit() reports the short sha, with "-dirty" when the vendored tree differed from it at build time
    assert e["git_sha"] == e["versions"]["llama.cpp commit"]
    assert e["git_sha"].startswith(e["versions"]["ggml commit"].removesuffix("-dirty"))
    assert len(e["git_sha"]) == 40
    assert mo["format"] == "gguf" and mo["quant"] == "Q4_K_M" and mo["architecture"] == "qwen3moe"
    assert mo["n_layers"] == 2 and mo["vocab_size"] == N_VOCAB and mo["compute_dtype"] == "f32"
    assert mo["sha256"] == models["moe"][1]["files"]["Q4_K_M"]["sha256"]
    assert set(mo["assumed"]) == {"norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"}
    assert m["captures"]["points"] == [] and set(m["captures"]["absent"]) == {"attn_out", "moe_router"}
    assert not any(k.startswith("hidden.") for k in t)
    assert t["logits"].shape == (3, N_VOCAB) and t["positions"].tolist() == [0, 5, last]
    rec = m["prompts"][0]
    assert "tokenizer_match" not in rec  # the prompt had no text
    assert len(rec["timings"]["prefill_ms"]) == 2 and rec["peak_rss_bytes"] > 0 and m["load_ms"] > 0


# ---------------------------------------------------------------------------------------
# the server path: top-k only


def test_server_top_k_matches_the_full_logits(models, dump, prompt_ids, tmp_path):
    _, full = dump("dense", "F16", "incremental")
    m, srv = run_adapter(tmp_path, gguf(models, "dense", "F16"), prompt_ids, "srv", text=TEXT,
                         decode_steps=DECODE_STEPS, options={"backend": "server", "top_k": 5})
    T = len(prompt_ids)
    assert "logits" not in srv and srv["top_ids"].shape == (T, 5) and srv["top_probs"].shape == (T, 5)
    assert srv["top_ids"].dtype == np.int32 and srv["top_probs"].dtype == np.float32
    logits = full["logits"].astype(np.float64)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 1e-3  # positions without a near-tie
    assert decided.mean() > 0.8
    assert (srv["top_ids"][:, 0] == logits.argmax(-1))[decided].all()
    # top_probs: the softmax of the same logits (the server scores through the single-token
    # decode path, as the library's incremental mode does)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(srv["top_probs"], np.take_along_axis(p, srv["top_ids"].astype(np.int64), -1), rtol=1e-3)
    assert srv["generated"].tolist() == full["generated"].tolist()
    assert m["extra"]["top_k_only"] is True and m["engine"]["backend"] == "llama-server-cpu"
    rec = m["prompts"][0]
    assert rec["tokenizer_match"] is True and rec["timings"]["decode_tokens"] == DECODE_STEPS - 1
    assert rec["timings"]["prefill_ms"][0] > 0 and rec["peak_rss_bytes"] > 0


# ---------------------------------------------------------------------------------------
# errors: exit 2, one line naming the file


def test_flash_attention_is_llama_cpps_other_path(models, dump, prompt_ids, tmp_path):
    """`options.flash_attn`: the same file through ggml's flash-attention CPU kernel. It is
    recorded, it computes the same function (close to the default path), and not the same
    bits (f16 accumulation of V): the pair is llama.cpp's own spread on the file."""
    m0, t0 = dump("dense", "Q8_0", "prefill")
    m1, t1 = run_adapter(tmp_path, gguf(models, "dense", "Q8_0"), prompt_ids, "fa", text=TEXT, mode="prefill",
                         decode_steps=DECODE_STEPS, options={"flash_attn": True})
    assert m0["extra"]["flash_attn"] is False and m1["extra"]["flash_attn"] is True
    err = rel_l2(t1["logits"], t0["logits"])
    assert 0 < np.median(err) < 3e-2, err
    assert (t1["logits"].argmax(-1) == t0["logits"].argmax(-1)).mean() >= 0.9
    for bad, why in ((1, "true or false"), (True, "library backend")):
        opts = {"flash_attn": bad, **({"backend": "server"} if bad is True else {})}
        req = write_request(tmp_path / "bad-fa.json", gguf(models, "dense", "Q8_0"),
                            [{"id": "a", "token_ids": prompt_ids}], options=opts)
        p = run_error(tmp_path, req)
        assert p.returncode == 2 and "options.flash_attn" in p.stderr and why in p.stderr, p.stderr


def test_missing_model_file(tmp_path, prompt_ids):
    missing = str(tmp_path / "nope.gguf")
    p = run_error(tmp_path, write_request(tmp_path / "r.json", missing, [{"id": "a", "token_ids": prompt_ids}]))
    assert p.returncode == 2 and missing in p.stderr and "not found" in p.stderr, p.stderr


@pytest.mark.parametrize("body, field", [
    ("{not json", "malformed JSON"),
    (json.dumps({"schema": 1, "prompts": [{"id": "a", "token_ids": [1]}], "mode": "prefill"}), "`model`"),
    (json.dumps({"schema": 1, "model": {"path": "x.gguf"}, "mode": "sideways",
                 "prompts": [{"id": "a", "token_ids": [1]}]}), "`mode`"),
    (json.dumps({"schema": 1, "model": {"path": "x.gguf"}, "mode": "prefill", "options": {"bakend": "server"},
                 "prompts": [{"id": "a", "token_ids": [1]}]}), "bakend"),
])
def test_malformed_request(tmp_path, body, field):
    req = tmp_path / "bad.json"
    req.write_text(body)
    p = run_error(tmp_path, str(req))
    assert p.returncode == 2 and str(req) in p.stderr and field in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def broken_ggufs(models, tmp_path) -> list:
    rng = np.random.default_rng(0)
    junk = tmp_path / "random.gguf"
    junk.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    fake_magic = tmp_path / "fake-magic.gguf"
    fake_magic.write_bytes(b"GGUF" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    data = open(gguf(models, "dense", "Q8_0"), "rb").read()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    # a well-formed file that llama.cpp itself refuses: an architecture it does not know
    bad_arch = tmp_path / "bad-arch.gguf"
    i = data.index(b"qwen3", data.index(b"general.architecture"))
    bad_arch.write_bytes(data[:i] + b"qwenX" + data[i + 5:])
    return [(junk, "not a GGUF"), (fake_magic, "version"), (truncated, "truncated"), (bad_arch, "qwenX")]


@pytest.mark.parametrize("backend", ["library", "server"])
def test_broken_gguf(models, tmp_path, prompt_ids, backend):
    for path, why in broken_ggufs(models, tmp_path):
        req = write_request(tmp_path / "r.json", str(path), [{"id": "a", "token_ids": prompt_ids}],
                            options={"backend": backend})
        p = run_error(tmp_path, req)
        assert p.returncode == 2 and str(path) in p.stderr and why in p.stderr, (path, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not (tmp_path / "err-dump" / "manifest.json").exists()


@pytest.mark.parametrize("backend", ["library", "server"])
def test_token_id_beyond_vocab(models, tmp_path, backend):
    model = gguf(models, "dense", "Q8_0")
    req = write_request(tmp_path / "r.json", model, [{"id": "a", "token_ids": [1, 2, N_VOCAB]}],
                        options={"backend": backend})
    p = run_error(tmp_path, req)
    assert p.returncode == 2 and f"id {N_VOCAB} >= n_vocab {N_VOCAB}" in p.stderr and model in p.stderr, p.stderr


def test_describe():
    p = subprocess.run([PY, ADAPTER, "describe"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["name"] == "llama.cpp" and d["version"] == "0.3.36"
    assert d["backends"] == ["llama.cpp-cpu", "llama-server"]
    assert d["capabilities"]["captures"] == [] and d["capabilities"]["modes"] == ["prefill", "incremental"]
