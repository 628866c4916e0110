"""What a trained run skips, per dataset, on test prompts; and what it costs in teacher-forced loss.

Reproduce (the numbers in docs/experiments/2026-11-24-issue3-recipe.md; runs/mix25 was trained at
commit 91899c0, as benchmarks/issue4_smollm2.sh says):
    python benchmarks/skip_sets.py --run runs/mix25 --data ../shared/data/samsum --data ../shared/data/xsum \
        --data ../shared/data/boolq --data ../shared/data/sst2 --limit 100 --loss-items 16 \
        --out benchmarks/results/skip_sets_mix25.json --plot docs/img/layer_usage_mix25.png

Per dataset (the first --limit test items, whole prompts as inference sees them): the mean skip
ratio at the run's threshold and at 0.5, the mean keep-probability, how often each layer is skipped,
the most common skip set and its share; Jaccard distances between datasets (of the most common
sets, of the typical sets = layers skipped by at least half of the prompts, and weighted by rates). With --loss-items, the teacher-forced response loss of the first N items without skipping,
with FiRST's per-prompt skip sets, and with a static set per dataset of FiRST's mean skip count on
that dataset (the layers FiRST skips most often over all datasets, the same set for every prompt).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from firstskip.data import encode_example, encode_prompt, load_examples
from firstskip.evaluate.report import plot_layer_usage
from firstskip.modeling import FirstSkipModel
from firstskip.routers import decide
from firstskip.train.calibrate import keep_probs, response_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--loss-items", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out")
    parser.add_argument("--plot", help="also draw the layer-usage heatmap (datasets x layers) here (.png)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fsm = FirstSkipModel.from_pretrained(args.run)
    report: dict = {"run": args.run, "threshold": fsm.config.threshold, "datasets": {}}
    skips, encoded = {}, {}
    for spec in args.data:
        examples = load_examples(spec, "test", limit=args.limit)
        name = examples[0].dataset
        prompts = [encode_prompt(fsm.tokenizer, ex.prompt) for ex in examples]
        probs = keep_probs(fsm, [(ids, len(ids)) for ids in prompts])
        skips[name] = decide(probs, fsm.config)
        report["datasets"][name] = _describe(probs, skips[name], fsm)
        if args.loss_items:
            encoded[name] = [encode_example(fsm.tokenizer, ex, args.max_length) for ex in examples[:args.loss_items]]
    report.update(_distances(report["datasets"]))
    if encoded:
        report["loss"] = _losses(fsm, encoded, skips)
    for line in _table(report):
        print(line)
    print(json.dumps({k: v for k, v in report.items() if k not in ("run", "datasets")}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(report, fsm.config.protected, Path(args.plot))


def plot(report: dict, protected: list[int], path: Path) -> None:
    """The heatmap `firstskip inspect` draws, from this report's per-layer skip rates."""
    plot_layer_usage({name: [1 - r for r in d["layer_skip_rate"]] for name, d in report["datasets"].items()},
                     protected, path)


def jaccard_distance(a: set[int], b: set[int]) -> float:
    return 1.0 - len(a & b) / len(a | b) if a | b else 0.0


def _distances(datasets: dict) -> dict:
    """Jaccard distances between datasets: of their most common skip sets, of their typical sets
    (layers at least half of the prompts skip) and, weighted, of their per-layer skip rates."""
    pairs = [(a, b) for i, a in enumerate(datasets) for b in list(datasets)[i + 1:]]
    typical = {name: {layer for layer, r in enumerate(d["layer_skip_rate"]) if r >= 0.5} for name, d in datasets.items()}
    rates = {name: torch.tensor(d["layer_skip_rate"]) for name, d in datasets.items()}
    return {
        "jaccard_most_common": {f"{a}|{b}": round(jaccard_distance(set(datasets[a]["most_common_set"]),
                                                                   set(datasets[b]["most_common_set"])), 3)
                                for a, b in pairs},
        "typical_sets": {name: sorted(layers) for name, layers in typical.items()},
        "jaccard_typical": {f"{a}|{b}": round(jaccard_distance(typical[a], typical[b]), 3) for a, b in pairs},
        "jaccard_weighted": {f"{a}|{b}": round(1 - float(torch.minimum(rates[a], rates[b]).sum()
                                                         / torch.maximum(rates[a], rates[b]).sum()), 3)
                             for a, b in pairs},
    }


def _describe(probs: torch.Tensor, skip: torch.Tensor, fsm: FirstSkipModel) -> dict:
    config, layers = fsm.config, fsm.config.num_layers
    sets = Counter(tuple(row.nonzero().squeeze(-1).tolist()) for row in skip)
    common, count = sets.most_common(1)[0]
    at_half = decide(probs, config.replace(threshold=0.5))
    return {
        "items": len(skip),
        "skip_ratio": round(float(skip.float().sum(-1).mean()) / layers, 4),
        "skip_ratio_at_0.5": round(float(at_half.float().sum(-1).mean()) / layers, 4),
        "mean_keep": round(float(probs[:, config.skippable].mean()), 4),
        "layer_skip_rate": [round(float(v), 3) for v in skip.float().mean(0)],
        "most_common_set": list(common), "most_common_share": round(count / len(skip), 3),
        "distinct_sets": len(sets),
    }


def _losses(fsm: FirstSkipModel, encoded: dict, skips: dict) -> dict:
    """Response loss per dataset: no skipping, FiRST's sets, and the static set of the same mean size."""
    used = {name: skips[name][:len(items)] for name, items in encoded.items()}
    ranking = torch.cat(list(used.values())).float().mean(0).argsort(descending=True, stable=True).tolist()
    out = {}
    for name, items in encoded.items():
        first = used[name]
        k = round(float(first.float().sum(-1).mean()))
        static = torch.zeros_like(first)
        static[:, ranking[:k]] = True
        out[name] = {kind: round(response_loss(fsm, items, mask), 4) for kind, mask in
                     (("none", torch.zeros_like(first)), ("first", first), ("static", static))}
        out[name]["static_set"] = sorted(ranking[:k])
    return out


def _table(report: dict) -> list[str]:
    """One markdown row per dataset; layer skip rates as one digit per layer (tenths, X = always)."""
    lines = ["| dataset | skip ratio | at 0.5 | mean keep | skip rate per layer (0-9 tenths, X = always) "
             "| most common set (share) | distinct sets |", "|---|---|---|---|---|---|---|"]
    for name, d in report["datasets"].items():
        rates = "".join("X" if r >= 0.995 else str(min(9, int(r * 10 + 0.5))) for r in d["layer_skip_rate"])
        lines.append(f"| {name} | {d['skip_ratio']:.3f} | {d['skip_ratio_at_0.5']:.3f} | {d['mean_keep']:.3f} | "
                     f"`{rates}` | {d['most_common_set']} ({d['most_common_share']:.2f}) | {d['distinct_sets']} |")
    return lines


if __name__ == "__main__":
    main()
