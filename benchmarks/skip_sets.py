"""What a trained run skips, per dataset, on test prompts; and what it costs in teacher-forced loss.

Reproduce (the numbers in docs/training.md):
    python benchmarks/skip_sets.py --run runs/smollm2-mix --data ../shared/data/samsum \
        --data ../shared/data/xsum --data ../shared/data/boolq --limit 100 --loss-items 32 \
        --threads 1 --out benchmarks/results/skip_sets_smollm2-mix.json

Per dataset (the first --limit test items, whole prompts as inference sees them): the mean skip
ratio at the run's threshold and at 0.5, the mean keep-probability, how often each layer is skipped,
the most common skip set and its share; Jaccard distances between the datasets' most common skip
sets. With --loss-items, the teacher-forced response loss of the first N items without skipping,
with FiRST's per-prompt skip sets, and with one static set skipping the same number of layers per
prompt (the layers FiRST skips most often over all datasets).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from firstskip.data import encode_example, encode_prompt, load_examples
from firstskip.modeling import FirstSkipModel
from firstskip.routers import decide
from firstskip.train.calibrate import keep_probs, response_loss


def jaccard_distance(a: set[int], b: set[int]) -> float:
    return 1.0 - len(a & b) / len(a | b) if a | b else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--loss-items", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fsm = FirstSkipModel.from_pretrained(args.run)
    config, layers = fsm.config, fsm.config.num_layers
    report: dict = {"run": args.run, "threshold": config.threshold, "datasets": {}}
    skips, losses = {}, {}
    for spec in args.data:
        examples = load_examples(spec, "test", limit=args.limit)
        name = examples[0].dataset
        prompts = [encode_prompt(fsm.tokenizer, ex.prompt) for ex in examples]
        probs = keep_probs(fsm, [(ids, len(ids)) for ids in prompts])
        skip = decide(probs, config)
        skips[name] = skip
        sets = Counter(tuple(row.nonzero().squeeze(-1).tolist()) for row in skip)
        common, count = sets.most_common(1)[0]
        report["datasets"][name] = {
            "items": len(examples),
            "skip_ratio": round(float(skip.float().sum(-1).mean()) / layers, 4),
            "skip_ratio_at_0.5": round(float(decide(probs, config.replace(threshold=0.5)).float().sum(-1).mean()) / layers, 4),
            "mean_keep": round(float(probs[:, config.skippable].mean()), 4),
            "layer_skip_rate": [round(float(v), 3) for v in skip.float().mean(0)],
            "most_common_set": list(common), "most_common_share": round(count / len(examples), 3),
            "distinct_sets": len(sets),
        }
        if args.loss_items:
            losses[name] = [encode_example(fsm.tokenizer, ex, args.max_length) for ex in examples[:args.loss_items]]
    names = list(report["datasets"])
    report["jaccard_most_common"] = {f"{a}|{b}": round(jaccard_distance(
        set(report["datasets"][a]["most_common_set"]), set(report["datasets"][b]["most_common_set"])), 3)
        for i, a in enumerate(names) for b in names[i + 1:]}
    if losses:
        report["loss"] = _losses(fsm, losses, skips, args.loss_items)
    for line in _table(report):
        print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("threshold", "jaccard_most_common", "loss") if k in report}))


def _table(report: dict) -> list[str]:
    """One markdown row per dataset; layer skip rates as one digit per layer (0-9 = tenths, X = all)."""
    lines = ["| dataset | skip ratio | at 0.5 | mean keep | layers skipped (rate per layer, 0-9 tenths, X = all) "
             "| most common set (share) | distinct sets |", "|---|---|---|---|---|---|---|"]
    for name, d in report["datasets"].items():
        rates = "".join("X" if r >= 0.995 else str(int(r * 10 + 0.5)) if r < 0.95 else "9" for r in d["layer_skip_rate"])
        lines.append(f"| {name} | {d['skip_ratio']:.3f} | {d['skip_ratio_at_0.5']:.3f} | {d['mean_keep']:.3f} | "
                     f"`{rates}` | {d['most_common_set']} ({d['most_common_share']:.2f}) | {d['distinct_sets']} |")
    return lines


def _losses(fsm: FirstSkipModel, data: dict, skips: dict, n: int) -> dict:
    """Response loss per dataset: no skipping, FiRST's sets, and a static set of the same mean size."""
    every = torch.cat([s[:n] for s in skips.values()])
    k = round(float(every.float().sum(-1).mean()))
    static = every.float().mean(0).topk(k).indices.sort().values.tolist() if k else []
    out = {"static_set": static}
    for name, encoded in data.items():
        first = skips[name][:len(encoded)]
        fixed = torch.zeros_like(first)
        fixed[:, static] = True
        out[name] = {kind: round(response_loss(fsm, encoded, mask), 4) for kind, mask in
                     (("none", torch.zeros_like(first)), ("first", first), ("static", fixed))}
    return out


if __name__ == "__main__":
    main()
