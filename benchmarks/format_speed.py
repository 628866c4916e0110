"""Which weight format decodes a trained run fastest: one run loaded in each format (int8 with its
LoRA merged, int4 with the LoRA beside), compiled, in one process, timed in interleaved rounds
(batch 1, a 256-token random prompt, 64 new tokens, skipping layers 10-17): decode tok/s and time
to first token, and each format's per-round ratio to the first one named. This is what
`quantize.default_format` rests on.

Reproduce (nothing else running):
    python benchmarks/format_speed.py --run runs/sec4s0 --out benchmarks/results/format_speed_sec4s0.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from firstskip.artifacts import write_json
from firstskip.engine import Engine, Sampling
from firstskip.modeling import FirstSkipModel


def timed(engine: Engine, prompt: list[int], skip: list[int]) -> tuple[float, float]:
    """(decode tok/s, time to first token in s) of one generation."""
    start = time.perf_counter()
    pre = engine.prefill([prompt], [skip], routers=False)
    prefilled = time.perf_counter()
    engine.decode(pre, Sampling(max_new_tokens=65))
    return 64 / (time.perf_counter() - prefilled), prefilled - start


def report(result: dict, out: str | None) -> None:
    """Print the summary (the rounds left out) and write the whole result to ``out``."""
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}))
    if out:
        write_json(out, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/sec4s0")
    parser.add_argument("--formats", default="int8,int4")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out")
    args = parser.parse_args()
    engines = {fmt: FirstSkipModel.from_pretrained(args.run, dtype=fmt).engine for fmt in args.formats.split(",")}
    for engine in engines.values():
        engine.compile()
    prompt = torch.randint(0, 49152, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    skip = list(range(10, 18))
    for engine in engines.values():
        timed(engine, prompt, skip)
    rounds = [{fmt: timed(engine, prompt, skip) for fmt, engine in engines.items()} for _ in range(args.rounds)]
    first = next(iter(engines))
    result = {"run": args.run, "skip": skip, "threads": torch.get_num_threads(),
              "decode_tok_s": {f: round(statistics.median(r[f][0] for r in rounds), 1) for f in engines},
              "ttft_s": {f: round(statistics.median(r[f][1] for r in rounds), 3) for f in engines},
              f"decode_over_{first}": {f: round(statistics.median(r[f][0] / r[first][0] for r in rounds), 3)
                                       for f in engines},
              "rounds": rounds}
    report(result, args.out)


if __name__ == "__main__":
    main()
