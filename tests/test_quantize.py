"""Int8 and int4 weights: every linear layer of the decoder and the head runs on torch's weight-only
kernels, the skipping invariants still hold, and a run loads quantized with its adapter merged first
(int8) or beside the 4-bit weights (int4).

Quantizing changes the arithmetic, so outputs are compared with float32 by distance (the quality check on
real data is `benchmarks/dtype_agreement.py` and `dtype_scores.py`), and with each other exactly.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import tiny
from firstskip.config import FirstSkipConfig
from firstskip.engine import Engine, Sampling
from firstskip.errors import FirstSkipError
from firstskip.families import decoder_layers
from firstskip.artifacts import fingerprint
from firstskip.modeling import FirstSkipModel, peft_quietly
from firstskip import decoding
from firstskip import quantize as quantize_module
from firstskip.quantize import INT4_GROUP, PACKED_ROWS, Int4Linear, Int8Linear, QuantLinear, quantize, stacked
from firstskip.skipping import pruned_copy

FAMILIES = ["llama", "qwen2", "gemma3_text", "phi3", "gpt2"]  # qwen2's projections have biases; gpt2 has Conv1D


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine(model, **config) -> Engine:
    return Engine(model, FirstSkipConfig(num_layers=len(decoder_layers(model)), hidden_size=model.config.hidden_size,
                                         **config))


@pytest.mark.parametrize("fmt, kind, bound", [("int8", Int8Linear, 0.02), ("int4", Int4Linear, 0.2)])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantizing_replaces_every_linear_and_stays_close_to_float32(family, fmt, kind, bound):
    reference = tiny(family)
    model = quantize(tiny(family), fmt)
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, Conv1D))]
    assert not linears and isinstance(model.get_output_embeddings(), Int8Linear)  # the head stays int8
    assert any(isinstance(m, kind) for m in decoder_layers(model).modules())
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = torch.tensor([prompt(12, 1)])
    with torch.no_grad():
        want, got = reference(ids).logits.log_softmax(-1), model(ids).logits.float().log_softmax(-1)
    kl = (want.exp() * (want - got)).sum(-1).mean()
    assert kl < bound, f"KL(fp32 || {fmt}) = {kl:.4f}"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_skipping_equals_the_quantized_pruned_copy_and_rows_equal_their_solo_runs(family, fmt):
    model = quantize(tiny(family), fmt)
    skip = [2, 3]
    pruned = engine(pruned_copy(model, skip))  # copied before an engine wraps the layers
    first = engine(model, prefill="routed")  # skips the prompt too, as the copy does (invariant 2)
    jobs = [prompt(9, 2), prompt(5, 3)]
    solo = [first.generate([ids], Sampling(max_new_tokens=6), [skip])[0].token_ids for ids in jobs]
    assert solo == [pruned.generate([ids], Sampling(max_new_tokens=6))[0].token_ids for ids in jobs]
    together = first.generate(jobs, Sampling(max_new_tokens=6), [skip, skip])
    assert [g.token_ids for g in together] == solo


def test_a_run_loads_in_int8_with_its_adapter_merged_and_routers_in_float32(tmp_path):
    FirstSkipModel.from_base("random:tiny-llama").save_pretrained(tmp_path / "run")
    fsm = FirstSkipModel.from_pretrained(tmp_path / "run", dtype="int8")
    assert isinstance(decoder_layers(fsm.model)[0].mlp.down_proj, Int8Linear)
    assert next(fsm.routers.parameters()).dtype == torch.float32
    assert len(fsm.engine.generate([prompt(7, 4)], Sampling(max_new_tokens=4))[0].token_ids) == 4
    with pytest.raises(FirstSkipError, match="merged"):
        FirstSkipModel.from_pretrained(tmp_path / "run", dtype="int8", merge_adapter=False)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("rows", [1, 3, 40])  # the packed kernel up to PACKED_ROWS rows, dequantized weights beyond
@pytest.mark.parametrize("prompt", [torch.bfloat16, torch.float32])  # a prompt's products on a CPU with and without bf16
def test_quantized_products_quantize_the_weights_only(rows, kind, lora, prompt, monkeypatch):
    monkeypatch.setattr(quantize_module, "prompt_dtype", lambda: prompt)
    layer = nn.Linear(64, 48)
    a, b = torch.randn(4, 64) / 8, torch.randn(48, 4) / 8
    quantized: QuantLinear = kind(layer, (a, b) if lora else None)
    x = torch.randn(rows, 64)
    dequantized = quantized.dequantized().float()
    largest = layer.weight.abs().max()
    step = largest / (127 if kind is Int8Linear else 7)  # int4: a group's range over 15 levels <= 2 max / 15
    assert (dequantized - layer.weight).abs().max() <= step / 2 + largest / 128  # half a step + bfloat16 scales and products
    side = x @ a.T @ b.T if lora else 0  # an adapter beside the weights, unquantized
    torch.testing.assert_close(quantized(x).float(), x.bfloat16().float() @ dequantized.T + layer.bias + side,
                               atol=5e-2, rtol=5e-2)
    one_by_one = torch.cat([quantized(x[i:i + 1]) for i in range(rows)]) if rows <= PACKED_ROWS else quantized(x)
    torch.testing.assert_close(quantized(x), one_by_one)  # a row's product does not depend on its batch
    assert quantized(x).dtype == torch.bfloat16  # whatever the product's dtype, the model's activations
    if rows > PACKED_ROWS and prompt == torch.float32:  # only the output's bfloat16 rounding is left
        exact = x @ quantized.dequantized(torch.float32).T + layer.bias + side
        torch.testing.assert_close(quantized(x).float(), exact, atol=1e-2, rtol=1e-2)


def test_int4_holds_weights_already_on_a_4_bit_grid_exactly():
    """Weights on a per-group 16-level grid (what the packaged models' Q4_1 GGUFs hold) survive."""
    low = torch.randn(32, 64 // INT4_GROUP, 1)
    grid = low + 0.05 * torch.randint(0, 16, (32, 64 // INT4_GROUP, INT4_GROUP))
    grid[..., 0], grid[..., 1] = low[..., 0], low[..., 0] + 0.75  # every group spans all 16 levels
    layer = nn.Linear(64, 32, bias=False)
    layer.weight.data = grid.reshape(32, 64)
    torch.testing.assert_close(Int4Linear(layer).dequantized().float(), layer.weight, atol=2e-2, rtol=1e-2)


def lora_run(folder, merged: bool) -> FirstSkipModel:
    """A tiny Llama run with a random, non-zero LoRA adapter (saved beside merged weights if ``merged``);
    returns the run in float32 as `from_pretrained` loads it."""
    fsm = FirstSkipModel.from_base("random:tiny-llama")
    targets = ["q_proj", "v_proj", "down_proj"]
    with peft_quietly():
        peft = get_peft_model(fsm.model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    peft.save_pretrained(folder / "adapter")
    fsm.config = fsm.config.replace(lora={"r": 4, "alpha": 8, "target_modules": targets})
    if merged:
        model = peft.merge_and_unload()
        model.save_pretrained(folder / "model")
        fsm.config = fsm.config.replace(merged=True, fingerprint=fingerprint(model))
    fsm.save_pretrained(folder)
    return FirstSkipModel.from_pretrained(folder)


@pytest.mark.parametrize("merged", [False, True])
def test_int4_keeps_a_runs_lora_beside_the_4_bit_base_weights(tmp_path, merged):
    """Rounding merged weights to 4 bits would round most of a LoRA's change away, so int4 quantizes
    the base's weights and runs the adapter beside them, in the packed and the dequantized path."""
    reference = lora_run(tmp_path / "run", merged)
    fsm = FirstSkipModel.from_pretrained(tmp_path / "run", dtype="int4")
    layer = decoder_layers(fsm.model)[0]
    assert isinstance(layer.self_attn.q_proj, Int4Linear) and layer.self_attn.q_proj.lora_a.shape == (4, 64)
    assert layer.self_attn.k_proj.lora_a is None  # not a target
    assert isinstance(fsm.model.get_output_embeddings(), Int8Linear)
    base = FirstSkipModel.from_base("random:tiny-llama", dtype="int4")  # the same 4-bit weights, no adapter
    for ids in (torch.tensor([prompt(12, 1)]), torch.tensor([prompt(40, 2)])):  # packed kernel, dequantized
        with torch.no_grad():
            want = reference.model(ids).logits.log_softmax(-1)
            got, without = (m.model(ids).logits.float().log_softmax(-1) for m in (fsm, base))
        kl, kl_without = ((want.exp() * (want - x)).sum(-1).mean() for x in (got, without))
        assert kl < 0.05 and kl < kl_without / 5, (kl, kl_without)
    with pytest.raises(FirstSkipError, match="adapter"):
        shutil.rmtree(tmp_path / "run" / "adapter")
        FirstSkipModel.from_pretrained(tmp_path / "run", dtype="int4")


@pytest.mark.parametrize("outputs", [48, 128])  # 128: whole blocks (64 or 32, by CPU), read back from the codes
def test_int4_dequantizes_from_its_packed_codes_where_the_layout_allows(outputs):
    layer = nn.Linear(64, outputs, bias=False)
    quantized = Int4Linear(layer)
    assert (quantized.codes is None) == (outputs % 64 == 0)  # no second copy of the weights
    x = torch.randn(40, 64)  # more than PACKED_ROWS: the dequantized product
    torch.testing.assert_close(quantized(x[:1]).float(), quantized(x)[:1].float(), atol=5e-2, rtol=5e-2)
    assert (quantized.dequantized().float() - layer.weight).abs().max() <= layer.weight.abs().max() / 7


@pytest.mark.parametrize("bias, lora", [(False, False), (True, True)])
@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear])
def test_stacked_projections_equal_their_parts_which_keep_their_weights_as_views(kind, bias, lora):
    """q, k, v (or gate, up) as one product for a decode step: the same outputs side by side, and
    the parts, which still serve prompts, read the stacked weights instead of copies."""
    gen = torch.Generator().manual_seed(0)
    parts = [kind(nn.Linear(64, out, bias=bias), (torch.randn(4, 64, generator=gen) / 8, torch.randn(out, 4, generator=gen) / 8)
                  if lora and i != 1 else None)  # the middle part without an adapter
             for i, out in enumerate((128, 64, 64))]
    x = torch.randn(3, 64)
    want = [p(x) for p in parts]
    whole = stacked(parts)
    got = whole(x)
    if lora:  # the adapters' sums run over the stacked ranks
        torch.testing.assert_close(got, torch.cat(want, -1))
    else:
        assert torch.equal(got, torch.cat(want, -1))
    for p, before in zip(parts, want):
        assert torch.equal(p(x), before)
        assert all(getattr(p, name) is None or getattr(p, name)._base is getattr(whole, name) for name in kind.ROWS)
    other = Int4Linear if kind is Int8Linear else Int8Linear
    assert stacked([parts[0], other(nn.Linear(64, 64, bias=bias))]) is None  # kinds differ
    assert stacked([Int4Linear(nn.Linear(64, 48)), Int4Linear(nn.Linear(64, 64))]) is None  # not whole int4 blocks


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_stacked_projections_decode_as_the_layers_own(family, fmt, monkeypatch):
    jobs, skip = [prompt(9, 2), prompt(5, 3)], [[2, 3], [1]]
    stacked_engine = engine(quantize(tiny(family), fmt))
    stacked_layer = decoder_layers(stacked_engine.model)[0]
    assert hasattr(stacked_layer.mlp, "gate_up_proj") and (fmt == "int4" or hasattr(stacked_layer.self_attn, "qkv_proj"))
    want = [g.token_ids for g in stacked_engine.generate(jobs, Sampling(max_new_tokens=6), skip)]
    monkeypatch.setattr(decoding, "_stack_projections", lambda layer: None)
    assert [g.token_ids for g in engine(quantize(tiny(family), fmt)).generate(jobs, Sampling(max_new_tokens=6), skip)] == want
