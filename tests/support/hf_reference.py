"""Tiny random Qwen checkpoints and their HF transformers fp32 outputs, for tests/engine_vs_hf.rs.

    $PARITYBENCH_PYTHON tests/support/hf_reference.py OUT_DIR

writes, for each model NAME:
  OUT_DIR/NAME/model/        the checkpoint (config.json, safetensors, maybe tokenizer.json)
  OUT_DIR/NAME/cases.json    prompts (id, token ids, optional text), decode_steps
  OUT_DIR/NAME/ref.safetensors
      {prompt}.logits                  f32 [T, V]  every position
      {prompt}.generated               i32 [N]     HF greedy continuation
      {prompt}.hidden.{point}.{layer}  [T, .]      forward hooks on HF's own modules

Models (fixed seed, every parameter re-drawn so that biases and norm weights are not the
trivial 0 / 1 of a fresh init):
  qwen3-dense      qwen3, tied embeddings, head_dim != hidden/heads, GQA, word-level tokenizer
  qwen3-moe        qwen3_moe, every layer sparse, norm_topk_prob true, sharded safetensors
  qwen3-moe-mixed  qwen3_moe, mlp_only_layers [0, 2] (dense), norm_topk_prob false
  qwen2            qwen2 (q/k/v bias), stored as bf16, config.json with a top-level rope_theta

Development scaffolding for the engine; the shared fixtures and the HF adapter
(runners/hf) replace it later.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file

VOCAB = 512
DECODE_STEPS = 5
PROMPT_LENGTHS = {"short": 7, "mid": 19, "long": 41}


def base_kwargs() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        hidden_act="silu",
    )


def configs():
    from transformers import Qwen2Config, Qwen3Config, Qwen3MoeConfig

    rope = {"rope_theta": 1_000_000.0, "rope_type": "default"}
    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
    return {
        "qwen3-dense": Qwen3Config(**base_kwargs(), head_dim=32, rope_parameters=rope, tie_word_embeddings=True),
        "qwen3-moe": Qwen3MoeConfig(
            **base_kwargs(), head_dim=16, rope_parameters=rope, tie_word_embeddings=False,
            decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, **moe,
        ),
        "qwen3-moe-mixed": Qwen3MoeConfig(
            **base_kwargs(), head_dim=16, rope_parameters=rope, tie_word_embeddings=False,
            decoder_sparse_step=1, mlp_only_layers=[0, 2], norm_topk_prob=False, **moe,
        ),
        "qwen2": Qwen2Config(
            **base_kwargs(), rope_parameters={"rope_theta": 10_000.0, "rope_type": "default"},
            tie_word_embeddings=False, use_sliding_window=False,
        ),
    }


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def word_tokenizer(path: str) -> None:
    """A word-level tokenizer whose words `w0` .. `w{V-1}` are token ids 0 .. V-1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(path)


def install_hooks(model, cap: dict):
    base = model.model
    handles = []

    def hook(name, pick=lambda o: o[0] if isinstance(o, (tuple, list)) else o):
        def f(_m, _a, out):
            t = pick(out)
            cap[name] = t.reshape(-1, t.shape[-1]).detach().clone()
        return f

    handles.append(base.embed_tokens.register_forward_hook(hook("hidden.embed.0")))
    handles.append(base.norm.register_forward_hook(hook("hidden.final_norm.0")))
    for i, b in enumerate(base.layers):
        handles.append(b.input_layernorm.register_forward_hook(hook(f"hidden.attn_norm.{i}")))
        handles.append(b.self_attn.register_forward_hook(hook(f"hidden.attn_out.{i}")))
        handles.append(b.post_attention_layernorm.register_forward_hook(hook(f"hidden.ffn_norm.{i}")))
        handles.append(b.mlp.register_forward_hook(hook(f"hidden.ffn_out.{i}")))
        handles.append(b.register_forward_hook(hook(f"hidden.layer_out.{i}")))
        if hasattr(b.mlp, "gate") and hasattr(b.mlp, "experts"):
            handles.append(b.mlp.gate.register_forward_hook(hook(f"hidden.moe_router.{i}", lambda o: o[0])))
            handles.append(b.mlp.gate.register_forward_hook(hook(f"hidden.moe_topk_ids.{i}", lambda o: o[2])))
    return handles


def build(name: str, config, out: str, seed: int) -> None:
    from transformers import AutoModelForCausalLM

    mdir = os.path.join(out, name, "model")
    os.makedirs(mdir, exist_ok=True)
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    if name == "qwen2":
        model = model.to(torch.bfloat16)
        model.save_pretrained(mdir)
        cfg_path = os.path.join(mdir, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]  # the pre-5.x layout
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)
    elif name == "qwen3-moe":
        model.save_pretrained(mdir, max_shard_size="200KB")
    else:
        model.save_pretrained(mdir)
    if name == "qwen3-dense":
        word_tokenizer(os.path.join(mdir, "tokenizer.json"))

    # The reference is the checkpoint as saved, read back in f32.
    ref = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32, attn_implementation="eager")
    ref.eval()
    g = torch.Generator().manual_seed(seed + 1)
    cases = []
    tensors = {}
    cap: dict = {}
    handles = install_hooks(ref, cap)
    for pid, length in PROMPT_LENGTHS.items():
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        case = {"id": pid, "token_ids": ids}
        if name == "qwen3-dense" and pid == "short":
            case["text"] = " ".join(f"w{i}" for i in ids)
        cases.append(case)
        cap.clear()
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0]
        tensors[f"{pid}.logits"] = logits.float().contiguous()
        for k, v in cap.items():
            v = v.to(torch.int32) if ".moe_topk_ids." in k else v.float()
            tensors[f"{pid}.{k}"] = v.contiguous()
        for h in handles:
            h.remove()
        with torch.no_grad():
            gen = ref.generate(
                torch.tensor([ids]), max_new_tokens=DECODE_STEPS, do_sample=False,
                pad_token_id=0, eos_token_id=None,
            )[0, length:]
        tensors[f"{pid}.generated"] = gen.to(torch.int32).contiguous()
        handles = install_hooks(ref, cap)
    for h in handles:
        h.remove()
    save_file(tensors, os.path.join(out, name, "ref.safetensors"))
    with open(os.path.join(out, name, "cases.json"), "w") as f:
        json.dump({"decode_steps": DECODE_STEPS, "prompts": cases, "n_layers": config.num_hidden_layers}, f)


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = sys.argv[1]
    torch.set_num_threads(1)
    for seed, (name, config) in enumerate(configs().items()):
        build(name, config, out, 1000 + seed)
    with open(os.path.join(out, "DONE"), "w") as f:
        f.write("ok\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
