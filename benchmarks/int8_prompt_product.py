"""What scaling a prompt's int8 products at their outputs buys over scaling every weight first
(`Int8Linear.dense_product` against ``F.linear(rows, dequantized())``): SmolLM2-135M int8 prefills
of random prompts of several lengths, batch 1, no routers, the two products switched in
interleaved pairs in one process; each ratio is the median of the per-pair ratios.

Reproduce (nothing else running):
    python benchmarks/int8_prompt_product.py --out benchmarks/results/int8_prompt_product.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from firstskip.modeling import FirstSkipModel
from firstskip.quantize import Int8Linear
from format_speed import report  # a script beside this one


def scaled_weights(self: Int8Linear, rows: torch.Tensor) -> torch.Tensor:
    return F.linear(rows, self.dequantized())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="100,321,700")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--out")
    args = parser.parse_args()
    engine = FirstSkipModel.from_base("smollm2-135m", dtype="int8").engine
    now = Int8Linear.dense_product

    def prefill_s(prompt: list[int], product) -> float:
        Int8Linear.dense_product = product
        start = time.perf_counter()
        engine.prefill([prompt], [[]], routers=False)
        return time.perf_counter() - start

    result = {"threads": torch.get_num_threads(), "lengths": {}, "rounds": {}}
    for length in map(int, args.lengths.split(",")):
        prompt = torch.randint(0, 49152, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        prefill_s(prompt, now), prefill_s(prompt, scaled_weights)
        pairs = [(prefill_s(prompt, now), prefill_s(prompt, scaled_weights)) for _ in range(args.pairs)]
        result["lengths"][length] = {"now_ms": round(statistics.median(a for a, _ in pairs) * 1e3, 1),
                                     "scaled_weights_ms": round(statistics.median(b for _, b in pairs) * 1e3, 1),
                                     "speedup": round(statistics.median(b / a for a, b in pairs), 3)}
        result["rounds"][length] = pairs
    Int8Linear.dense_product = now
    report(result, args.out)


if __name__ == "__main__":
    main()
