"""Which decode schedule delivers most when rows skip different layers (issue 22, item 2): one batch
in which each layer runs once for the rows that keep it (the engine's and the server's schedule),
against groups of rows that share a skip set decoded as separate batches, against the same batch
with skipping off.

Prompts: the mixed workload (the test prompts of SAMSum, XSum and BoolQ in turn), their skip sets
chosen by the run's routers, per prompt (threshold) and snapped to the run's learned sets. Every
row decodes --new-tokens tokens (EOS ignored), so the work is the same in every schedule; rates are
decode tokens over decode wall time (prefill not counted: it is the same in all three), medians of
interleaved repeats, ratios paired within a repeat. The saving s is the share of layer executions
the rows skip; 1 / (1 - s) bounds what skipping can gain over skipping off.

Reproduce (nothing else running):
    python benchmarks/schedules.py --run runs/sec4s0-w30 --dtype int8 --compile \
        --out benchmarks/results/schedules_int8_compiled.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

from firstskip.data import encode_prompt, load_examples
from firstskip.engine import Engine, Sampling
from firstskip.modeling import FirstSkipModel

DATA = ("../shared/data/samsum", "../shared/data/xsum", "../shared/data/boolq")


def mixed_prompts(fsm: FirstSkipModel, rows: int) -> list[list[int]]:
    per_task = [load_examples(spec, split="test", limit=rows) for spec in DATA]
    examples = [ex for trio in zip(*per_task) for ex in trio][:rows]
    return [encode_prompt(fsm.tokenizer, ex.prompt) for ex in examples]


def decode(engine: Engine, prompts: list[list[int]], sets: list[list[int]], new_tokens: int) -> tuple[int, float]:
    """Decode tokens and seconds for one batch of ``prompts`` with forced ``sets``."""
    pre = engine.prefill(prompts, sets, routers=False)
    batch = engine.new_batch(len(prompts), max(map(len, prompts)) + new_tokens)
    start = time.perf_counter()
    gens = engine.decode(pre, Sampling(max_new_tokens=new_tokens), batch=batch)
    return sum(g.new_tokens - 1 for g in gens), time.perf_counter() - start


def grouped(engine: Engine, prompts: list[list[int]], sets: list[list[int]], new_tokens: int) -> tuple[int, float]:
    """Rows that share a skip set as one batch each, one batch after another."""
    tokens = seconds = 0.0
    key = lambda i: tuple(sets[i])  # noqa: E731
    for _, rows in itertools.groupby(sorted(range(len(sets)), key=key), key=key):
        rows = list(rows)
        t, s = decode(engine, [prompts[i] for i in rows], [sets[i] for i in rows], new_tokens)
        tokens, seconds = tokens + t, seconds + s
    return int(tokens), seconds


def measure(engine: Engine, prompts: list[list[int]], sets: list[list[int]], new_tokens: int,
            repeats: int, layers: int) -> dict:
    schedules = {
        "one_batch": lambda: decode(engine, prompts, sets, new_tokens),
        "grouped_by_set": lambda: grouped(engine, prompts, sets, new_tokens),
        "skipping_off": lambda: decode(engine, prompts, [[] for _ in prompts], new_tokens),
    }
    for run in schedules.values():  # warm-up (and any compiling a new batch size needs)
        run()
    rates: dict[str, list[float]] = {name: [] for name in schedules}
    for _ in range(repeats):
        for name, run in schedules.items():
            tokens, seconds = run()
            rates[name].append(tokens / seconds)
    saving = sum(map(len, sets)) / (len(sets) * layers)
    ratio = lambda a, b: round(statistics.median(x / y for x, y in zip(rates[a], rates[b])), 4)  # noqa: E731
    return {
        "rows": len(prompts), "distinct_sets": len({tuple(s) for s in sets}), "saving": round(saving, 4),
        "bound": round(1 / (1 - saving), 4),
        "tok_s": {name: round(statistics.median(r), 2) for name, r in rates.items()},
        "one_batch_over_off": ratio("one_batch", "skipping_off"),
        "grouped_over_off": ratio("grouped_by_set", "skipping_off"),
        "one_batch_over_grouped": ratio("one_batch", "grouped_by_set"),
        "runs": {name: [round(x, 2) for x in r] for name, r in rates.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    fsm = FirstSkipModel.from_pretrained(args.run, dtype=args.dtype)
    engine = fsm.engine
    if args.compile:
        engine.compile()
    layers = fsm.config.num_layers
    results = []
    for rows in args.rows:
        prompts = mixed_prompts(fsm, rows)
        for decision in ("threshold", "snapped"):
            fsm.update_config(decision=decision)
            sets = [row.nonzero().squeeze(-1).tolist() for row in engine.prefill(prompts, None).skip]
            result = {"decision": decision, **measure(engine, prompts, sets, args.new_tokens, args.repeats, layers)}
            print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
            results.append(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"run": args.run, "dtype": args.dtype, "compiled": args.compile,
                       "new_tokens": args.new_tokens, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
