"""Whether the engine alone holds on to memory as requests come and go: the server's mixed workload
(serve_load.py's prompts, chat template) replayed through one running batch without HTTP, each
prompt prefilled, joined and decoded while at most 4 others run, with the KV pool sized for the
longest request from the start (as `serve --max-model-len` does). Resident size after every 25
requests, with the native caches bounded as `firstskip serve` bounds them
(`server.bound_native_caches`) or at torch's defaults.

Reproduce (nothing else running):
    python benchmarks/engine_memory.py --out benchmarks/results/engine_memory_int8.json
    python benchmarks/engine_memory.py --caches default --out benchmarks/results/engine_memory_int8_default_caches.json
"""

from __future__ import annotations

import argparse
import gc
import os
import time

from firstskip.engine import Sampling
from firstskip.modeling import FirstSkipModel
from firstskip.server import NATIVE_CACHES, bound_native_caches
from format_speed import report  # scripts beside this one
from serve_load import parse, prompts


def rss_mib() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/sec4s0")
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--caches", choices=["bounded", "default"], default="bounded",
                        help="oneDNN's and ideep's caches as `firstskip serve` sets them, or torch's defaults")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.requests < 50:
        parser.error(f"--requests must be at least 50 (the growth is read after the first 25), got {args.requests}")
    if args.caches == "bounded":
        bound_native_caches()
    fsm = FirstSkipModel.from_pretrained(args.run, dtype=args.dtype)
    engine = fsm.engine
    engine.compile()
    load = parse([])
    items = prompts(load.data, load.per_task, load.seed)[:args.requests]
    ids = [fsm.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for _, p in items]
    batch = engine.new_batch(8, max(map(len, ids)) + 64)
    samples, start = [], time.perf_counter()
    for i, prompt in enumerate(ids):
        engine.join(batch, engine.prefill([prompt]), Sampling(max_new_tokens=64), fsm.eos_token_ids)
        while len(batch.requests) >= 4:
            batch.step()
        if i % 25 == 0 or i == len(ids) - 1:
            gc.collect()
            samples.append((i + 1, rss_mib(), round(time.perf_counter() - start, 1)))
    first, middle, last = samples[1], samples[len(samples) // 2], samples[-1]
    report({"run": args.run, "dtype": args.dtype,
            "caches": {name: os.environ.get(name) for name in NATIVE_CACHES},
            "mib_per_request_after_25": round((last[1] - first[1]) / (last[0] - first[0]), 2),
            "mib_per_request_second_half": round((last[1] - middle[1]) / (last[0] - middle[0]), 2),
            "seconds": last[2], "rounds": samples}, args.out)


if __name__ == "__main__":
    main()
