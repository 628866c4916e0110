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
])
def test_bad_values_name_the_field(changes, message):
    with pytest.raises(FirstSkipError, match=message):
        FirstSkipConfig(num_layers=30, hidden_size=576, **changes)


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
