"""Tests of the HF transformers reference adapter, run as the real program on real models.

Small random checkpoints are built with transformers itself (Qwen3, a Qwen3-MoE that mixes
dense and sparse layers with norm_topk_prob false, and a sharded Qwen2 with QKV bias); the
adapter runs as a subprocess, and its dumps are checked against each other and against
transformers called directly in this process.

    $PARITYBENCH_PYTHON -m pytest runners/hf/test_adapter.py -q

PARITYBENCH_TEST_DEVICE=cuda runs the adapter, and transformers called in this process as
the yardstick, on the GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
ADAPTER = os.path.join(HERE, "adapter.py")
sys.path.insert(0, os.path.join(HERE, "..", "common"))
import pbproto  # noqa: E402

ALL_POINTS = list(pbproto.CAPTURE_POINTS)
VOCAB = 320
N_LAYERS = 4
HIDDEN = 64
# Words of the toy tokenizer: "w0" .. "w{VOCAB-1}", split on whitespace.
PROMPTS = [
    {"id": "long", "token_ids": [3, 17, 250, 9, 41, 41, 120, 7, 300, 66, 5, 211], "text": "w3 w17 w250 w9 w41 w41 w120 w7 w300 w66 w5 w211"},
    {"id": "short", "token_ids": [11, 2, 150, 99, 13], "positions": [1, 3, 4], "text": "w11 w2 w150 w99 w12"},
]
DECODE = 5
DEVICE = os.environ.get("PARITYBENCH_TEST_DEVICE", "cpu")

torch.set_num_threads(1)
# the yardstick computes as the adapter does: full fp32 matrix products, no TF32
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_float32_matmul_precision("highest")


# ---------------------------------------------------------------------------------------------
# Fixtures: models, tokenizer, runs
# ---------------------------------------------------------------------------------------------


def _tokenizer_json(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(path)


def _common(**kw) -> dict:
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=N_LAYERS,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, tie_word_embeddings=False,
                initializer_range=0.2, dtype="float32")
    base.update(kw)
    return base


def _build(kind: str, out: str) -> str:
    from transformers import (Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    torch.manual_seed(0)
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**_common(head_dim=16)))
        model.save_pretrained(out)
    elif kind == "qwen3_moe":
        # layers 1 and 3 sparse, 0 and 2 dense; no renormalisation of the top-k weights
        cfg = Qwen3MoeConfig(**_common(head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                       decoder_sparse_step=1, mlp_only_layers=[0, 2], norm_topk_prob=False))
        model = Qwen3MoeForCausalLM(cfg)
        model.save_pretrained(out)
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_common()))
        model.save_pretrained(out, max_shard_size="200KB")  # sharded: exercises the index path
    else:
        raise ValueError(kind)
    _tokenizer_json(os.path.join(out, "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {k: _build(k, str(root / k)) for k in ("qwen3", "qwen3_moe", "qwen2")}


def write_request(path, model_dir, **over) -> str:
    req = {
        "schema": 1,
        "model": {"path": model_dir},
        "prompts": PROMPTS,
        "captures": {"points": ALL_POINTS, "layers": "all"},
        "decode_steps": DECODE,
        "mode": "prefill",
        "device": DEVICE,
        "dtype": "auto",
        "warmup": 0,
        "repeats": 1,
        "options": {"threads": 1},
    }
    req.update(over)
    with open(path, "w") as f:
        json.dump(req, f)
    return str(path)


def run_adapter(req_path, out_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, ADAPTER, "run", "--request", str(req_path), "--out", str(out_dir)],
                          capture_output=True, text=True, timeout=300)


class Dump:
    def __init__(self, d):
        self.dir = str(d)
        with open(os.path.join(self.dir, "manifest.json")) as f:
            self.manifest = json.load(f)

    def shard(self, i: int) -> dict:
        return load_file(os.path.join(self.dir, f"p{i}.safetensors"))


_RUNS: dict = {}


@pytest.fixture(scope="module")
def run(models, tmp_path_factory):
    """run(model, **request overrides) -> Dump; each distinct request runs once per module."""

    def go(kind: str, **over) -> Dump:
        key = (kind, json.dumps(over, sort_keys=True))
        if key not in _RUNS:
            d = tmp_path_factory.mktemp(f"dump-{kind}")
            req = write_request(d / "req.json", models[kind], **over)
            r = run_adapter(req, d / "out")
            assert r.returncode == 0, f"adapter failed ({r.returncode}): {r.stderr}"
            _RUNS[key] = Dump(d / "out")
        return _RUNS[key]

    return go


def hf_forward(model_dir: str, ids: list[int], attention="sdpa"):
    """transformers called directly, on the adapter's device (so that the comparison sees the
    same kernels, not CPU-vs-GPU rounding): (logits [T, V], hidden_states list of [T, H])."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention)
    model.to(DEVICE).eval()
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=DEVICE), output_hidden_states=True)
    return out.logits[0].cpu().numpy(), [h[0].cpu().numpy() for h in out.hidden_states]


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---------------------------------------------------------------------------------------------
# describe
# ---------------------------------------------------------------------------------------------


def test_describe_lists_capabilities():
    r = subprocess.run([sys.executable, ADAPTER, "describe"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    import transformers

    assert d["name"] == "hf-transformers" and d["version"] == transformers.__version__
    assert "cpu" in d["backends"]
    assert ("cuda" in d["backends"]) == torch.cuda.is_available()
    assert set(d["dtypes"]) == {"auto", "f32", "f16", "bf16"}
    assert set(d["attention"]) == {"eager", "sdpa"}
    assert d["capabilities"]["captures"] == ALL_POINTS
    assert d["capabilities"]["modes"] == ["prefill", "incremental"]
    assert d["capabilities"]["decode"] is True


# ---------------------------------------------------------------------------------------------
# Manifest and shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "qwen2"])
def test_manifest_is_complete(run, models, kind):
    d = run(kind)
    m = d.manifest
    import transformers

    assert m["schema"] == 1 and m["complete"] is True and "error" not in m
    e = m["engine"]
    assert e["name"] == "hf-transformers" and e["version"] == transformers.__version__
    assert e["backend"] == "torch-sdpa" and e["device_name"]
    if DEVICE == "cpu":
        assert e["device"] == "cpu" and "peak_gpu_bytes" not in m
    else:
        assert e["device"].startswith("cuda:") and e["driver"].startswith("CUDA ") and m["peak_gpu_bytes"] > 0
        assert all(p["peak_gpu_bytes"] > 0 for p in m["prompts"])
    for lib in ("torch", "transformers", "python", "numpy", "safetensors"):
        assert e["versions"][lib], lib
    mod = m["model"]
    assert mod["format"] == "safetensors" and mod["quant"] == "f32" and mod["compute_dtype"] == "f32"
    assert mod["architecture"] == kind and mod["n_layers"] == N_LAYERS and mod["vocab_size"] == VOCAB
    if kind == "qwen2":  # sharded: sha256 of the shards' bytes concatenated in file-name order
        shards = sorted(f for f in os.listdir(models[kind]) if f.endswith(".safetensors"))
        assert len(shards) > 1
        h = hashlib.sha256()
        for s in shards:
            h.update(open(os.path.join(models[kind], s), "rb").read())
        assert mod["sha256"] == h.hexdigest()
    else:
        assert mod["sha256"] == sha256(os.path.join(models[kind], "model.safetensors"))
    assert m["tokenizer"] == {"sha256": sha256(os.path.join(models[kind], "tokenizer.json")), "add_bos": False}
    assert m["mode"] == "prefill"
    assert m["prompt_ids"] == ["long", "short"]
    assert m["load_ms"] > 0 and m["peak_rss_bytes"] > 0
    assert m["captures"]["layers"] == list(range(N_LAYERS))
    if kind == "qwen3_moe":
        assert m["captures"]["points"] == ALL_POINTS and m["captures"]["absent"] == {}
    else:
        assert set(m["captures"]["absent"]) == {"moe_router", "moe_topk_ids"}
        assert m["captures"]["points"] == [p for p in ALL_POINTS if p not in ("moe_router", "moe_topk_ids")]
    for i, rec in enumerate(m["prompts"]):
        p = PROMPTS[i]
        assert rec["index"] == i and rec["id"] == p["id"] and rec["file"] == f"p{i}.safetensors"
        assert rec["n_tokens"] == len(p["token_ids"]) and rec["n_generated"] == DECODE
        assert rec["sha256"] == sha256(os.path.join(d.dir, rec["file"]))
        t = rec["timings"]
        assert len(t["prefill_ms"]) == 1 and len(t["decode_ms"]) == 1 and len(t["ttft_ms"]) == 1
        assert t["prefill_tokens"] == len(p["token_ids"]) and t["decode_tokens"] == DECODE - 1
        assert rec["peak_rss_bytes"] > 0
    # prompt 0's text tokenizes to its ids; prompt 1's text was changed on purpose
    assert [r["tokenizer_match"] for r in m["prompts"]] == [True, False]


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "qwen2"])
def test_shapes_of_logits_and_every_capture(run, kind):
    d = run(kind)
    for i, p in enumerate(PROMPTS):
        s = d.shard(i)
        T = len(p["token_ids"])
        pos = p.get("positions", list(range(T)))
        P = len(pos)
        assert s["token_ids"].dtype == np.int32 and s["token_ids"].tolist() == p["token_ids"]
        assert s["positions"].tolist() == pos
        assert s["logits"].shape == (P, VOCAB) and s["logits"].dtype == np.float32
        assert s["generated"].shape == (DECODE,) and s["generated"].dtype == np.int32
        names = {k for k in s if k.startswith("hidden.")}
        expected = {"hidden.embed.0", "hidden.final_norm.0"}
        for layer in range(N_LAYERS):
            for point in ("attn_norm", "attn_out", "ffn_norm", "ffn_out", "layer_out"):
                expected.add(f"hidden.{point}.{layer}")
        if kind == "qwen3_moe":  # sparse layers only
            expected |= {f"hidden.{pt}.{layer}" for pt in ("moe_router", "moe_topk_ids") for layer in (1, 3)}
        assert names == expected
        for k in names:
            if ".moe_router." in k:
                assert s[k].shape == (P, 8) and s[k].dtype == np.float32
            elif ".moe_topk_ids." in k:
                assert s[k].shape == (P, 2) and s[k].dtype == np.int32
            else:
                assert s[k].shape == (P, HIDDEN) and s[k].dtype == np.float32, k
            assert np.isfinite(s[k]).all(), k


# ---------------------------------------------------------------------------------------------
# What the numbers are
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "qwen2"])
def test_logits_and_hidden_states_match_transformers(run, models, kind):
    """layer_out[i] is output_hidden_states[i+1] for i < L-1, final_norm the last entry
    (taken after the final norm), embed entry 0; logits are transformers' own."""
    d = run(kind)
    for i, p in enumerate(PROMPTS):
        s = d.shard(i)
        pos = s["positions"]
        logits, hs = hf_forward(models[kind], p["token_ids"])
        assert rel(s["logits"], logits[pos]) < 1e-5
        assert rel(s["hidden.embed.0"], hs[0][pos]) == 0.0
        for layer in range(N_LAYERS - 1):
            assert rel(s[f"hidden.layer_out.{layer}"], hs[layer + 1][pos]) < 1e-6, layer
        assert rel(s["hidden.final_norm.0"], hs[N_LAYERS][pos]) < 1e-6
        # the last layer's raw output is not the final-norm output
        assert rel(s[f"hidden.layer_out.{N_LAYERS - 1}"], hs[N_LAYERS][pos]) > 1e-2


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "qwen2"])
def test_residual_stream_adds_up(run, kind):
    """layer_out = input + attn_out + ffn_out: attn_out and ffn_out are taken before the adds."""
    s = run(kind).shard(0)
    prev = s["hidden.embed.0"]
    for layer in range(N_LAYERS):
        out = s[f"hidden.layer_out.{layer}"]
        assert rel(prev + s[f"hidden.attn_out.{layer}"] + s[f"hidden.ffn_out.{layer}"], out) < 1e-5
        prev = out


def _weights(model_dir: str) -> dict:
    w = {}
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".safetensors"):
            w.update({k: v.astype(np.float64) for k, v in load_file(os.path.join(model_dir, f)).items()})
    return w


def _rms(x, weight, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def _swiglu(x, gate, up, down):
    g = x @ gate.T
    return ((g / (1 + np.exp(-g))) * (x @ up.T)) @ down.T


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "qwen2"])
def test_captures_follow_the_checkpoint_weights(run, models, kind):
    """Each norm/MLP capture recomputed in f64 numpy from the checkpoint's tensors and the
    captures before it: pins which module output each point is (attn_out then follows from
    the residual sum)."""
    w = _weights(models[kind])
    for i in range(len(PROMPTS)):
        s = run(kind).shard(i)
        x = s["hidden.embed.0"].astype(np.float64)
        for layer in range(N_LAYERS):
            pre = f"model.layers.{layer}."
            assert rel(s[f"hidden.attn_norm.{layer}"], _rms(x, w[pre + "input_layernorm.weight"])) < 1e-5
            h = x + s[f"hidden.attn_out.{layer}"]
            ffn_norm = _rms(h, w[pre + "post_attention_layernorm.weight"])
            assert rel(s[f"hidden.ffn_norm.{layer}"], ffn_norm) < 1e-5
            xn = s[f"hidden.ffn_norm.{layer}"].astype(np.float64)
            if pre + "mlp.gate.weight" in w:  # sparse: softmax, top-2, no renormalisation
                router = xn @ w[pre + "mlp.gate.weight"].T
                assert rel(s[f"hidden.moe_router.{layer}"], router) < 1e-5
                probs = np.exp(router - router.max(-1, keepdims=True))
                probs /= probs.sum(-1, keepdims=True)
                ffn = np.zeros_like(xn)
                for row, experts in enumerate(s[f"hidden.moe_topk_ids.{layer}"]):
                    for e in experts:
                        ep = f"{pre}mlp.experts.{e}."
                        ffn[row] += probs[row, e] * _swiglu(xn[row], w[ep + "gate_proj.weight"],
                                                            w[ep + "up_proj.weight"], w[ep + "down_proj.weight"])
            else:
                ffn = _swiglu(xn, w[pre + "mlp.gate_proj.weight"], w[pre + "mlp.up_proj.weight"],
                              w[pre + "mlp.down_proj.weight"])
            assert rel(s[f"hidden.ffn_out.{layer}"], ffn) < 1e-5, (kind, layer)
            x = s[f"hidden.layer_out.{layer}"].astype(np.float64)
        assert rel(s["hidden.final_norm.0"], _rms(x, w["model.norm.weight"])) < 1e-5
        assert rel(s["logits"], s["hidden.final_norm.0"].astype(np.float64) @ w["lm_head.weight"].T) < 1e-5


def test_router_topk_is_topk_of_softmax(run):
    s = run("qwen3_moe").shard(0)
    for layer in (1, 3):
        logits = torch.from_numpy(s[f"hidden.moe_router.{layer}"])
        ids = torch.topk(torch.softmax(logits, dim=-1), 2, dim=-1).indices
        assert s[f"hidden.moe_topk_ids.{layer}"].tolist() == ids.tolist()
        # a router picks more than one expert across the prompt (the capture is not constant)
        assert len(set(s[f"hidden.moe_topk_ids.{layer}"].flatten().tolist())) > 2


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "qwen2"])
def test_prefill_and_incremental_agree(run, kind):
    a, b = run(kind), run(kind, mode="incremental")
    assert b.manifest["mode"] == "incremental" and b.manifest["complete"]
    for i in range(len(PROMPTS)):
        sa, sb = a.shard(i), b.shard(i)
        assert set(sa) == set(sb)
        assert rel(sb["logits"], sa["logits"]) < 1e-5
        for k in sa:
            if ".moe_topk_ids." in k or k in ("token_ids", "positions", "generated"):
                assert sa[k].tolist() == sb[k].tolist(), k
            elif k.startswith("hidden."):
                assert rel(sb[k], sa[k]) < 1e-5, k
        # greedy decode takes the same path through the cache either way
        assert sa["generated"].tolist() == sb["generated"].tolist()


def test_greedy_decode_is_argmax_continuation(run, models):
    """The generated ids continue the prompt greedily: checked by transformers' own forward."""
    s = run("qwen3").shard(0)
    ids = PROMPTS[0]["token_ids"] + s["generated"].tolist()
    logits, _ = hf_forward(models["qwen3"], ids)
    T = len(PROMPTS[0]["token_ids"])
    want = [int(np.argmax(logits[t])) for t in range(T - 1, T - 1 + DECODE)]
    assert s["generated"].tolist() == want


def test_eager_and_sdpa_agree(run):
    a = run("qwen3_moe")
    b = run("qwen3_moe", options={"threads": 1, "attention": "eager"}, captures={"points": ALL_POINTS, "layers": [1, 3]})
    assert b.manifest["engine"]["backend"] == "torch-eager" and b.manifest["captures"]["layers"] == [1, 3]
    for i in range(len(PROMPTS)):
        sa, sb = a.shard(i), b.shard(i)
        assert rel(sb["logits"], sa["logits"]) < 1e-5
        assert sa["generated"].tolist() == sb["generated"].tolist()
        hidden = {k for k in sb if k.startswith("hidden.")}
        # only the asked layers, plus the layer-0 globals
        assert {k.rsplit(".", 1)[1] for k in hidden} == {"0", "1", "3"}
        assert {k for k in hidden if k.endswith(".0")} == {"hidden.embed.0", "hidden.final_norm.0"}
        for k in hidden:
            if ".moe_topk_ids." in k:
                assert sa[k].tolist() == sb[k].tolist()
            else:
                assert rel(sb[k], sa[k]) < 1e-5, k


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_half_precision_runs_are_finite_and_close(run, dtype):
    f32 = run("qwen3_moe")
    d = run("qwen3_moe", dtype=dtype, warmup=1, repeats=2)
    m = d.manifest
    assert m["model"]["compute_dtype"] == dtype and m["model"]["quant"] == "f32"
    assert len(m["prompts"][0]["timings"]["prefill_ms"]) == 2 and len(m["prompts"][0]["timings"]["decode_ms"]) == 2
    s, ref = d.shard(0), f32.shard(0)
    for k, v in s.items():
        if k.startswith("hidden.") or k == "logits":
            assert v.dtype == (np.int32 if ".moe_topk_ids." in k else np.float32), k
            assert np.isfinite(v).all(), k
    # upcast to f32 but computed in half precision: close to, and not identical with, f32
    err = rel(s["logits"], ref["logits"])
    assert 0 < err < 0.05, err


# ---------------------------------------------------------------------------------------------
# Bad input and failures
# ---------------------------------------------------------------------------------------------


def _bad(tmp_path, models, expect: list[str], raw: str | None = None, **over):
    req = tmp_path / "req.json"
    if raw is not None:
        req.write_text(raw)
    else:
        write_request(req, models["qwen3"], **over)
    r = run_adapter(req, tmp_path / "out")
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for e in expect:
        assert e in lines[0], (e, lines[0])
    return r


def test_missing_model_dir(tmp_path, models):
    _bad(tmp_path, models, ["model.path", "/nonexistent/model", "no such directory"],
         model={"path": "/nonexistent/model"})


def test_missing_weights_file(tmp_path, models):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(open(os.path.join(models["qwen3"], "config.json")).read())
    _bad(tmp_path, models, [str(d / "model.safetensors"), "missing"], model={"path": str(d)})


def test_missing_config(tmp_path, models):
    d = tmp_path / "m"
    d.mkdir()
    _bad(tmp_path, models, [str(d / "config.json"), "missing"], model={"path": str(d)})


def test_malformed_request(tmp_path, models):
    _bad(tmp_path, models, ["req.json", "malformed JSON"], raw='{"schema": 1, "model": ')
    _bad(tmp_path, models, ["req.json", "mode", "prefil"], mode="prefil")
    _bad(tmp_path, models, ["req.json", "repeats"], repeats=0)
    _bad(tmp_path, models, ["req.json", "prompts[0].token_ids"], prompts=[{"id": "a", "token_ids": [1, True]}])


def test_unknown_capture_point(tmp_path, models):
    _bad(tmp_path, models, ["captures.points", "attn_outt"], captures={"points": ["attn_outt"]})


def test_unknown_option(tmp_path, models):
    _bad(tmp_path, models, ["options.attention", "flash"], options={"attention": "flash"})
    _bad(tmp_path, models, ["options.nope"], options={"nope": 1})


def test_wrong_model_sha256(tmp_path, models):
    _bad(tmp_path, models, ["model.sha256", "0" * 64], model={"path": models["qwen3"], "sha256": "0" * 64})


def test_crash_midway_keeps_finished_prompts(tmp_path, models):
    """Prompt 1 holds an id outside the vocabulary: prompt 0 is written and usable, the run
    stops with exit 2 naming prompt, position and id, and the manifest says so."""
    prompts = [PROMPTS[0], {"id": "bad", "token_ids": [1, 2, VOCAB + 7, 3]}]
    r = _bad(tmp_path, models, ["prompts[1]", "'bad'", "position 2", str(VOCAB + 7), str(VOCAB)], prompts=prompts)
    d = Dump(tmp_path / "out")
    m = d.manifest
    assert m["complete"] is False and str(VOCAB + 7) in m["error"]
    assert m["prompt_ids"] == ["long", "bad"] and [p["id"] for p in m["prompts"]] == ["long"]
    s = d.shard(0)
    assert s["logits"].shape == (len(PROMPTS[0]["token_ids"]), VOCAB) and np.isfinite(s["logits"]).all()
    assert m["prompts"][0]["sha256"] == sha256(tmp_path / "out" / "p0.safetensors")
    assert not os.path.exists(tmp_path / "out" / "p1.safetensors")
    assert r.stderr.startswith("error: ")


def test_refuses_to_overwrite_a_dump(tmp_path, models, run):
    d = run("qwen3")
    req = write_request(tmp_path / "req.json", models["qwen3"])
    before = open(os.path.join(d.dir, "manifest.json")).read()
    r = run_adapter(req, d.dir)
    assert r.returncode == 2 and "already holds a dump" in r.stderr
    assert open(os.path.join(d.dir, "manifest.json")).read() == before
