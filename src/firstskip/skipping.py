"""Layer skipping inside a Hugging Face model's own forward.

Each decoder layer's ``forward`` is wrapped (the way accelerate attaches hooks) so that a shared
`SkipController` decides, per call, whether the layer runs. The model's own forward still builds
embeddings, rotary tables and masks, so every family works unchanged. A skipped layer returns its
input at once: its weights are never touched. This module knows hidden states, masks and caches;
it knows nothing of tokens, datasets or losses.

Modes of the controller:
- ``off``: every layer runs (plain base model).
- ``prefill``: routers score the prompt entering each layer; in ``routed`` prefill the rows that
  skip a layer skip it for the prompt too (only the rows that keep it are executed).
- ``decode``: a fixed list says which layers run; no router runs, no per-row work.
- ``train``: every layer runs; on response tokens its output is blended with its input by a
  per-sequence gate, ``h + g (f(h) - h)``, which is how routers and LoRA learn the skip pattern.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache

from firstskip.config import FirstSkipConfig
from firstskip.families import decoder_layers, family_of, set_decoder_layers
from firstskip.routers import RouterBank

GateFn = Callable[[int, torch.Tensor], torch.Tensor]  # (layer, p_l [B]) -> gate [B]


class SkipCache(DynamicCache):
    """A DynamicCache whose skipped layers stop growing.

    transformers asks one layer (the first of each attention type) for the cache length when it
    builds masks; once that layer is skipped its length is stale, so such questions are sent to a
    kept layer of the same type.
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config=config)
        self.redirect: dict[int, int] = {}

    def freeze(self, skipped: set[int]) -> None:
        kept = [i for i in range(len(self.layers)) if i not in skipped]
        self.redirect = {}
        for i in skipped:
            same_type = [j for j in kept if self.layers[j].is_sliding == self.layers[i].is_sliding]
            if same_type:
                self.redirect[i] = same_type[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self.redirect.get(layer_idx, layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self.redirect.get(layer_idx, layer_idx))

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return super().get_query_offset(self.redirect.get(layer_idx, layer_idx))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))


class _RowView(DynamicCache):
    """The cache as seen by a layer that runs on some batch rows only.

    New keys/values are written into those rows (zeros elsewhere: the other rows skip this layer
    for good and never read it), and the layer gets back only its rows' history.
    """

    def __init__(self, cache: Cache, rows: torch.Tensor, batch: int) -> None:
        super().__init__()
        self.cache, self.rows, self.batch = cache, rows, batch

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        full = []
        for t in (key_states, value_states):
            f = t.new_zeros((self.batch, *t.shape[1:]))
            f[self.rows] = t
            full.append(f)
        keys, values = self.cache.update(full[0], full[1], layer_idx, *args, **kwargs)
        return keys[self.rows], values[self.rows]


class SkipController:
    """Attaches to a model's decoder layers and decides, per call, which of them run."""

    def __init__(self, model: nn.Module, config: FirstSkipConfig, routers: RouterBank | None = None) -> None:
        family_of(model)  # a clear error for unsupported models before anything is patched
        self.model, self.config, self.routers = model, config, routers
        self.mode = "off"
        self.prompt_mask: torch.Tensor | None = None
        self.probs: list[torch.Tensor | None] = []  # p_l per layer, [B] each, filled by prefill/train
        self.skip: torch.Tensor | None = None  # [B, L] rows' skip sets (forced, or routed decisions)
        self.decode_rows: list[bool | torch.Tensor] = []
        self.gate_fn: GateFn | None = None
        self.forced = False
        self._protected = set(config.protected)
        self._attach()

    # -- attaching -------------------------------------------------------------------------
    def _attach(self) -> None:
        for idx, layer in enumerate(decoder_layers(self.model)):
            if "forward" in layer.__dict__:
                raise RuntimeError("this model is already attached to a SkipController; detach it first")
            layer.forward = functools.partial(self._layer_forward, idx, layer.forward)

    def detach(self) -> None:
        for layer in decoder_layers(self.model):
            layer.__dict__.pop("forward", None)

    @contextmanager
    def detached(self) -> Iterator[None]:
        self.detach()
        try:
            yield
        finally:
            self._attach()

    # -- modes -----------------------------------------------------------------------------
    @contextmanager
    def mode_ctx(self, mode: str, prompt_mask: torch.Tensor | None = None, skip: torch.Tensor | None = None,
                 gate_fn: GateFn | None = None) -> Iterator[None]:
        """Run a forward pass in one mode; state is reset afterwards except what callers read."""
        self.mode, self.prompt_mask, self.skip, self.gate_fn = mode, prompt_mask, skip, gate_fn
        self.forced = skip is not None
        self.probs = [None] * self.config.num_layers
        try:
            yield
        finally:
            self.mode, self.prompt_mask, self.gate_fn = "off", None, None

    def set_decode(self, skip: torch.Tensor) -> None:
        """Fix, for decoding, which rows run each layer: all (True), none (False) or some (indices).

        Rows that agree need no per-row work; a layer kept by only some rows runs for those rows.
        """
        self.mode = "decode"
        self.decode_rows = [_rows_plan(~skip[:, i]) for i in range(skip.shape[1])]

    # -- the wrapped forward ---------------------------------------------------------------
    def _layer_forward(self, idx: int, inner: Callable, hidden: torch.Tensor, *args: Any, **kwargs: Any):
        if self.mode == "decode":
            rows = self.decode_rows[idx]
            if rows is True:
                return inner(hidden, *args, **kwargs)
            return hidden if rows is False else _run_rows(inner, rows, hidden, args, kwargs)
        if self.mode == "prefill":
            return self._prefill(idx, inner, hidden, args, kwargs)
        if self.mode == "train":
            return self._train(idx, inner, hidden, args, kwargs)
        return inner(hidden, *args, **kwargs)

    def _score(self, idx: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.routers is None:
            return None
        p = self.routers.keep_probability(idx, hidden, self.prompt_mask)
        self.probs[idx] = p
        return p

    def _prefill(self, idx: int, inner: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict):
        p = self._score(idx, hidden)
        if self.config.prefill == "full":
            return inner(hidden, *args, **kwargs)
        skip_rows = self._routed_decision(idx, p, hidden.shape[0], hidden.device)
        if not skip_rows.any():
            return inner(hidden, *args, **kwargs)
        if skip_rows.all():
            return hidden
        return _run_rows(inner, (~skip_rows).nonzero().squeeze(-1), hidden, args, kwargs)

    def _routed_decision(self, idx: int, p: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """Decide layer idx for every row as the prompt reaches it; record it in self.skip."""
        if self.skip is None:
            self.skip = torch.zeros(batch, self.config.num_layers, dtype=torch.bool, device=device)
        if not self.forced and p is not None and idx not in self._protected:
            self.skip[:, idx] = p < self.config.threshold
        return self.skip[:, idx]

    def _train(self, idx: int, inner: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict):
        p = self._score(idx, hidden)
        out = inner(hidden, *args, **kwargs)
        if idx in self._protected or self.gate_fn is None:
            return out
        gate = self.gate_fn(idx, p).to(hidden.dtype)  # [B]
        g = torch.where(self.prompt_mask, torch.ones_like(gate)[:, None], gate[:, None]).unsqueeze(-1)
        return hidden + g * (out - hidden)


def _rows_plan(keep: torch.Tensor) -> bool | torch.Tensor:
    if keep.all():
        return True
    return keep.nonzero().squeeze(-1) if keep.any() else False


def _run_rows(inner: Callable, rows: torch.Tensor, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Run a layer on some batch rows only; the others pass through unchanged, their cache untouched."""
    batch = hidden.shape[0]

    def sub(x: Any) -> Any:
        if isinstance(x, Cache):
            return _RowView(x, rows, batch)
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
            return x[rows]
        if isinstance(x, tuple):
            return tuple(sub(v) for v in x)
        return x

    out = hidden.clone()
    out[rows] = inner(*[sub(a) for a in (hidden, *args)], **{k: sub(v) for k, v in kwargs.items()})
    return out


def pruned_copy(model: nn.Module, skip: set[int] | list[int]) -> nn.Module:
    """The same model with layers ``skip`` physically deleted: the speed limit of skipping them.

    Parameters and buffers are shared with ``model`` (no extra weight memory); modules are copied
    so renumbering the remaining layers' cache slots leaves the original untouched.
    """
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    pruned = copy.deepcopy(model, memo)
    keep = [i for i in range(len(decoder_layers(model))) if i not in set(skip)]
    attention = family_of(model).attention
    layers = nn.ModuleList(decoder_layers(pruned)[i] for i in keep)
    for new_idx, layer in enumerate(layers):
        getattr(layer, attention).layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    set_decoder_layers(pruned, layers)
    pruned.config.num_hidden_layers = len(keep)
    if getattr(pruned.config, "layer_types", None):
        pruned.config.layer_types = [model.config.layer_types[i] for i in keep]
    return pruned
