"""Where FiRST loses quality: per-item score differences grouped by how many layers FiRST skipped.

Reads the predictions an evaluation already wrote (no model is run). Reproduce the SAMSum analysis
in docs/experiments/2026-11-24-issue3-recipe.md (out/eval/l60 is written by the command there):
    python benchmarks/loss_by_skip_count.py --eval out/eval/l60 --data ../shared/data/samsum --limit 100

For each group of items (by FiRST's skip count, in bins of --bin layers): how many items, the mean
per-item score of --method minus --against, and that group's share of the whole gap (its summed
difference over all items). Per-item scores are firstskip.metrics.score_items' (sentence-level).
Last, the items on which --method ran to max_new_tokens (a repetition loop, for a summary) and
their share of the gap, and how --method's skip count follows prompt length (the correlation, and
the mean count of prompts under 150 and over 300 tokens). Then the items on which --method stopped
early (under half of --against's words) and their share, and per layer skipped by at least
--min-items items: the mean difference of the items that skip it and of the others.
"""

from __future__ import annotations

import argparse
import statistics

from firstskip.evaluate.runner import load_dataset
from firstskip.evaluate.store import PredictionStore
from firstskip.metrics import primary_metric, score_items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", required=True, help="an evaluation's --out folder")
    ap.add_argument("--data", required=True, help="the dataset, as given to firstskip eval")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--method", default="first")
    ap.add_argument("--against", default="lora-only")
    ap.add_argument("--bin", type=int, default=3, help="layers per group")
    ap.add_argument("--min-items", type=int, default=10, help="list a layer only if this many items skip it")
    args = ap.parse_args()
    ds = load_dataset(args.data, args.limit)
    metric = primary_metric(ds.task)
    refs = [e.references for e in ds.examples]
    records = {}
    for name in (args.method, args.against):
        store = PredictionStore(f"{args.eval}/predictions/{ds.name}/{name}.jsonl").records
        missing = [e.id for e in ds.examples if e.id not in store]
        if missing:
            raise SystemExit(f"{args.eval} has no {name} prediction for {len(missing)} of the first {args.limit} "
                             f"{ds.name} items (e.g. {missing[0]}); evaluate them first or lower --limit")
        records[name] = [store[e.id] for e in ds.examples]
    scores = {name: score_items(ds.task, [r["prediction"] for r in rs], refs, [e.choices for e in ds.examples])[metric]
              for name, rs in records.items()}
    diffs = [a - b for a, b in zip(scores[args.method], scores[args.against])]
    groups: dict[int, list[float]] = {}
    for r, d in zip(records[args.method], diffs):
        groups.setdefault(len(r["skipped"]) // args.bin, []).append(d)
    n = len(ds.examples)
    print(f"{ds.name}, {n} items, {metric}: {args.method} {statistics.fmean(scores[args.method]):.1f}, "
          f"{args.against} {statistics.fmean(scores[args.against]):.1f}")
    print(f"| layers skipped by {args.method} | items | mean difference | contribution to the mean |")
    print("|---|---|---|---|")
    for g in sorted(groups):
        d = groups[g]
        print(f"| {g * args.bin}-{g * args.bin + args.bin - 1} | {len(d)} | {statistics.fmean(d):+.1f} | "
              f"{sum(d) / n:+.2f} |")
    cut = [d for r, d in zip(records[args.method], diffs) if r["finish"] == "length"]
    print(f"{args.method} ran to max_new_tokens on {len(cut)} items ({args.against}: "
          f"{sum(r['finish'] == 'length' for r in records[args.against])}); they contribute {sum(cut) / n:+.2f}")
    counts = [len(r["skipped"]) for r in records[args.method]]
    lengths = [r["prompt_tokens"] for r in records[args.method]]
    short = [c for c, t in zip(counts, lengths) if t < 150]
    long = [c for c, t in zip(counts, lengths) if t > 300]
    print(f"skip count vs prompt tokens: correlation {statistics.correlation(counts, lengths):+.2f}; "
          f"prompts under 150 tokens skip {_mean(short):.1f} layers ({len(short)}), "
          f"over 300 tokens {_mean(long):.1f} ({len(long)})")
    words = {name: [len(r["prediction"].split()) for r in rs] for name, rs in records.items()}
    early = [d for d, m, o in zip(diffs, words[args.method], words[args.against]) if 2 * m < o]
    print(f"{args.method} stopped at under half of {args.against}'s words on {len(early)} items; "
          f"they contribute {sum(early) / n:+.2f}")
    print("| layer | items skipping it | their mean difference | the other items' |")
    print("|---|---|---|---|")
    for layer in sorted({l for r in records[args.method] for l in r["skipped"]}):
        hit = [layer in r["skipped"] for r in records[args.method]]
        if sum(hit) >= args.min_items:
            others = [d for d, h in zip(diffs, hit) if not h]
            print(f"| {layer} | {sum(hit)} | {_mean([d for d, h in zip(diffs, hit) if h]):+.1f} | "
                  f"{f'{_mean(others):+.1f}' if others else '-'} |")


def _mean(values: list[int]) -> float:
    return statistics.fmean(values) if values else float("nan")


if __name__ == "__main__":
    main()
