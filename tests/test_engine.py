"""The invariants of first-method.md, on a tiny random model of every supported family.

Each fast path is compared with a slow reference built independently of the engine: plain
transformers ``generate``, a physically pruned model made from a smaller config, and a loop that
swaps skipped layers for identities after prefill.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

from conftest import TOLERANCE, tiny
from firstskip.config import FirstSkipConfig
from firstskip.engine import Engine, Sampling
from firstskip.errors import FirstSkipError
from firstskip.families import FAMILIES, cache_kwargs, decoder_layers, family_of
from firstskip.routers import RouterBank

N_NEW = 8
SKIP = [2, 3]  # keeps layer 0 (sliding) and 1 (full) so references' mask lengths stay right


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def config_for(model, **config) -> FirstSkipConfig:
    return FirstSkipConfig(num_layers=len(decoder_layers(model)), hidden_size=model.config.hidden_size, **config)


def engine(model, routers: RouterBank | None = None, **config) -> Engine:
    return Engine(model, config_for(model, **config), routers)


def greedy(eng: Engine, prompts, skip=None) -> list[list[int]]:
    return [g.token_ids for g in eng.generate(prompts, Sampling(max_new_tokens=N_NEW), skip=skip)]


def hf_greedy(model, ids: list[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def physically_pruned(model, skip: list[int]):
    """A smaller model of the same family holding only the kept layers' weights."""
    keep = [i for i in range(len(decoder_layers(model))) if i not in skip]
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [model.config.layer_types[i] for i in keep]
    pruned = AutoModelForCausalLM.from_config(config).eval()
    prefix = family_of(model).layers + "."
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            idx, rest = key[len(prefix):].split(".", 1)
            if int(idx) in skip:
                continue
            key = f"{prefix}{keep.index(int(idx))}.{rest}"
        state[key] = value
    pruned.load_state_dict(state)
    return pruned


class Identity(nn.Module):
    def forward(self, hidden, *args, **kwargs):
        return hidden


@torch.no_grad()
def reference_skip(model, ids: list[int], skip: list[int], every: int | None = None) -> list[int]:
    """The first ``every`` prompt tokens (all by default: `full` prefill) through every layer, then the
    rest of the prompt and every generated token through the kept layers only."""
    every = len(ids) if every is None else every
    cache = DynamicCache(config=model.config)
    logits = model(torch.tensor([ids[:every]]), **cache_kwargs(model, cache)).logits[:, -1]
    layers = decoder_layers(model)
    saved = list(layers)
    for i in skip:
        layers[i] = Identity()
    tokens = []
    try:
        if every < len(ids):
            logits = model(torch.tensor([ids[every:]]), position_ids=torch.arange(every, len(ids))[None],
                           **cache_kwargs(model, cache)).logits[:, -1]
        for _ in range(N_NEW):
            token = logits.argmax(-1)
            tokens.append(token.item())
            logits = model(token[:, None], **cache_kwargs(model, cache)).logits[:, -1]
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer
    return tokens


def set_keep_probs(routers: RouterBank, probs: dict[int, float]) -> None:
    """Make router l answer p regardless of input (zero weights, bias = logit p)."""
    for layer, p in probs.items():
        routers.routers[layer].down.bias.data.fill_(math.log(p / (1 - p)))


# -- invariant 1: keep-all is the base model -------------------------------------------------
def test_keep_all_equals_base(tiny_model):
    ids = prompt(12, 0)
    expected = hf_greedy(tiny_model, ids)
    with torch.no_grad():
        base_logits = tiny_model(torch.tensor([ids])).logits[:, -1]
    for threshold in (0.5, 0.0):  # untrained routers keep every layer; tau = 0 keeps all whatever they say
        model = tiny(tiny_model.config.model_type)
        eng = engine(model, RouterBank(config_for(tiny_model)), threshold=threshold)
        if threshold == 0.0:
            set_keep_probs(eng.routers, {1: 0.1, 2: 0.1, 3: 0.1})
        assert greedy(eng, [ids]) == [expected]
        torch.testing.assert_close(eng.prefill([ids]).logits, base_logits, **TOLERANCE[torch.float32])


# -- invariant 2: routed S is the pruned model ------------------------------------------------
def test_routed_skip_equals_pruned_model(tiny_model):
    ids = prompt(12, 1)
    pruned = physically_pruned(tiny_model, SKIP)
    eng = engine(tiny_model, prefill="routed")
    assert greedy(eng, [ids], skip=[SKIP]) == [hf_greedy(pruned, ids)]
    with torch.no_grad():
        torch.testing.assert_close(eng.prefill([ids], [SKIP]).logits, pruned(torch.tensor([ids])).logits[:, -1],
                                   **TOLERANCE[torch.float32])


# -- invariant 3: full S is the reference loop ------------------------------------------------
def test_full_skip_equals_reference_loop(tiny_model):
    ids = prompt(12, 2)
    expected = reference_skip(tiny_model, ids, SKIP)
    assert greedy(engine(tiny_model), [ids], skip=[SKIP]) == [expected]


# -- invariant 4: a batch row is the prompt alone ---------------------------------------------
@pytest.mark.parametrize("prefill", ["full", "routed"])
def test_batch_rows_equal_single_runs(tiny_model, prefill):
    prompts = [prompt(12, 3), prompt(5, 4), prompt(9, 5)]
    skips = [SKIP, [1, 4], SKIP]
    eng = engine(tiny_model, prefill=prefill)
    batch = greedy(eng, prompts, skip=skips)
    batch_logits = eng.prefill(prompts, skips).logits
    for row, (ids, skip) in enumerate(zip(prompts, skips)):
        assert batch[row] == greedy(eng, [ids], skip=[skip])[0]
        torch.testing.assert_close(batch_logits[row], eng.prefill([ids], [skip]).logits[0], **TOLERANCE[torch.float32])


# -- `early` prefill: the routers read the prompt's start, the rest of it runs the kept layers --
def test_early_prefill_equals_its_reference_and_decides_on_the_prompts_start(tiny_model):
    ids = prompt(40, 20)
    eng = engine(tiny_model, RouterBank(config_for(tiny_model)), prefill="early")
    head = eng.config.decision_tokens(len(ids))
    assert head == 16  # at least EARLY_TOKENS: a quarter of 40 is fewer
    assert greedy(eng, [ids], skip=[SKIP]) == [reference_skip(tiny_model, ids, SKIP, every=head)]
    torch.nn.init.normal_(eng.routers.routers[2].down.weight, std=1.0)  # input-dependent scores
    start = eng.prefill([ids[:head]], config=eng.config.replace(prefill="full")).probs
    torch.testing.assert_close(eng.prefill([ids]).probs, start, **TOLERANCE[torch.float32])


def test_early_batch_rows_equal_single_runs(tiny_model):
    """Rows split at their own decision tokens (invariant 4); a prompt too short to split runs whole."""
    prompts, skips = [prompt(40, 21), prompt(18, 22), prompt(5, 23), prompt(33, 24)], [SKIP, [1, 4], SKIP, []]
    eng = engine(tiny_model, prefill="early")
    batch = greedy(eng, prompts, skip=skips)
    batch_logits = eng.prefill(prompts, skips).logits
    for row, (ids, skip) in enumerate(zip(prompts, skips)):
        assert batch[row] == greedy(eng, [ids], skip=[skip])[0]
        torch.testing.assert_close(batch_logits[row], eng.prefill([ids], [skip]).logits[0], **TOLERANCE[torch.float32])


def test_early_prefill_runs_a_skipped_layer_for_the_decision_tokens_only():
    model = tiny("llama")
    tokens = [0] * len(decoder_layers(model))
    for i, layer in enumerate(decoder_layers(model)):
        layer.mlp.register_forward_hook(lambda _m, args, _o, i=i: tokens.__setitem__(i, tokens[i] + args[0].shape[1]))
    engine(model, prefill="early").generate([prompt(40, 25)], Sampling(max_new_tokens=5), skip=[SKIP])
    assert [tokens[i] for i in SKIP] == [16] * len(SKIP)
    assert all(tokens[i] == 40 + 4 for i in range(len(tokens)) if i not in SKIP)


# -- skipped layers really do not run ---------------------------------------------------------
@pytest.mark.parametrize("prefill", ["full", "routed"])
def test_skipped_layers_do_not_execute(prefill):
    model = tiny("llama")
    calls = [0] * len(decoder_layers(model))
    for i, layer in enumerate(decoder_layers(model)):
        layer.mlp.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    engine(model, prefill=prefill).generate([prompt(10, 6)], Sampling(max_new_tokens=5), skip=[SKIP])
    prompt_runs = 0 if prefill == "routed" else 1
    assert [calls[i] for i in SKIP] == [prompt_runs] * len(SKIP)
    assert all(calls[i] == 5 for i in range(len(calls)) if i not in SKIP)  # prefill + 4 decode steps


# -- routers decide ---------------------------------------------------------------------------
def test_threshold_and_budget_decisions():
    model = tiny("qwen2")
    eng = engine(model, RouterBank(config_for(model)))
    set_keep_probs(eng.routers, {1: 0.2, 2: 0.3, 3: 0.45, 5: 0.01})  # layer 5 is protected (last)
    pre = eng.prefill([prompt(8, 7)])
    assert pre.skip[0].nonzero().squeeze(-1).tolist() == [1, 2, 3]
    eng.config = eng.controller.config = eng.config.replace(threshold=0.25)
    assert eng.prefill([prompt(8, 7)]).skip[0].nonzero().squeeze(-1).tolist() == [1]
    eng.config = eng.controller.config = eng.config.replace(decision="budget", skip_ratio=2 / 6)
    assert eng.prefill([prompt(8, 7)]).skip[0].nonzero().squeeze(-1).tolist() == [1, 2]
    eng.config = eng.controller.config = eng.config.replace(decision="threshold", threshold=0.5, prefill="routed")
    gen = eng.generate([prompt(8, 7)], Sampling(max_new_tokens=3))[0]
    assert gen.skipped_layers == [1, 2, 3] and len(gen.keep_probs) == 6


@pytest.mark.parametrize("pooling", [dict(router_pooling="mean-all"), dict(router_pooling="mean", template_tokens=[2, 1]),
                                     dict(router_pooling="last")])
@pytest.mark.parametrize("prefill", ["full", "routed"])
def test_padding_never_counts_in_router_pooling(pooling, prefill):
    model = tiny("llama")
    routers = RouterBank(config_for(model, **pooling))
    torch.nn.init.normal_(routers.routers[2].down.weight, std=1.0)  # input-dependent scores
    eng = engine(model, routers, **pooling, prefill=prefill)
    alone = eng.prefill([prompt(4, 8)]).probs[0]
    padded = eng.prefill([prompt(4, 8), prompt(11, 9)]).probs[0]
    torch.testing.assert_close(alone, padded, **TOLERANCE[torch.float32])


# -- sampling, streaming, stopping ------------------------------------------------------------
def test_sampling_is_seeded_and_greedy_ignores_seed():
    eng = engine(tiny("llama"))
    ids = [prompt(6, 10)]
    hot = Sampling(max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=50, seed=1)
    first = eng.generate(ids, hot)[0].token_ids
    assert eng.generate(ids, hot)[0].token_ids == first
    assert eng.generate(ids, Sampling(max_new_tokens=12, temperature=1.5, seed=2))[0].token_ids != first
    assert eng.generate(ids, Sampling(max_new_tokens=N_NEW, seed=3))[0].token_ids == greedy(eng, ids)[0]
    assert eng.generate(ids, Sampling(max_new_tokens=N_NEW, temperature=0.7, top_k=1, seed=4))[0].token_ids == \
        greedy(eng, ids)[0]


def test_stream_equals_generate_and_eos_stops():
    eng = engine(tiny("mistral"))
    ids = prompt(7, 11)
    full = greedy(eng, [ids], skip=[SKIP])[0]
    stream = eng.stream(ids, Sampling(max_new_tokens=N_NEW), skip=SKIP)
    assert stream.skipped_layers == SKIP
    assert list(stream) == full and stream.result.finish_reason == "length"
    eos = full[3]
    gen = eng.generate([ids], Sampling(max_new_tokens=N_NEW), skip=[SKIP], eos_token_ids=[eos])[0]
    assert gen.token_ids == full[: full.index(eos)] and gen.finish_reason == "eos"
    gen = eng.generate([ids], Sampling(max_new_tokens=N_NEW), stop=lambda t: len(t) == 2)[0]
    assert gen.new_tokens == 2 and gen.finish_reason == "stop"


# -- bad input --------------------------------------------------------------------------------
def test_bad_input_is_a_user_error():
    eng = engine(tiny("gpt2"))
    with pytest.raises(FirstSkipError, match="outside"):
        eng.generate([prompt(4, 0)], skip=[[7]])
    with pytest.raises(FirstSkipError, match="empty prompt"):
        eng.generate([[]])
    with pytest.raises(FirstSkipError, match="context"):
        eng.generate([[5] * 600])
    with pytest.raises(FirstSkipError, match="max_new_tokens"):
        Sampling(max_new_tokens=0)


def test_the_cache_goes_by_the_name_the_installed_transformers_takes():
    """transformers 5.24 renamed past_key_values to cache; the old name warns (and goes in 5.40)."""
    model = tiny("qwen2")
    expected = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    assert set(cache_kwargs(model, None)) == {expected, "use_cache"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        greedy(engine(model), [prompt(5, 12)], skip=[SKIP])


def test_every_family_row_is_tested():
    assert {"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2"} <= set(FAMILIES)
    assert {"gemma2", "gemma3_text"} & set(FAMILIES)


def test_mixed_batch_runs_each_layer_for_the_rows_that_keep_it():
    model = tiny("llama")
    rows_seen: dict[int, list[int]] = {i: [] for i in range(6)}
    for i, layer in enumerate(decoder_layers(model)):
        layer.mlp.register_forward_hook(lambda _m, inp, _out, i=i: rows_seen[i].append(inp[0].shape[0]))
    engine(model).generate([prompt(6, 1), prompt(6, 2)], Sampling(max_new_tokens=3), skip=[[2, 3], [3, 4]])
    decode = {i: seen[1:] for i, seen in rows_seen.items()}  # after the full prefill of both rows
    assert decode[3] == [] and decode[2] == [1, 1] and decode[4] == [1, 1] and decode[1] == [2, 2]
