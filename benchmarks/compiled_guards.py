"""What checking the layer argument once at compile() instead of at every call buys: two compiled
int8 SmolLM2-135M engines in one process, one with dynamo's guards on the layer filtered out (what
`LayerStack.compile` does when every layer is alike), one keeping them, timed in interleaved pairs
(batch 1, a 256-token random prompt, 64 new tokens, skipping layers 10-17).

Reproduce (nothing else running):
    python benchmarks/compiled_guards.py --out benchmarks/results/compiled_guards_int8.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from firstskip import decoding
from firstskip.artifacts import write_json
from firstskip.engine import Engine, Sampling
from firstskip.modeling import FirstSkipModel


def compiled(dtype: str, filter_guards: bool) -> Engine:
    engine = FirstSkipModel.from_base("smollm2-135m", dtype=dtype).engine
    uniform = decoding._uniform
    if not filter_guards:
        decoding._uniform = lambda layers: False  # as for layers that differ: every guard stays
    try:
        engine.compile()
    finally:
        decoding._uniform = uniform
    return engine


def rate(engine: Engine, prompt: list[int]) -> float:
    pre = engine.prefill([prompt], [list(range(10, 18))], routers=False)
    start = time.perf_counter()
    engine.decode(pre, Sampling(max_new_tokens=65))
    return 64 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--pairs", type=int, default=9)
    parser.add_argument("--out")
    args = parser.parse_args()
    filtered, kept = compiled(args.dtype, True), compiled(args.dtype, False)
    prompt = torch.randint(0, 49152, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    pairs = [(rate(filtered, prompt), rate(kept, prompt)) for _ in range(args.pairs)]
    result = {"dtype": args.dtype, "threads": torch.get_num_threads(),
              "filtered_tok_s": statistics.median(a for a, _ in pairs),
              "kept_tok_s": statistics.median(b for _, b in pairs),
              "filtered_over_kept": statistics.median(a / b for a, b in pairs),
              "pairs": pairs}
    print(json.dumps({k: v for k, v in result.items() if k != "pairs"}))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
