#!/usr/bin/env python3
"""Writes realistic-size Qwen3 checkpoints (random weights, fixed seed) for speed measurements.

Written on the GPU machine itself (nothing large travels): HF config.json, model.safetensors
(bf16), and the real Qwen3 tokenizer files. The weights are N(0, std) from torch's generator
with a fixed seed on the GPU, norms 1: fit for timings and memory, not for parity (the seeded
models of `runner fixtures gen` are the parity fixtures).

Usage: gpu-bench-models.py --out DIR --tokenizer-dir DIR [--models qwen3-4b-shape,qwen3-moe-3b-shape]
"""

import argparse
import json
import shutil
import time
from pathlib import Path

SHAPES = {
    # Qwen3-4B's shapes (hidden 2560, 36 layers, GQA 32/8, head_dim 128, intermediate 9728).
    "qwen3-4b-shape": dict(arch="qwen3", hidden=2560, layers=36, heads=32, kv=8, hd=128, inter=9728, tie=True),
    # A ~2.9B Qwen3-MoE: 128 experts, 8 per token, expert intermediate 256, 24 layers.
    "qwen3-moe-3b-shape": dict(arch="qwen3_moe", hidden=1024, layers=24, heads=16, kv=8, hd=128, inter=3072,
                               tie=False, experts=128, topk=8, moe_inter=256),
}
VOCAB = 151936


def config(s):
    c = {
        "architectures": ["Qwen3ForCausalLM" if s["arch"] == "qwen3" else "Qwen3MoeForCausalLM"],
        "model_type": s["arch"], "vocab_size": VOCAB, "hidden_size": s["hidden"],
        "intermediate_size": s["inter"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"], "head_dim": s["hd"], "hidden_act": "silu",
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": s["tie"], "attention_bias": False, "torch_dtype": "bfloat16",
        "bos_token_id": 151643, "eos_token_id": 151645, "use_cache": True,
    }
    if s["arch"] == "qwen3_moe":
        c.update(num_experts=s["experts"], num_experts_per_tok=s["topk"], moe_intermediate_size=s["moe_inter"],
                 decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, output_router_logits=False,
                 router_aux_loss_coef=0.001)
    return c


def tensors(s):
    h, hd, L = s["hidden"], s["hd"], s["layers"]
    yield "model.embed_tokens.weight", (VOCAB, h), 1.0
    yield "model.norm.weight", (h,), None
    if not s["tie"]:
        yield "lm_head.weight", (VOCAB, h), 0.02
    for i in range(L):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (h,), None
        yield f"{p}.post_attention_layernorm.weight", (h,), None
        yield f"{p}.self_attn.q_proj.weight", (s["heads"] * hd, h), 0.02
        yield f"{p}.self_attn.k_proj.weight", (s["kv"] * hd, h), 0.02
        yield f"{p}.self_attn.v_proj.weight", (s["kv"] * hd, h), 0.02
        yield f"{p}.self_attn.o_proj.weight", (h, s["heads"] * hd), 0.02
        yield f"{p}.self_attn.q_norm.weight", (hd,), None
        yield f"{p}.self_attn.k_norm.weight", (hd,), None
        if s["arch"] == "qwen3":
            yield f"{p}.mlp.gate_proj.weight", (s["inter"], h), 0.02
            yield f"{p}.mlp.up_proj.weight", (s["inter"], h), 0.02
            yield f"{p}.mlp.down_proj.weight", (h, s["inter"]), 0.02
        else:
            yield f"{p}.mlp.gate.weight", (s["experts"], h), 0.02
            for e in range(s["experts"]):
                yield f"{p}.mlp.experts.{e}.gate_proj.weight", (s["moe_inter"], h), 0.02
                yield f"{p}.mlp.experts.{e}.up_proj.weight", (s["moe_inter"], h), 0.02
                yield f"{p}.mlp.experts.{e}.down_proj.weight", (h, s["moe_inter"]), 0.02


def main():
    import torch
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer-dir", required=True)
    ap.add_argument("--models", default=",".join(SHAPES))
    args = ap.parse_args()
    for name in args.models.split(","):
        t = time.time()
        s = SHAPES[name]
        d = Path(args.out) / name
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator(device="cuda").manual_seed(1234)
        sd = {}
        for k, shape, std in tensors(s):
            if std is None:
                x = torch.ones(shape, dtype=torch.bfloat16, device="cuda")
            else:
                x = (torch.randn(shape, generator=g, device="cuda", dtype=torch.float32) * std).to(torch.bfloat16)
            sd[k] = x.cpu()
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config(s), indent=1))
        (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151645}))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(args.tokenizer_dir) / f, d / f)
        n = sum(v.numel() for v in sd.values())
        print(f"{name}: {n / 1e9:.2f}B parameters, {time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
