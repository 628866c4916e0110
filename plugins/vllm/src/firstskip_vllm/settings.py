"""The decision settings an export carries, per-request overrides, and the skip decision itself.

``firstskip export --format vllm`` writes the settings, resolved, under ``config.json``'s ``firstskip``
key, so this module needs no firstskip defaults. The decision mirrors ``firstskip.routers.decide``
(threshold; the ``k`` lowest keep-probabilities among the skippable layers; the threshold's set
snapped to the nearest of the run's stored sets; a static run's fixed set for every request); the plugin's tests check it against firstskip's own choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SETTINGS_VERSION = 1
POOLINGS = ("mean", "mean-all", "last")
# Keys a request may put in SamplingParams.extra_args (the OpenAI server's ``vllm_xargs``).
SKIP_KEY, THRESHOLD_KEY, BUDGET_KEY, PREFILL_KEY, RECORD_KEY = (
    "firstskip_skip", "firstskip_threshold", "firstskip_budget", "firstskip_prefill", "firstskip_record")


class SettingsError(ValueError):
    """A bad export or a bad request override; vLLM turns a ValueError from validation into HTTP 400."""


@dataclass(frozen=True)
class Settings:
    """How a FiRST export scores prompts and decides skip sets (``config.json`` -> ``firstskip``)."""

    num_layers: int
    hidden_size: int
    router_dim: int
    pooling: str
    template_tokens: tuple[int, int]
    protected_layers: tuple[int, ...]
    decision: str
    threshold: float
    budget_k: int | None
    prefill: str
    static_skip: tuple[int, ...] | None
    snap_sets: tuple[tuple[int, ...], ...] | None = None
    router_norm_eps: float = 1e-5

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> Settings:
        """Read and check the export's settings; a config without them is not a FiRST export."""
        data = getattr(hf_config, "firstskip", None)
        if not isinstance(data, dict):
            raise SettingsError("config.json has no 'firstskip' settings: write the folder with "
                                "`firstskip export --run RUN --format vllm --out DIR`")
        if data.get("version") != SETTINGS_VERSION:
            raise SettingsError(f"firstskip settings version {data.get('version')!r}; this plugin reads "
                                f"version {SETTINGS_VERSION} (upgrade firstskip-vllm or re-export)")
        if data.get("router_activation", "gelu") != "gelu":
            raise SettingsError(f"router activation {data['router_activation']!r} is not supported (gelu)")
        settings = cls(
            num_layers=int(data["num_layers"]), hidden_size=int(data["hidden_size"]),
            router_dim=int(data["router_dim"]), pooling=data["pooling"],
            template_tokens=tuple(data.get("template_tokens") or (0, 0)),
            protected_layers=tuple(data["protected_layers"]), decision=data["decision"],
            threshold=float(data["threshold"]), budget_k=data.get("budget_k"), prefill=data.get("prefill", "full"),
            static_skip=None if data.get("static_skip") is None else tuple(data["static_skip"]),
            snap_sets=None if not data.get("snap_sets") else tuple(tuple(s) for s in data["snap_sets"]),
            router_norm_eps=float(data.get("router_norm_eps", 1e-5)))
        settings.check(hf_config.num_hidden_layers)
        return settings

    def check(self, model_layers: int) -> None:
        if self.num_layers != model_layers:
            raise SettingsError(f"the routers are for {self.num_layers} layers, the model has {model_layers}")
        if self.pooling not in POOLINGS:
            raise SettingsError(f"router pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if (self.decision not in ("threshold", "budget", "snapped") or (self.decision == "budget" and self.budget_k is None)
                or (self.decision == "snapped" and not self.snap_sets)):
            raise SettingsError(f"decision {self.decision!r}: expected 'threshold', 'budget' with budget_k or "
                                "'snapped' with snap_sets")

    @property
    def skippable(self) -> list[int]:
        protected = set(self.protected_layers)
        return [i for i in range(self.num_layers) if i not in protected]

    def pool_window(self, prompt_len: int) -> tuple[int, int]:
        """Prompt positions [start, end) whose router scores are pooled into p_l (firstskip's
        ``inner_mask``: the chat template's fixed head and tail left out, unless nothing would remain)."""
        if self.pooling == "last":
            return prompt_len - 1, prompt_len
        head, tail = self.template_tokens if self.pooling == "mean" else (0, 0)
        return (head, prompt_len - tail) if prompt_len - tail > head else (0, prompt_len)


@dataclass(frozen=True)
class Overrides:
    """One request's changes to the export's decision, from ``extra_args``."""

    skip: tuple[int, ...] | None = None
    threshold: float | None = None
    budget: float | None = None
    prefill: str | None = None
    record: str | None = None


def parse_overrides(extra_args: dict[str, Any] | None, num_layers: int | None = None) -> Overrides:
    """Check a request's ``firstskip_*`` extra args; anything wrong is a one-line SettingsError."""
    args = extra_args or {}
    skip = args.get(SKIP_KEY)
    if skip is not None:
        if not isinstance(skip, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in skip):
            raise SettingsError(f"{SKIP_KEY} must be a list of layer numbers, got {skip!r}")
        if num_layers is not None:
            bad = sorted(i for i in set(skip) if not 0 <= i < num_layers)
            if bad:
                raise SettingsError(f"{SKIP_KEY} layers {bad} are outside 0..{num_layers - 1}")
            if len(set(skip)) >= num_layers:
                raise SettingsError(f"{SKIP_KEY} holds all {num_layers} layers; keep at least one")
        skip = tuple(sorted(set(skip)))
    threshold, budget = _fraction(args, THRESHOLD_KEY), _fraction(args, BUDGET_KEY)
    if sum(v is not None for v in (skip, threshold, budget)) > 1:
        raise SettingsError(f"give at most one of {SKIP_KEY}, {THRESHOLD_KEY} or {BUDGET_KEY}")
    prefill = args.get(PREFILL_KEY)
    if prefill not in (None, "full", "routed"):
        raise SettingsError(f"{PREFILL_KEY} must be 'full' or 'routed', got {prefill!r}")
    record = args.get(RECORD_KEY)
    if record is not None and not isinstance(record, str):
        raise SettingsError(f"{RECORD_KEY} must be a string, got {record!r}")
    return Overrides(skip, threshold, budget, prefill, record)


def _fraction(args: dict[str, Any], key: str) -> float | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise SettingsError(f"{key} must be a number in [0, 1], got {value!r}")
    return float(value)


def decide(keep: torch.Tensor, settings: Settings, overrides: Overrides) -> list[int]:
    """The layers a request skips, from its keep-probabilities [L] (firstskip's ``decide``)."""
    skippable = torch.zeros(settings.num_layers, dtype=torch.bool)
    skippable[settings.skippable] = True
    if overrides.budget is not None:
        k = min(len(settings.skippable), int(settings.num_layers * overrides.budget + 0.5))
    elif overrides.threshold is not None or settings.decision != "budget":
        threshold = settings.threshold if overrides.threshold is None else overrides.threshold
        skip = (keep < threshold) & skippable
        if overrides.threshold is None and settings.decision == "snapped":
            return nearest_set(skip, settings.snap_sets)
        return skip.nonzero().squeeze(-1).tolist()
    else:
        k = settings.budget_k
    if k == 0:
        return []
    ranked = keep.masked_fill(~skippable, float("inf"))
    return sorted(ranked.topk(k, largest=False).indices.tolist())


def nearest_set(skip: torch.Tensor, stored: tuple[tuple[int, ...], ...]) -> list[int]:
    """The stored set nearest to ``skip`` [L] in Hamming distance; ties to the smaller, then the earlier
    set (firstskip's ``nearest_set``)."""
    def key(item: tuple[int, tuple[int, ...]]) -> tuple[int, int, int]:
        index, layers = item
        mask = torch.zeros_like(skip)
        mask[list(layers)] = True
        return int((mask ^ skip).sum()), len(layers), index

    return sorted(min(enumerate(stored), key=key)[1])
