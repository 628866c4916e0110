"""How far a run decodes in another weight format from what it decodes in float32: skip sets,
greedy tokens and per-token KL.

Reproduce (benchmarks/README.md, "bfloat16" and "int8"):
    python benchmarks/dtype_agreement.py --run runs/sec4s0 --dtype int8 --data ../shared/data/samsum \
        --data ../shared/data/boolq --limit 100 --out benchmarks/results/int8_agreement.json

Per dataset, the first --limit test prompts are generated greedily (64 new tokens, EOS stops) by the
run loaded in float32 and again in --dtype, each with the skip set its own routers choose: the share
of prompts whose skip set is the same, whose output is the same token for token, the mean share of
each output's tokens before the first difference, the mean KL(fp32 || other) of the first token's
distribution (the prefill's, where both see the same prompt), and the mean per-token KL along the
float32 output (the other format is fed float32's tokens, so both predict from the same context).
A screening check beside the task scores with intervals (`dtype_scores.py`).
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


def logprobs_along(fsm: FirstSkipModel, ids: list[int], sampling: Sampling,
                   tokens: list[int] | None = None) -> tuple[list[int], list[int], torch.Tensor]:
    """The run's skip set for ``ids``, the tokens it decodes and its log-probabilities at each of
    their positions: its own greedy tokens (EOS stops), or ``tokens`` fed whatever it would have
    sampled (teacher forcing)."""
    engine = fsm.engine
    pre = engine.prefill([ids])
    rows = [pre.logits[0].float().log_softmax(-1)]
    budget = sampling.max_new_tokens if tokens is None else len(tokens)
    batch = engine.new_batch(1, len(ids) + budget)
    eos = fsm.eos_token_ids if tokens is None else ()
    (request,) = engine.join(batch, pre, Sampling(max_new_tokens=budget), eos)
    forced = iter(tokens[1:] if tokens else ())
    if tokens:
        request.token = tokens[0]
    request.greedy = False

    def record(logits: torch.Tensor) -> int:
        rows.append(logits.float().log_softmax(-1))
        return int(logits.argmax()) if tokens is None else next(forced, tokens[-1])

    request.sample = record
    while batch.requests:
        batch.step()
    out = request.generation.token_ids if tokens is None else tokens
    return pre.skip[0].nonzero().squeeze(-1).tolist(), out, torch.stack(rows[:len(out)])


def compare(models: dict[str, FirstSkipModel], ids: list[int], sampling: Sampling) -> dict[str, float | bool]:
    ref, other = models.values()
    ref_set, ref_tokens, l32 = logprobs_along(ref, ids, sampling)
    other_set, other_tokens, _ = logprobs_along(other, ids, sampling)
    _, _, l16 = logprobs_along(other, ids, sampling, ref_tokens)
    kl = (l32.exp() * (l32 - l16)).sum(-1)
    return {"same_set": ref_set == other_set, "same_output": ref_tokens == other_tokens,
            "prefix": common_prefix(ref_tokens, other_tokens), "kl_first": float(kl[0]),
            "kl_token": float(kl.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--dtype", default="bfloat16", help="the format compared with float32")
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()
    models = {dtype: FirstSkipModel.from_pretrained(args.run, dtype=dtype) for dtype in ("float32", args.dtype)}
    sampling = Sampling(max_new_tokens=args.new_tokens)
    report: dict = {"run": args.run, "dtype": args.dtype, "limit": args.limit, "new_tokens": args.new_tokens,
                    "datasets": {}}
    for spec in args.data:
        examples = load_examples(spec, "test", limit=args.limit)
        tokenizer = models["float32"].tokenizer
        rows = [compare(models, encode_prompt(tokenizer, ex.prompt), sampling) for ex in examples]
        report["datasets"][examples[0].dataset] = {
            "prompts": len(rows),
            "same_skip_set": statistics.mean(r["same_set"] for r in rows),
            "same_output": statistics.mean(r["same_output"] for r in rows),
            "mean_prefix_share": round(statistics.mean(r["prefix"] for r in rows), 4),
            "mean_first_token_kl": round(statistics.mean(r["kl_first"] for r in rows), 6),
            "mean_token_kl": round(statistics.mean(r["kl_token"] for r in rows), 6),
        }
        print(examples[0].dataset, report["datasets"][examples[0].dataset], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
