"""HF transformers loads every small seeded model and its tokenizer, exactly as generated.

Reads the models from `$PARITYBENCH_CACHE/fixtures/models` (made by `runner fixtures gen`).
Skips with a message when they are not there; fails instead when `CI` is set.

    $PARITYBENCH_PYTHON -m pytest runners/hf/test_models.py
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL_MODELS = ("qwen3-dense", "qwen3-moe", "qwen3-moe-mixed", "qwen2")
ARCH = {
    "qwen3-dense": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3-moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "qwen3-moe-mixed": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}


def models_dir() -> Path:
    cache = os.environ.get("PARITYBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "paritybench")
    return Path(cache) / "fixtures" / "models"


def model_dir(name: str) -> Path:
    d = models_dir() / name
    if not (d / "config.json").is_file():
        msg = f"{d} is missing: generate the models with `runner fixtures gen`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return d


def suite() -> list[dict]:
    path = REPO / "fixtures" / "suites" / "default.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_model_loads_with_every_tensor(name):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    d = model_dir(name)
    model, info = AutoModelForCausalLM.from_pretrained(str(d), output_loading_info=True, dtype=torch.float32)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(kind), f"{name}: {kind}: {sorted(info[kind])[:10]}"
    cls, model_type = ARCH[name]
    assert type(model).__name__ == cls
    assert model.config.model_type == model_type
    assert model.config.vocab_size == 151936 and model.config.hidden_size == 256
    assert model.config.rope_parameters["rope_theta"] == 1e6

    # The loaded weights are the file's weights (transformers 5 fuses per-expert tensors).
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        sd = model.state_dict()
        emb = f.get_tensor("model.embed_tokens.weight")
        assert torch.equal(sd["model.embed_tokens.weight"], emb)
        if model.config.tie_word_embeddings:
            assert "lm_head.weight" not in f.keys()
            assert torch.equal(model.lm_head.weight, emb)
        else:
            assert torch.equal(sd["lm_head.weight"], f.get_tensor("lm_head.weight"))
        if model_type == "qwen3_moe":
            sparse = [i for i in range(4) if i not in model.config.mlp_only_layers]
            for i in sparse:
                experts = model.model.layers[i].mlp.experts
                for e in (0, 7):
                    p = f"model.layers.{i}.mlp.experts.{e}"
                    gate_up = torch.cat([f.get_tensor(f"{p}.gate_proj.weight"), f.get_tensor(f"{p}.up_proj.weight")])
                    assert torch.equal(experts.gate_up_proj[e], gate_up), f"{p} gate/up"
                    assert torch.equal(experts.down_proj[e], f.get_tensor(f"{p}.down_proj.weight")), f"{p} down"
                assert torch.equal(model.model.layers[i].mlp.gate.weight, f.get_tensor(f"model.layers.{i}.mlp.gate.weight"))
            for i in model.config.mlp_only_layers:
                assert torch.equal(model.model.layers[i].mlp.gate_proj.weight,
                                   f.get_tensor(f"model.layers.{i}.mlp.gate_proj.weight"))
        if model_type == "qwen2":
            assert torch.equal(model.model.layers[0].self_attn.k_proj.bias,
                               f.get_tensor("model.layers.0.self_attn.k_proj.bias"))
            assert model.model.layers[0].self_attn.o_proj.bias is None

    ids = torch.tensor([suite()[0]["token_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 151936)
    assert torch.isfinite(logits).all()


def test_mixed_model_has_dense_and_sparse_layers():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir("qwen3-moe-mixed")))
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock", "Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock"]
    assert model.config.norm_topk_prob is False
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (768, 256)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_tokenizer_loads_and_reproduces_the_suite(name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir(name)))
    assert len(tok) == 151669
    for p in suite():
        assert tok(p["text"], add_special_tokens=False)["input_ids"] == p["token_ids"], p["id"]


# An independent port of src/fixtures/prng.rs and the fills in src/fixtures/gen.rs: the
# generator's bytes follow from its written definition, not from one implementation's quirks
# (Python integers and numpy float32 arithmetic instead of Rust's).
_M64 = (1 << 64) - 1


def _stream(model_seed: int, name: str):
    import hashlib
    import struct

    digest = hashlib.sha256(b"paritybench/fixtures/prng/v1\0" + struct.pack("<Q", model_seed) + name.encode()).digest()
    sm = struct.unpack("<Q", digest[:8])[0]
    state = []
    for _ in range(4):
        sm = (sm + 0x9E3779B97F4A7C15) & _M64
        z = sm
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        state.append(z ^ (z >> 31))

    def rotl(x, k):
        return ((x << k) | (x >> (64 - k))) & _M64

    while True:
        s = state
        out = (rotl((s[1] * 5) & _M64, 7) * 9) & _M64
        t = (s[1] << 17) & _M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        yield out


def _normal(u: int):
    import numpy as np

    scale = np.frombuffer(bytes.fromhex("37ddb3d7")[::-1], dtype=np.float32)[0]
    total = (u & 0xFFFF) + ((u >> 16) & 0xFFFF) + ((u >> 32) & 0xFFFF) + (u >> 48)
    return np.float32(total - 131070) * scale


def _port_values(model_seed: int, name: str, shape: list[int], init: dict, count: int):
    """The first `count` values of a tensor, as the Rust generator defines them."""
    import numpy as np

    f32 = np.float32
    rng = _stream(model_seed, name)
    numel = math.prod(shape)
    if init["kind"] == "normal":
        return np.array([_normal(next(rng)) * f32(init["std"]) for _ in range(count)], dtype=np.float32)
    if init["kind"] == "gain":
        g = init["gain"]
        v = np.array([_normal(next(rng)) * f32(g["jitter"]) + f32(g["mean"]) for _ in range(numel)], dtype=np.float32)
        chosen = []
        while len(chosen) < min(g["outliers"], numel):
            i = (next(rng) * numel) >> 64
            if i not in chosen:
                chosen.append(i)
                v[i] = v[i] * f32(g["outlier_gain"])
        return v[:count]
    rows, cols = shape[0], numel // shape[0]
    lo, hi = init["row_scale"]
    out = []
    for r in range(rows):
        t = r / (rows - 1) if rows > 1 else 0.0
        row_std = f32(init["std"] * (lo + (hi - lo) * t))
        out.extend(_normal(next(rng)) * row_std for _ in range(cols))
        if len(out) >= count:
            break
    return np.array(out[:count], dtype=np.float32)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_weights_match_an_independent_port_of_the_generator(name):
    import numpy as np
    from safetensors.numpy import load_file

    d = model_dir(name)
    lock = json.loads((REPO / "fixtures" / "models.lock.json").read_text(encoding="utf-8"))["models"][name]
    spec, init = lock["spec"], lock["spec"]["init"]
    seed = spec["seed"]
    tensors = load_file(str(d / "model.safetensors"))
    checks = [
        ("model.embed_tokens.weight", {"kind": "normal", "std": init["embed_std"]}, 2048),
        ("model.layers.0.input_layernorm.weight", {"kind": "gain", "gain": init["input_layernorm"]}, None),
        ("model.layers.3.post_attention_layernorm.weight", {"kind": "gain", "gain": init["post_attention_layernorm"]}, None),
        ("model.norm.weight", {"kind": "gain", "gain": init["final_norm"]}, None),
        ("model.layers.2.self_attn.o_proj.weight", {"kind": "normal", "std": init["o_std"]}, 1024),
    ]
    if spec["arch"] == "qwen3_moe":
        sparse = [i for i in range(4) if i not in spec["moe"]["mlp_only_layers"]]
        checks.append((f"model.layers.{sparse[0]}.mlp.gate.weight",
                       {"kind": "rows", "std": init["router_std"], "row_scale": init["router_row_scale"]}, None))
        checks.append((f"model.layers.{sparse[-1]}.mlp.experts.5.down_proj.weight",
                       {"kind": "normal", "std": init["expert_down_std"]}, 512))
    if spec["arch"] in ("qwen3", "qwen3_moe"):
        checks.append(("model.layers.1.self_attn.k_norm.weight", {"kind": "gain", "gain": init["qk_norm"]}, None))
    if spec["arch"] == "qwen2":
        checks.append(("model.layers.1.self_attn.k_proj.bias", {"kind": "normal", "std": init["qkv_bias_std"]}, None))
    for tname, tinit, count in checks:
        stored = tensors[tname].reshape(-1)
        n = stored.size if count is None else count
        want = _port_values(seed, tname, list(tensors[tname].shape), tinit, n)
        assert want.tobytes() == stored[:n].tobytes(), f"{name}: {tname} differs from the port of the generator"
