"""How a run's routers score prompt tokens by their place in the prompt (docs/experiments/2026-11-24-issue3-recipe.md, "Prefixes").

For the first --limit test prompts of each dataset: every token's keep score (the router's sigmoid,
averaged over the skippable layers), for the tokens the routers pool (the chat template's fixed
tokens left out), grouped by the token's index among them. A mean over a prompt's tokens drifts
with the prompt's length when these groups differ. Reproduce:
    python benchmarks/router_scores_by_position.py --run runs/mix25-r120 --data ../shared/data/samsum \
        --data ../shared/data/xsum --data ../shared/data/boolq --limit 30
"""

from __future__ import annotations

import argparse
import statistics

import torch

from firstskip.data import encode_prompt
from firstskip.evaluate.runner import load_dataset
from firstskip.modeling import FirstSkipModel
from firstskip.routers import inner_mask

EDGES = [0, 40, 80, 160, 320]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--limit", type=int, default=30)
    args = ap.parse_args()
    fsm = FirstSkipModel.from_pretrained(args.run)
    head, tail = fsm.routers.head, fsm.routers.tail
    layers = fsm.config.skippable
    print("| dataset | " + " | ".join(_label(i) for i in range(len(EDGES))) + " |")
    print("|---|" + "---|" * len(EDGES))
    for spec in args.data:
        ds = load_dataset(spec, args.limit)
        groups: list[list[float]] = [[] for _ in EDGES]
        for example in ds.examples:
            ids = encode_prompt(fsm.tokenizer, example.prompt)
            with torch.no_grad():
                hidden = fsm.model(input_ids=torch.tensor([ids]), output_hidden_states=True,
                                   logits_to_keep=1).hidden_states
                scores = torch.stack([torch.sigmoid(fsm.routers.routers[l](hidden[l]))[0] for l in layers]).mean(0)
            pooled = inner_mask(torch.ones(1, len(ids), dtype=torch.bool), head, tail)[0]
            for index, score in enumerate(scores[pooled].tolist()):
                groups[sum(index >= e for e in EDGES) - 1].append(score)
        print(f"| {ds.name} | " + " | ".join(f"{statistics.fmean(g):.3f} ({len(g)})" if g else "-"
                                           for g in groups) + " |")


def _label(i: int) -> str:
    return f"tokens {EDGES[i]}-{EDGES[i + 1] - 1}" if i + 1 < len(EDGES) else f"tokens {EDGES[i]}+"


if __name__ == "__main__":
    main()
