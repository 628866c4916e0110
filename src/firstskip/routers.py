"""Routers: one small MLP per decoder layer that scores the prompt, and the skip decisions.

A router reads the residual stream entering its layer and scores the prompt's tokens; the scores
become one keep-probability per sequence by a masked mean over the prompt's own tokens (padding and
the chat template's fixed tokens never count) or from the last prompt token alone
(``router_pooling``). Routers know nothing of the engine or of training; they see hidden states
and masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from firstskip.config import FirstSkipConfig


class Router(nn.Module):
    """norm -> Linear(d, r) -> GELU -> Linear(r, 1); a logit per token."""

    def __init__(self, hidden_size: int, dim: int, init_keep: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.up = nn.Linear(hidden_size, dim)
        self.act = nn.GELU()
        self.down = nn.Linear(dim, 1)
        # Zero output weights: every input gets exactly init_keep, so an untrained router keeps all
        # layers and the model starts as the base model (like LoRA's zero-initialised B).
        nn.init.zeros_(self.down.weight)
        nn.init.constant_(self.down.bias, math.log(init_keep / (1.0 - init_keep)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.up.weight.dtype)
        return self.down(self.act(self.up(self.norm(x)))).squeeze(-1)


class RouterBank(nn.Module):
    """One router per decoder layer (protected layers have one too, it is simply never asked)."""

    def __init__(self, config: FirstSkipConfig) -> None:
        super().__init__()
        self.routers = nn.ModuleList(
            Router(config.hidden_size, config.router_dim, config.router_init_keep)
            for _ in range(config.num_layers)
        )
        self.pooling = config.router_pooling
        self.head, self.tail = (config.template_tokens or (0, 0)) if self.pooling == "mean" else (0, 0)

    def keep_probability(self, layer: int, hidden: torch.Tensor, prompt_mask: torch.Tensor,
                         share: torch.Tensor | None = None) -> torch.Tensor:
        """p_l per sequence, shape [B].

        ``mean``: the masked mean of per-token keep probabilities over the prompt without its first
        ``head`` and last ``tail`` tokens (``template_tokens``: the chat template's system turn and
        assistant header, the same in every prompt). Pooled with the rest (``mean-all``), those fixed
        tokens weigh more in a short prompt than in a long one, so p_l drifted with prompt length and
        short prompts skipped most (docs/training.md). ``last``: the last prompt token's score, the
        state a causal model's sequence classifier reads.

        ``share`` [B] (training only): pool just the first ``ceil(share * n)`` of the n tokens a row
        would pool. A causal model's states there are those of the prompt cut after them, so this is
        p_l of that shorter prompt (`RouterTraining.prefixes`).
        """
        hidden = hidden.to(next(self.parameters()).dtype)  # routers stay float32 under a bfloat16 model
        mask = inner_mask(prompt_mask, self.head, self.tail)
        if share is not None:
            rank = mask.long().cumsum(-1)
            mask = mask & (rank <= torch.ceil(share * rank[:, -1]).clamp_min(1)[:, None])
        if self.pooling == "last":
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return torch.sigmoid(self.routers[layer](hidden[rows, last_index(mask)]))
        return masked_mean(torch.sigmoid(self.routers[layer](hidden)), mask)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim counting only positions where mask is true."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def inner_mask(mask: torch.Tensor, head: int, tail: int) -> torch.Tensor:
    """``mask`` [B, T] without each row's first ``head`` and last ``tail`` true positions (left or right
    padding); a row that would keep none keeps all of its own."""
    if head == tail == 0:
        return mask
    position = mask.long().cumsum(-1)  # 1-based index among the row's true positions
    inner = mask & (position > head) & (position <= position[:, -1:] - tail)
    return torch.where(inner.any(-1, keepdim=True), inner, mask)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the last true position of ``mask`` [B, T] (left or right padding)."""
    return mask.shape[-1] - 1 - mask.flip(-1).int().argmax(-1)


def decide(probs: torch.Tensor, config: FirstSkipConfig) -> torch.Tensor:
    """Skip mask [B, L] (True = skip) from keep-probabilities [B, L], per the config's decision
    (a static-set run's fixed set for every row, whatever the probabilities): ``threshold`` skips
    the skippable layers with p_l < threshold, ``budget`` the k lowest, ``snapped`` the stored set
    nearest to the threshold's (`nearest_set`)."""
    if config.static_skip is not None:
        return set_mask([config.static_skip], probs.shape[-1], probs.device).expand(probs.shape[0], -1).clone()
    skippable = torch.zeros(probs.shape[-1], dtype=torch.bool, device=probs.device)
    skippable[config.skippable] = True
    if config.decision == "budget":
        return lowest_k(probs, config.budget_k, skippable)
    skip = (probs < config.threshold) & skippable
    if config.decision == "snapped":
        stored = set_mask(config.snap_sets or [], probs.shape[-1], probs.device)
        return stored[nearest_set(skip, stored)]
    return skip


def set_mask(sets: Sequence[Sequence[int]], num_layers: int, device: torch.device | None = None) -> torch.Tensor:
    """Skip sets as a bool mask [K, L]."""
    mask = torch.zeros(len(sets), num_layers, dtype=torch.bool, device=device)
    for row, layers in enumerate(sets):
        mask[row, list(layers)] = True
    return mask


def nearest_set(skip: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Per row of ``skip`` [B, L], the index of the nearest row of ``stored`` [K, L] in Hamming distance
    (layers in one set and not the other). Ties go to the set that skips fewer layers (the safer one
    for quality), then to the earlier one (`calibrate` stores the most used first)."""
    distance = (skip[:, None, :] ^ stored[None]).sum(-1)  # [B, K]
    key = distance * (stored.shape[-1] + 1) + stored.sum(-1)[None]
    return key.argmin(-1)  # the first of equal keys


def lowest_k(probs: torch.Tensor, k: int, skippable: torch.Tensor) -> torch.Tensor:
    """Skip exactly the k skippable layers with the lowest keep-probability in each row."""
    skip = torch.zeros_like(probs, dtype=torch.bool)
    if k == 0:
        return skip
    ranked = probs.masked_fill(~skippable, float("inf"))
    return skip.scatter(-1, ranked.topk(k, dim=-1, largest=False).indices, True)
