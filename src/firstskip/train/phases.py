"""Phase 1 (routers on a frozen base) and phase 2 (LoRA under the routers' hard skip sets).

Both phases run every layer (the controller's train mode): prompt tokens pass each layer unchanged
and the routers pool them into p_l; response tokens pass the gated residual ``h + g (f(h) - h)``.
Phase 1 gates with ``g = p_l`` and, late in training, with hard gates (their gradient from secant slopes); phase 2
gates with the hard decision inference makes. What differs between the phases is an objective
module the shared loop (`loop.py`) calls; nothing else.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from firstskip import artifacts
from firstskip.config import FirstSkipConfig
from firstskip.data import Batch
from firstskip.errors import FirstSkipError
from firstskip.families import family_of
from firstskip.modeling import FirstSkipModel, peft_quietly
from firstskip.routers import decide
from firstskip.skipping import GateFn
from firstskip.train.calibrate import threshold_for_ratio
from firstskip.train.loop import Encoded, LoopSettings, StepInfo, clear_checkpoint, on_main, run_loop
from firstskip.train.passes import decision_prompt, hard_gate, prompt_keep_probs, prompt_then_response


# -- phase 1: routers ----------------------------------------------------------------------------

@dataclass
class RouterTraining(LoopSettings):
    """Phase 1 settings. Defaults are the measured smollm2-135m recipe (docs/training.md).

    The fit term is the response loss per token over the batch. Two regularisers pull towards
    skipping; exactly one is active:
    - λ mode (``skip_target`` None): ``lam * R``, R = mean keep-probability of skippable layers;
    - target mode: ``target_weight * (R - r*)**2`` with ``r* = 1 - skip_target * L / S``: the mean
      keep-probability at which skipping S(1 - R) of the S skippable layers skips ``skip_target``
      of all L layers (protected layers count as kept).
    ``polarize * mean p(1 - p)`` pushes each p towards 0 or 1. From step ``hard_from * steps`` on,
    gates are hard ones: forward 1[p >= tau], gradient through ``secant`` (below), with tau = the
    config's threshold in λ mode and, in target mode, the threshold that meets the target on the
    batch (as calibration will choose it): a mean keep-probability at the target does not make
    a threshold of 0.5 skip the target's share of layers (measured: 0-16% instead of 25%).
    ``prefixes``: the share of rows whose routers read only a random start of the prompt (between
    ``min_prefix`` and all of it), as if the prompt ended there, while the response is the whole
    prompt's. Routers otherwise learn that short prompts are cheap to skip (short yes/no prompts are)
    and skip short summarisation prompts most, where it costs most (docs/training.md).
    ``distill``: the weight of KL(the frozen model with every layer || the gated one) per response
    token, added to the fit term. The CE sees only the reference token's probability; the KL sees the
    whole next-token distribution a skipped layer moves, which greedy decoding follows (docs/training.md).
    ``token_weighted`` (off; ``train --saving-target``): in target mode, ``skip_target`` is a
    token-weighted decode saving: each row's keep-probabilities weigh its response tokens in R and in
    the batch's hard threshold, so the pull towards skipping lands on prompts whose answers are long,
    where a skip saves decode work, and hardly on one-token answers (docs/results.md, "Routers
    trained at a decode saving").
    ``secant`` (default 4): in the hard stage, the number of gates per row that run at a uniform random
    value in (0, 1) and alone carry the fit's gradient to p, scaled by S / secant (S skippable layers).
    The slope at a uniform point averages to L(keep) - L(skip), the cost of the decision itself. The
    straight-through slope at the hard value (``secant=0``) is the tangent there, near 0 for a kept
    layer however dear it is to skip, so the penalty pulls such a layer down to tau and keeps it there.
    Measured over three seeds: the same SAMSum ratio to LoRA-only, with more of the skips on the
    summaries, where decoding is long, and fewer on yes/no answers. These choices were measured, and
    the variants that gave nothing were removed: docs/experiments/ logs both.
    """

    steps: int | None = 120
    lr: float = 3e-3
    lam: float = 0.01
    skip_target: float | None = None
    target_weight: float = 10.0
    polarize: float = 0.1
    hard_from: float | None = 0.7
    hard_threshold: float | None = None  # None: as described above; a number: always that threshold
    prefixes: float = 0.5
    min_prefix: float = 0.1  # of the prompt's pooled tokens
    distill: float = 3.0  # weight of KL(base with every layer || gated) per response token, added to the CE
    secant: int = 4  # hard stage: gates per row at a random value whose slope alone trains p (0: straight-through)
    token_weighted: bool = False  # target mode: the target is a decode saving, each row weighing its response tokens
    before_they_existed: ClassVar[dict[str, Any]] = {"prefixes": 0.0, "min_prefix": 0.1, "distill": 0.0, "secant": 0,
                                                     "token_weighted": False}
    no_longer_used: ClassVar[dict[str, Any]] = {"per_example": False, "row_tokens": None, "on_policy": 0.0,
                                                "leave_one_out": False}

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.lam, self.target_weight, self.polarize, self.distill) < 0:
            raise FirstSkipError("lam, target_weight, polarize and distill must be >= 0")
        if self.skip_target is not None and not 0 <= self.skip_target < 1:
            raise FirstSkipError(f"skip target must lie in [0, 1), got {self.skip_target}")
        if not 0 <= self.prefixes <= 1 or not 0 < self.min_prefix <= 1:
            raise FirstSkipError(f"prefixes must lie in [0, 1] and min_prefix in (0, 1], got {self.prefixes}, "
                                 f"{self.min_prefix}")
        if self.hard_from is not None and not 0 <= self.hard_from <= 1:
            raise FirstSkipError(f"hard_from must lie in [0, 1], got {self.hard_from}")
        if self.hard_threshold is not None and not 0 < self.hard_threshold < 1:
            raise FirstSkipError(f"hard_threshold must lie in (0, 1), got {self.hard_threshold}")
        if self.secant < 0:
            raise FirstSkipError(f"secant must be >= 0, got {self.secant}")

    def target_keep(self, config: FirstSkipConfig) -> float | None:
        """r*, the mean keep-probability of skippable layers that meets ``skip_target`` (None in λ mode)."""
        if self.skip_target is None:
            return None
        wanted, skippable = self.skip_target * config.num_layers, len(config.skippable)
        if wanted > skippable:
            raise FirstSkipError(f"skip target {self.skip_target} means {wanted:g} of {config.num_layers} layers, "
                                 f"but only {skippable} are skippable (protected: {config.protected})")
        return 1.0 - wanted / skippable


class RouterObjective(nn.Module):
    """CE on response tokens plus the skip regulariser; the routers are its only trainable part."""

    def __init__(self, fsm: FirstSkipModel, settings: RouterTraining) -> None:
        super().__init__()
        self.model, self.routers = fsm.model, fsm.routers
        self.controller = fsm.engine.controller
        self.config, self.settings = fsm.config, settings
        self.skippable = fsm.config.skippable
        self.target = settings.target_keep(fsm.config)
        self._tau: float | None = None  # last batch's target threshold, for the log

    def hard(self, info: StepInfo) -> bool:
        return self.settings.hard_from is not None and info.step >= self.settings.hard_from * info.total

    def forward(self, batch: Batch, info: StepInfo) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens = (batch.labels != -100).sum(-1)
        ce, probs, kl = prompt_then_response(self.model, self.controller, self.routers, batch,
                                             lambda probs: self._gate(probs, info, tokens), self._shares(info),
                                             self.settings.distill > 0)
        kl = torch.zeros_like(ce) if kl is None else kl
        fit_rows = ce + self.settings.distill * kl
        p = probs[:, self.skippable]
        count = info.rows * len(self.skippable)  # global: sums over rows and layers divide by this
        keep_sum, polar_sum = p.sum(), (p * (1 - p)).sum()
        reg = self.settings.lam * keep_sum / count if self.target is None else self.target_term(p, tokens, info)
        fit = fit_rows.sum() / info.tokens
        loss = fit + reg + self.settings.polarize * polar_sum / count
        ce, kl = ce.detach(), kl.detach()
        stats = {"ce": ce.sum(), "kl": kl.sum(), "ce_example": (ce / tokens).sum(),
                 "fit": fit_rows.detach().sum(),
                 "keep": probs.detach().sum(0),
                 "polar": polar_sum.detach(),
                 "skipped": (p.detach() < self.config.threshold).sum().float()}
        return loss, stats

    def target_term(self, p: torch.Tensor, tokens: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """The target penalty's surrogate for this process's rows ``p`` [rows, skippable layers]:
        d/dp of w (R - r*)^2 needs R over the *global* batch; with it as a constant, this term has
        exactly that gradient on every process. R is the mean keep-probability, or with
        ``token_weighted`` its mean with each row weighing its response ``tokens``."""
        if self.settings.token_weighted:
            total, count = (p * tokens[:, None]).sum(), info.tokens * p.shape[1]
        else:
            total, count = p.sum(), info.rows * p.shape[1]
        mean = info.reduce(total.detach()) / count
        return 2 * self.settings.target_weight * (mean - self.target) * total / count

    def _shares(self, info: StepInfo) -> torch.Tensor | None:
        """Each local row's share of its prompt the routers read."""
        if not self.settings.prefixes:
            return None
        picked, fraction = self._draw(info, 2)
        low = self.settings.min_prefix
        return torch.where(picked < self.settings.prefixes, low + (1 - low) * fraction, torch.ones_like(fraction))

    def _draw(self, info: StepInfo, n: int, salt: int = 0) -> torch.Tensor:
        """[n, local rows] uniforms drawn for the global batch from (seed, step, salt), so the draws do
        not depend on the number of processes."""
        generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + info.step + salt)
        values = torch.rand(n, info.rows, generator=generator)
        return values[:, info.rank::info.world].to(next(self.routers.parameters()).device)

    def _gate(self, probs: torch.Tensor, info: StepInfo, tokens: torch.Tensor) -> GateFn:
        """Soft gates, then hard ones (secant or straight-through slopes). In target mode the hard
        threshold is the one that meets the target on this batch, as calibration will choose it for
        inference; a fixed 0.5 would skip far fewer layers while the mean keep-probability sits at the
        target."""
        self._tau = None
        if self.target is not None:
            weights = info.gather(tokens).tolist() if self.settings.token_weighted else None
            self._tau = threshold_for_ratio(info.gather(probs.detach()), self.config, self.settings.skip_target,
                                            weights)
        if not self.hard(info):
            return lambda layer, p: p
        tau = self.settings.hard_threshold or (self.config.threshold if self._tau is None else self._tau)
        if not self.settings.secant:
            return straight_through(tau)
        picked, at = self._secant_draws(info)
        return secant_gate(tau, picked, at, len(self.skippable) / min(self.settings.secant, len(self.skippable)))

    def _secant_draws(self, info: StepInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """``(picked, at)`` [local rows, L]: ``secant`` skippable layers per row, drawn uniformly, and the
        gate values they run at; from (seed, step) like every draw."""
        count = len(self.skippable)
        order, values = self._draw(info, 2 * count, salt=2 << 32).T.split(count, dim=-1)
        index = torch.tensor(self.skippable, device=order.device)
        shape = (len(order), self.config.num_layers)
        lowest = order.argsort(-1).argsort(-1) < self.settings.secant  # rank of each layer's draw in its row
        picked = torch.zeros(shape, dtype=torch.bool, device=order.device).index_copy_(1, index, lowest)
        return picked, torch.ones(shape, device=order.device).index_copy_(1, index, values)

    def summarize(self, stats: dict[str, torch.Tensor], info: StepInfo) -> dict[str, Any]:
        per_layer = stats["keep"] / info.rows
        keep = float(per_layer[self.skippable].mean())
        ce, kl = (float(stats[key]) / info.tokens for key in ("ce", "kl"))
        ce_example = float(stats["ce_example"]) / info.rows
        fit = float(stats["fit"]) / info.tokens
        if self.target is None:
            reg = self.settings.lam * keep
        else:
            reg = self.settings.target_weight * (keep - self.target) ** 2
        reg += self.settings.polarize * float(stats["polar"]) / (info.rows * len(self.skippable))
        summary = {"loss": round(fit + reg, 5), "ce": round(ce, 5), "ce_example": round(ce_example, 5),
                   **({"kl": round(kl, 5)} if self.settings.distill else {}), "reg": round(reg, 5),
                   "keep": round(keep, 4),
                   "skip": round(float(stats["skipped"]) / (info.rows * self.config.num_layers), 4),
                   "hard": self.hard(info)}
        if self._tau is not None:
            summary["tau"] = round(self._tau, 4)  # the threshold that meets the target on this batch
        return {**summary, "keep_per_layer": [round(float(v), 4) for v in per_layer]}


def straight_through(tau: float) -> GateFn:
    """Forward 1[p >= tau], backward the gradient of p."""
    def gate(layer: int, p: torch.Tensor) -> torch.Tensor:
        return (p >= tau).to(p.dtype) + p - p.detach()
    return gate


def secant_gate(tau: float, picked: torch.Tensor, at: torch.Tensor, scale: float) -> GateFn:
    """Forward 1[p >= tau], except ``picked`` [B, L] gates, which run at ``at`` [B, L] and alone pass the
    gradient of p, ``scale`` times (1 / the chance a gate is picked): an unbiased estimate of each gate's
    secant slope L(1) - L(0) over the uniform draws of ``at``."""
    def gate(layer: int, p: torch.Tensor) -> torch.Tensor:
        return torch.where(picked[:, layer], at[:, layer] + (p - p.detach()) * scale, (p >= tau).to(p.dtype))
    return gate


def train_routers(fsm: FirstSkipModel, data: Encoded, run_dir: str | os.PathLike,
                  settings: RouterTraining | None = None, resume: bool = False,
                  progress: bool = True) -> FirstSkipModel:
    """Phase 1: train ``fsm``'s routers on its frozen base; saves routers, then config.json.

    Args:
        fsm: the model whose routers are trained (in place); its base model stays frozen.
        data: ``(ids, prompt_len)`` pairs as `data.encode_example` returns them.
        run_dir: the run folder (checkpoints go to ``run_dir/checkpoint``).
        settings: steps, batch, learning rate and the skip regulariser.
        resume: go on from the last checkpoint in ``run_dir`` (a fresh start if there is none).
        progress: show a progress bar.
    """
    settings = settings or RouterTraining()
    fsm.model.requires_grad_(False)
    fsm.routers.float()
    skippable = set(fsm.config.skippable)
    for index, router in enumerate(fsm.routers.routers):
        router.requires_grad_(index in skippable)  # protected layers' routers are never asked
    summary = run_loop(RouterObjective(fsm, settings), data, settings, run_dir, "routers", resume, progress,
                       model_config=dataclasses.asdict(fsm.config))
    fsm.routers.requires_grad_(False)
    record = {**dataclasses.asdict(settings), "examples": len(data), "steps": settings.total_steps(len(data)),
              "final": _final(summary)}
    fsm.update_config(training={**fsm.config.training, "routers": record})
    on_main(lambda: artifacts.save_run(run_dir, fsm.config, fsm.routers))
    on_main(lambda: clear_checkpoint(run_dir))
    return fsm


# -- phase 2: LoRA -------------------------------------------------------------------------------

@dataclass
class LoraTraining(LoopSettings):
    """Phase 2 settings: peft LoRA on the family's target modules unless ``targets`` is given."""

    steps: int | None = 30
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None
    no_longer_used: ClassVar[dict[str, Any]] = {"distill": 0.0}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise FirstSkipError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise FirstSkipError(f"LoRA dropout must lie in [0, 1), got {self.dropout}")
        if self.targets is not None:
            self.targets = list(self.targets)


class LoraObjective(nn.Module):
    """CE on response tokens with each row's hard skip set, decided as inference decides it."""

    def __init__(self, fsm: FirstSkipModel, peft_model: nn.Module, settings: LoraTraining) -> None:
        super().__init__()
        self.model, self.controller, self.config = peft_model, fsm.engine.controller, fsm.config
        self.routers = fsm.routers
        # The prompt runs before the response, so every p_l is known before any layer is gated and
        # the decisions come from the training pass itself; but LoRA dropout perturbs the prompt's
        # states, so with it the decisions need a separate scoring pass in eval mode, as inference.
        self.score_first = settings.dropout > 0

    def forward(self, batch: Batch, info: StepInfo) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = decision_prompt(batch, self.config)  # in `early` prefill most of the prompt skips too
        scored = prompt_keep_probs(self.model, self.controller, batch) if self.score_first else None
        used: list[torch.Tensor] = []  # the skip mask applied, for the log

        def make_gate(probs: torch.Tensor) -> GateFn:
            used.append(decide(probs.detach() if scored is None else scored, self.config))
            return hard_gate(used[0])

        ce, probs, _ = prompt_then_response(self.model, self.controller, self.routers, batch, make_gate,
                                            prompt_grad=True)
        ce = ce.sum()
        return ce / info.tokens, {"ce": ce.detach(), "keep": probs.detach().sum(0), "skipped": used[0].sum().float()}

    def summarize(self, stats: dict[str, torch.Tensor], info: StepInfo) -> dict[str, Any]:
        per_layer = stats["keep"] / info.rows
        return {"loss": round(float(stats["ce"]) / info.tokens, 5),
                "keep": round(float(per_layer[self.config.skippable].mean()), 4),
                "skip": round(float(stats["skipped"]) / (info.rows * self.config.num_layers), 4),
                "keep_per_layer": [round(float(v), 4) for v in per_layer]}


def add_lora(model: nn.Module, settings: LoraTraining) -> nn.Module:
    """Wrap ``model`` in a peft LoRA model (base weights frozen, adapters trainable)."""
    from peft import LoraConfig, get_peft_model

    targets = settings.targets or list(family_of(model).lora_targets)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(), peft_quietly():
        torch.manual_seed(settings.seed)  # LoRA's A matrices are drawn at random
        return get_peft_model(model, config)


def train_lora(fsm: FirstSkipModel, data: Encoded, run_dir: str | os.PathLike,
               settings: LoraTraining | None = None, merge: bool = False, resume: bool = False,
               progress: bool = True) -> FirstSkipModel:
    """Phase 2: train LoRA adapters under the routers' hard skip sets; routers stay frozen.

    Saves ``run_dir/adapter`` (peft format) and, with ``merge``, the merged model in
    ``run_dir/model``; config.json last. Returns ``fsm`` with the adapter merged into its weights
    (an unmerged adapter slows decoding).

    Args:
        fsm: a model with trained routers (phase 1); its base weights are not changed on disk.
        data: ``(ids, prompt_len)`` pairs as `data.encode_example` returns them.
        run_dir: the run folder.
        settings: steps, batch, learning rate, rank, alpha, dropout and target modules.
        merge: also save the merged full model, for deployment without peft.
        resume: go on from the last phase-2 checkpoint in ``run_dir``.
        progress: show a progress bar.
    """
    settings = settings or LoraTraining()
    if fsm.config.lora is not None:
        raise FirstSkipError("this model already holds a trained adapter; start phase 2 from the routers-only run")
    fsm.routers.requires_grad_(False)
    base_fingerprint = fsm.config.fingerprint
    peft_model = add_lora(fsm.model, settings)
    peft_model.train()
    summary = run_loop(LoraObjective(fsm, peft_model, settings), data, settings, run_dir, "lora", resume, progress,
                       model_config=dataclasses.asdict(fsm.config))
    peft_model.eval()
    run_dir = Path(run_dir)
    on_main(lambda: artifacts.atomic_dir(run_dir / artifacts.ADAPTER_DIR, peft_model.save_pretrained))
    fsm.model = peft_model.merge_and_unload()
    lora = {"r": settings.rank, "alpha": settings.alpha, "dropout": settings.dropout,
            "target_modules": settings.targets or list(family_of(fsm.model).lora_targets)}
    record = {**dataclasses.asdict(settings), "examples": len(data), "steps": settings.total_steps(len(data)),
              "final": _final(summary), "base_fingerprint": base_fingerprint}
    changes: dict[str, Any] = {"lora": lora, "training": {**fsm.config.training, "lora": record}}
    if merge:
        on_main(lambda: artifacts.atomic_dir(run_dir / artifacts.MERGED_DIR, lambda tmp: _save_merged(fsm, tmp)))
        changes.update(merged=True, fingerprint=artifacts.fingerprint(fsm.model))
    fsm.update_config(**changes)
    on_main(lambda: artifacts.save_run(run_dir, fsm.config, fsm.routers))
    on_main(lambda: clear_checkpoint(run_dir))
    return fsm


def _save_merged(fsm: FirstSkipModel, folder: str) -> None:
    fsm.model.save_pretrained(folder)
    if fsm.tokenizer is not None:
        fsm.tokenizer.save_pretrained(folder)


def _final(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if summary is None else {k: v for k, v in summary.items() if k != "keep_per_layer"}
