"""FiRST against LoRA-only on one dataset, per evaluation and summed over them (the seeds of a recipe).

Usage: python benchmarks/seed_table.py out/eval/NAMEs0 out/eval/NAMEs1 out/eval/NAMEs2 [--dataset samsum]

Per evaluation folder (`firstskip eval --methods lora-only,first`): FiRST's skip ratio, both scores,
their ratio with the paired 95% interval, and the items on which each ran to the token limit; then
the ratio of the summed scores, which weighs every item of every seed alike.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("evals", nargs="+", type=Path)
    parser.add_argument("--dataset", default="samsum")
    args = parser.parse_args()
    print("| evaluation | skip ratio | FiRST | LoRA-only | FiRST / LoRA-only [95%] | at the token limit (FiRST, LoRA-only) |")
    print("|---|---|---|---|---|---|")
    sums = [0.0, 0.0]
    for folder in args.evals:
        data = json.loads((folder / "results.json").read_text())["datasets"][args.dataset]
        first, lora = (data["methods"][m] for m in ("first", "lora-only"))
        metric = data["primary_metric"]
        scores = [m["metrics"][metric]["score"] for m in (first, lora)]
        kept = first["vs"]["lora-only"]
        sums = [s + x for s, x in zip(sums, scores)]
        print(f"| {folder.name} | {first['skip']['skip_ratio']:.3f} | {scores[0]:.1f} | {scores[1]:.1f} | "
              f"{scores[0] / scores[1]:.2f} [{kept['low']:.2f}, {kept['high']:.2f}] | "
              f"{first['finish']['length']}, {lora['finish']['length']} |")
    print(f"summed over {len(args.evals)}: FiRST {sums[0]:.1f}, LoRA-only {sums[1]:.1f}, ratio {sums[0] / sums[1]:.3f}")


if __name__ == "__main__":
    main()
