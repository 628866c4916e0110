from __future__ import annotations

import json

import pytest

from firstskip.config import FirstSkipConfig
from firstskip.errors import FirstSkipError


def test_defaults_protect_first_and_last_layer():
    cfg = FirstSkipConfig(num_layers=30, hidden_size=576)
    assert cfg.protected == [0, 29] and len(cfg.skippable) == 28


@pytest.mark.parametrize("changes, message", [
    (dict(threshold=1.5), "threshold"),
    (dict(decision="budget"), "skip ratio"),
    (dict(decision="budget", skip_ratio=0.2, prefill="routed"), "prefill 'full'"),
    (dict(prefill="sideways"), "prefill"),
    (dict(protected_layers=[40]), "outside"),
    (dict(skip_ratio=-0.1), "skip ratio"),
    (dict(router_pooling="max"), "pooling"),
    (dict(template_tokens=[3]), "template_tokens"),
    (dict(prefill="early", early_share=0.0), "early_share"),
])
def test_bad_values_name_the_field(changes, message):
    with pytest.raises(FirstSkipError, match=message):
        FirstSkipConfig(num_layers=30, hidden_size=576, **changes)


def test_early_prefill_reads_the_template_head_then_a_share_of_the_pooled_tokens():
    cfg = FirstSkipConfig(num_layers=30, hidden_size=8, prefill="early", template_tokens=[20, 5])
    assert cfg.decision_tokens(425) == 20 + 100  # a quarter of the 400 tokens the routers pool
    assert cfg.decision_tokens(60) == 20 + 16  # at least 16 of them
    assert cfg.decision_tokens(30) == 30  # too short to split: read whole
    assert cfg.replace(prefill="full").decision_tokens(425) == 425
    # prefill's layer executions: the decision tokens through all 30 layers, the rest through 30 - 6
    assert cfg.prompt_layer_runs(425, 6) == 120 * 30 + 305 * 24
    assert cfg.replace(prefill="full").prompt_layer_runs(425, 6) == 425 * 30
    assert cfg.replace(prefill="routed").prompt_layer_runs(425, 6) == 425 * 24


def test_budget_k_rounds_half_up_and_caps():
    assert FirstSkipConfig(num_layers=30, hidden_size=8, decision="budget", skip_ratio=0.25).budget_k == 8
    assert FirstSkipConfig(num_layers=6, hidden_size=8, decision="budget", skip_ratio=1.0).budget_k == 4


def test_json_round_trip_and_forward_compatibility():
    cfg = FirstSkipConfig(num_layers=6, hidden_size=8, threshold=0.3, base_model="random:tiny-llama")
    data = json.loads(cfg.to_json())
    assert FirstSkipConfig.from_dict(data) == cfg
    with pytest.warns(UserWarning, match="future_key"):
        assert FirstSkipConfig.from_dict({**data, "future_key": 1}) == cfg
    with pytest.raises(FirstSkipError, match="newer firstskip"):
        FirstSkipConfig.from_dict({**data, "schema_version": 99})


def test_runs_saved_before_pooling_was_a_choice_pool_by_mean_over_every_token():
    data = json.loads(FirstSkipConfig(num_layers=6, hidden_size=8, router_pooling="last",
                                      template_tokens=[4, 2]).to_json())
    del data["router_pooling"], data["template_tokens"]
    old = FirstSkipConfig.from_dict(data)
    assert old.router_pooling == "mean-all" and old.template_tokens is None
