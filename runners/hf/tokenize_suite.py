#!/usr/bin/env python3
"""Build or refresh a prompt suite's token ids with the HF tokenizer (deterministic).

A suite (`fixtures/suites/<name>.jsonl`) holds one prompt per line:
`{"id", "text", "chat", "token_ids", "positions"}`. `text` is the exact string tokenized with
`add_special_tokens=False`; for chat prompts it already has the chat template applied
(`apply_chat_template(messages, tokenize=False, ...)`). Engines are given `token_ids` and
never re-tokenize.

    tokenize_suite.py                      build default.jsonl from default.source.json
    tokenize_suite.py --refresh SUITE      re-tokenize SUITE's texts in place
    tokenize_suite.py --check              exit 1 if the committed suite is not what it would write

The tokenizer is loaded with AutoTokenizer from a generated model directory (default
`$PARITYBENCH_CACHE/fixtures/models/qwen3-dense`, made by `runner fixtures gen`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITES = REPO / "fixtures" / "suites"
FIELDS = ("id", "text", "chat", "token_ids", "positions")


def default_tokenizer_dir() -> Path:
    cache = os.environ.get("PARITYBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "paritybench")
    return Path(cache) / "fixtures" / "models" / "qwen3-dense"


def load_tokenizer(model_dir: Path):
    if not (model_dir / "tokenizer.json").is_file():
        sys.exit(f"tokenize_suite: {model_dir / 'tokenizer.json'} is missing: run `runner fixtures gen` first "
                 f"or pass --tokenizer-dir")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def encode(tok, text: str) -> list[int]:
    return [int(t) for t in tok(text, add_special_tokens=False)["input_ids"]]


def resolve_positions(spec, n_tokens: int, where: str):
    """`"all"`, `{"last": N}` or an explicit ascending list -> the suite's `positions`."""
    if spec == "all":
        return "all"
    if isinstance(spec, dict) and set(spec) == {"last"}:
        n = int(spec["last"])
        if not 0 < n <= n_tokens:
            sys.exit(f"tokenize_suite: {where}: last {n} positions of a {n_tokens}-token prompt")
        return list(range(n_tokens - n, n_tokens))
    if isinstance(spec, list) and spec and all(isinstance(p, int) for p in spec):
        if any(b <= a for a, b in zip(spec, spec[1:])) or spec[0] < 0 or spec[-1] >= n_tokens:
            sys.exit(f"tokenize_suite: {where}: positions {spec} not ascending within 0..{n_tokens}")
        return spec
    sys.exit(f"tokenize_suite: {where}: positions must be \"all\", {{\"last\": N}} or a list, got {spec!r}")


def build_from_source(tok, source: Path) -> list[dict]:
    doc = json.loads(source.read_text(encoding="utf-8"))
    out = []
    for i, p in enumerate(doc["prompts"]):
        where = f"{source}: prompts[{i}] ({p.get('id')})"
        if "messages" in p:
            text = tok.apply_chat_template(p["messages"], tokenize=False,
                                           add_generation_prompt=bool(p.get("add_generation_prompt", False)))
            chat = True
        elif "text" in p:
            text, chat = p["text"], False
        else:
            sys.exit(f"tokenize_suite: {where}: needs `text` or `messages`")
        ids = encode(tok, text)
        out.append({"id": p["id"], "text": text, "chat": chat, "token_ids": ids,
                    "positions": resolve_positions(p.get("positions", "all"), len(ids), where)})
    return out


def refresh(tok, suite: Path) -> list[dict]:
    out = []
    for n, line in enumerate(suite.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        p = json.loads(line)
        ids = encode(tok, p["text"])
        positions = p.get("positions", "all")
        if positions != "all" and positions and positions[-1] >= len(ids):
            sys.exit(f"tokenize_suite: {suite}:{n}: positions reach {positions[-1]} but the text now has "
                     f"{len(ids)} tokens")
        out.append({"id": p["id"], "text": p["text"], "chat": bool(p.get("chat", False)), "token_ids": ids,
                    "positions": positions})
    return out


def render(prompts: list[dict]) -> str:
    lines = [json.dumps({k: p[k] for k in FIELDS}, ensure_ascii=False) for p in prompts]
    return "\n".join(lines) + "\n"


def scored(p: dict) -> int:
    return len(p["token_ids"]) if p["positions"] == "all" else len(p["positions"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=SUITES / "default.source.json")
    ap.add_argument("--out", type=Path, default=SUITES / "default.jsonl")
    ap.add_argument("--refresh", type=Path, help="re-tokenize this suite's texts (in place unless --out)")
    ap.add_argument("--tokenizer-dir", type=Path, default=default_tokenizer_dir())
    ap.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    args = ap.parse_args(argv)

    tok = load_tokenizer(args.tokenizer_dir)
    if args.refresh:
        prompts = refresh(tok, args.refresh)
        out = args.refresh if args.out == SUITES / "default.jsonl" else args.out
    else:
        prompts = build_from_source(tok, args.source)
        out = args.out
    text = render(prompts)
    for p in prompts:
        print(f"{p['id']:<16} tokens {len(p['token_ids']):>4}  scored {scored(p):>4}", file=sys.stderr)
    print(f"{'total':<16} tokens {sum(len(p['token_ids']) for p in prompts):>4}  "
          f"scored {sum(scored(p) for p in prompts):>4}", file=sys.stderr)
    if args.check:
        current = out.read_text(encoding="utf-8") if out.is_file() else None
        if current != text:
            print(f"tokenize_suite: {out} is out of date (run runners/hf/tokenize_suite.py)", file=sys.stderr)
            return 1
        print(f"{out}: up to date", file=sys.stderr)
        return 0
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
