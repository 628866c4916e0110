"""`firstskip export`: a pruned Hugging Face folder equals the engine's routed prefill for that skip set on
every family, a run's LoRA is merged into it, a packaged GGUF keeps its blocks renumbered, and
mistakes are one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import TOLERANCE, tiny
from firstskip.cli import app
from firstskip.engine import Sampling
from firstskip.errors import FirstSkipError
from firstskip.export import INFO_NAME, export, most_common_skip_set
from firstskip.families import FAMILIES
from firstskip.modeling import FirstSkipModel, peft_quietly
from firstskip.models import source_gguf
from firstskip.skipping import pruned_copy

N_NEW = 8
SKIP = [2, 4]  # not a run of layers, so gemma's alternating layer_types come out uneven: [s, f, f, f]


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def routed(fsm: FirstSkipModel, ids: list[int], skip: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and last-position logits of the engine with routed prefill and a forced set."""
    fsm.update_config(prefill="routed")
    tokens = fsm.engine.generate([ids], Sampling(max_new_tokens=N_NEW), skip=[skip])[0].token_ids
    return tokens, fsm.engine.prefill([ids], [skip]).logits


@torch.no_grad()
def plain(model, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """The same from a plain transformers model: greedy generate and a forward pass."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist(), model(torch.tensor([ids])).logits[:, -1]


def assert_same(exported, fsm: FirstSkipModel, skip: list[int], seed: int = 0) -> None:
    ids = prompt(12, seed)
    tokens, logits = plain(exported, ids)
    ref_tokens, ref_logits = routed(fsm, ids, skip)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, **TOLERANCE[torch.float32])


def save_run(fsm: FirstSkipModel, folder, lora: tuple[str, ...] = (), scale: float = 0.5, **training) -> None:
    """A run folder; with ``lora`` (target modules), a random non-zero adapter on them."""
    if lora:
        gen = torch.Generator().manual_seed(0)
        with peft_quietly():
            peft = get_peft_model(fsm.model, LoraConfig(r=4, lora_alpha=8, target_modules=list(lora)))
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
        peft.save_pretrained(folder / "adapter")
        fsm.config = fsm.config.replace(lora={"r": 4, "alpha": 8, "target_modules": list(lora)})
    fsm.config = fsm.config.replace(training=training or None)
    fsm.save_pretrained(folder)


def set_keep_probs(fsm: FirstSkipModel, probs: dict[int, float]) -> None:
    """Router l answers p whatever the input (its output layer is zero, its bias the logit of p)."""
    for layer, p in probs.items():
        fsm.routers.routers[layer].down.bias.data.fill_(math.log(p / (1 - p)))


# -- pruned: equal to the engine's routed prefill, on every family -----------------------------------
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_pruned_export_equals_routed_prefill(model_type, tmp_path):
    name = f"random:tiny-{model_type}"
    result = export(tmp_path / "out", model=name, skip=SKIP)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert exported.config.num_hidden_layers == 4 and result["kept_layers"] == [0, 1, 3, 5]
    base = tiny(model_type)
    if getattr(base.config, "layer_types", None):
        assert exported.config.layer_types == [base.config.layer_types[i] for i in (0, 1, 3, 5)]
    assert json.loads((tmp_path / "out" / INFO_NAME).read_text())["skip"] == SKIP
    assert_same(exported, FirstSkipModel.wrap(base, base_model=name), SKIP)


def test_a_run_exports_with_its_lora_merged(tmp_path):
    save_run(FirstSkipModel.from_base("random:tiny-llama"), tmp_path / "run", lora=("q_proj", "v_proj"))
    export(tmp_path / "out", run=tmp_path / "run", skip=[3])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not any("lora" in key for key in exported.state_dict())
    assert_same(exported, FirstSkipModel.from_pretrained(tmp_path / "run"), [3], seed=1)
    ids = prompt(12, 1)
    assert not torch.allclose(plain(exported, ids)[1], plain(pruned_copy(tiny("llama"), [3]), ids)[1]), \
        "the export holds the base weights, not the adapted ones"


def test_a_static_set_run_exports_its_own_set(tmp_path):
    FirstSkipModel.from_base("random:tiny-qwen2", static_skip=[1, 2]).save_pretrained(tmp_path / "run")
    result = export(tmp_path / "out", run=tmp_path / "run")
    assert result["skip"] == [1, 2] and result["skip_source"] == "the run's static set"


# -- the most common skip set --------------------------------------------------------------------------
def test_most_common_skip_set_counts_the_routers_decisions():
    fsm = FirstSkipModel.from_base("random:tiny-llama")
    set_keep_probs(fsm, {2: 0.1, 3: 0.2})
    prompts = [prompt(8 + i, i) for i in range(5)]
    assert most_common_skip_set(fsm, prompts) == ([2, 3], 1.0)
    fsm.update_config(threshold=0.15)  # layer 3 (p = 0.2) is now kept
    assert most_common_skip_set(fsm, prompts) == ([2], 1.0)
    set_keep_probs(fsm, {4: 0.5})
    with torch.no_grad():  # layer 4's router now depends on the input: some prompts skip it, some do not
        fsm.routers.routers[4].down.weight.normal_(generator=torch.Generator().manual_seed(0))
    skip, share = most_common_skip_set(fsm, [prompt(8 + i, i) for i in range(20)])
    assert skip in ([2], [2, 4]) and 0.5 <= share < 1.0
    with pytest.raises(FirstSkipError, match="no prompts"):
        most_common_skip_set(fsm, [])


def test_task_set_on_a_run_of_the_packaged_model(tmp_path):
    fsm = FirstSkipModel.from_base("smollm2-135m")
    set_keep_probs(fsm, {12: 0.1, 13: 0.1})
    save_run(fsm, tmp_path / "run")
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"Question {i}: is {i} even?", "reference": "yes", "task": "yesno"} for i in range(3)]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["export", "--run", str(tmp_path / "run"), "--task-set", str(data),
                                      "--out", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["skip"] == [12, 13] and "100% of 3 test prompts" in info["skip_source"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert exported.config.num_hidden_layers == 28 and (tmp_path / "out" / "tokenizer.json").is_file()


# -- gguf ---------------------------------------------------------------------------------------------
def test_gguf_export_of_the_packaged_model(tmp_path, smollm2):
    from gguf import GGUFReader

    skip = [10, 11, 12, 13]
    export(tmp_path / "out", "gguf", model="smollm2-135m", skip=skip)
    source, written = GGUFReader(source_gguf("smollm2-135m", tmp_path)), GGUFReader(tmp_path / "out" / "model.gguf")
    assert written.fields["llama.block_count"].contents() == 26
    old = {t.name: t for t in source.tensors}
    new = {t.name: t for t in written.tensors}
    per_block = sum(name.startswith("blk.0.") for name in old)
    assert len(new) == len(old) - 4 * per_block and not any(n.startswith("blk.26.") for n in new)
    for name in ("blk.10.attn_q.weight", "blk.25.ffn_down.weight"):
        moved = name.replace(f"blk.{name.split('.')[1]}.", f"blk.{int(name.split('.')[1]) + 4}.")
        assert new[name].tensor_type == old[moved].tensor_type
        assert np.array_equal(new[name].data, old[moved].data)
    assert written.fields["tokenizer.chat_template"].contents() == source.fields["tokenizer.chat_template"].contents()
    # transformers reads it back (dequantized, as the packaged model is) as the pruned copy
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32)
    ids = smollm2[1]("The capital of France is")["input_ids"]
    assert plain(loaded.eval(), ids)[0] == plain(pruned_copy(smollm2[0], skip), ids)[0]


def test_llamacpp_decodes_the_gguf_export_as_the_pruned_copy_does(tmp_path):
    """llama.cpp itself loads the export (where llama-cpp-python is installed; benchmark-only)."""
    pytest.importorskip("llama_cpp")
    from firstskip.llamacpp import LlamaCpp

    export(tmp_path / "out", "gguf", model="smollm2-135m", skip=list(range(10, 18)))
    fsm = FirstSkipModel.from_base("smollm2-135m", prefill="routed")  # skips the prompt too, as the export does
    ids = fsm.encode("What is the capital of France? Answer in one sentence.")
    want = fsm.engine.generate([ids], Sampling(max_new_tokens=4), [list(range(10, 18))])[0].token_ids
    assert LlamaCpp(tmp_path / "out" / "model.gguf", 2, 128).generate(ids, 4) == want


def test_gguf_export_of_a_lora_run_holds_the_adapted_weights(tmp_path, smollm2):
    save_run(FirstSkipModel.from_base("smollm2-135m"), tmp_path / "run", lora=("q_proj", "k_proj", "v_proj"),
             scale=0.02)
    result = export(tmp_path / "out", "gguf", run=tmp_path / "run", skip=[3, 20])
    assert result["lora_changed_tensors"] == 3 * 30  # q, k and v of every block (written as float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32)
    merged = pruned_copy(FirstSkipModel.from_pretrained(tmp_path / "run").model, [3, 20])
    ids = smollm2[1]("The capital of France is")["input_ids"]
    tokens, logits = plain(loaded.eval(), ids)
    ref_tokens, ref_logits = plain(merged, ids)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, **TOLERANCE[torch.float32])
    assert not torch.allclose(logits, plain(pruned_copy(smollm2[0], [3, 20]), ids)[1]), "the adapter is missing"


def test_gguf_export_needs_a_model_from_a_gguf(tmp_path):
    save_run(FirstSkipModel.from_base("random:tiny-llama"), tmp_path / "run")
    for source in (dict(model="random:tiny-llama"), dict(run=tmp_path / "run")):
        with pytest.raises(FirstSkipError, match="come from a GGUF"):
            export(tmp_path / "out", "gguf", skip=[2], **source)
    assert not (tmp_path / "out").exists()


# -- vllm: every layer, the routers and the decision, for the plugin ---------------------------------------
def test_vllm_export_holds_merged_weights_routers_and_settings(tmp_path):
    from safetensors.torch import load_file

    fsm = FirstSkipModel.from_base("random:tiny-qwen2", protected_layers=[0, 1, 5], threshold=0.3)
    set_keep_probs(fsm, {2: 0.2})
    save_run(fsm, tmp_path / "run", lora=("q_proj", "v_proj"))
    result = export(tmp_path / "out", "vllm", run=tmp_path / "run")
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["FirstSkipQwen2ForCausalLM"] == [result["architecture"]]
    settings = config["firstskip"]
    assert settings["protected_layers"] == [0, 1, 5] and settings["threshold"] == 0.3
    assert settings["decision"] == "threshold" and settings["num_layers"] == 6 and settings["version"] == 1
    routers = load_file(out / "firstskip_routers.safetensors")
    assert len(routers) == 6 * 6 and all(name.startswith("firstskip_routers.") for name in routers)
    assert routers["firstskip_routers.2.down.bias"].item() == pytest.approx(math.log(0.2 / 0.8), abs=1e-6)
    # the weights are the run's, LoRA merged, every layer kept: transformers reads them as the plain family
    merged = FirstSkipModel.from_pretrained(tmp_path / "run").model
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.num_hidden_layers == 6 and not any("lora" in k for k in loaded.state_dict())
    ids = prompt(12, 2)
    assert plain(loaded, ids)[0] == plain(merged, ids)[0]
    assert json.loads((out / INFO_NAME).read_text())["format"] == "vllm"


def test_vllm_export_of_a_budget_run_resolves_k_and_a_static_run_keeps_its_set(tmp_path):
    FirstSkipModel.from_base("random:tiny-llama", decision="budget", skip_ratio=0.34).save_pretrained(tmp_path / "b")
    FirstSkipModel.from_base("random:tiny-mistral", static_skip=[2, 3]).save_pretrained(tmp_path / "s")
    budget = export(tmp_path / "ob", "vllm", run=tmp_path / "b")["settings"]
    static = export(tmp_path / "os", "vllm", run=tmp_path / "s")["settings"]
    assert budget["decision"] == "budget" and budget["budget_k"] == 2
    assert static["static_skip"] == [2, 3]
    assert json.loads((tmp_path / "os" / "config.json").read_text())["architectures"] == ["FirstSkipMistralForCausalLM"]


@pytest.mark.parametrize("case, message", [
    ("model", "needs a --run with trained routers"),
    ("skip", "keeps every layer"),
    ("no routers", "holds no trained routers"),
    ("family", "the vLLM plugin supports llama, mistral, qwen2, qwen3, not 'gemma2'"),
    ("early", "trained for 'early' prefill"),
])
def test_vllm_export_refuses_bad_input_in_one_line(case, message, tmp_path):
    run = tmp_path / "run"
    base = "random:tiny-gemma2" if case == "family" else "random:tiny-llama"
    FirstSkipModel.from_base(base, prefill="early" if case == "early" else "full").save_pretrained(run)
    if case == "no routers":
        (run / "routers.safetensors").unlink()
    source = {"model": "random:tiny-llama"} if case == "model" else {"run": run}
    with pytest.raises(FirstSkipError, match=message):
        export(tmp_path / "out", "vllm", skip=[2] if case == "skip" else None, **source)
    assert not (tmp_path / "out").exists()


# -- mistakes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--skip", "2,9"], "outside 0..5"),
    (["--skip", "0-5"], "all 6 layers"),
    ([], "give --skip"),
    (["--format", "vllm"], "needs a --run with trained routers"),
    (["--skip", "2", "--format", "onnx"], "unknown format"),
    (["--task-set", "builtin:boolq"], "needs a --run"),
    (["--skip", "2", "--task-set", "builtin:boolq"], "at most one of --skip or --task-set"),
])
def test_bad_input_is_one_line(args, message, tmp_path):
    result = CliRunner().invoke(app, ["export", "-m", "random:tiny-llama", "--out", str(tmp_path / "o"), *args])
    assert isinstance(result.exception, FirstSkipError) and message in str(result.exception), result.output
    assert not (tmp_path / "o").exists()


def test_a_non_empty_out_or_a_run_without_a_set_is_refused_with_exit_code_2(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    save_run(FirstSkipModel.from_base("random:tiny-llama"), tmp_path / "run")
    for args, message in ((["-m", "random:tiny-llama", "--skip", "2", "--out", str(tmp_path / "full")], "empty folder"),
                          (["--run", str(tmp_path / "run"), "--out", str(tmp_path / "o")], "--task-set DATA")):
        out = subprocess.run([sys.executable, "-c", "from firstskip.cli import main; main()", "export", *args],
                             capture_output=True, text=True, timeout=300)
        lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
