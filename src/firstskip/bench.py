"""The timing harness: full model, FiRST and a physically pruned copy, side by side in one process.

Speed is never asserted in tests; it is measured here, with a warm-up first, the variants
interleaved round-robin so machine noise hits them alike, and medians over repeats. The pruned
copy is the physical limit of skipping a set of layers; ``first_over_pruned`` close to 1 says the
skipping itself costs nothing.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from firstskip.engine import Engine, Sampling
from firstskip.modeling import FirstSkipModel
from firstskip.skipping import pruned_copy


@dataclass
class Variant:
    name: str
    engine: Engine
    skip: list[list[int]] | None  # forced skip sets per row; None lets the routers decide


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(variant: Variant, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """One timed generation: time to first token (prefill), decode rate and end-to-end time."""
    engine, device = variant.engine, variant.engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    pre = engine.prefill(prompts, variant.skip)
    _sync(device)
    prefilled = time.perf_counter()
    gens = engine.decode(pre, Sampling(max_new_tokens=new_tokens))
    _sync(device)
    end = time.perf_counter()
    decoded = sum(g.new_tokens for g in gens) - len(gens)  # the first token comes from prefill
    return {
        "ttft_s": prefilled - start,
        "decode_tok_s": decoded / max(end - prefilled, 1e-9),
        "e2e_s": end - start,
        "kv_cache_mb": pre.cache.nbytes() / 2**20,
        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "skipped_layers": sorted({i for g in gens for i in g.skipped_layers}),
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("ttft_s", "decode_tok_s", "e2e_s", "kv_cache_mb", "peak_mem_mb"):
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = round(statistics.median(values), 5) if values else None
    out["skipped_layers"] = runs[-1]["skipped_layers"]
    out["decode_tok_s_runs"] = [round(r["decode_tok_s"], 3) for r in runs]
    return out


def run_bench(fsm: FirstSkipModel, skip: Sequence[int] | None, batch_size: int = 1, prompt_len: int = 256,
              new_tokens: int = 64, repeats: int = 5, warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """Measure full / FiRST / pruned on random prompts (speed does not depend on token values).

    With ``skip`` FiRST uses that forced set; without it the routers choose, and the pruned copy
    deletes the layers they chose for the first prompt.
    """
    generator = torch.Generator().manual_seed(seed)
    vocab = fsm.model.config.vocab_size
    prompts = torch.randint(0, vocab, (batch_size, prompt_len), generator=generator).tolist()
    first_skip = None if skip is None else [list(skip)] * batch_size
    if skip is None:
        skip = fsm.engine.prefill(prompts[:1]).skip[0].nonzero().squeeze(-1).tolist()
    with fsm.engine.controller.detached():
        pruned = pruned_copy(fsm.model, skip)
    config = fsm.config.replace(prefill="full")
    variants = [
        Variant("full", fsm.engine, [[]] * batch_size),
        Variant("first", fsm.engine, first_skip),
        Variant("pruned", Engine(pruned, config.replace(num_layers=config.num_layers - len(skip),
                                                          protected_layers=[0], decision="threshold")), None),
    ]
    for _ in range(warmup):
        for v in variants:
            time_once(v, prompts, min(new_tokens, 8))
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            runs[v.name].append(time_once(v, prompts, new_tokens))
    result: dict[str, Any] = {name: _summary(r) for name, r in runs.items()}
    result["first_over_full"] = round(result["first"]["decode_tok_s"] / result["full"]["decode_tok_s"], 4)
    result["first_over_pruned"] = round(result["first"]["decode_tok_s"] / result["pruned"]["decode_tok_s"], 4)
    result["ttft_first_over_full"] = round(result["first"]["ttft_s"] / result["full"]["ttft_s"], 4)
    result["setup"] = {
        "base_model": fsm.config.base_model, "skip": list(skip), "batch_size": batch_size,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
        "device": str(fsm.engine.device), "dtype": str(next(fsm.model.parameters()).dtype),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return result
