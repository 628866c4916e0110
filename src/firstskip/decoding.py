"""The engine's own decode loop: embedding → each request's kept layers → final norm → head.

After prefill, decoding never calls the model's forward (which rebuilds masks, position tables and
cache bookkeeping every step). `LayerStack` calls the decoder layers themselves, with a mask made
from each request's cache position and a view of the pool's slots as their cache; what differs
between families is read from `families.py`. A `Batch` is the running set of requests: requests
join after their prefill and leave when done, between steps; each layer runs only for the requests
that keep it, and a layer no request keeps does not run at all.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import get_layer_types_and_kwargs

from firstskip.families import decoder_layers, family_of
from firstskip.kvpool import KVPool, LayerSlots

StopFn = Callable[[list[int]], bool]  # generated ids of one row -> stop now?


class _SlotsView:
    """What one layer's attention sees as its cache during a step: ``update`` writes the new key and
    value at each request's position in its slot and returns the slots' histories as views."""

    def __init__(self, slots: LayerSlots, positions: torch.Tensor, length: int) -> None:
        self.slots, self.positions, self.length = slots, positions, length
        self.index = torch.arange(len(positions), device=positions.device)

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: Any, **kwargs: Any):
        n, slots = len(self.positions), self.slots
        slots.keys[self.index, :, self.positions] = keys[:, :, 0]
        slots.values[self.index, :, self.positions] = values[:, :, 0]
        return slots.keys[:n, :, :self.length], slots.values[:n, :, :self.length]


class LayerStack:
    """A causal LM's decode step run directly: the model's modules, none of its forward's overhead."""

    def __init__(self, model: nn.Module, inner: Sequence[Callable]) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper
        family, config = family_of(base), base.config
        self.layers = list(inner)  # each layer's own forward, past any skipping wrapper
        self.embed = base.get_submodule(family.embed)
        self.positions = base.get_submodule(family.learned_positions) if family.learned_positions else None
        self.rotary = base.get_submodule(family.rotary) if family.rotary else None
        self.by_type = family.rotary_by_type
        self.norm = base.get_submodule(family.norm)
        self.head = base.get_output_embeddings()
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        self.windows = [k.get("sliding_window") for k in kwargs]
        self.additive_mask = config._attn_implementation == "eager"  # eager attention adds its mask
        self.cache_key = _cache_keyword(type(decoder_layers(base)[0]))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, pool: KVPool,
                 plan: Sequence[tuple[int, torch.Tensor | None, list[int]]]) -> torch.Tensor:
        """Next-token logits [B, V] for one new token per row.

        ``plan``: for each layer any row keeps, ``(layer, rows, lengths)``: the batch rows that keep
        it in slot order (None: all rows, in order) and their positions as Python ints.
        """
        hidden = self.embed(tokens[:, None])
        if self.positions is not None:
            hidden = hidden + self.positions(positions[:, None])
        tables = self._rotary(hidden, positions)
        masks: dict[tuple[int, int | None], torch.Tensor] = {}
        for layer, rows, lengths in plan:
            x = hidden if rows is None else hidden.index_select(0, rows)
            pos = positions if rows is None else positions.index_select(0, rows)
            window = self.windows[layer]
            key = (id(rows), window)
            if key not in masks:
                masks[key] = self._mask(pos, max(lengths) + 1, window, x.dtype)
            kwargs = {"attention_mask": masks[key], self.cache_key: _SlotsView(pool.layers[layer], pos, max(lengths) + 1)}
            if tables is not None:
                cos, sin = tables[self.types[layer]] if self.by_type else tables
                kwargs["position_embeddings"] = (cos, sin) if rows is None else (cos[rows], sin[rows])
            out = self.layers[layer](x, **kwargs)
            hidden = out if rows is None else hidden.index_copy(0, rows, out)
        logits = self.head(self.norm(hidden))[:, -1]
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> Any:
        if self.rotary is None:
            return None
        if self.by_type:
            return {t: self.rotary(hidden, positions[:, None], t) for t in set(self.types)}
        return self.rotary(hidden, positions[:, None])

    def _mask(self, positions: torch.Tensor, length: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[n, 1, 1, length]: each row attends to its own history up to its position (within the
        sliding window), never to the zeros past it."""
        index = torch.arange(length, device=positions.device)[None]
        allowed = index <= positions[:, None]
        if window is not None:
            allowed &= index > positions[:, None] - window
        allowed = allowed[:, None, None]
        if not self.additive_mask:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


@functools.cache
def _cache_keyword(layer_class: type) -> str:
    """transformers 5.24 renamed the layers' ``past_key_values`` keyword to ``cache``."""
    return "cache" if "cache" in inspect.signature(layer_class.forward).parameters else "past_key_values"


@dataclass(eq=False)
class Request:
    """One generation's decode state: its own skip set, slot, position, sampler and output."""

    generation: Any  # engine.Generation, filled token by token
    length: int  # positions in its cache = the position of the token it feeds next
    token: int  # the last sampled token, fed at the next step
    sample: Callable[[torch.Tensor], int]  # logits [V] -> next token
    finished: Callable[[int], bool]  # appends a token to the generation; True once it has ended
    budget: int  # tokens it may still sample
    greedy: bool = True
    done: bool = field(default=False)


class Batch:
    """The running batch of one engine: requests join after prefill and leave between steps."""

    def __init__(self, stack: LayerStack, num_layers: int, capacity: int = 1, max_len: int = 0) -> None:
        self.stack, self.num_layers = stack, num_layers
        self.pool = KVPool(num_layers, capacity, max_len)
        self.requests: list[Request] = []
        self._plan: list[tuple[int, torch.Tensor | None, list[Request]]] | None = None

    def join(self, request: Request, kv: Sequence[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Add a prefilled request; ``kv[l]`` is its prompt's keys and values of each kept layer."""
        self.pool.add(request, kv, request.length + request.budget)
        self.requests.append(request)
        self._plan = None

    def leave(self, request: Request) -> None:
        """Remove a request (finished or cancelled); its slots are free at once."""
        self.pool.remove(request)
        self.requests.remove(request)
        self._plan = None

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Feed every request its last token, sample the next; return the requests that ended (they
        have left the batch)."""
        if not self.requests:
            return []
        device = self.pool_device()
        tokens = torch.tensor([r.token for r in self.requests], device=device)
        positions = torch.tensor([r.length for r in self.requests], device=device)
        plan = [(layer, rows, [r.length for r in owners]) for layer, rows, owners in self.plan()]
        logits = self.stack(tokens, positions, self.pool, plan)
        greedy = logits.argmax(-1).tolist() if any(r.greedy for r in self.requests) else None
        ended = []
        for row, request in enumerate(self.requests):
            request.length += 1
            request.token = greedy[row] if request.greedy else request.sample(logits[row])
            request.budget -= 1
            if request.finished(request.token) or request.budget == 0:
                ended.append(request)
        for request in ended:
            request.done = True
            self.leave(request)
        return ended

    def plan(self) -> list[tuple[int, torch.Tensor | None, list[Request]]]:
        """Per layer that some request keeps: the batch rows of its slots' owners (None when they
        are all rows in order), recomputed only when requests join or leave."""
        if self._plan is None:
            row_of = {id(r): i for i, r in enumerate(self.requests)}
            interned: dict[tuple[int, ...], torch.Tensor | None] = {}
            self._plan = []
            for layer, slots in enumerate(self.pool.layers):
                if not slots.owners:
                    continue
                rows = tuple(row_of[id(r)] for r in slots.owners)
                if rows not in interned:
                    whole = rows == tuple(range(len(self.requests)))
                    interned[rows] = None if whole else torch.tensor(rows, device=self.pool_device())
                self._plan.append((layer, interned[rows], slots.owners))
        return self._plan

    def pool_device(self) -> torch.device:
        return self.stack.head.weight.device
