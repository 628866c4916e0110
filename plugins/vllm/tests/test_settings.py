"""The plugin's decision and request overrides, without an engine: decisions equal firstskip's own
(``routers.decide``, run by `make_fixtures.py`) for every kind of decision, and bad overrides are
one-line errors (vLLM answers them with HTTP 400)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from firstskip_vllm.settings import Overrides, Settings, SettingsError, decide, parse_overrides


def test_decisions_equal_firstskip(fixtures):
    for case in json.loads((fixtures / "decisions.json").read_text()):
        hf_config = SimpleNamespace(firstskip=case["settings"], num_hidden_layers=case["settings"]["num_layers"])
        settings = Settings.from_hf_config(hf_config)
        for probs, skip in zip(case["probs"], case["skip"]):
            # a static run's set is applied before any scoring (skipping.Controller), not by decide
            got = list(settings.static_skip) if settings.static_skip else decide(torch.tensor(probs), settings, Overrides())
            assert got == skip, case["settings"]


@pytest.mark.parametrize("args, message", [
    ({"firstskip_skip": "2,3"}, "must be a list of layer numbers"),
    ({"firstskip_skip": [2, 9]}, "outside 0..7"),
    ({"firstskip_skip": list(range(8))}, "keep at least one"),
    ({"firstskip_threshold": 1.5}, "must be a number in [0, 1]"),
    ({"firstskip_skip": [2], "firstskip_budget": 0.25}, "at most one of"),
    ({"firstskip_prefill": "partial"}, "'full' or 'routed'"),
])
def test_bad_overrides_are_one_line_errors(args, message):
    with pytest.raises(SettingsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_overrides(args, num_layers=8)


def test_a_config_without_settings_names_the_export_command():
    with pytest.raises(SettingsError, match="firstskip export --run RUN --format vllm"):
        Settings.from_hf_config(SimpleNamespace(num_hidden_layers=4))


def test_request_overrides_change_the_decision():
    settings = Settings(num_layers=6, hidden_size=8, router_dim=4, pooling="mean", template_tokens=(0, 0),
                        protected_layers=(0, 5), decision="threshold", threshold=0.5, budget_k=None,
                        prefill="full", static_skip=None)
    keep = torch.tensor([0.1, 0.3, 0.6, 0.2, 0.9, 0.1])
    assert decide(keep, settings, Overrides()) == [1, 3]
    assert decide(keep, settings, Overrides(threshold=0.0)) == []
    assert decide(keep, settings, Overrides(threshold=0.7)) == [1, 2, 3]
    assert decide(keep, settings, Overrides(budget=0.34)) == [1, 3]  # round(0.34 * 6) = 2 lowest skippable
    assert decide(keep, settings, Overrides(budget=1.0)) == [1, 2, 3, 4]  # capped by the skippable layers
