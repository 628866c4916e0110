"""The forward passes training and calibration make: gated (teacher-forced) and prompt scoring.

They take right-padded batches (`data.collate`). One-piece passes need no attention mask: attention
is causal, so no real token ever looks ahead to the pads, and positions count from 0 in every row,
as at inference. The two-piece pass of phase 1 left-pads the prompts, as the engine's prefill does.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from firstskip.config import FirstSkipConfig
from firstskip.data import Batch
from firstskip.families import cache_kwargs
from firstskip.routers import RouterBank
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
    with controller.mode_ctx("train", prompt_mask=batch.prompt_mask, gate_fn=gate_fn) as state:
        logits = model(input_ids=batch.input_ids, use_cache=False,
                       logits_to_keep=batch.input_ids.shape[1] - start).logits
    probs = state.stacked_probs()
    return logits, batch.labels[:, start:], probs


def prompt_then_response(model: nn.Module, controller: SkipController, routers: RouterBank, batch: Batch,
                         make_gate: Callable[[torch.Tensor], GateFn], share: torch.Tensor | None = None,
                         distill: bool = False, prompt_grad: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(response CE summed per row [B], probs [B, L], KL summed per row [B] or None)``: the CE and probs
    as `gated_forward` gives them, far cheaper to differentiate.

    ``make_gate(probs)`` returns the gate function once all keep-probabilities are known (a gate may
    depend on all of them, e.g. a threshold that meets a skip target on the batch). ``share`` [B]:
    the routers pool only that share of each prompt (`RouterBank.keep_probability`). ``distill``:
    also KL(ungated || gated) of the response positions' next-token distributions (the teacher is the
    same model with every layer, run on a fork of the prompt's cache).

    Prompt tokens never pass a gate. For a frozen base (phase 1) their states and keys/values do not
    depend on the routers: the prompt runs once without autograd (a prefill into a KV cache that
    keeps each layer's input), the routers score those inputs with autograd, and only the response
    tokens, typically a tenth of a row, run forward and backward on top of the cache. With
    ``prompt_grad`` (phase 2: LoRA changes the prompt's states too) the prompt keeps its graph.
    """
    prompt_ids, prompt_mask, first_labels, response_ids, response_mask, labels = _split_rows(batch)
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=model.config)
    with torch.set_grad_enabled(prompt_grad and torch.is_grad_enabled()):
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask.long(), position_ids=positions,
                    **cache_kwargs(model, cache), output_hidden_states=True, logits_to_keep=1)
    # The routers learn from their own weights only; with prompt_grad the layer inputs carry LoRA's
    # graph, which the routers' pass need not extend (their decisions are hard in phase 2).
    probs = torch.stack([routers.keep_probability(layer, out.hidden_states[layer].detach(), prompt_mask, share)
                         for layer in range(len(out.hidden_states) - 1)], dim=-1)
    ce_first = response_ce(out.logits, first_labels[:, None], per_row=True)  # from the prompt: ungated
    gate_fn = make_gate(probs)
    gates = lambda layer, _: gate_fn(layer, probs[:, layer])  # noqa: E731  (the batch's p, not the pass's)
    steps = torch.arange(1, response_ids.shape[1] + 1, device=positions.device)
    response = {"input_ids": response_ids, "attention_mask": torch.cat([prompt_mask, response_mask], -1).long(),
                "position_ids": positions[:, -1:] + steps}
    teacher = None
    if distill:
        with torch.no_grad():
            teacher = model(**response, **cache_kwargs(model, _fork(cache))).logits
    with controller.mode_ctx("train", prompt_mask=torch.zeros_like(response_mask), gate_fn=gates):
        logits = model(**response, **cache_kwargs(model, cache)).logits
    kl = None if teacher is None else response_kl(logits, teacher, labels)
    ce = ce_first + response_ce(logits, labels, per_row=True)
    return ce, probs, kl


def decision_prompt(batch: Batch, config: FirstSkipConfig) -> Batch:
    """``batch`` whose ``prompt_mask`` holds only the tokens the routers read before deciding
    (`FirstSkipConfig.decision_tokens`). In `early` prefill the rest of each prompt then passes the
    gates with the response, as it runs only the kept layers at inference."""
    if config.prefill != "early":
        return batch
    heads = [config.decision_tokens(n) for n in batch.prompt_mask.sum(-1).tolist()]
    columns = torch.arange(batch.prompt_mask.shape[1], device=batch.prompt_mask.device)
    head = torch.tensor(heads, device=columns.device)[:, None]
    return dataclasses.replace(batch, prompt_mask=batch.prompt_mask & (columns < head))


def _fork(cache: DynamicCache) -> DynamicCache:
    """A copy of ``cache`` that a pass can extend while ``cache`` keeps the prompt alone. A cache
    layer's update rebinds its tensors (torch.cat) instead of writing into them, so copying the layer
    objects suffices; cropping instead would lose what a sliding-window layer dropped."""
    fork = copy.copy(cache)
    fork.layers = [copy.copy(layer) for layer in cache.layers]
    return fork


def _split_rows(batch: Batch) -> tuple[torch.Tensor, ...]:
    """A right-padded prompt+response batch as left-padded prompts and right-padded responses.

    Returns prompt ids and mask [B, P], each row's first response token (predicted from the last
    prompt position), response ids and mask [B, R], and the labels of the response positions [B, R].
    """
    prompt_lens = batch.prompt_mask.sum(-1).tolist()
    lengths = batch.attention_mask.sum(-1).tolist()
    width, depth = max(prompt_lens), max(n - p for n, p in zip(lengths, prompt_lens))
    rows, device = len(prompt_lens), batch.input_ids.device
    prompt_ids = batch.input_ids.new_zeros(rows, width)
    prompt_mask = torch.zeros(rows, width, dtype=torch.bool, device=device)
    response_ids = batch.input_ids.new_zeros(rows, depth)
    response_mask = torch.zeros(rows, depth, dtype=torch.bool, device=device)
    labels = torch.full_like(response_ids, -100)
    for row, (p, n) in enumerate(zip(prompt_lens, lengths)):
        prompt_ids[row, width - p:] = batch.input_ids[row, :p]
        prompt_mask[row, width - p:] = True
        response_ids[row, :n - p] = batch.input_ids[row, p:n]
        response_mask[row, :n - p] = True
        labels[row, :n - p] = batch.labels[row, p:n]
    first_labels = batch.labels[torch.arange(rows, device=device), torch.tensor(prompt_lens, device=device) - 1]
    return prompt_ids, prompt_mask, first_labels, response_ids, response_mask, labels


def response_ce(logits: torch.Tensor, labels: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """Cross-entropy summed over response tokens (labels are already shifted), or per row [B]."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return losses.view(labels.shape).sum(-1) if per_row else losses.sum()


def response_kl(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) summed over each row's labelled positions [B]."""
    kl = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(teacher.float(), -1), reduction="none",
                  log_target=True).sum(-1)
    return (kl * (labels != -100)).sum(-1)


def hard_gate(skip: torch.Tensor) -> GateFn:
    """Gates of a fixed skip mask [B, L]: 0 where a row skips the layer, 1 elsewhere."""
    return lambda layer, p: (~skip[:, layer]).to(p.dtype)


@torch.no_grad()
def prompt_keep_probs(model: nn.Module, controller: SkipController, batch: Batch) -> torch.Tensor:
    """Keep-probabilities [B, L] from the prompts alone, as a full prefill computes them (pass
    `decision_prompt`'s batch for what `early` prefill reads).

    The model is put in eval mode for the pass (no LoRA dropout), as it is at inference.
    """
    width = int(batch.prompt_mask.sum(-1).max())
    was_training = model.training
    model.eval()
    try:
        # `full` prefill whatever the config says: training and calibration model it, where each p_l
        # depends on the prompt only, never on other layers' decisions.
        with controller.mode_ctx("prefill", prompt_mask=batch.prompt_mask[:, :width],
                                 config=controller.config.replace(prefill="full")) as state:
            model(input_ids=batch.input_ids[:, :width], use_cache=False, logits_to_keep=1)
        return state.stacked_probs()
    finally:
        model.train(was_training)
