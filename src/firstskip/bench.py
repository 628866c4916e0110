"""The timing harness: full model, FiRST, a physically pruned copy and, where installed, llama.cpp,
side by side in one process.

Speed is never asserted in tests; it is measured here: a warm-up first, then repeats in which the
variants run one after another (interleaved), and every ratio is the median of the per-repeat
ratios, so machine noise that hits one repeat hits both sides of its ratio. A ratio is checked
against its physical bound: skipping k of L layers cannot decode more than L/(L-k) times faster,
so a ratio above that is reported as a measurement fault (busy cores, a warm-up missing), never as
a result. KV bytes are the engine's pool as allocated; peak memory on CPU is the resident size of a
separate process per variant (``memory=True``), since one process holds every variant at once.
"""

from __future__ import annotations

import multiprocessing
import platform
import resource
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from firstskip import llamacpp
from firstskip.engine import Engine, Sampling
from firstskip.errors import FirstSkipError
from firstskip.llamacpp import LlamaCpp
from firstskip.modeling import FirstSkipModel
from firstskip.quantize import weight_format
from firstskip.skipping import pruned_copy


@dataclass
class Variant:
    name: str
    engine: Engine | LlamaCpp
    skip: list[list[int]] | None  # forced skip sets per row; None lets the routers decide
    routers: bool = False  # whether prefill runs the routers (only FiRST's own decisions need them)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(variant: Variant, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """One timed generation: time to first token (prefill), decode rate and end-to-end time."""
    if isinstance(variant.engine, LlamaCpp):
        return variant.engine.time_once(prompts[0], new_tokens)
    engine, device = variant.engine, variant.engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    pre = engine.prefill(prompts, variant.skip, routers=variant.routers)
    _sync(device)
    prefilled = time.perf_counter()
    batch = engine.new_batch(len(prompts), max(len(p) for p in prompts) + new_tokens)
    gens = engine.decode(pre, Sampling(max_new_tokens=new_tokens), batch=batch)
    _sync(device)
    end = time.perf_counter()
    decoded = sum(g.new_tokens for g in gens) - len(gens)  # the first token comes from prefill
    return {
        "ttft_s": prefilled - start,
        "decode_tok_s": decoded / max(end - prefilled, 1e-9),
        "e2e_s": end - start,
        "kv_cache_mb": batch.pool.nbytes() / 2**20,
        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "skip_sets": [g.skipped_layers for g in gens],
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("ttft_s", "decode_tok_s", "e2e_s", "kv_cache_mb", "peak_mem_mb"):
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = round(statistics.median(values), 5) if values else None
    sets = runs[-1]["skip_sets"]
    out["skipped_layers"] = sets[0] if all(s == sets[0] for s in sets) else sets
    out["decode_tok_s_runs"] = [round(r["decode_tok_s"], 3) for r in runs]
    return out


def paired_ratio(runs: dict[str, list[dict[str, Any]]], top: str, bottom: str, key: str = "decode_tok_s") -> float:
    """Median over repeats of ``top / bottom`` measured in the same repeat."""
    return round(statistics.median(a[key] / b[key] for a, b in zip(runs[top], runs[bottom])), 4)


def speed_bound(num_layers: int, skip_sets: Sequence[Sequence[int]]) -> float:
    """The most a batch can gain over the full model: its rows skip at most max k of L layers."""
    k = max((len(s) for s in skip_sets), default=0)
    return round(num_layers / (num_layers - k), 4)


def run_bench(fsm: FirstSkipModel, skip: Sequence[int] | None, batch_size: int = 1, prompt_len: int = 256,
              new_tokens: int = 64, repeats: int = 5, warmup: int = 1, seed: int = 0,
              prompts: list[list[int]] | None = None, memory: str | None = None,
              llamacpp: Sequence[str] = (), compile: bool = False) -> dict[str, Any]:
    """Measure full / FiRST / pruned on random prompts (speed does not depend on token values) or
    on ``prompts`` (real ones, whose skip sets the routers choose).

    With ``skip`` FiRST uses that forced set; without it the routers choose per row, and the pruned
    copy (only when every row chose the same set) deletes those layers. ``memory``: the model
    reference (``--model`` or ``--run``) to measure each variant's peak resident size in a
    process of its own. ``llamacpp``: GGUF types (``Q8_0`` ...) llama.cpp runs the base model at,
    each a variant beside the others (batch 1; see `firstskip.llamacpp`). ``compile``: the engines
    decode through compiled layer steps (`Engine.compile`, before the warm-up).
    """
    if prompts is None:
        generator = torch.Generator().manual_seed(seed)
        vocab = fsm.model.config.vocab_size
        prompts = torch.randint(0, vocab, (batch_size, prompt_len), generator=generator).tolist()
    batch_size = len(prompts)
    first_skip = None if skip is None else [list(skip)] * batch_size
    chosen = fsm.engine.prefill(prompts, first_skip).skip
    sets = [row.nonzero().squeeze(-1).tolist() for row in chosen]
    shared = sets[0] if all(s == sets[0] for s in sets) else None
    variants = [Variant("full", fsm.engine, [[]] * batch_size), Variant("first", fsm.engine, first_skip, skip is None)]
    if shared is not None:
        variants.append(Variant("pruned", _pruned_engine(fsm, shared), None))
    engines = {id(v.engine): v.engine for v in variants}.values()  # full and FiRST share one
    compiled = compile and all([engine.compile() for engine in engines])
    variants += [_llamacpp_variant(fsm, kind, prompts, new_tokens) for kind in llamacpp]
    for _ in range(warmup):
        for v in variants:
            time_once(v, prompts, min(new_tokens, 8))
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            runs[v.name].append(time_once(v, prompts, new_tokens))
    result: dict[str, Any] = {name: _summary(r) for name, r in runs.items()}
    bound = speed_bound(fsm.config.num_layers, sets)
    ratios = {"first_over_full": paired_ratio(runs, "first", "full")}
    if shared is not None:
        ratios["pruned_over_full"] = paired_ratio(runs, "pruned", "full")
        ratios["first_over_pruned"] = paired_ratio(runs, "first", "pruned")
    ours = [name for name in runs if not name.startswith("llamacpp")]
    ratios.update({f"{name}_over_{kind}": paired_ratio(runs, name, kind) for kind in runs
                   if kind.startswith("llamacpp") for name in ours})
    result.update(ratios)
    result["bound"] = bound
    result["faults"] = [f"{name} {value:.3f} is above the bound {bound:.3f}: a measurement fault (busy cores?)"
                        for name, value in ratios.items() if name.endswith("_over_full") and value > bound]
    result["ttft_first_over_full"] = paired_ratio(runs, "first", "full", "ttft_s")
    if memory is not None:
        for v in variants:
            if not isinstance(v.engine, LlamaCpp):
                result[v.name]["peak_rss_mb"] = peak_rss(memory, weight_format(fsm.model), v.name, shared or [],
                                                         prompts, new_tokens)
    result["setup"] = {
        "llamacpp_ggufs": {v.name: v.engine.gguf.name for v in variants if isinstance(v.engine, LlamaCpp)},
        "base_model": fsm.config.base_model, "skip": list(skip) if skip is not None else shared,
        "skip_sets": sets, "batch_size": batch_size, "prompt_lens": sorted({len(p) for p in prompts}),
        "new_tokens": new_tokens, "repeats": repeats, "device": str(fsm.engine.device),
        "dtype": weight_format(fsm.model), "compiled": compiled, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return result


def _llamacpp_variant(fsm: FirstSkipModel, kind: str, prompts: list[list[int]], new_tokens: int) -> Variant:
    if not llamacpp.available():
        raise FirstSkipError("--llamacpp needs llama-cpp-python: run benchmarks/setup_llamacpp.sh")
    if len(prompts) != 1:
        raise FirstSkipError("--llamacpp times batch 1 only; drop --batch-size")
    gguf = llamacpp.gguf_for(fsm.config.base_model, kind)
    return Variant(f"llamacpp_{kind}", LlamaCpp(gguf, torch.get_num_threads(), len(prompts[0]) + new_tokens + 8), None)


def _pruned_engine(fsm: FirstSkipModel, skip: Sequence[int]) -> Engine:
    with fsm.engine.controller.detached():
        pruned = pruned_copy(fsm.model, skip)
    config = fsm.config.replace(prefill="full")
    return Engine(pruned, config.replace(num_layers=config.num_layers - len(skip), protected_layers=[0],
                                         decision="threshold"))


def peak_rss(reference: str, dtype: str, variant: str, skip: Sequence[int], prompts: list[list[int]],
             new_tokens: int) -> float:
    """Peak resident MB of one variant generating once, in a fresh process that loads the model,
    makes the variant, frees what it does not use and only then starts counting."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        job = pool.submit(_rss_child, reference, dtype, variant, list(skip), prompts, new_tokens, torch.get_num_threads())
        return job.result()


def _rss_child(reference: str, dtype: str, variant: str, skip: list[int], prompts: list[list[int]],
               new_tokens: int, threads: int) -> float:
    import gc
    from pathlib import Path

    torch.set_num_threads(threads)
    is_run = (Path(reference) / "routers.safetensors").is_file()
    load = FirstSkipModel.from_pretrained if is_run else FirstSkipModel.from_base
    fsm = load(reference, dtype=dtype)
    if variant == "pruned":
        v = Variant(variant, _pruned_engine(fsm, skip), None)
        del fsm  # the skipped layers' weights go with it; the copy shares only the kept ones
    else:
        routed = variant == "first" and not skip
        v = Variant(variant, fsm.engine, None if routed else [skip if variant == "first" else []] * len(prompts), routed)
    gc.collect()
    _reset_peak_rss()
    time_once(v, prompts, new_tokens)
    return _peak_rss_mb()


def _reset_peak_rss() -> None:
    """Linux resets a process's peak resident size (VmHWM) on this write; elsewhere the peak counts
    from the start of the process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        return round(int(hwm.split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
