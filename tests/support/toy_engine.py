#!/usr/bin/env python3
"""The toy engine of tests/once_e2e.rs: a 4-layer residual model over a 64-token vocabulary
that really computes (causal context, RMSNorm, tanh blocks, tied lm_head) and speaks the
paritybench dump protocol (docs/PROTOCOL.md) with the Python standard library only.

The line marked BEHAVIOUR is what the test commits change: `SCALE_LAYER, SCALE = 2, 1.001`
scales layer 2's output (and so everything after it) by 1.001."""
import hashlib, json, math, os, random, struct, sys, time

V, H, L = 64, 16, 4
SCALE_LAYER, SCALE = None, 1.0  # BEHAVIOUR


def weights():
    rng = random.Random(1234)
    emb = [[rng.gauss(0, 1) for _ in range(H)] for _ in range(V)]
    mat = lambda: [[rng.gauss(0, 1 / math.sqrt(H)) for _ in range(H)] for _ in range(H)]
    return emb, [mat() for _ in range(L)], [mat() for _ in range(L)]


EMB, WA, WF = weights()


def rmsnorm(x):
    r = math.sqrt(sum(v * v for v in x) / len(x) + 1e-6)
    return [v / r for v in x]


def matvec(x, w):
    return [sum(x[i] * w[i][j] for i in range(H)) for j in range(H)]


def forward(tokens, t):
    """Captures and logits at position t (causal: tokens[0..=t] only)."""
    cap = {}
    ctx = [sum(EMB[tokens[s]][j] for s in range(t)) / max(t, 1) for j in range(H)]
    x = [EMB[tokens[t]][j] + 0.5 * ctx[j] + 0.1 * math.sin(t + j) for j in range(H)]
    cap[("embed", 0)] = x
    for l in range(L):
        a = rmsnorm(x)
        cap[("attn_norm", l)] = a
        ao = [0.5 * math.tanh(v) for v in matvec(a, WA[l])]
        cap[("attn_out", l)] = ao
        x = [x[j] + ao[j] for j in range(H)]
        f = rmsnorm(x)
        cap[("ffn_norm", l)] = f
        fo = [0.5 * math.tanh(v) for v in matvec(f, WF[l])]
        cap[("ffn_out", l)] = fo
        x = [x[j] + fo[j] for j in range(H)]
        if l == SCALE_LAYER:
            x = [v * SCALE for v in x]
        cap[("layer_out", l)] = x
    fn = rmsnorm(x)
    cap[("final_norm", 0)] = fn
    logits = [2.0 * sum(fn[j] * EMB[v][j] for j in range(H)) for v in range(V)]
    return cap, logits


def tokenize(text):
    return [ord(c) % V for c in text]


def f32(rows):
    return struct.pack("<%df" % sum(len(r) for r in rows), *[v for r in rows for v in r])


def i32(vals):
    return struct.pack("<%di" % len(vals), *vals)


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def run(req_path, out):
    raw = open(req_path, "rb").read()
    req = json.loads(raw)
    os.makedirs(out, exist_ok=True)
    points = ["embed", "attn_norm", "attn_out", "ffn_norm", "ffn_out", "layer_out", "final_norm"]
    manifest = {
        "schema": 1, "complete": False,
        "engine": {"name": "toy", "version": "1", "backend": "python", "device": "cpu"},
        "model": {"path": str(req["model"]["path"]), "format": "safetensors", "quant": "f32",
                  "compute_dtype": "f32", "architecture": "toy", "n_layers": L, "vocab_size": V},
        "tokenizer": {"add_bos": False}, "mode": req.get("mode", "prefill"),
        "request_sha256": hashlib.sha256(raw).hexdigest(),
        "prompt_ids": [p["id"] for p in req["prompts"]], "prompts": [],
        "captures": {"points": points, "layers": list(range(L)),
                     "absent": {"moe_router": "a dense model", "moe_topk_ids": "a dense model"}},
        "command": sys.argv, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save = lambda: json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"), indent=1)
    save()
    for i, p in enumerate(req["prompts"]):
        ids = p["token_ids"]
        pos = p.get("positions") or (req.get("positions") if isinstance(req.get("positions"), list) else None)
        pos = pos or list(range(len(ids)))
        t0 = time.time()
        rows = [forward(ids, t) for t in pos]
        t1 = time.time()
        gen, toks = [], list(ids)
        for _ in range(req.get("decode_steps", 0)):
            _, lg = forward(toks, len(toks) - 1)
            nxt = max(range(V), key=lambda v: (lg[v], -v))
            gen.append(nxt)
            toks.append(nxt)
        t2 = time.time()
        tensors = {"token_ids": ("I32", [len(ids)], i32(ids)), "positions": ("I32", [len(pos)], i32(pos)),
                   "logits": ("F32", [len(pos), V], f32([lg for _, lg in rows])),
                   "generated": ("I32", [len(gen)], i32(gen))}
        for (c, l) in rows[0][0]:
            tensors["hidden.%s.%d" % (c, l)] = ("F32", [len(pos), H], f32([cap[(c, l)] for cap, _ in rows]))
        name = "p%d.safetensors" % i
        write_safetensors(os.path.join(out, name), tensors)
        rec = {"index": i, "id": p["id"], "file": name, "n_tokens": len(ids), "n_positions": len(pos),
               "n_generated": len(gen), "sha256": hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest(),
               "timings": {"prefill_ms": [1000 * (t1 - t0)], "decode_ms": [1000 * (t2 - t1)],
                           "prefill_tokens": len(ids), "decode_tokens": len(gen), "ttft_ms": []}}
        if p.get("text") is not None:
            rec["tokenizer_match"] = tokenize(p["text"]) == ids
        manifest["prompts"].append(rec)
        save()
    manifest["complete"] = True
    save()


if __name__ == "__main__":
    if sys.argv[1:2] == ["describe"]:
        print(json.dumps({"name": "toy", "version": "1", "backends": ["cpu"]}))
    elif sys.argv[1:2] == ["run"] and len(sys.argv) == 6 and sys.argv[2] == "--request" and sys.argv[4] == "--out":
        run(sys.argv[3], sys.argv[5])
    else:
        print("usage: engine.py describe | run --request REQ --out DIR", file=sys.stderr)
        sys.exit(2)
