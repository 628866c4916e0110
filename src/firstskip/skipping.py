"""Layer skipping inside a Hugging Face model's own forward.

Each decoder layer's ``forward`` is wrapped (the way accelerate attaches hooks) so that a
`SkipController` decides, per call, whether the layer runs. The model's own forward still builds
embeddings, rotary tables and masks, so every family works unchanged. A skipped layer returns its
input at once: its weights are never touched. This module knows hidden states, masks and caches;
it knows nothing of tokens, datasets or losses.

What a call does is read from the `Pass` active in the caller's context (a ``ContextVar``), so
prefills and training passes in several threads, or interleaved generators, never share state.
Modes of a pass:
- none active: every layer runs (plain base model).
- ``prefill``: routers score the prompt entering each layer; in ``routed`` prefill the rows that
  skip a layer skip it for the prompt too (only the rows that keep it are executed).
- ``decode``: a fixed list says which layers run; no router runs (the fallback decode path of a
  family that the engine's own loop, `decoding.py`, does not run).
- ``train``: every layer runs; on response tokens its output is blended with its input by a
  per-sequence gate, ``h + g (f(h) - h)``, which is how routers and LoRA learn the skip pattern.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
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
    """A DynamicCache whose skipped layers stop growing (the fallback decode path's cache).

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


class Pass:
    """The state of one forward pass (or of a few passes that belong together, such as a training
    step's prompt and response): its mode, decisions and router scores. It belongs to its caller,
    never to the shared model, so passes in several threads or interleaved generators never mix."""

    def __init__(self, mode: str, config: FirstSkipConfig, routers: RouterBank | None,
                 prompt_mask: torch.Tensor | None = None, skip: torch.Tensor | None = None,
                 gate_fn: GateFn | None = None) -> None:
        self.mode, self.config, self.routers = mode, config, routers
        self.prompt_mask, self.gate_fn = prompt_mask, gate_fn
        self.skip = skip  # [B, L] rows' skip sets (forced, or routed decisions as prefill makes them)
        self.forced = skip is not None
        self.probs: list[torch.Tensor | None] = [None] * config.num_layers  # p_l per layer, [B] each
        self.decode_rows: list[bool | torch.Tensor] = []
        self.protected = set(config.protected)

    def stacked_probs(self) -> torch.Tensor | None:
        """[B, L] keep-probabilities, or None when no router ran."""
        return None if self.routers is None else torch.stack(self.probs, dim=-1)


class SkipController:
    """Attaches to a model's decoder layers and decides, per call, which of them run.

    The decision is read from the `Pass` active in the caller's context (`mode_ctx`); with none
    active a layer simply runs. The controller itself holds only defaults (config and routers).
    """

    def __init__(self, model: nn.Module, config: FirstSkipConfig, routers: RouterBank | None = None) -> None:
        family_of(model)  # a clear error for unsupported models before anything is patched
        self.model, self.config, self.routers = model, config, routers
        self.inner: list[Callable] = []  # each layer's own forward, for callers that run layers directly
        self._active: ContextVar[Pass | None] = ContextVar(f"firstskip_pass_{id(self)}", default=None)
        self._attach()

    # -- attaching -------------------------------------------------------------------------
    def _attach(self) -> None:
        self.inner = []
        for idx, layer in enumerate(decoder_layers(self.model)):
            if "forward" in layer.__dict__:
                raise RuntimeError("this model is already attached to a SkipController; detach it first")
            self.inner.append(layer.forward)
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

    # -- passes ----------------------------------------------------------------------------
    @contextmanager
    def mode_ctx(self, mode: str, prompt_mask: torch.Tensor | None = None, skip: torch.Tensor | None = None,
                 gate_fn: GateFn | None = None, config: FirstSkipConfig | None = None,
                 routers: bool = True) -> Iterator[Pass]:
        """Run forward passes in one mode, in this context only; yields the pass's state.

        ``config`` overrides the controller's for this pass (a request's own threshold, or `full`
        prefill for scoring); ``routers=False`` scores nothing (the plain model, or forced sets).
        """
        state = Pass(mode, config or self.config, self.routers if routers else None, prompt_mask, skip, gate_fn)
        token = self._active.set(state)
        try:
            yield state
        finally:
            self._active.reset(token)

    @contextmanager
    def decode_ctx(self, skip: torch.Tensor) -> Iterator[Pass]:
        """Decode with a fixed plan of which rows run each layer: all (True), none (False) or some
        (indices). Rows that agree need no per-row work; a layer kept by some rows runs for those."""
        with self.mode_ctx("decode", routers=False) as state:
            state.decode_rows = [_rows_plan(~skip[:, i]) for i in range(skip.shape[1])]
            yield state

    # -- the wrapped forward ---------------------------------------------------------------
    def _layer_forward(self, idx: int, inner: Callable, hidden: torch.Tensor, *args: Any, **kwargs: Any):
        state = self._active.get()
        if state is None:
            return inner(hidden, *args, **kwargs)
        if state.mode == "decode":
            rows = state.decode_rows[idx]
            if rows is True:
                return inner(hidden, *args, **kwargs)
            return hidden if rows is False else _run_rows(inner, rows, hidden, args, kwargs)
        if state.mode == "prefill":
            return _prefill(state, idx, inner, hidden, args, kwargs)
        if state.mode == "train":
            return _train(state, idx, inner, hidden, args, kwargs)
        return inner(hidden, *args, **kwargs)


def _score(state: Pass, idx: int, hidden: torch.Tensor) -> torch.Tensor | None:
    if state.routers is None:
        return None
    p = state.routers.keep_probability(idx, hidden, state.prompt_mask)
    state.probs[idx] = p
    return p


def _prefill(state: Pass, idx: int, inner: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict):
    p = _score(state, idx, hidden)
    if state.config.prefill == "full":
        return inner(hidden, *args, **kwargs)
    skip_rows = _routed_decision(state, idx, p, hidden.shape[0], hidden.device)
    if not skip_rows.any():
        return inner(hidden, *args, **kwargs)
    if skip_rows.all():
        return hidden
    return _run_rows(inner, (~skip_rows).nonzero().squeeze(-1), hidden, args, kwargs)


def _routed_decision(state: Pass, idx: int, p: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """Decide layer idx for every row as the prompt reaches it; record it in the pass's skip."""
    if state.skip is None:
        state.skip = torch.zeros(batch, state.config.num_layers, dtype=torch.bool, device=device)
    if not state.forced and p is not None and idx not in state.protected:
        state.skip[:, idx] = p < state.config.threshold
    return state.skip[:, idx]


def _train(state: Pass, idx: int, inner: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict):
    p = _score(state, idx, hidden)
    out = inner(hidden, *args, **kwargs)
    if idx in state.protected or state.gate_fn is None:
        return out
    gate = state.gate_fn(idx, p).to(hidden.dtype)  # [B]
    g = torch.where(state.prompt_mask, torch.ones_like(gate)[:, None], gate[:, None]).unsqueeze(-1)
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
