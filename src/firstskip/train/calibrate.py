"""Calibration: choose the threshold on held-out data, for a mean skip ratio or a quality budget.

Keep-probabilities are computed once per prompt (a full prefill: each p_l depends on the prompt
only, never on other layers' decisions), so the skip sets of any threshold follow from them without
running the model again. Only the quality budget runs the model, once per candidate threshold.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from firstskip import artifacts
from firstskip.config import FirstSkipConfig
from firstskip.data import Example, collate, encode_example
from firstskip.errors import FirstSkipError
from firstskip.modeling import FirstSkipModel
from firstskip.routers import decide
from firstskip.train.loop import Encoded, on_main
from firstskip.train.passes import gated_forward, hard_gate, prompt_keep_probs, response_ce

DEFAULT_MAX_LENGTH = 2048  # text examples: whole prompts as inference sees them, within reason


@dataclass
class Calibration:
    """The chosen threshold and what it does on the held-out examples."""

    threshold: float
    skip_ratio: float  # mean fraction of all layers skipped per prompt at `threshold`
    examples: int
    skip_target: float | None = None
    max_drop: float | None = None
    loss_increase: float | None = None  # relative increase of response cross-entropy (max_drop mode)


def calibrate(run: str | os.PathLike, examples: Sequence[Example] | Encoded, skip_target: float | None = None,
              max_drop: float | None = None, *, model: FirstSkipModel | None = None,
              max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 8) -> Calibration:
    """Choose the threshold on held-out examples and store it in the run's config.json.

    Args:
        run: the run folder; its config.json is rewritten (atomically) with the new threshold.
        examples: held-out examples (text, encoded with the run's tokenizer) or ``(ids, prompt_len)`` pairs.
        skip_target: pick the threshold whose mean skip ratio over the prompts is closest to this.
        max_drop: pick the largest skip ratio (in steps of one layer per prompt) whose response
            cross-entropy, teacher-forced on the references, is at most ``1 + max_drop`` times the
            cross-entropy without skipping.
        model: the run already loaded (otherwise it is loaded from ``run``).
        max_length: token limit when encoding text examples.
        batch_size: prompts per forward pass.
    """
    if (skip_target is None) == (max_drop is None):
        raise FirstSkipError("give exactly one of --skip-target or --max-drop")
    if skip_target is not None and not 0 <= skip_target < 1:
        raise FirstSkipError(f"skip target must lie in [0, 1), got {skip_target}")
    if max_drop is not None and max_drop < 0:
        raise FirstSkipError(f"max drop must be >= 0, got {max_drop}")
    fsm = model or FirstSkipModel.from_pretrained(run)
    data = _encoded(fsm, examples, max_length)
    probs = keep_probs(fsm, data, batch_size)
    if skip_target is not None:
        threshold = threshold_for_ratio(probs, fsm.config, skip_target)
        result = Calibration(threshold, skip_ratio(probs, fsm.config, threshold), len(data), skip_target=skip_target)
    else:
        result = _for_max_drop(fsm, data, probs, max_drop, batch_size)
    fsm.update_config(decision="threshold", threshold=result.threshold,
                      training={**fsm.config.training, "calibration": dataclasses.asdict(result)})
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
        out[rows] = prompt_keep_probs(fsm.model, fsm.engine.controller, batch).float().cpu()
    return out


def threshold_for_ratio(probs: torch.Tensor, config: FirstSkipConfig, ratio: float) -> float:
    """The threshold that skips ``round(ratio * L * N)`` of the N prompts' skippable layers in all.

    Sorting every skippable p once and cutting between the k-th and (k+1)-th value hits the target
    as closely as the prompts allow (ties aside); ratio is a fraction of all L layers.
    """
    values = probs[:, config.skippable].flatten().sort().values
    k = min(len(values), round(ratio * config.num_layers * probs.shape[0]))
    if k == 0:
        return 0.0
    if k == len(values):
        return float(min(1.0, values[-1].item() + 1e-6))
    return float((values[k - 1] + values[k]) / 2)


def skip_ratio(probs: torch.Tensor, config: FirstSkipConfig, threshold: float) -> float:
    """Mean fraction of all layers a threshold decision skips, over the rows of ``probs``."""
    skip = decide(probs, config.replace(decision="threshold", threshold=threshold))
    return float(skip.float().sum(-1).mean()) / config.num_layers


@torch.no_grad()
def response_loss(fsm: FirstSkipModel, data: Encoded, skip: torch.Tensor, batch_size: int = 8) -> float:
    """Mean teacher-forced cross-entropy per response token with skip sets ``skip`` [N, L]."""
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
    device = next(fsm.model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate([data[i] for i in rows], pad_id=0).to(device)
        logits, labels, _ = gated_forward(fsm.model, fsm.engine.controller, batch, hard_gate(skip[rows].to(device)))
        total += float(response_ce(logits, labels))
        tokens += int((labels != -100).sum())
    return total / tokens


def _for_max_drop(fsm: FirstSkipModel, data: Encoded, probs: torch.Tensor, max_drop: float,
                  batch_size: int) -> Calibration:
    """Binary search over j layers skipped per prompt on average (the loss grows with j)."""
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
    threshold, increase = best
    return Calibration(threshold, skip_ratio(probs, config, threshold), len(data), max_drop=max_drop,
                       loss_increase=round(increase, 5))
