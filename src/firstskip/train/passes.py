"""The forward passes training and calibration make: gated (teacher-forced) and prompt scoring.

Both run on right-padded batches (`data.collate`) without an attention mask: attention is causal, so
no real token ever looks ahead to the pads, and positions count from 0 in every row, as at inference.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from firstskip.data import Batch
from firstskip.skipping import GateFn, SkipController


def gated_forward(model: nn.Module, controller: SkipController, batch: Batch,
                  gate_fn: GateFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, labels, probs)``: response tokens pass gated layers, prompt tokens every layer.

    Logits cover only the positions from the first one that has a label (prompts make up most of
    each row, and the vocabulary projection is a large part of a small model's cost); ``labels``
    are cut to match. ``probs`` [B, L] are the routers' keep-probabilities.
    """
    has_label = (batch.labels != -100).any(0).nonzero()
    start = int(has_label[0]) if len(has_label) else batch.labels.shape[1] - 1
    with controller.mode_ctx("train", prompt_mask=batch.prompt_mask, gate_fn=gate_fn):
        logits = model(input_ids=batch.input_ids, use_cache=False,
                       logits_to_keep=batch.input_ids.shape[1] - start).logits
        probs = torch.stack(controller.probs, dim=-1)
    return logits, batch.labels[:, start:], probs


def response_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over response tokens (labels are already shifted)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def hard_gate(skip: torch.Tensor) -> GateFn:
    """Gates of a fixed skip mask [B, L]: 0 where a row skips the layer, 1 elsewhere."""
    return lambda layer, p: (~skip[:, layer]).to(p.dtype)


@torch.no_grad()
def prompt_keep_probs(model: nn.Module, controller: SkipController, batch: Batch) -> torch.Tensor:
    """Keep-probabilities [B, L] from the prompts alone, as a full prefill computes them.

    The model is put in eval mode for the pass (no LoRA dropout), as it is at inference.
    """
    width = int(batch.prompt_mask.sum(-1).max())
    was_training = model.training
    model.eval()
    try:
        with full_prefill(controller), controller.mode_ctx("prefill", prompt_mask=batch.prompt_mask[:, :width]):
            model(input_ids=batch.input_ids[:, :width], use_cache=False, logits_to_keep=1)
            return torch.stack(controller.probs, dim=-1)
    finally:
        model.train(was_training)


@contextmanager
def full_prefill(controller: SkipController) -> Iterator[None]:
    """Score prompts through every layer whatever the config's prefill mode: training and calibration
    model `full` prefill, where each p_l depends on the prompt only, never on other layers' decisions."""
    config = controller.config
    controller.config = config.replace(prefill="full")
    try:
        yield
    finally:
        controller.config = config
