"""Evaluation: FiRST against the full model, LoRA-only and input-agnostic baselines at an equal budget.

`methods` names what is compared and the skip set each method gives an item; `store` keeps
predictions resumable; `runner` generates, scores and times; `report` writes the table and plots.
This package sees run folders, datasets and predictions; metrics live in `firstskip.metrics`,
skip sets of baselines in `firstskip.baselines`.
"""

from firstskip.evaluate.methods import DEFAULT_METHODS, PER_EXAMPLE, method_names, parse_methods
from firstskip.evaluate.runner import TASK_MAX_NEW_TOKENS, evaluate_run, inspect_run, router_decisions

__all__ = ["DEFAULT_METHODS", "PER_EXAMPLE", "TASK_MAX_NEW_TOKENS", "evaluate_run", "inspect_run",
           "method_names", "parse_methods", "router_decisions"]
