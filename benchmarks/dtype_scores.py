"""Task scores of one run evaluated in two dtypes, item for item: the quality check of a weight format.

Reproduce (benchmarks/README.md, "bfloat16"):
    for d in float32 bfloat16; do firstskip eval -r runs/sec4s0 -d ../shared/data/samsum \
        -d ../shared/data/boolq --limit 100 --speed-items 0 --methods lora-only,first --dtype $d \
        --out out/eval/sec4s0-$d; done
    python benchmarks/dtype_scores.py out/eval/sec4s0-float32 out/eval/sec4s0-bfloat16 \
        --data ../shared/data/samsum --data ../shared/data/boolq

Per dataset and method: both scores, the second over the first with the paired 95% bootstrap
interval (`metrics.paired_ratio`: both scored on the same resampled items), how many outputs are
the same text, and FiRST's skip ratio in each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from firstskip.data import load_examples
from firstskip.metrics import paired_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference", type=Path, help="evaluation folder of the reference dtype")
    parser.add_argument("candidate", type=Path, help="evaluation folder of the dtype checked")
    parser.add_argument("--data", action="append", required=True, help="the datasets both evaluated")
    args = parser.parse_args()
    results = [json.loads((folder / "results.json").read_text()) for folder in (args.reference, args.candidate)]
    print(f"| dataset | method | {args.reference.name} | {args.candidate.name} | ratio [paired 95%] | same output | skip ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, data in results[0]["datasets"].items():
        metric = data["primary_metric"]
        for method in [m for m in data["methods"] if m in results[1]["datasets"][name]["methods"]]:  # both ran
            preds = [_predictions(folder, name, method) for folder in (args.reference, args.candidate)]
            ids = sorted(set(preds[0]) & set(preds[1]))
            refs, task, choices = _references(args.data, name, ids)
            pair = paired_ratio(task, [preds[1][i]["prediction"] for i in ids], [preds[0][i]["prediction"] for i in ids],
                                refs, choices)
            scores = [r["datasets"][name]["methods"][method]["metrics"][metric]["score"] for r in results]
            same = sum(preds[0][i]["prediction"] == preds[1][i]["prediction"] for i in ids)
            skips = [r["datasets"][name]["methods"][method].get("skip", {}).get("skip_ratio") for r in results]
            ratio = "n/a" if pair is None else f"{pair['ratio']:.3f} [{pair['low']:.3f}, {pair['high']:.3f}]"
            skip = " / ".join("-" if s is None else f"{s:.3f}" for s in skips)
            print(f"| {name} | {method} | {scores[0]:.1f} | {scores[1]:.1f} | {ratio} | {same}/{len(ids)} | {skip} |")


def _predictions(folder: Path, dataset: str, method: str) -> dict[str, dict]:
    path = folder / "predictions" / dataset / f"{method}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["id"]: r for r in records}


def _references(specs: list[str], dataset: str, ids: list[str]):
    spec = next(s for s in specs if load_examples(s, "test", limit=1)[0].dataset == dataset)
    examples = {ex.id: ex for ex in load_examples(spec, "test")}
    chosen = [examples[i] for i in ids]
    return [ex.references for ex in chosen], chosen[0].task, [ex.choices for ex in chosen]


if __name__ == "__main__":
    main()
