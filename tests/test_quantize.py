"""Int8 weights: every linear layer of the decoder and the head runs on torch's int8 kernels, the
skipping invariants still hold, and a run loads in int8 with its adapter merged first.

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
from firstskip.quantize import Int8Linear, quantize_int8
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
    assert model.get_input_embeddings().weight.dtype == torch.float32
    ids = torch.tensor([prompt(12, 1)])
    with torch.no_grad():
        want, got = reference(ids).logits.log_softmax(-1), model(ids).logits.log_softmax(-1)
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


def test_a_rows_int8_product_does_not_depend_on_what_else_is_in_the_call():
    """The kernel quantizes a whole call with one range; rows are scaled first so a large row
    (a prompt token with outliers) does not flatten the others."""
    layer = nn.Linear(64, 32)
    quantized = Int8Linear(layer)
    rows = torch.randn(3, 64)
    loud = torch.cat([rows, 1000 * torch.randn(1, 64)])
    torch.testing.assert_close(quantized(loud)[:3], quantized(rows), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(quantized(rows), layer(rows), atol=5e-2, rtol=5e-2)
