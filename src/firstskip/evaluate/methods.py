"""The methods an evaluation compares, and the skip set each one gives every item.

Four methods are defined here and run by default (the full model, LoRA without skipping, FiRST,
FiRST's routers without LoRA); the static ones are the keys of `baselines.BASELINES`, each at the
equal budget k = mean of FiRST's per-example skip counts, or with the suffix ``-per-example`` at
each item's own FiRST count. Adding a baseline to that registry adds it here and to the CLI. Two
more on request: ``first-snapped`` (FiRST's set snapped to the nearest of the run's K sets,
`calibrate --snap K`) and ``oracle`` (each task's most common FiRST set on that task's held-out
training prompts, applied statically with FiRST's LoRA; it needs the task label, which a
deployment does not have, hence the name). Rival runs (`train --static`) join as methods of their
own (`rival_method`): a static set with the LoRA that was trained under it, FiRST's fair rival.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from firstskip.baselines import BASELINES, BaselineContext, static_skip_set
from firstskip.errors import FirstSkipError

PER_EXAMPLE = "-per-example"


@dataclass(frozen=True)
class Method:
    name: str
    tuned: bool  # runs on base + the run's LoRA (merged), else on the plain base model
    routed: bool  # the routers choose each item's skip set at prefill
    baseline: str | None = None  # a BASELINES key: a static skip set on the base model
    per_example: bool = False  # static k = FiRST's count on this item, not the dataset mean
    rival: str | None = None  # a static-set run folder (`train --static`): its own LoRA and fixed set
    oracle: bool = False  # the task's most common FiRST set on its training prompts, for every item
    decision: str | None = None  # a decision other than the run's for the routers ("snapped")


_OWN = {
    "full": Method("full", tuned=False, routed=False),
    "lora-only": Method("lora-only", tuned=True, routed=False),
    "first": Method("first", tuned=True, routed=True),
    "first-nolora": Method("first-nolora", tuned=False, routed=True),
}
DEFAULT_METHODS: tuple[str, ...] = (*_OWN, *BASELINES)
_OWN.update({"first-snapped": Method("first-snapped", tuned=True, routed=True, decision="snapped"),
             "oracle": Method("oracle", tuned=True, routed=False, oracle=True)})
# The weights with every layer that a method's score is divided by: the base model, and the base with the
# run's adapter ("FiRST keeps 95% of the score of the same LoRA without skipping").
REFERENCES: tuple[str, ...] = ("full", "lora-only")


def method_names() -> list[str]:
    """Every valid method name, in table order."""
    return [*_OWN, *BASELINES, *(name + PER_EXAMPLE for name in BASELINES)]


def method(name: str) -> Method:
    if name in _OWN:
        return _OWN[name]
    stem = name.removesuffix(PER_EXAMPLE)
    if stem in BASELINES:
        return Method(name, tuned=False, routed=False, baseline=stem, per_example=stem != name)
    raise FirstSkipError(f"unknown method {name!r}; choose from: {', '.join(method_names())}")


def parse_methods(methods: str | Sequence[str] | None) -> list[Method]:
    """'full,first,shortgpt' (or a list of names, or None for the defaults) -> methods, duplicates dropped."""
    if methods is None:
        names = list(DEFAULT_METHODS)
    else:
        parts = methods.split(",") if isinstance(methods, str) else list(methods)
        names = list(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not names:
        raise FirstSkipError(f"no methods given; choose from: {', '.join(method_names())}")
    bad = [n for n in names if n not in _OWN and n.removesuffix(PER_EXAMPLE) not in BASELINES]
    if bad:
        raise FirstSkipError(f"unknown method{'s' * (len(bad) > 1)} {', '.join(map(repr, bad))}; "
                             f"choose from: {', '.join(method_names())}")
    return [method(n) for n in names]


def rival_method(run: str, static: dict, taken: Sequence[str]) -> Method:
    """The method of a static-set run: ``shortgpt+lora`` and the like after the set it was trained
    under, ``plain-lora`` for a LoRA that skips nothing; the run folder's name where two would clash."""
    spec = static.get("spec", "")
    name = "plain-lora" if spec == "none" else f"{spec.split(':')[0]}+lora"
    if name in taken:
        name = f"{name}:{run.rstrip('/').rsplit('/', 1)[-1]}"
    return Method(name, tuned=True, routed=False, rival=run)


def skip_sets(m: Method, ctx: BaselineContext, k: int, first_counts: Sequence[int],
              fixed: Sequence[int] | None = None) -> list[list[int] | None]:
    """Per item: the forced skip set, or None where the routers decide.

    Args:
        m: the method.
        ctx: the model's depth, protected layers and block influence (ShortGPT).
        k: the equal budget, `equal_budget_k(first_counts)`.
        first_counts: FiRST's skip count on each item, in item order.
        fixed: a rival run's own fixed set (the one its LoRA was trained under), or the oracle's.
    """
    if m.routed:
        return [None] * len(first_counts)
    if m.rival is not None or m.oracle:
        return [list(fixed or []) for _ in first_counts]
    if m.baseline is None:
        return [[] for _ in first_counts]
    if not m.per_example:
        chosen = static_skip_set(m.baseline, ctx, k)
        return [list(chosen) for _ in first_counts]
    by_k = {n: static_skip_set(m.baseline, ctx, n) for n in set(first_counts)}
    return [list(by_k[n]) for n in first_counts]
