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
