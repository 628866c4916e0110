"""Run folders: JSON + safetensors, atomic, refused on the wrong base."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny
from firstskip import artifacts
from firstskip.engine import Sampling
from firstskip.errors import FirstSkipError
from firstskip.modeling import FirstSkipModel


def trained_like(seed: int = 0) -> FirstSkipModel:
    fsm = FirstSkipModel.wrap(tiny("llama"), base_model="random:tiny-llama")
    torch.manual_seed(seed)
    for router in fsm.routers.routers:
        torch.nn.init.normal_(router.down.weight, std=2.0)
    return fsm


def test_save_and_reload_generate_identically(tmp_path):
    fsm = trained_like()
    prompt = [[5, 6, 7, 8, 9, 10]]
    before = fsm.engine.generate(prompt, Sampling(max_new_tokens=6))[0]
    fsm.save_pretrained(tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "routers.safetensors"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["schema_version"] == 1 and saved["fingerprint"]["num_layers"] == 6
    again = FirstSkipModel.from_pretrained(tmp_path / "run")
    after = again.engine.generate(prompt, Sampling(max_new_tokens=6))[0]
    assert (after.token_ids, after.skipped_layers, after.keep_probs) == \
        (before.token_ids, before.skipped_layers, before.keep_probs)


def test_run_on_a_different_base_is_refused(tmp_path):
    trained_like().save_pretrained(tmp_path / "run")
    with pytest.raises(FirstSkipError, match="different base model"):
        FirstSkipModel.from_pretrained(tmp_path / "run", model=tiny("llama", seed=1))


def test_missing_or_broken_runs_are_user_errors(tmp_path):
    with pytest.raises(FirstSkipError, match="not a firstskip run"):
        artifacts.load_config(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(FirstSkipError, match="not valid JSON"):
        artifacts.load_config(tmp_path)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "kept.json"
    artifacts.write_json(target, {"v": 1})

    def crash(_tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        artifacts.atomic_write(target, crash)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["kept.json"]
