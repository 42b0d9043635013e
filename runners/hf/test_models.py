"""HF transformers loads every small seeded model and its tokenizer, exactly as generated.

Reads the models from `$PARITYBENCH_CACHE/fixtures/models` (made by `runner fixtures gen`).
Skips with a message when they are not there; fails instead when `CI` is set.

    $PARITYBENCH_PYTHON -m pytest runners/hf/test_models.py
"""

from __future__ import annotations

import json
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
