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
import shutil
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import get_layer_types_and_kwargs

from firstskip.families import cache_keyword, decoder_layers, family_of
from firstskip.kvpool import KVPool, LayerSlots
from firstskip.quantize import stacked

StopFn = Callable[[list[int]], bool]  # generated ids of one row -> stop now?


class _SlotsView:
    """What one layer's attention sees as its cache during a step: ``update`` writes the new key and
    value at each request's position in its slot and returns the slots' histories as views, as far
    as the step's mask reaches (a tensor's shape, so a compiled step takes it symbolically)."""

    def __init__(self, slots: LayerSlots, group: _Group, mask: torch.Tensor) -> None:
        self.slots, self.group, self.mask = slots, group, mask

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args: Any, **kwargs: Any):
        slots, group, n, length = self.slots, self.group, keys.shape[0], self.mask.shape[-1]
        if not torch.compiler.is_compiling() and group.single is not None:  # one row: a plain slice
            slots.keys[0, :, group.single] = keys[0, :, 0]
            slots.values[0, :, group.single] = values[0, :, 0]
        else:  # positions as a tensor: a compiled step does not specialise on them
            slots.keys[group.index, :, group.positions] = keys[:, :, 0]
            slots.values[group.index, :, group.positions] = values[:, :, 0]
        return slots.keys[:n, :, :length], slots.values[:n, :, :length]


class _Group:
    """The rows that run a layer in one step (shared by every layer with the same owners): their
    positions, mask per window, and how far their histories reach."""

    def __init__(self, rows: torch.Tensor | None, positions: torch.Tensor, lengths: list[int]) -> None:
        self.rows, self.n = rows, len(lengths)
        self.positions = positions if rows is None else positions.index_select(0, rows)
        self.length = max(lengths) + 1
        self.single = lengths[0] if self.n == 1 else None
        self.index = torch.arange(self.n, device=positions.device)
        self.masks: dict[int | None, torch.Tensor] = {}


def llama_layer(layer: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor], cache: _SlotsView) -> torch.Tensor:
    """One decode step of a Llama-layout decoder layer (Llama, Mistral, Qwen2, Qwen3): the same
    arithmetic as the layer's forward in fewer, larger operations and without its wrappers.

    The linear layers and the MLP are still the layer's own modules, so a quantized or LoRA-wrapped
    module runs as it is. Grouped-query heads attend as ``[n, kv_heads, group, head_dim]`` queries
    against the slots' ``[n, kv_heads, T, head_dim]``, so keys are never repeated.
    """
    attn, n = layer.self_attn, hidden.shape[0]
    x = _rms_norm(layer.input_layernorm, hidden)
    if hasattr(attn, "qkv_proj"):  # stacked by `_stack_projections`
        q, k, v = attn.qkv_proj(x).split([attn.q_proj.out_features, attn.k_proj.out_features,
                                          attn.v_proj.out_features], -1)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q, k, v = (t.view(n, -1, attn.head_dim) for t in (q, k, v))
    if hasattr(attn, "q_norm"):  # Qwen3 normalises each head's query and key
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = position_embeddings  # [n, 1, head_dim]: broadcast over heads
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    keys, values = cache.update(k[:, :, None], v[:, :, None])
    out = _attend(q.view(n, k.shape[1], -1, attn.head_dim), keys, values, attention_mask, attn.scaling)
    hidden = hidden + attn.o_proj(out.reshape(n, 1, -1))
    x, mlp = _rms_norm(layer.post_attention_layernorm, hidden), layer.mlp
    if not hasattr(mlp, "gate_up_proj"):
        return hidden + mlp(x)
    gate, up = mlp.gate_up_proj(x).chunk(2, -1)
    return hidden + mlp.down_proj(mlp.act_fn(gate) * up)


STACKED = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")), ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


def _stack_projections(layer: nn.Module) -> None:
    """Give a Llama-layout layer's attention and MLP one product for the projections that read the
    same input (`quantize.stacked`), where they are quantized alike; the layer's forward (prompts)
    still calls the parts."""
    for owner_name, name, part_names in STACKED:
        owner = layer.get_submodule(owner_name)
        if not hasattr(owner, name):
            whole = stacked([getattr(owner, part) for part in part_names])
            if whole is not None:
                owner.add_module(name, whole)


def _uniform(layers: Sequence[nn.Module]) -> bool:
    """Whether every layer has the first one's modules, hooks, settings (``eps``, ``scaling`` ...)
    and tensors (name, shape, dtype): then the one compiled step fits them all without checking
    the layer at each call."""

    def layout(layer: nn.Module) -> list[tuple]:
        return [(name, type(m), len(m._forward_hooks), len(m._forward_pre_hooks),
                 {k: v for k, v in vars(m).items()  # the layer's index differs and the step never reads it
                  if isinstance(v, (int, float, str, bool, type(None))) and k != "layer_idx"},
                 [(n, t.shape, t.dtype) for n, t in m.named_buffers(recurse=False) if t is not None],
                 [(n, t.shape, t.dtype) for n, t in m.named_parameters(recurse=False)])
                for name, m in layer.named_modules()]

    first = layout(layers[0])
    return all(layout(layer) == first for layer in layers[1:])


def _own_copy(fn: types.FunctionType) -> types.FunctionType:
    """``fn`` with a code object of its own: dynamo keeps compiled programs per code object, and
    without its layer guards one stack's program must never run another stack's layers (an int8
    and an int4 model in one process)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _skip_layer_guards(entries: Sequence[Any]) -> list[bool]:
    """Dynamo's guards on the layer argument (its modules, hooks, attributes and weights) are about
    200 of a step's 270 and a tenth of a compiled step's time; `_uniform` has checked them once
    for every layer. The guards on the step's own inputs (rows, cache, positions) stay."""
    return [not (e.name == "layer" or e.name.startswith(("layer.", "layer["))) for e in entries]


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row against its history: ``[n, kv, group, d]`` and ``[n, kv, T, d]``. Compiled,
    as products written out as sums, which the step fuses into its own loops: a call of torch's CPU
    flash attention costs more than the arithmetic of one query."""
    if not torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    scores = (q[:, :, :, None].float() * keys[:, :, None].float()).sum(-1) * scale  # [n, kv, group, T]
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(-1)
    return (probs[..., None] * values[:, :, None].float()).sum(-2).to(q.dtype)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LayerStack:
    """A causal LM's decode step run directly: the model's modules, none of its forward's overhead."""

    def __init__(self, model: nn.Module, inner: Sequence[Callable]) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper
        family, config = family_of(base), base.config
        self.modules = decoder_layers(base) if family.layer_step == "llama" else None
        if self.modules is not None:
            for layer in self.modules:
                _stack_projections(layer)
            self.layers = [functools.partial(llama_layer, layer) for layer in self.modules]
        else:  # each layer's own forward, past any skipping wrapper
            self.layers = list(inner)
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
        self.cache_key = "cache" if family.layer_step == "llama" else cache_keyword(type(decoder_layers(base)[0]))

    def compile(self) -> str | None:
        """Compile the layer step (regional ``torch.compile``): one program for every layer, with
        the weights, rows and history length as inputs, so a skip set or batch never seen before
        runs without compiling. Where the layers are all alike, dynamo checks the layer argument
        once here instead of at every call (changing a layer's modules after this is not seen).
        Returns why it stays eager, or None once compiled."""
        if self.modules is None:
            return "only Llama-layout layers (Llama, Mistral, Qwen2, Qwen3) decode compiled"
        if self.embed.weight.device.type == "cpu" and not any(map(shutil.which, ("g++", "c++", "clang++"))):
            return "no C++ compiler found for torch.compile"
        options = None
        if _uniform(self.modules):
            options = {"guard_filter_fn": _skip_layer_guards}
        step = torch.compile(_own_copy(llama_layer), dynamic=True, options=options)
        self.layers = [functools.partial(step, layer) for layer in self.modules]
        return None

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
        groups: dict[int, _Group] = {}
        for layer, rows, lengths in plan:
            group = groups.get(id(rows))
            if group is None:
                group = groups[id(rows)] = _Group(rows, positions, lengths)
            window = self.windows[layer]
            if window not in group.masks:
                group.masks[window] = self._mask(group.positions, group.length, window, hidden.dtype)
            x = hidden if rows is None else hidden.index_select(0, rows)
            mask = group.masks[window]
            kwargs = {"attention_mask": mask, self.cache_key: _SlotsView(pool.layers[layer], group, mask)}
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
    done: bool = False


class Batch:
    """The running batch of one engine: requests join after prefill and leave between steps."""

    def __init__(self, stack: LayerStack, num_layers: int, capacity: int = 1, max_len: int = 0) -> None:
        self.stack = stack
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
        lengths: dict[int, list[int]] = {}  # per owner group, not per layer
        for _, rows, owners in self.plan():
            if id(rows) not in lengths:
                lengths[id(rows)] = [r.length for r in owners]
        plan = [(layer, rows, lengths[id(rows)]) for layer, rows, _ in self.plan()]
        logits = self.stack(tokens, positions, self.pool, plan)
        # argmax in float32: torch's bfloat16 argmax is about 3x slower on CPU, and the same token
        greedy = logits.float().argmax(-1).tolist() if any(r.greedy for r in self.requests) else None
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
        return self.stack.embed.weight.device
