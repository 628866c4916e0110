"""How fast firstskip prefills one prompt alone: `engine.prefill` of a random prompt (batch 1, the
run's routers deciding, and with a forced empty skip set and no routers), beside the model's own
forward, medians of 5 after one warm-up. The serving comparison with vLLM (benchmarks/README.md,
"Serving against vLLM") asks whether prompt processing itself is the gap.

Reproduce (nothing else running):
    python benchmarks/prefill_speed.py --run runs/sec4s0 --out benchmarks/results/prefill_speed_float32.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from firstskip.artifacts import write_json
from firstskip.modeling import FirstSkipModel


def median_s(run: Callable[[], object], repeats: int = 5) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--out")
    args = parser.parse_args()
    fsm = FirstSkipModel.from_pretrained(args.run, dtype=args.dtype)
    engine = fsm.engine
    ids = torch.randint(0, fsm.model.config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        forward = median_s(lambda: fsm.model(torch.tensor([ids]), use_cache=True))
    routed = median_s(lambda: engine.prefill([ids], None))
    forced = median_s(lambda: engine.prefill([ids], [[]], routers=False))
    result = {"run": args.run, "dtype": args.dtype, "tokens": args.tokens, "threads": torch.get_num_threads(),
              "model_forward_s": round(forward, 4), "prefill_routers_s": round(routed, 4),
              "prefill_no_routers_s": round(forced, 4), "prefill_tokens_per_s": round(args.tokens / routed, 1)}
    print(json.dumps(result))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
