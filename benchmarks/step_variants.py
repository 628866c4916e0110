"""What the compiled decode step's two latest changes buy: the engine as it is, against the same
engine with q/k/v and gate/up as separate products (`decoding._stack_projections` off), and against
the step calling torch's CPU flash attention for its one query (the step before `decoding._attend`).
Three compiled SmolLM2-135M engines in one process, timed in interleaved rounds (batch 1, a
256-token random prompt, 64 new tokens, skipping layers 10-17, and at full depth); each ratio is the
median of the per-round ratios against the engine as it is.

Reproduce (nothing else running):
    python benchmarks/step_variants.py --dtype int8 --out benchmarks/results/step_variants_int8.json
    python benchmarks/step_variants.py --dtype int4 --run runs/sec4s0 --out benchmarks/results/step_variants_int4_lora.json
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from firstskip import decoding
from firstskip.engine import Engine
from firstskip.modeling import FirstSkipModel
from format_speed import report, timed  # a script beside this one


def load(reference: str, dtype: str) -> Engine:
    load = FirstSkipModel.from_pretrained if reference.startswith(("runs/", "/", ".")) else FirstSkipModel.from_base
    return load(reference, dtype=dtype).engine


def unstacked(reference: str, dtype: str) -> Engine:
    stack = decoding._stack_projections
    decoding._stack_projections = lambda layer: None
    try:
        engine = load(reference, dtype)
    finally:
        decoding._stack_projections = stack
    engine.compile()
    return engine


def flash_attention(reference: str, dtype: str) -> Engine:
    """The step compiled from a copy of `decoding` whose ``_attend`` always calls torch's kernel (a
    module of its own, so the engines' programs never share a global)."""
    spec = importlib.util.spec_from_file_location("decoding_flash", decoding.__file__)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module._attend = lambda q, keys, values, mask, scale: F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale)
    engine = load(reference, dtype)
    stack = engine.stack

    def compile_flash() -> None:  # in place of `LayerStack.compile`; `Engine.compile` warms it up as usual
        step = torch.compile(module.llama_layer, dynamic=True, options={"guard_filter_fn": decoding._skip_layer_guards})
        stack.layers = [functools.partial(step, layer) for layer in stack.modules]

    stack.compile = compile_flash
    engine.compile()
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--run", default="smollm2-135m", help="a run folder (its LoRA) or a model name")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out")
    args = parser.parse_args()
    now = load(args.run, args.dtype)
    now.compile()
    engines = {"now": now, "unstacked": unstacked(args.run, args.dtype),
               "flash_attention": flash_attention(args.run, args.dtype)}
    prompt = torch.randint(0, 49152, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    sets = {"skip10-17": list(range(10, 18)), "full": []}
    for engine in engines.values():
        timed(engine, prompt, sets["full"])
    rounds = [{f"{name}_{label}": timed(engine, prompt, skip)[0] for label, skip in sets.items()
               for name, engine in engines.items()} for _ in range(args.rounds)]
    result = {"dtype": args.dtype, "run": args.run, "threads": torch.get_num_threads(),
              "tok_s": {key: round(statistics.median(r[key] for r in rounds), 1) for key in rounds[0]},
              "now_over": {f"{name}_{label}": round(statistics.median(r[f"now_{label}"] / r[f"{name}_{label}"]
                                                                      for r in rounds), 3)
                           for label in sets for name in engines if name != "now"},
              "rounds": rounds}
    report(result, args.out)


if __name__ == "__main__":
    main()
