"""Baseline skip sets on hand-checked cases; Block Influence on models whose BI is known by construction."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from firstskip.baselines import (
    BASELINES,
    BaselineContext,
    block_influence,
    equal_budget_k,
    last_k,
    random_k,
    shortgpt,
    skippable,
    static_skip_set,
    uls,
    uls_released,
)
from firstskip.errors import FirstSkipError
from firstskip.families import FAMILIES, decoder_layers

CTX = BaselineContext(num_layers=30, protected=(0, 29))


def test_skippable_excludes_protected():
    assert skippable(CTX) == list(range(1, 29))


@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize("k", [0, 1, 6, 14, 28])
def test_every_baseline_skips_exactly_k_unprotected_layers(name, k):
    ctx = BaselineContext(30, (0, 29), block_influence=[float(i % 7) for i in range(30)])
    chosen = static_skip_set(name, ctx, k)
    assert chosen == sorted(set(chosen)) and len(chosen) == k
    assert not set(chosen) & {0, 29}


@pytest.mark.parametrize("name", list(BASELINES))
@pytest.mark.parametrize("k", [-1, 29])
def test_k_beyond_skippable_layers_is_an_error(name, k):
    ctx = BaselineContext(30, (0, 29), block_influence=[0.0] * 30)
    with pytest.raises(FirstSkipError, match="skippable"):
        static_skip_set(name, ctx, k)


def test_unknown_baseline_lists_the_registry():
    with pytest.raises(FirstSkipError, match="random, last, shortgpt, uls, uls-released"):
        static_skip_set("laco", CTX, 3)


def test_random_k_is_fixed_by_seed_and_varies_across_seeds():
    draws = {seed: random_k(BaselineContext(30, (0, 29), seed=seed), 5) for seed in range(3)}
    assert draws[0] == random_k(BaselineContext(30, (0, 29), seed=0), 5)
    assert len({tuple(d) for d in draws.values()}) == 3


def test_last_k_takes_the_top_skippable_layers():
    assert last_k(CTX, 4) == [25, 26, 27, 28]
    assert last_k(BaselineContext(30, (0, 27, 29)), 3) == [25, 26, 28]
    assert last_k(CTX, 0) == []


def test_shortgpt_picks_lowest_influence_and_needs_it():
    bi = [0.0, 0.5, 0.1, 0.9, 0.1, 0.3] + [1.0] * 23 + [0.0]  # layers 0 and 29 lowest but protected
    ctx = BaselineContext(30, (0, 29), block_influence=bi)
    assert shortgpt(ctx, 2) == [2, 4]
    assert shortgpt(ctx, 3) == [2, 4, 5]
    with pytest.raises(FirstSkipError, match="block_influence"):
        shortgpt(CTX, 2)


# ULS, evenly spaced: keep round_half_up(i * 29 / (n - 1)) for i = 0..n-1, skip the rest.
# k=6, n=24, step 29/23 = 1.261: kept 0 1 3 4 5 6 8 9 10 11 13 14 15 16 18 19 20 21 23 24 25 26 28 29
# k=14, n=16, step 29/15 = 1.933: kept 0 2 4 6 8 10 12 14 15 17 19 21 23 25 27 29 (the gap 14->15 is
# where 7 * 1.933 = 13.53 and 8 * 1.933 = 15.47 round)
# k=27, n=3, step 14.5: kept 0, 15 (14.5 rounds half up, Python's round would give 14), 29
@pytest.mark.parametrize("k, expected", [
    (6, [2, 7, 12, 17, 22, 27]),
    (14, [1, 3, 5, 7, 9, 11, 13, 16, 18, 20, 22, 24, 26, 28]),
    (27, [*range(1, 15), *range(16, 29)]),
])
def test_uls_even_spacing(k, expected):
    assert uls(CTX, k) == expected


def test_uls_keeps_an_off_grid_protected_layer_in_place_of_its_nearest_grid_layer():
    # k=10, n=20, step 29/19 = 1.526: grid 0 2 3 5 6 8 9 11 12 14 15 17 18 20 21 23 24 26 27 29.
    # Off-grid layers 1 4 7 ... 28 are skipped (9); protected layer 1 displaces grid layer 2 (10th).
    ctx = BaselineContext(30, (0, 1, 29))
    assert uls(ctx, 10) == [2, 4, 7, 10, 13, 16, 19, 22, 25, 28]


# ULS, released rule: interval = int(30 / (n - 1)); keep slots filled by protected, 29, then multiples
# of interval bottom-up, until n are kept.
# k=6, n=24: interval int(30/23) = 1, every layer is a multiple (the raw rule would skip nothing);
# kept 0 29 then 1..22 -> skipped 23..28, one contiguous block just below the top.
# k=14, n=16: interval int(30/15) = 2: kept 0 2 4 .. 28 and 29 (exactly 16, no trimming) -> odd layers.
# k=20, n=10: interval int(30/9) = 3: multiples 0 3 .. 27 plus 29 make 11, one too many; the top
# multiple 27 is trimmed -> kept 0 3 6 .. 24 29, skipped the rest (20).
@pytest.mark.parametrize("k, expected", [
    (6, list(range(23, 29))),
    (14, list(range(1, 29, 2))),
    (20, [i for i in range(1, 29) if i % 3 or i == 27]),
])
def test_uls_released_rule(k, expected):
    assert uls_released(CTX, k) == expected


@pytest.mark.parametrize("k", range(1, 14))
def test_uls_released_skips_one_contiguous_block_below_the_top_for_mild_budgets(k):
    assert uls_released(CTX, k) == list(range(29 - k, 29)) == last_k(CTX, k)


@pytest.mark.parametrize("counts, k",
                         [([3], 3), ([2, 3], 3), ([1, 2], 2), ([4, 5, 5, 5], 5), ([0, 0, 1], 0)])
def test_equal_budget_k_rounds_half_up(counts, k):
    assert equal_budget_k(counts) == k  # [2, 3] -> 2.5 -> 3, where round() would give 2


def test_equal_budget_k_needs_counts():
    with pytest.raises(FirstSkipError):
        equal_budget_k([])


def _tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config_class = {"llama": LlamaConfig, "gpt2": GPT2Config}[family]
    return AutoModelForCausalLM.from_config(config_class(**FAMILIES[family].tiny))


def _make_identity(layer: torch.nn.Module, projections: tuple[str, ...]) -> None:
    """Zero the residual branches' output projections: the layer then returns its input exactly."""
    with torch.no_grad():
        for name in projections:
            for param in layer.get_submodule(name).parameters():
                param.zero_()


def _batches() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding on the second row
    return [{"input_ids": ids, "attention_mask": mask},
            {"input_ids": ids[:1, :5], "attention_mask": mask[:1, :5]}]


@pytest.mark.parametrize("family, projections", [
    ("llama", ("self_attn.o_proj", "mlp.down_proj")),
    ("gpt2", ("attn.c_proj", "mlp.c_proj")),  # gpt2's projections carry biases, zeroed too
])
def test_block_influence_is_zero_exactly_for_identity_layers(family, projections):
    model = _tiny(family)
    identities = {2, 4, 5}  # 5 is the top layer, whose transformers hidden_states entry is normed
    for i in identities:
        _make_identity(decoder_layers(model)[i], projections)
    with torch.no_grad():  # a non-trivial final norm would change the top layer's BI if it leaked in
        final_norm = model.get_submodule({"llama": "model.norm", "gpt2": "transformer.ln_f"}[family])
        final_norm.weight.uniform_(0.5, 2.0)
    bi = block_influence(model, _batches())
    assert len(bi) == 6 and model.training  # mode restored
    for i, value in enumerate(bi):
        assert (value == pytest.approx(0.0, abs=1e-5)) == (i in identities), (i, value)
    ctx = BaselineContext(6, (0, 5), block_influence=bi)
    assert shortgpt(ctx, 2) == [2, 4]  # the identity top layer is protected, so not chosen


def test_block_influence_ignores_padding():
    model = _tiny("llama")
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    alone = block_influence(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    padded_ids = torch.cat([ids, torch.zeros(1, 5, dtype=ids.dtype)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 5, dtype=ids.dtype)], dim=1)
    padded = block_influence(model, [{"input_ids": padded_ids, "attention_mask": mask}])
    assert padded == pytest.approx(alone, abs=1e-5)
