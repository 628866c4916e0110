"""Where a decode step's time goes: torch's profiler over 32 steps of SmolLM2-135M, batch 1, a
256-token random prompt, skipping layers 10-17 (the operators with the most self time).

Reproduce (nothing else running):
    python benchmarks/profile_step.py --dtype int8 --compile
    python benchmarks/profile_step.py --dtype int4 --compile --run runs/sec4s0
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import profile

from firstskip.engine import Sampling
from firstskip.modeling import FirstSkipModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--run", help="a trained run instead of the base model (its LoRA, in int4 beside the weights)")
    args = parser.parse_args()
    fsm = (FirstSkipModel.from_pretrained(args.run, dtype=args.dtype) if args.run
           else FirstSkipModel.from_base("smollm2-135m", dtype=args.dtype))
    engine = fsm.engine
    if args.compile:
        engine.compile()
    prompt = torch.randint(0, 49152, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    skip = [list(range(10, 18))]
    for _ in range(2):  # warm-up
        engine.decode(engine.prefill([prompt], skip, routers=False), Sampling(max_new_tokens=65))
    pre = engine.prefill([prompt], skip, routers=False)
    with profile() as prof:
        engine.decode(pre, Sampling(max_new_tokens=33))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
