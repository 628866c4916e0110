"""Does a layer's skip decision follow the prompt's length? Per layer, on test prompts.

Reproduce (docs/experiments/2026-11-25-distillation-and-row-tokens.md, "Capping a row's tokens"):
    python benchmarks/keep_by_length.py --run runs/v0 --data ../shared/data/samsum --layers 3 4 5 19 22 25

For each listed layer: the share of the first --limit test prompts that skip it at the run's
threshold, the 10th/50th/90th percentiles of its keep-probability, and the correlation of the
keep-probability with the prompt's token count and with the first reference's token count; then the
mean prompt and reference lengths of the prompts that skip it and of those that keep it.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from firstskip.data import encode_prompt, load_examples
from firstskip.modeling import FirstSkipModel
from firstskip.train.calibrate import keep_probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--layers", type=int, nargs="+", required=True)
    args = parser.parse_args()
    fsm = FirstSkipModel.from_pretrained(args.run)
    tau = fsm.config.threshold
    examples = load_examples(args.data, "test", limit=args.limit)
    prompts = [encode_prompt(fsm.tokenizer, ex.prompt) for ex in examples]
    probs = keep_probs(fsm, [(ids, len(ids)) for ids in prompts])
    prompt_len = torch.tensor([len(ids) for ids in prompts], dtype=torch.float)
    ref_len = torch.tensor([len(fsm.tokenizer(ex.references[0])["input_ids"]) for ex in examples], dtype=torch.float)
    print(f"{args.run}, {examples[0].dataset}, {len(examples)} prompts, threshold {tau:.4f}")
    print("| layer | skipped by | p10 / p50 / p90 | corr(p, prompt length) | corr(p, reference length) "
          "| prompt length: skipping / keeping | reference length: skipping / keeping |")
    print("|---|---|---|---|---|---|---|")
    for layer in args.layers:
        p = probs[:, layer]
        skip = p < tau
        q = torch.quantile(p, torch.tensor([0.1, 0.5, 0.9]))
        lengths = [f"{x[skip].mean():.0f} / {x[~skip].mean():.0f}" if skip.any() and (~skip).any() else "-"
                   for x in (prompt_len, ref_len)]
        print(f"| {layer} | {skip.float().mean():.0%} | {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f} "
              f"| {statistics.correlation(p.tolist(), prompt_len.tolist()):+.2f} "
              f"| {statistics.correlation(p.tolist(), ref_len.tolist()):+.2f} | {lengths[0]} | {lengths[1]} |")


if __name__ == "__main__":
    main()
