"""What owning the decode loop saves: the engine's loop against transformers' own forward per step.

Reproduce (part of benchmarks/engine_speed.sh):
    python benchmarks/decode_overhead.py --out benchmarks/results/decode_overhead.json

Two models: a 30-layer Llama of hidden size 64 (almost no arithmetic, so a step is all overhead)
and SmolLM2-135M. Each decodes 64 tokens after a 256-token prompt, batch 1, fp32, every layer:
(a) the model's forward with a DynamicCache, one token per call (what the engine did before it
owned its loop, and what plain transformers does), (b) `Engine.generate`. The two are interleaved
per repeat; the ratio is the median of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from firstskip.engine import Sampling
from firstskip.families import cache_kwargs
from firstskip.modeling import FirstSkipModel

PROMPT, NEW = 256, 64


@torch.inference_mode()
def forward_loop(model, ids: torch.Tensor) -> float:
    """Seconds per decode step through the model's own forward."""
    cache = DynamicCache()
    logits = model(input_ids=ids, **cache_kwargs(model, cache), logits_to_keep=1).logits[:, -1]
    start = time.perf_counter()
    for _ in range(NEW - 1):
        token = logits.argmax(-1, keepdim=True)
        logits = model(input_ids=token, **cache_kwargs(model, cache), logits_to_keep=1).logits[:, -1]
    return (time.perf_counter() - start) / (NEW - 1)


def engine_loop(fsm: FirstSkipModel, ids: torch.Tensor) -> float:
    engine = fsm.engine
    pre = engine.prefill(ids.tolist(), [[]], routers=False)
    start = time.perf_counter()
    engine.decode(pre, Sampling(max_new_tokens=NEW))
    return (time.perf_counter() - start) / (NEW - 1)


def measure(name: str, fsm: FirstSkipModel, repeats: int) -> dict:
    ids = torch.randint(0, fsm.model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with fsm.engine.controller.detached():
        forward_loop(fsm.model, ids)  # warm-up
    engine_loop(fsm, ids)
    runs = []
    for _ in range(repeats):
        with fsm.engine.controller.detached():
            a = forward_loop(fsm.model, ids)
        runs.append((a, engine_loop(fsm, ids)))
    row = {"model": name, "forward_ms_per_step": round(1000 * statistics.median(a for a, _ in runs), 2),
           "engine_ms_per_step": round(1000 * statistics.median(b for _, b in runs), 2),
           "engine_over_forward_speed": round(statistics.median(a / b for a, b in runs), 3)}
    row["forward_tok_s"] = round(1000 / row["forward_ms_per_step"], 1)
    row["engine_tok_s"] = round(1000 / row["engine_ms_per_step"], 1)
    print(row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=30,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=49152)
    torch.manual_seed(0)
    tiny = FirstSkipModel.wrap(AutoModelForCausalLM.from_config(config).eval())
    rows = [measure("llama-30x64 (overhead only)", tiny, args.repeats),
            measure("smollm2-135m", FirstSkipModel.from_base("smollm2-135m"), args.repeats)]
    result = {"rows": rows, "prompt": PROMPT, "new_tokens": NEW, "threads": torch.get_num_threads(),
              "torch": torch.__version__}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
