"""Int8 weights: every linear layer of the decoder and the head runs on torch's int8 weight kernel,
the skipping invariants still hold, and a run loads in int8 with its adapter merged first.

Int8 changes the arithmetic, so outputs are compared with float32 by distance (the quality check on
real data is `benchmarks/dtype_agreement.py` and `dtype_scores.py`), and with each other exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import tiny
from firstskip.config import FirstSkipConfig
from firstskip.engine import Engine, Sampling
from firstskip.errors import FirstSkipError
from firstskip.families import decoder_layers
from firstskip.modeling import FirstSkipModel
from firstskip.quantize import PACKED_ROWS, Int8Linear, quantize_int8
from firstskip.skipping import pruned_copy

FAMILIES = ["llama", "qwen2", "gemma3_text", "phi3", "gpt2"]  # qwen2's projections have biases; gpt2 has Conv1D


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine(model, **config) -> Engine:
    return Engine(model, FirstSkipConfig(num_layers=len(decoder_layers(model)), hidden_size=model.config.hidden_size,
                                         **config))


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_replaces_every_linear_and_stays_close_to_float32(family):
    reference = tiny(family)
    model = quantize_int8(tiny(family))
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, Conv1D))]
    assert not linears and isinstance(model.get_output_embeddings(), Int8Linear)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = torch.tensor([prompt(12, 1)])
    with torch.no_grad():
        want, got = reference(ids).logits.log_softmax(-1), model(ids).logits.float().log_softmax(-1)
    kl = (want.exp() * (want - got)).sum(-1).mean()
    assert kl < 0.02, f"KL(fp32 || int8) = {kl:.4f}"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_int8_skipping_equals_the_int8_pruned_copy_and_rows_equal_their_solo_runs(family):
    model = quantize_int8(tiny(family))
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


@pytest.mark.parametrize("rows", [1, 3, 40])  # the int8 kernel up to PACKED_ROWS rows, dequantized weights beyond
def test_int8_products_quantize_the_weights_only(rows):
    layer = nn.Linear(64, 32)
    quantized = Int8Linear(layer)
    x = torch.randn(rows, 64)
    dequantized = quantized.weight_int8.float() * quantized.scales.float()[:, None]
    assert (dequantized - layer.weight).abs().max() <= layer.weight.abs().max() / 127
    torch.testing.assert_close(quantized(x).float(), x.bfloat16().float() @ dequantized.T + layer.bias,
                               atol=3e-2, rtol=3e-2)
    one_by_one = torch.cat([quantized(x[i:i + 1]) for i in range(rows)]) if rows <= PACKED_ROWS else quantized(x)
    torch.testing.assert_close(quantized(x), one_by_one)  # a row's product does not depend on its batch
