"""Calibration: choose the threshold on held-out data, for a skip ratio, a decode saving or a quality
budget, and learn the skip sets of the ``snapped`` decision.

Keep-probabilities are computed once per prompt (a full prefill: each p_l depends on the prompt
only, never on other layers' decisions), so the skip sets of any threshold follow from them without
running the model again. Only the quality budget runs the model, once per candidate threshold.

Two budgets: the skip ratio counts skipped layers per prompt; the decode saving (token-weighted)
counts decoder-layer executions saved over all generated tokens (`token_weighted_saving`): a skip
on a one-token answer saves almost nothing, a skip on a summary is paid back on every token.
Calibration reads held-out *training* prompts only (`held_out_examples`), never a test split.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from firstskip import artifacts
from firstskip.config import FirstSkipConfig
from firstskip.data import Example, collate, encode_example
from firstskip.errors import FirstSkipError
from firstskip.modeling import FirstSkipModel
from firstskip.routers import decide, nearest_set, set_mask
from firstskip.train.loop import Encoded, on_main
from firstskip.train.passes import decision_prompt, gated_forward, hard_gate, prompt_keep_probs, response_ce

DEFAULT_MAX_LENGTH = 2048  # text examples: whole prompts as inference sees them, within reason


@dataclass
class Calibration:
    """The chosen threshold and what it does on the held-out examples."""

    threshold: float
    skip_ratio: float  # mean fraction of all layers skipped per prompt at `threshold`
    examples: int
    saving: float | None = None  # token-weighted decode saving at `threshold` (`token_weighted_saving`)
    skip_target: float | None = None
    saving_target: float | None = None
    max_drop: float | None = None
    loss_increase: float | None = None  # relative increase of response cross-entropy (max_drop mode)
    snap: dict[str, Any] | None = None  # the snapped decision's sets and what snapping does (`snap_summary`)


def calibrate(run: str | os.PathLike, examples: Sequence[Example] | Encoded, skip_target: float | None = None,
              max_drop: float | None = None, *, saving_target: float | None = None, snap: int | None = None,
              model: FirstSkipModel | None = None, max_length: int = DEFAULT_MAX_LENGTH,
              batch_size: int = 8) -> Calibration:
    """Choose the threshold on held-out examples (and the snapped decision's sets); store them in the
    run's config.json. The run then decides by threshold; ``snapped`` is chosen at inference.

    Args:
        run: the run folder; its config.json is rewritten (atomically) with the new threshold.
        examples: held-out training examples (text, encoded with the run's tokenizer) or
            ``(ids, prompt_len)`` pairs; never test items.
        skip_target: pick the threshold whose mean skip ratio over the prompts is closest to this.
        saving_target: pick the threshold whose token-weighted decode saving is closest to this,
            each prompt weighing the decode steps of its reference (`decode_steps`).
        max_drop: pick the largest skip ratio (in steps of one layer per prompt) whose response
            cross-entropy, teacher-forced on the references, is at most ``1 + max_drop`` times the
            cross-entropy without skipping.
        snap: learn this many skip sets from the routers' decisions at the chosen threshold
            (`learn_snap_sets`); alone, at the run's threshold.
        model: the run already loaded (otherwise it is loaded from ``run``).
        max_length: token limit when encoding text examples.
        batch_size: prompts per forward pass.
    """
    targets = sum(t is not None for t in (skip_target, saving_target, max_drop))
    if targets > 1 or (targets == 0 and snap is None):
        raise FirstSkipError("give exactly one of --skip-target, --saving-target or --max-drop (or --snap K alone)")
    for name, target in (("skip", skip_target), ("saving", saving_target)):
        if target is not None and not 0 <= target < 1:
            raise FirstSkipError(f"{name} target must lie in [0, 1), got {target}")
    if max_drop is not None and max_drop < 0:
        raise FirstSkipError(f"max drop must be >= 0, got {max_drop}")
    if snap is not None and snap < 1:
        raise FirstSkipError(f"--snap needs at least 1 set, got {snap}")
    fsm = model or FirstSkipModel.from_pretrained(run)
    config = fsm.config
    if config.static_skip is not None:
        raise FirstSkipError(f"{run} is a static-set run: it has no routers to calibrate")
    data = _encoded(fsm, examples, max_length)
    steps = decode_steps(examples, data)
    probs = keep_probs(fsm, data, batch_size)
    increase = None
    if max_drop is not None:
        threshold, increase = _for_max_drop(fsm, data, probs, max_drop, batch_size)
    elif skip_target is not None or saving_target is not None:
        weights = None if saving_target is None else steps
        threshold = threshold_for_ratio(probs, config, skip_target if weights is None else saving_target, weights)
    else:
        threshold = config.threshold
    skip = decide(probs, config.replace(decision="threshold", threshold=threshold))
    result = Calibration(threshold, skip_ratio(probs, config, threshold), len(data),
                         saving=round(token_weighted_saving(skip.sum(-1).tolist(), steps, config.num_layers), 6),
                         skip_target=skip_target, saving_target=saving_target, max_drop=max_drop,
                         loss_increase=None if increase is None else round(increase, 5))
    changes: dict[str, Any] = {}
    if snap is not None:
        changes["snap_sets"] = learn_snap_sets(skip, snap)
        result.snap = snap_summary(skip, changes["snap_sets"], steps)
    fsm.update_config(decision="threshold", threshold=threshold, **changes,
                      training={**config.training, "calibration": dataclasses.asdict(result)})
    on_main(lambda: artifacts.save_config(run, fsm.config))
    return result


def _encoded(fsm: FirstSkipModel, examples: Sequence[Example] | Encoded, max_length: int) -> Encoded:
    if not examples:
        raise FirstSkipError("no held-out examples to calibrate on")
    if not isinstance(examples[0], Example):
        return list(examples)  # type: ignore[arg-type]
    if fsm.tokenizer is None:
        raise FirstSkipError("this model has no tokenizer: give token ids instead of text examples")
    max_length = min(max_length, getattr(fsm.model.config, "max_position_embeddings", None) or max_length)
    return [encode_example(fsm.tokenizer, ex, max_length) for ex in examples]  # type: ignore[arg-type]


def keep_probs(fsm: FirstSkipModel, data: Encoded, batch_size: int = 8) -> torch.Tensor:
    """Keep-probabilities [N, L] of each example's prompt, in the order of ``data``."""
    order = sorted(range(len(data)), key=lambda i: data[i][1])  # similar lengths together: less padding
    device = next(fsm.model.parameters()).device
    out = torch.empty(len(data), fsm.config.num_layers)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate([(data[i][0][:data[i][1]], data[i][1]) for i in rows], pad_id=0).to(device)
        batch = decision_prompt(batch, fsm.config)
        out[rows] = prompt_keep_probs(fsm.model, fsm.engine.controller, batch).float().cpu()
    return out


def threshold_for_ratio(probs: torch.Tensor, config: FirstSkipConfig, ratio: float,
                        weights: Sequence[float] | None = None) -> float:
    """The threshold that skips ``ratio`` of all L layers of the N prompts, prompt i's layers weighing
    ``weights[i]`` (default 1: a mean skip ratio per prompt; decode steps: a token-weighted saving).

    Every skippable p sorted once: a threshold between the k-th and (k+1)-th value skips the k
    lowest, so the cut whose skipped weight is closest to ``ratio * L * sum(weights)`` hits the
    target as closely as the prompts allow (ties aside).
    """
    skippable = probs[:, config.skippable].detach().float().cpu()  # training passes them from any device
    w = torch.ones(probs.shape[0], dtype=torch.float64) if weights is None else \
        torch.as_tensor(list(weights), dtype=torch.float64)
    values, order = skippable.flatten().sort()
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64),
                            w[:, None].expand(skippable.shape).flatten()[order].cumsum(0)])
    k = int((cumulative - ratio * config.num_layers * float(w.sum())).abs().argmin())
    if k == 0:
        return 0.0
    if k == len(values):
        return float(min(1.0, values[-1].item() + 1e-6))
    return float((values[k - 1] + values[k]) / 2)


def skip_ratio(probs: torch.Tensor, config: FirstSkipConfig, threshold: float) -> float:
    """Mean fraction of all layers a threshold decision skips, over the rows of ``probs``."""
    skip = decide(probs, config.replace(decision="threshold", threshold=threshold))
    return float(skip.float().sum(-1).mean()) / config.num_layers


def token_weighted_saving(skipped: Sequence[int], steps: Sequence[int], num_layers: int) -> float:
    """Share of decoder-layer executions saved over all generated tokens: the sum of
    ``skipped[i] * steps[i]`` over ``num_layers * sum(steps)``, where ``steps[i]`` counts item i's
    decode forwards (its tokens after the first, a sampled EOS included). The first token comes from
    prefill, which runs every layer (``full`` prefill), so it is not counted; 0 when nothing decoded."""
    total = sum(steps)
    return sum(s * n for s, n in zip(skipped, steps)) / (num_layers * total) if total else 0.0


def decode_steps(examples: Sequence[Example] | Encoded, data: Encoded) -> list[int]:
    """Each held-out example's decode forwards had it generated its reference: response tokens (EOS
    included) capped at its task's max_new_tokens, as `firstskip eval` generates, minus the first
    token, which prefill makes. ``(ids, prompt_len)`` pairs carry no task: not capped."""
    from firstskip.evaluate import TASK_MAX_NEW_TOKENS  # firstskip.evaluate imports train: late, no cycle

    caps = [TASK_MAX_NEW_TOKENS.get(e.task) if isinstance(e, Example) else None for e in examples]
    return [max(0, min(len(ids) - n, cap or len(ids)) - 1) for (ids, n), cap in zip(data, caps)]


def learn_snap_sets(skip: torch.Tensor, k: int) -> list[list[int]]:
    """K skip sets for the ``snapped`` decision, from the routers' sets ``skip`` [N, L] on held-out prompts.

    k-medoids on Hamming distance: the K sets, each one the routers chose, that minimise the summed
    distance from every prompt's set to its nearest one (assigned as `routers.nearest_set` snaps).
    Built greedily (each next medoid the one that lowers that sum most), then refined by alternating
    assignment and medoid updates until nothing changes. Unlike the K most common sets, which may
    all be near copies of one another, medoids cover the different kinds of prompts. Returned most
    used first; fewer than K when the prompts chose fewer distinct sets.
    """
    unique, counts = skip.bool().unique(dim=0, return_counts=True)
    w = counts.double()
    distance = (unique[:, None, :] ^ unique[None]).sum(-1).double()  # [U, U]
    chosen: list[int] = []
    best = torch.full((len(unique),), float("inf"), dtype=torch.float64)
    for _ in range(min(k, len(unique))):
        cost = (torch.minimum(best[:, None], distance) * w[:, None]).sum(0)
        cost[chosen] = float("inf")
        chosen.append(int(cost.argmin()))
        best = torch.minimum(best, distance[:, chosen[-1]])
    for _ in range(100):  # each change lowers the summed distance: it ends long before
        assigned = nearest_set(unique, unique[chosen])
        updated = []
        for j, medoid in enumerate(chosen):
            members = (assigned == j).nonzero().squeeze(-1)
            within = (distance[members][:, members] * w[members][:, None]).sum(0)
            updated.append(int(members[within.argmin()]) if len(members) else medoid)
        if updated == chosen:
            break
        chosen = updated
    used = torch.zeros(len(chosen), dtype=torch.float64).index_add_(0, nearest_set(unique, unique[chosen]), w)
    order = sorted(range(len(chosen)), key=lambda j: (-float(used[j]), int(unique[chosen[j]].sum())))
    return [unique[chosen[j]].nonzero().squeeze(-1).tolist() for j in order]


def snap_summary(skip: torch.Tensor, sets: list[list[int]], steps: Sequence[int]) -> dict[str, Any]:
    """What snapping ``skip`` [N, L] to ``sets`` does on the prompts they were learned on."""
    stored = set_mask(sets, skip.shape[-1])
    index = nearest_set(skip, stored)
    snapped, num_layers = stored[index], skip.shape[-1]
    return {"sets": sets, "share": [round(float((index == j).double().mean()), 4) for j in range(len(sets))],
            "exact": round(float((snapped == skip).all(-1).double().mean()), 4),
            "mean_distance": round(float((snapped ^ skip).sum(-1).double().mean()), 4),
            "skip_ratio": round(float(snapped.sum(-1).double().mean()) / num_layers, 6),
            "saving": round(token_weighted_saving(snapped.sum(-1).tolist(), steps, num_layers), 6)}


@torch.no_grad()
def response_loss(fsm: FirstSkipModel, data: Encoded, skip: torch.Tensor, batch_size: int = 8) -> float:
    """Mean teacher-forced cross-entropy per response token with skip sets ``skip`` [N, L]."""
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
    device = next(fsm.model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = decision_prompt(collate([data[i] for i in rows], pad_id=0).to(device), fsm.config)
        logits, labels, _ = gated_forward(fsm.model, fsm.engine.controller, batch, hard_gate(skip[rows].to(device)))
        total += float(response_ce(logits, labels))
        tokens += int((labels != -100).sum())
    return total / tokens


def _for_max_drop(fsm: FirstSkipModel, data: Encoded, probs: torch.Tensor, max_drop: float,
                  batch_size: int) -> tuple[float, float]:
    """(threshold, loss increase): a binary search over j layers skipped per prompt on average (the
    loss grows with j)."""
    config = fsm.config
    base = response_loss(fsm, data, torch.zeros_like(probs, dtype=torch.bool), batch_size)

    def trial(j: int) -> tuple[float, float]:
        threshold = threshold_for_ratio(probs, config, j / config.num_layers)
        skip = decide(probs, config.replace(decision="threshold", threshold=threshold))
        return threshold, response_loss(fsm, data, skip, batch_size) / base - 1

    best, lo, hi = (0.0, 0.0), 1, len(config.skippable)
    while lo <= hi:
        mid = (lo + hi) // 2
        threshold, increase = trial(mid)
        if increase <= max_drop:
            best, lo = (threshold, increase), mid + 1
        else:
            hi = mid - 1
    return best
