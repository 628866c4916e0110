"""How far a run decodes in bfloat16 from what it decodes in float32: skip sets and greedy tokens.

Reproduce (benchmarks/README.md, "bfloat16"):
    python benchmarks/dtype_agreement.py --run runs/sec4s0 --data ../shared/data/samsum \
        --data ../shared/data/boolq --limit 30 --out benchmarks/results/bf16_agreement.json

Per dataset, the first --limit test prompts are generated greedily (64 new tokens, EOS stops) by the
run loaded in float32 and again in bfloat16: the share of prompts whose skip set is the same, whose
output is the same token for token, the mean share of each output's tokens before the first
difference, and the mean KL(fp32 || bf16) of the first token's distribution (the prefill's, where
both see the same prompt). A screening check, not the task scores with intervals (issue 20).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from firstskip.data import encode_prompt, load_examples
from firstskip.engine import Sampling
from firstskip.modeling import FirstSkipModel


def common_prefix(a: list[int], b: list[int]) -> float:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(len(a), len(b), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()
    models = {dtype: FirstSkipModel.from_pretrained(args.run, dtype=dtype) for dtype in ("float32", "bfloat16")}
    sampling = Sampling(max_new_tokens=args.new_tokens)
    report: dict = {"run": args.run, "limit": args.limit, "new_tokens": args.new_tokens, "datasets": {}}
    for spec in args.data:
        examples = load_examples(spec, "test", limit=args.limit)
        rows = []
        for ex in examples:
            ids = encode_prompt(models["float32"].tokenizer, ex.prompt)
            out = {}
            for dtype, fsm in models.items():
                pre = fsm.engine.prefill([ids])
                gen = fsm.engine.decode(pre, sampling, fsm.eos_token_ids)[0]
                out[dtype] = (gen.skipped_layers, gen.token_ids, pre.logits[0].float().log_softmax(-1))
            (s32, t32, l32), (s16, t16, l16) = out["float32"], out["bfloat16"]
            rows.append({"same_set": s32 == s16, "same_output": t32 == t16, "prefix": common_prefix(t32, t16),
                         "kl_first": float((l32.exp() * (l32 - l16)).sum())})
        report["datasets"][examples[0].dataset] = {
            "prompts": len(rows),
            "same_skip_set": statistics.mean(r["same_set"] for r in rows),
            "same_output": statistics.mean(r["same_output"] for r in rows),
            "mean_prefix_share": round(statistics.mean(r["prefix"] for r in rows), 4),
            "mean_first_token_kl": round(statistics.mean(r["kl_first"] for r in rows), 6),
        }
        print(examples[0].dataset, report["datasets"][examples[0].dataset])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
