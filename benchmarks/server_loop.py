"""The server's admission loop in one process, without HTTP: the mixed workload's prompts queue,
up to 8 run at a time, newcomers prefill between decode steps (2 at a time while others run, as
`firstskip serve` does), and every decode step is timed. Separates what the engine spends on a
workload from what the HTTP side adds, and shows stalls (a step over a second: a compile).

Reproduce (nothing else running; "off" keeps every layer, as ``serve --threshold 0``):
    python benchmarks/server_loop.py --run runs/sec4s0 --mode first --requests 40
    python benchmarks/server_loop.py --run runs/sec4s0 --mode off --requests 40
"""

from __future__ import annotations

import argparse
import collections
import json
import time

from firstskip.data import encode_prompt
from firstskip.engine import Sampling
from firstskip.modeling import FirstSkipModel
from firstskip.server import PREFILLS_PER_STEP
from serve_load import prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--mode", choices=("first", "off"), default="first")
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    fsm = FirstSkipModel.from_pretrained(args.run, dtype=args.dtype)
    engine = fsm.engine
    engine.compile()
    config = fsm.config.replace(threshold=0.0) if args.mode == "off" else None
    queue = collections.deque(encode_prompt(fsm.tokenizer, p) for _, p in
                              prompts(["samsum", "xsum", "boolq"], 200, 0)[:args.requests])
    batch, steps, prefill_s, start = engine.new_batch(args.batch), [], 0.0, time.perf_counter()
    while queue or batch.requests:
        for _ in range(min(args.batch - len(batch.requests), PREFILLS_PER_STEP if batch.requests else args.batch)):
            if queue:
                began = time.perf_counter()
                engine.join(batch, engine.prefill([queue.popleft()], config=config),
                            Sampling(max_new_tokens=args.max_tokens), fsm.eos_token_ids)
                prefill_s += time.perf_counter() - began
        if batch.requests:
            rows, began = len(batch.requests), time.perf_counter()
            batch.step()
            steps.append((rows, time.perf_counter() - began))
    decode_s, tokens = sum(s for _, s in steps), sum(r for r, _ in steps)
    print(json.dumps({"mode": args.mode, "dtype": args.dtype, "requests": args.requests,
                      "prefill_s": round(prefill_s, 1), "decode_s": round(decode_s, 1), "steps": len(steps),
                      "rows_per_step": round(tokens / len(steps), 2), "decode_tokens": tokens,
                      "ms_per_row_step": round(1000 * decode_s / tokens, 1),
                      "median_step_ms": round(1000 * sorted(s for _, s in steps)[len(steps) // 2], 1),
                      "slow_steps": [[i, rows, round(s, 1)] for i, (rows, s) in enumerate(steps) if s > 1],
                      "wall_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
