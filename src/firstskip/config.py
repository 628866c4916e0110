"""`FirstSkipConfig`: router shape and skip decision, checked once so the CLI and the API agree."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from firstskip.errors import FirstSkipError

SCHEMA_VERSION = 1
POOLINGS = ("mean", "mean-all", "last")
DECISIONS = ("threshold", "budget", "snapped")
PREFILLS = ("full", "routed", "early")
EARLY_TOKENS = 16  # `early` prefill reads at least this many of a prompt's own tokens before deciding


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise FirstSkipError(message)


@dataclass
class FirstSkipConfig:
    """Everything that defines a FiRST model on top of its base.

    The decision fields (``decision``, ``threshold``, ``skip_ratio``, ``prefill``) can be changed
    at inference time without retraining; the router fields cannot. ``snapped`` decides by threshold,
    then replaces the set with the nearest of ``snap_sets`` (`routers.decide`).
    """

    num_layers: int
    hidden_size: int
    router_dim: int = 64
    router_init_keep: float = 0.95  # an untrained router keeps every layer: untrained FiRST = base
    router_pooling: Literal["mean", "mean-all", "last"] = "mean"  # token scores -> p_l (RouterBank.keep_probability)
    template_tokens: list[int] | None = None  # [head, tail]: chat-template tokens every prompt shares
    protected_layers: list[int] | None = None  # None: the first and the last layer
    decision: Literal["threshold", "budget", "snapped"] = "threshold"
    threshold: float = 0.5  # keep layer l iff p_l >= threshold
    skip_ratio: float | None = None  # budget mode: skip round(ratio * num_layers) layers
    prefill: Literal["full", "routed", "early"] = "full"
    early_share: float = 0.25  # prefill 'early': the share of the prompt the routers read before deciding
    snap_sets: list[list[int]] | None = None  # decision 'snapped': a threshold set snaps to the nearest of these
    static_skip: list[int] | None = None  # a static-set run: every prompt skips these, no router decides
    base_model: str | None = None  # how to reload the base (hub id, folder or packaged name)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = None  # peft LoRA settings when the run holds an adapter
    merged: bool = False  # adapter folded into the base weights (saved as a full model)
    training: dict[str, Any] = field(default_factory=dict)  # how the run was trained, for reports

    def __post_init__(self) -> None:
        _check(self.num_layers >= 2, f"num_layers must be at least 2, got {self.num_layers}")
        _check(self.router_dim >= 1, f"router_dim must be positive, got {self.router_dim}")
        _check(0.0 < self.router_init_keep < 1.0, "router_init_keep must lie strictly between 0 and 1")
        _check(self.router_pooling in POOLINGS,
               f"router pooling must be one of {', '.join(POOLINGS)}, got {self.router_pooling!r}")
        _check(self.template_tokens is None or (len(self.template_tokens) == 2 and min(self.template_tokens) >= 0),
               f"template_tokens must be [head, tail] token counts, got {self.template_tokens!r}")
        _check(self.decision in DECISIONS,
               f"decision must be one of {', '.join(DECISIONS)}, got {self.decision!r}")
        _check(0.0 <= self.threshold <= 1.0, f"threshold must lie in [0, 1], got {self.threshold}")
        _check(self.prefill in PREFILLS, f"prefill must be one of {', '.join(PREFILLS)}, got {self.prefill!r}")
        _check(0.0 < self.early_share <= 1.0, f"early_share must lie in (0, 1], got {self.early_share}")
        if self.skip_ratio is not None:
            _check(0.0 <= self.skip_ratio <= 1.0, f"skip ratio must lie in [0, 1], got {self.skip_ratio}")
        _check(self.decision != "budget" or self.skip_ratio is not None,
               "decision 'budget' needs a skip ratio (e.g. --budget 0.25)")
        _check(self.decision == "threshold" or self.prefill != "routed",
               f"a {self.decision} decision looks at all layers at once, so it needs prefill 'full' or 'early'")
        _check(self.decision != "snapped" or bool(self.snap_sets),
               "decision 'snapped' needs the run's skip sets (learn them with firstskip calibrate --snap K)")
        skippable = set(self.skippable)
        bad = sorted({i for s in self.snap_sets or [] for i in s} - skippable)
        _check(not bad, f"snap sets hold layers {bad} that are protected or outside 0..{self.num_layers - 1}")
        bad = [i for i in self.protected if not 0 <= i < self.num_layers]
        _check(not bad, f"protected layers {bad} are outside 0..{self.num_layers - 1}")
        bad = [i for i in self.static_skip or [] if not 0 <= i < self.num_layers]
        _check(not bad, f"static skip layers {bad} are outside 0..{self.num_layers - 1}")

    @property
    def protected(self) -> list[int]:
        if self.protected_layers is None:
            return [0, self.num_layers - 1]
        return sorted(set(self.protected_layers))

    @property
    def skippable(self) -> list[int]:
        protected = set(self.protected)
        return [i for i in range(self.num_layers) if i not in protected]

    @property
    def budget_k(self) -> int:
        """How many layers a budget decision skips, capped by what may be skipped."""
        return min(len(self.skippable), int(self.num_layers * (self.skip_ratio or 0.0) + 0.5))

    def decision_tokens(self, n: int) -> int:
        """How many of an n-token prompt's first tokens the routers read before its skip set is fixed.

        All of them, except in ``early`` prefill: the chat template's fixed head, then ``early_share``
        of the tokens the routers pool (at least `EARLY_TOKENS`); the rest of the prompt then runs
        only the kept layers, as generated tokens do, and its tokens never reach the routers."""
        if self.prefill != "early":
            return n
        head, tail = self.template_tokens or (0, 0)
        pooled = max(0, n - head - tail)
        return min(n, head + max(EARLY_TOKENS, math.ceil(self.early_share * pooled)))

    def prompt_layer_runs(self, n: int, skipped: int) -> int:
        """Decoder-layer executions the prefill of an n-token prompt costs with ``skipped`` layers skipped."""
        every = {"full": n, "routed": 0, "early": self.decision_tokens(n)}[self.prefill]  # tokens through all layers
        return every * self.num_layers + (n - every) * (self.num_layers - skipped)

    def replace(self, **changes: Any) -> FirstSkipConfig:
        """A checked copy with some fields changed (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_json(self) -> str:
        data = {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FirstSkipConfig:
        """Load forward-compatibly: unknown keys from a newer firstskip are dropped with a warning."""
        data = dict(data)
        version = data.pop("schema_version", SCHEMA_VERSION)
        _check(isinstance(version, int) and version <= SCHEMA_VERSION,
               f"this run was written by a newer firstskip (schema {version}); upgrade firstskip to read it")
        data.setdefault("router_pooling", "mean-all")  # runs saved before pooling was a choice
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"ignoring unknown config keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})
