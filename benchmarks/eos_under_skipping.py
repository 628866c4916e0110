"""Does skipping raise the end-of-sequence probability on the reference's own path?

FiRST's summaries on some seeds stop early under greedy decoding
(docs/experiments/2026-11-24-issue3-recipe.md). This asks whether that shows up teacher-forced,
where the phase-1 loss would see it: for the first --limit test items, at every response position whose label is not EOS, the mean probability of EOS and the
number of positions where EOS is the argmax, with no layer skipped and with the skip set FiRST used
on that item in an evaluation (read from its predictions; no routers run here). Reproduce:
    python benchmarks/eos_under_skipping.py --run runs/mix25-p50s2 --eval out/eval/mix25-p50s2 \
        --data ../shared/data/samsum --limit 40
"""

from __future__ import annotations

import argparse

import torch

from firstskip.data import collate, encode_example, load_examples
from firstskip.evaluate.store import PredictionStore
from firstskip.modeling import FirstSkipModel
from firstskip.train.passes import gated_forward, hard_gate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--eval", required=True, help="an evaluation of --run with the first method's predictions")
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args()
    fsm = FirstSkipModel.from_pretrained(args.run)
    examples = load_examples(args.data, "test", limit=args.limit)
    store = PredictionStore(f"{args.eval}/predictions/{examples[0].dataset}/first.jsonl").records
    eos = torch.tensor(fsm.eos_token_ids)
    print(f"{examples[0].dataset}, {len(examples)} items, response positions whose label is not EOS:")
    print("| skip sets | mean p(EOS) | positions where EOS is the argmax |")
    print("|---|---|---|")
    for name in ("none", "FiRST's"):
        total, argmax, positions = 0.0, 0, 0
        for example in examples:
            skip = torch.zeros(1, fsm.config.num_layers, dtype=torch.bool)
            if name != "none":
                skip[0, store[example.id]["skipped"]] = True
            batch = collate([encode_example(fsm.tokenizer, example, args.max_length)], pad_id=0)
            with torch.no_grad():
                logits, labels, _ = gated_forward(fsm.model, fsm.engine.controller, batch, hard_gate(skip))
            probs, labels = logits[0].float().softmax(-1), labels[0]
            inside = (labels != -100) & ~torch.isin(labels, eos)
            total += float(probs[inside][:, eos].sum())
            argmax += int(torch.isin(probs[inside].argmax(-1), eos).sum())
            positions += int(inside.sum())
        print(f"| {name} | {total / positions:.4f} | {argmax} of {positions} |")


if __name__ == "__main__":
    main()
