"""One forward step of a FiRST model inside vLLM: which token skips which layer, and the routers.

At the start of each step `Controller.begin` reads the step's layout (rows = persistent-batch slots,
from the attention metadata) and each row's `RequestState`, and plans per layer:

- a prompt token runs every layer (``full`` prefill) and, while its request is undecided, is scored
  by the router of every layer it enters; scores are summed across chunks (chunked prefill) and
  the skip set is fixed at the end of the step that holds the prompt's last token;
- a generated token (position >= prompt length, also when a preempted request is recomputed) skips
  its request's set; with ``routed`` prefill and a set known in advance the prompt skips it too;
- a layer that no token of the step needs is not called at all (no attention, no KV write): that
  is the saving. A layer some tokens need runs for all and the others keep their input.

Layers are vLLM's own decoder-layer objects with their class swapped for a subclass that asks the
controller first (`make_skippable`), so weight names and vLLM's code stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from firstskip_vllm.settings import Settings, decide
from firstskip_vllm.state import SLOTS, RequestState


class Router(nn.Module):
    """firstskip's router: LayerNorm -> Linear(d, r) -> GELU -> Linear(r, 1), a logit per token."""

    def __init__(self, hidden_size: int, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.up = nn.Linear(hidden_size, dim)
        self.act = nn.GELU()
        self.down = nn.Linear(dim, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(self.norm(hidden.float())))).squeeze(-1)


def make_routers(settings: Settings, device: torch.device | str | None = None) -> nn.ModuleList:
    """One float32 router per layer (float32 whatever the model's dtype, as in firstskip)."""
    routers = nn.ModuleList(Router(settings.hidden_size, settings.router_dim, settings.router_norm_eps)
                            for _ in range(settings.num_layers))
    return routers.to(device=device, dtype=torch.float32)


@dataclass
class Plan:
    """What one step does at each layer."""

    run: list[bool]  # layer l is called at all
    keep_input: list[torch.Tensor | None]  # [N, 1] bool: tokens that skip a layer that runs for others
    score_idx: torch.Tensor | None  # tokens the routers score this step
    score_row: torch.Tensor | None  # their index into ``scored``
    scored: list[tuple[RequestState, int, int, bool]]  # (state, pooled tokens, new scored_upto, prompt done)
    sums: torch.Tensor | None  # [len(scored), L] this step's per-layer score sums


class Controller:
    """Per-model, per-process skip control; the swapped layers consult it."""

    def __init__(self, settings: Settings, routers: nn.ModuleList) -> None:
        self.settings, self.routers = settings, routers
        self.plan: Plan | None = None
        self.layer_runs = [0] * settings.num_layers  # calls per layer (tests count them; cheap)

    # -- step ------------------------------------------------------------------------------
    def begin(self, num_tokens: int, device: torch.device) -> None:
        """Plan this step from the attention metadata and the slot table (None: run everything)."""
        self.plan = None
        layout = step_layout()
        if layout is None or not SLOTS:
            return
        rows = [(SLOTS.get(r), start, n) for r, (start, n) in enumerate(zip(*layout))]
        if any(state is not None for state, _, _ in rows):
            self.plan = self._plan(rows, num_tokens, device)

    def _plan(self, rows: list[tuple[RequestState | None, int, int]], num_tokens: int, device: torch.device) -> Plan:
        """Per token and layer, whether the token skips it; which prompt tokens the routers score."""
        num_layers = self.settings.num_layers
        skip = torch.zeros(num_tokens, num_layers, dtype=torch.bool)
        skip[sum(n for *_, n in rows):] = True  # padding tokens need no layer
        spans: list[tuple[int, int]] = []
        scored: list[tuple[RequestState, int, int, bool]] = []
        offset = 0
        for state, start, n in rows:
            if state is not None:
                self._ensure_forced(state)
                prompt_here = max(0, min(n, state.prompt_len - start))  # this row's prompt tokens
                if state.skip_mask is not None:
                    first = offset if self._routed_prefill(state) else offset + prompt_here
                    skip[first:offset + n] = state.skip_mask
                elif (score := self._score_span(state, start, prompt_here)) is not None:
                    lo, hi, done = score
                    spans.append((offset + lo - start, offset + hi - start))
                    scored.append((state, hi - lo, max(state.scored_upto, start + prompt_here), done))
            offset += n
        runs, partial = (~skip.all(0)).tolist(), skip.any(0).tolist()
        keep_input = [skip[:, l:l + 1].to(device) if runs[l] and partial[l] else None for l in range(num_layers)]
        if not scored:
            return Plan(runs, keep_input, None, None, [], None)
        sums = torch.zeros(len(scored), num_layers, device=device)
        if all(a == b for a, b in spans):  # prompts completed with nothing left to score
            return Plan(runs, keep_input, None, None, scored, sums)
        idx = torch.cat([torch.arange(a, b) for a, b in spans]).to(device)
        row = torch.cat([torch.full((b - a,), j) for j, (a, b) in enumerate(spans)]).to(device)
        return Plan(runs, keep_input, idx, row, scored, sums)

    def _score_span(self, state: RequestState, start: int, prompt_here: int) -> tuple[int, int, bool] | None:
        """Prompt positions [lo, hi) of this step that the routers score for an undecided request, and
        whether its prompt is complete after the step (None: nothing to score or settle)."""
        lo, hi = self.settings.pool_window(state.prompt_len)
        lo, hi = max(lo, start, state.scored_upto), min(hi, start + prompt_here)
        done = start + prompt_here >= state.prompt_len
        if hi <= lo and not done:
            return None
        return lo, max(lo, hi), done

    def _ensure_forced(self, state: RequestState) -> None:
        """A set known before any scoring (forced by the request, or the run's static set)."""
        if state.skip is not None:
            return
        forced = state.overrides.skip if state.overrides.skip is not None else self.settings.static_skip
        if forced is not None:
            state.set_skip([i for i in forced if 0 <= i < self.settings.num_layers], self.settings.num_layers)

    def _routed_prefill(self, state: RequestState) -> bool:
        forced = state.overrides.skip is not None or self.settings.static_skip is not None
        return forced and (state.overrides.prefill or self.settings.prefill) == "routed"

    def end(self) -> None:
        """Add this step's router scores to each request; decide those whose prompt is complete."""
        plan, self.plan = self.plan, None
        if plan is None or not plan.scored:
            return
        sums = plan.sums.cpu()
        for j, (state, pooled, upto, done) in enumerate(plan.scored):
            state.sums = sums[j] if state.sums is None else state.sums + sums[j]
            state.count += pooled
            state.scored_upto = upto
            if done:
                keep = state.sums / max(state.count, 1)
                state.set_skip(decide(keep, self.settings, state.overrides), self.settings.num_layers, keep.tolist())

    # -- layer -----------------------------------------------------------------------------
    def score(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Router ``layer`` reads the residual stream entering the layer (hidden + residual in vLLM's
        fused form) at this step's scored prompt tokens."""
        plan = self.plan
        stream = hidden[plan.score_idx] if residual is None else hidden[plan.score_idx] + residual[plan.score_idx]
        probs = torch.sigmoid(self.routers[layer](stream))
        plan.sums[:, layer].index_add_(0, plan.score_row, probs)


class SkippableLayer(nn.Module):
    """Mixed into a vLLM decoder-layer class: ask the controller whether to run, score, or keep input."""

    _firstskip: Controller
    _firstskip_index: int

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                *args: Any, **kwargs: Any) -> Any:  # vLLM's own layer signature
        control, index = self._firstskip, self._firstskip_index
        plan = control.plan
        if plan is None:
            control.layer_runs[index] += 1
            return super().forward(positions, hidden_states, residual, *args, **kwargs)
        if not plan.run[index]:
            return hidden_states, residual  # nobody in this step needs the layer: it does not run
        if plan.score_idx is not None:
            control.score(index, hidden_states, residual)
        control.layer_runs[index] += 1
        keep = plan.keep_input[index]
        if keep is None:
            return super().forward(positions, hidden_states, residual, *args, **kwargs)
        # vLLM's fused add-norm may write into its inputs: keep copies for the tokens that skip.
        old_hidden = hidden_states.clone()
        old_residual = torch.zeros_like(hidden_states) if residual is None else residual.clone()
        new_hidden, new_residual = super().forward(positions, hidden_states, residual, *args, **kwargs)
        return torch.where(keep, old_hidden, new_hidden), torch.where(keep, old_residual, new_residual)


_SWAPPED: dict[type, type] = {}


def make_skippable(layer: nn.Module, index: int, control: Controller) -> None:
    """Swap ``layer``'s class for a skippable subclass of it (same module, same weight names)."""
    cls = type(layer)
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"FirstSkip{cls.__name__}", (SkippableLayer, cls), {})
    layer.__class__ = _SWAPPED[cls]
    object.__setattr__(layer, "_firstskip", control)  # not a submodule: no weights, no state_dict entry
    layer._firstskip_index = index


def step_layout() -> tuple[list[int], list[int]] | None:
    """Per row of this step: the position of its first token and its token count (None outside a
    real step, e.g. vLLM's profiling and warm-up runs, which then run every layer)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # micro-batched: not planned, every layer runs
        return None
    if not metadata:
        return None
    meta = next(iter(metadata.values()))
    bounds = meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    starts = [s - n for s, n in zip(seq_lens, lengths)]
    return starts, lengths

