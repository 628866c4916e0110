"""Input-agnostic baselines: each one picks a fixed skip set of k layers for every input.

A baseline is one row of `BASELINES` (name -> function of a `BaselineContext` and k), so evaluation
loops over the registry and the CLI's choices are its keys. Every function returns exactly k sorted
skippable layer indices and never a protected layer, so baselines and FiRST compare at an equal
budget (`equal_budget_k` turns FiRST's per-example skip counts into that budget).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from firstskip.errors import FirstSkipError
from firstskip.families import decoder_layers


@dataclass(frozen=True)
class BaselineContext:
    """What a baseline may know about a model: its depth, its protected layers, and calibration data."""

    num_layers: int
    protected: tuple[int, ...]  # never skipped; callers default to (0, num_layers - 1)
    seed: int = 0
    block_influence: list[float] | None = None  # ShortGPT BI per layer, when computed

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise FirstSkipError(f"num_layers must be at least 1, got {self.num_layers}")
        outside = [i for i in self.protected if not 0 <= i < self.num_layers]
        if outside:
            raise FirstSkipError(f"protected layers {outside} are outside 0..{self.num_layers - 1}")
        if self.block_influence is not None and len(self.block_influence) != self.num_layers:
            raise FirstSkipError(
                f"block_influence has {len(self.block_influence)} values for {self.num_layers} layers"
            )


def skippable(ctx: BaselineContext) -> list[int]:
    """The layers a baseline may skip, in ascending order."""
    return [i for i in range(ctx.num_layers) if i not in ctx.protected]


def _checked(ctx: BaselineContext, k: int) -> list[int]:
    """The skippable layers, after checking that k of them can be skipped."""
    layers = skippable(ctx)
    if not 0 <= k <= len(layers):
        raise FirstSkipError(
            f"cannot skip k={k} layers: only {len(layers)} of {ctx.num_layers} are skippable "
            f"(protected: {list(ctx.protected)})"
        )
    return layers


def _round_half_up(numerator: int, denominator: int) -> int:
    """floor(numerator / denominator + 0.5) in exact integers: no float ties, no banker's rounding."""
    return (2 * numerator + denominator) // (2 * denominator)


def random_k(ctx: BaselineContext, k: int) -> list[int]:
    """k skippable layers drawn with `ctx.seed`, so a run is reproducible and seeds give spread."""
    return sorted(random.Random(ctx.seed).sample(_checked(ctx, k), k))


def last_k(ctx: BaselineContext, k: int) -> list[int]:
    """The k skippable layers nearest the top, where many models are most redundant."""
    layers = _checked(ctx, k)
    return layers[len(layers) - k:]


def shortgpt(ctx: BaselineContext, k: int) -> list[int]:
    """ShortGPT: the k skippable layers with the lowest Block Influence (ties go to the lower layer)."""
    layers = _checked(ctx, k)
    bi = ctx.block_influence
    if bi is None:
        raise FirstSkipError("shortgpt needs block influence: compute block_influence(model, batches)")
    return sorted(sorted(layers, key=lambda i: (bi[i], i))[:k])


def _even_grid(num_layers: int, n: int) -> list[int]:
    """n layers evenly spaced from 0 to num_layers - 1, each rounded half up (ULS's keep set)."""
    if n < 2:
        return [0][:n]
    return [_round_half_up(i * (num_layers - 1), n - 1) for i in range(n)]


def uls(ctx: BaselineContext, k: int) -> list[int]:
    """Unified Layer Skipping (Liu et al. 2024), evenly spaced: keep n = L - k layers, 0 and L - 1 included.

    The kept layers are round(linspace(0, L - 1, n)) with halves rounded up. With the default protected
    layers (0, L - 1) these sit on the grid and exactly k layers fall off it. A protected layer off the
    grid is kept in place of the nearest skippable grid layer (ties: the lower one), so exactly k
    layers are still skipped and spacing stays as even as the protection allows.
    """
    layers = _checked(ctx, k)
    grid = _even_grid(ctx.num_layers, ctx.num_layers - k)
    kept = [i for i in grid if i not in ctx.protected]
    for p in sorted(set(ctx.protected) - set(grid)):
        kept.remove(min(kept, key=lambda i: (abs(i - p), i)))
    return [i for i in layers if i not in kept]


def uls_released(ctx: BaselineContext, k: int) -> list[int]:
    """Unified Layer Skipping as in its released code: interval = int(L / (n - 1)), keep idx % interval == 0.

    The raw rule keeps a number of layers that depends on L and n, not n itself (interval = 1 keeps
    every layer). We keep exactly n = L - k layers, filling the keep slots in this order: protected
    layers, layer L - 1, the multiples of interval bottom-up, then (only if those run out) the other
    layers bottom-up. Extra multiples are therefore trimmed from the top, as the released code's
    truncation to the first n - 1 multiples does. Consequence: for mild budgets (n - 1 > L / 2, so
    interval = 1) the kept layers are 0..n-2 and L - 1, i.e. one contiguous block just below the top
    is skipped, which is last-k with the very top layer kept, not an even spread.
    """
    layers = _checked(ctx, k)
    n = ctx.num_layers - k
    interval = ctx.num_layers // (n - 1) if n > 1 else ctx.num_layers  # == int(L / (n - 1)) for ints
    multiples = [i for i in range(ctx.num_layers) if i % interval == 0]
    order = [*ctx.protected, ctx.num_layers - 1, *multiples, *range(ctx.num_layers)]
    kept = list(dict.fromkeys(order))[:n]  # dict.fromkeys: first occurrence wins, order kept
    return [i for i in layers if i not in kept]


Baseline = Callable[[BaselineContext, int], list[int]]

BASELINES: dict[str, Baseline] = {
    "random": random_k,
    "last": last_k,
    "shortgpt": shortgpt,
    "uls": uls,
    "uls-released": uls_released,
}


def static_skip_set(name: str, ctx: BaselineContext, k: int) -> list[int]:
    """The skip set of the baseline called `name`; evaluation and the CLI go through here."""
    if name not in BASELINES:
        raise FirstSkipError(f"unknown baseline {name!r}; choose one of: {', '.join(BASELINES)}")
    return BASELINES[name](ctx, k)


class _CosineMeter:
    """Running sums of per-token cos(layer input, layer output) over real tokens, one per layer.

    Forward hooks see each layer's own output, before the final norm that transformers applies to
    the last entry of `hidden_states`, so the top layer's BI is measured like every other layer's.
    """

    def __init__(self, num_layers: int) -> None:
        self.sums, self.counts = [0.0] * num_layers, [0.0] * num_layers
        self.mask = torch.ones(1)  # the current batch's attention mask, as floats

    def hook(self, index: int) -> Callable:
        def record(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            self.sums[index] += (cos * self.mask).sum().item()
            self.counts[index] += self.mask.sum().item()

        return record

    def influence(self) -> list[float]:
        if not all(self.counts):
            raise FirstSkipError("block_influence needs at least one batch with a non-padding token")
        return [1.0 - s / c for s, c in zip(self.sums, self.counts)]


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> list[float]:
    """ShortGPT Block Influence per layer: BI_l = 1 - mean over real tokens of cos(h_l, h_{l+1}).

    h_l enters layer l and h_{l+1} leaves it, both caught by forward hooks on the decoder layers, so
    this works for every family. The mean pools every non-padding token of every batch. Dropout is
    off while measuring; the model's train/eval mode is restored afterwards.
    """
    layers = decoder_layers(model)
    meter = _CosineMeter(len(layers))
    handles = [layer.register_forward_hook(meter.hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            batch = {name: t.to(device) for name, t in batch.items()}
            meter.mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).float()
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return meter.influence()


def equal_budget_k(skip_counts: Sequence[int]) -> int:
    """A static baseline's k at FiRST's budget: the mean per-example skip count, halves rounded up."""
    if not skip_counts:
        raise FirstSkipError("equal_budget_k needs at least one per-example skip count")
    return math.floor(sum(skip_counts) / len(skip_counts) + 0.5)
