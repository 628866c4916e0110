"""What compiling the decode step costs: once per process, and for a skip set never seen before.

Reproduce (part of benchmarks/compiled.sh):
    python benchmarks/compile_cost.py --dtype int8 --out benchmarks/results/compile_cost_int8.json

SmolLM2-135M, batch 1, a 256-token random prompt, 16 new tokens. `Engine.compile()` is timed
(it compiles and runs its warm-up generations); then each of several skip sets, none seen before,
is generated twice: the first run of a set pays any compiling, the second does not, so their
difference is what a new set costs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from firstskip.artifacts import write_json
from firstskip.engine import Sampling
from firstskip.modeling import FirstSkipModel

SETS = [[10, 11, 12, 13, 14, 15, 16, 17], [3, 4, 5], [2, 7, 19, 23], list(range(1, 29, 2))]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    engine = FirstSkipModel.from_base("smollm2-135m", dtype=args.dtype).engine
    prompt = torch.randint(0, 49152, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    result = {"dtype": args.dtype, "threads": torch.get_num_threads(), "compile_s": round(timed(engine.compile), 2),
              "sets": []}
    for skip in SETS:
        run = lambda: engine.generate([prompt], Sampling(max_new_tokens=16), skip=[skip])  # noqa: E731
        first, again = timed(run), timed(run)
        result["sets"].append({"skip": skip, "first_s": round(first, 3), "again_s": round(again, 3),
                               "new_set_cost_s": round(first - again, 3)})
    print(json.dumps(result))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
