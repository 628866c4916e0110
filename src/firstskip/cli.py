"""The `firstskip` command: one thin typer command per library function.

A mistake a user can fix (a `FirstSkipError`) prints one line and exits with code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from firstskip.errors import FirstSkipError

app = typer.Typer(
    help="FiRST: decode faster by skipping decoder layers chosen per input.\n\n"
         "Start with `firstskip demo --quick`, or `firstskip generate --model smollm2-135m --prompt 'Hi'`.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Base model: packaged name (smollm2-135m), Hugging Face id, folder, or random:<preset>.")]
RunOpt = Annotated[Optional[Path], typer.Option("--run", "-r", help="A trained run folder (routers, adapter).")]
SkipOpt = Annotated[Optional[str], typer.Option("--skip", help="Force this skip set, e.g. 3,4,5 (overrides routers).")]
DtypeOpt = Annotated[Optional[str], typer.Option(
    help="float32, bfloat16, float16, int8 or int4 weights (default: int8 on a CPU, bfloat16 on a GPU).",
    show_default=False)]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ...")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="Compile the decode step (torch.compile; about a "
                                          "minute once, then faster decoding; eager where it cannot).")]


def parse_layers(text: str | None) -> list[int] | None:
    """'3,4,5' or '10-17' (or a mix) -> sorted layer indices."""
    if text is None:
        return None
    layers: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            layers.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise FirstSkipError(f"--skip takes layer numbers like 3,4,5 or 10-17, got {text!r}") from None
    return sorted(layers)


def weights(dtype: str | None, device: str) -> str:
    """--dtype, or the fastest format that passed the quality check on this device."""
    from firstskip.quantize import default_format

    return dtype or default_format(device)


def load(model: str | None, run: Path | None, dtype: str, device: str = "cpu"):
    """The FirstSkipModel named by --model or --run (exactly one of them)."""
    from firstskip.modeling import FirstSkipModel

    if (model is None) == (run is None):
        raise FirstSkipError("give exactly one of --model or --run")
    if run is not None:
        return FirstSkipModel.from_pretrained(run, dtype=dtype, device=device)
    return FirstSkipModel.from_base(model, dtype=dtype, device=device)


@app.command(epilog="Examples:\n\n"
             "  firstskip generate -m smollm2-135m --prompt 'Summarize: ...' --skip 10-17\n\n"
             "  echo 'Is the sky blue?' | firstskip generate --run runs/demo --stream\n\n"
             "  firstskip generate --run runs/demo --prompt 'Hi' --budget 0.25 --json")
def generate(
    model: ModelOpt = None,
    run: RunOpt = None,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt text; read from standard input if omitted.")] = None,
    raw: Annotated[bool, typer.Option(help="Feed the prompt as is, without the chat template.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    skip: SkipOpt = None,
    threshold: Annotated[Optional[float], typer.Option(help="Keep layer l iff its keep-probability >= this.")] = None,
    budget: Annotated[Optional[float], typer.Option(help="Skip this fraction of layers (lowest keep-probability).")] = None,
    prefill: Annotated[Optional[str], typer.Option(
        help="full (prompt runs every layer), routed, or early (decide on its start, the rest skips too).")] = None,
    snapped: Annotated[bool, typer.Option(help="Snap the threshold's skip set to the nearest of the run's "
                                          "sets (learned by calibrate --snap K).")] = False,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[Optional[float], typer.Option()] = None,
    top_k: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop when this text appears (repeatable).")] = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Generate text, skipping the layers the routers (or --skip) choose for this prompt."""
    from firstskip.engine import Sampling

    if prompt is None:
        prompt = sys.stdin.read()
    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed)
    dtype = weights(dtype, device)
    fsm = load(model, run, dtype, device)
    fsm.set_decision(threshold=threshold, budget=budget, prefill=prefill)
    if snapped:
        if budget is not None:
            raise FirstSkipError("--snapped snaps a threshold decision: give --threshold, not --budget")
        fsm.update_config(decision="snapped")
    layers, stops = parse_layers(skip), stop or []
    if stream and not as_json:
        _print_stream(fsm, prompt, sampling, raw, layers, stops)
        return
    gen = fsm.generate(prompt, sampling, raw=raw, skip=layers, stop=stops)[0]
    if as_json:
        typer.echo(json.dumps({"text": gen.text, "token_ids": gen.token_ids, "skipped_layers": gen.skipped_layers,
                               "keep_probs": gen.keep_probs, "prompt_tokens": gen.prompt_tokens,
                               "new_tokens": gen.new_tokens, "finish_reason": gen.finish_reason}))
    else:
        typer.echo(gen.text)
        typer.echo(f"[skipped {len(gen.skipped_layers)}/{fsm.config.num_layers} layers: {gen.skipped_layers}]", err=True)


def _print_stream(fsm, prompt, sampling, raw, layers, stops) -> None:
    stream = fsm.stream(prompt, sampling, raw=raw, skip=layers, stop=stops)
    typer.echo(f"[skipping {len(stream.skipped_layers)}/{fsm.config.num_layers} layers: {stream.skipped_layers}]",
               err=True)
    shown = ""
    for _ in stream:
        text = fsm.decode(stream.result.token_ids, stops)
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")


@app.command(epilog="Examples:\n\n  firstskip bench -m smollm2-135m --skip 10-17 --batch-size 1 "
                    "--prompt-len 256 --new-tokens 64 --json\n\n"
                    "  firstskip bench -r runs/mine --data ../shared/data/samsum --batch-size 8 --memory\n\n"
                    "  firstskip bench -m smollm2-135m --skip 10-17 --dtype int8 --llamacpp Q8_0,Q4_1")
def bench(
    model: ModelOpt = None,
    run: RunOpt = None,
    skip: SkipOpt = None,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="Real prompts: the first --batch-size "
                                                "test prompts of a dataset (the routers choose per row).")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together.")] = 1,
    prompt_len: Annotated[int, typer.Option(help="Prompt length in tokens (random prompts).")] = 256,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt.")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed runs per variant (medians are reported).")] = 5,
    memory: Annotated[bool, typer.Option("--memory", help="Also each variant's peak resident memory, "
                                         "in a process of its own.")] = False,
    llamacpp: Annotated[Optional[str], typer.Option(help="Also llama.cpp on the model's GGUF requantized to these "
                                                    "types, e.g. Q8_0,Q4_1 (batch 1; needs "
                                                    "benchmarks/setup_llamacpp.sh).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    compile_: CompileOpt = False,
) -> None:
    """Time the full model, FiRST and a physically pruned copy, interleaved in one process."""
    from firstskip.bench import run_bench

    for name, value in (("--batch-size", batch_size), ("--prompt-len", prompt_len),
                        ("--new-tokens", new_tokens), ("--repeats", repeats)):
        if value < 1:
            raise FirstSkipError(f"{name} must be at least 1, got {value}")
    dtype = weights(dtype, device)
    fsm = load(model, run, dtype, device)
    layers = parse_layers(skip)
    if layers is None and run is None:
        raise FirstSkipError("give --skip (e.g. --skip 10-17) or a trained --run whose routers choose")
    prompts = None
    if data is not None:
        from firstskip.data import encode_prompt, load_examples

        prompts = [encode_prompt(fsm.tokenizer, ex.prompt) for ex in load_examples(data, "test", limit=batch_size)]
    result = run_bench(fsm, layers, batch_size, prompt_len, new_tokens, repeats, prompts=prompts,
                       memory=str(run if run is not None else model) if memory else None,
                       llamacpp=[k.strip() for k in llamacpp.split(",") if k.strip()] if llamacpp else (),
                       compile=compile_)
    if as_json:
        typer.echo(json.dumps(result))
        return
    _print_bench(result)


def _print_bench(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    setup = result["setup"]
    skips = setup["skip"] if setup["skip"] is not None else "per row (routers)"
    table = Table(title=f"decode speed, {setup['dtype']}, batch {setup['batch_size']}, skip {skips}")
    columns = ["variant", "decode tok/s", "TTFT s", "end-to-end s", "KV cache MB"]
    memory = "peak_rss_mb" in result["full"]
    for col in columns + (["peak RSS MB"] if memory else []):
        table.add_column(col)
    for name in ["full", "first", "pruned", *setup["llamacpp_ggufs"]]:
        if name in result:
            r = result[name]
            label = name.replace("llamacpp_", "llama.cpp ")
            kv = "" if r["kv_cache_mb"] is None else f"{r['kv_cache_mb']:.1f}"
            row = [label, f"{r['decode_tok_s']:.1f}", f"{r['ttft_s']:.3f}", f"{r['e2e_s']:.2f}", kv]
            rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else ""
            table.add_row(*row, *([rss] if memory else []))
    console = Console()
    console.print(table)
    names = ["first_over_full", "pruned_over_full", "first_over_pruned"]
    names += [f"{ours}_over_{kind}" for kind in setup["llamacpp_ggufs"] for ours in ("full", "first")]
    ratios = "   ".join(f"{k.replace('_over_', '/').replace('llamacpp_', 'llama.cpp ')} {result[k]:.3f}x"
                        for k in names if k in result)
    console.print(f"{ratios}   (bound {result['bound']:.3f}x; medians of per-repeat ratios)")
    for fault in result["faults"]:
        console.print(f"[red]measurement fault:[/red] {fault}")


@app.command(epilog="Examples:\n\n  firstskip models\n\n  firstskip models --json")
def models(as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False) -> None:
    """List the packaged and random models, what is cached, and the cache folder's size."""
    from rich.console import Console
    from rich.table import Table

    from firstskip.models import list_models

    rows = list_models()
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    table = Table(title="models (use the name with --model)")
    for col in ("name", "kind", "status", "details"):
        table.add_column(col)
    for row in rows:
        table.add_row(*_model_row(row))
    Console().print(table)


def _model_row(row: dict) -> tuple[str, str, str, str]:
    size = f"{row.get('size_bytes', 0) / 2**20:,.0f} MB"
    if row["kind"] == "packaged":
        status = f"cached, {size}" if row["cached"] else "installed" if row["installed"] else "not installed"
        return row["name"], "packaged", status, row["description"] if row["installed"] else row["install"]
    if row["kind"] == "cache":
        return "(cache folder)", "", size, row["path"]
    return row["name"], "random", "", f"{row['model_type']}, {row['layers']} layers, width {row['hidden_size']}"


# -- evaluation: `eval` and `inspect` (firstskip.evaluate) -------------------------------------
EvalRunOpt = Annotated[Path, typer.Option("--run", "-r", help="A trained run folder (routers, and adapter/ or model/).")]
DataOpt = Annotated[list[str], typer.Option(
    "--data", "-d", help="Dataset (repeatable): a folder with test.jsonl and train.jsonl, a .jsonl file, "
                         "hf:NAME[:CONFIG]\\[@SPLIT] or builtin:NAME.")]
LimitOpt = Annotated[Optional[int], typer.Option(help="Use the first N test items of each dataset.")]
ThresholdOpt = Annotated[Optional[float], typer.Option(help="FiRST keeps layer l iff its keep-probability >= this.")]
BudgetOpt = Annotated[Optional[float], typer.Option(help="FiRST skips this fraction of layers instead (lowest first).")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's own choice).")]


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise FirstSkipError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


@app.command("eval", epilog="Examples:\n\n"
             "  firstskip eval -r runs/smollm2-samsum -d ../shared/data/samsum --limit 50 --out eval/samsum\n\n"
             "  firstskip eval -r runs/smollm2-mix -d ../shared/data/boolq -d ../shared/data/sst2 --limit 100 "
             "--methods full,lora-only,first,shortgpt,shortgpt-per-example --out eval/mix\n\n"
             "  firstskip eval -r runs/smollm2-mix -d ../shared/data/sst2 --budget 0.15 --methods full,first,shortgpt "
             "--out eval/sst2-budget0.15\n\n"
             "  firstskip eval -r runs/mix -d ../shared/data/samsum --methods full,first --rival runs/shortgpt25 "
             "--rival runs/plain --out eval/fair\n\n"
             "Stopped and started again with the same --out, it resumes; finished items are not recomputed.")
def eval_(
    run: EvalRunOpt,
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Output folder: predictions/, results.json, results.md, *.png.")],
    limit: LimitOpt = None,
    methods: Annotated[Optional[str], typer.Option(
        help="Comma-separated methods. Default: full, lora-only, first, first-nolora and every static baseline "
             "at FiRST's mean skip count; add <baseline>-per-example for each item's own count, first-snapped "
             "(calibrate --snap K), oracle (each task's most common FiRST set on its training prompts). A wrong "
             "name lists the valid ones.")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts generated together.")] = 8,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help="One limit for every task (default per task: summaries and translation 64, yes/no and "
             "classification 8, QA 16, math 256).")] = None,
    threshold: ThresholdOpt = None,
    budget: BudgetOpt = None,
    rival: Annotated[Optional[list[Path]], typer.Option(
        help="A static-set run (train --static ... --lora), evaluated as a method of its own: its fixed set "
             "with its own LoRA (shortgpt+lora, plain-lora ...). Repeat for several.")] = None,
    calibration_items: Annotated[int, typer.Option(help="Train items for ShortGPT's block influence.")] = 32,
    speed_items: Annotated[int, typer.Option(
        help="Prompts per dataset timed alone (batch 1, 32 new tokens) for decode speed; 0: none.")] = 8,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Score FiRST against the full model, LoRA-only and static baselines at an equal skip budget."""
    from firstskip.evaluate import evaluate_run
    from firstskip.evaluate.report import kept_table, summary

    _set_threads(threads)
    results = evaluate_run(run, data, methods, limit, out, batch_size, max_new_tokens, threshold, budget,
                           calibration_items, speed_items, dtype=weights(dtype, device), device=device,
                           rivals=[str(r) for r in rival or []])
    typer.echo("\n".join(summary(results)))
    kept = kept_table(results)
    if kept:
        typer.echo("\nquality kept (paired 95% interval):\n" + "\n".join(kept))
    typer.echo(f"wrote {out}/results.md, results.json, pareto.png, layer_usage.png, skip_counts.png")


@app.command("inspect", epilog="Example:\n\n"
             "  firstskip inspect -r runs/smollm2-mix -d ../shared/data/samsum -d ../shared/data/boolq "
             "--limit 50 --out layers.png")
def inspect_(
    run: EvalRunOpt,
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="The heatmap to write (.png).")],
    limit: LimitOpt = None,
    batch_size: Annotated[int, typer.Option(help="Prompts scored together.")] = 8,
    threshold: ThresholdOpt = None,
    budget: BudgetOpt = None,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Draw which layers the routers keep on each dataset (prefill only, no generation)."""
    from firstskip.evaluate import inspect_run

    if out.suffix.lower() != ".png":
        raise FirstSkipError(f"--out must name a .png file, got {out}")
    _set_threads(threads)
    found = inspect_run(run, data, out, limit, batch_size, threshold, budget, weights(dtype, device), device)
    for name, d in found.items():
        typer.echo(f"{name} ({d['task']}): {d['items']} items, {d['mean_skipped']:.2f} of "
                   f"{len(d['layer_keep_rate'])} layers skipped on average")
    typer.echo(f"wrote {out}")


@app.command(epilog="Examples:\n\n"
             "  firstskip train -m smollm2-135m -d ../shared/data/samsum -d ../shared/data/xsum "
             "-d ../shared/data/boolq -o runs/mix --skip-target 0.25 --lora --merge\n\n"
             "  firstskip train -m smollm2-135m -d ../shared/data/samsum -d ../shared/data/xsum "
             "-d ../shared/data/boolq -o runs/shortgpt --skip-target 0.25 --static shortgpt --lora\n\n"
             "  firstskip train -m smollm2-135m -d builtin:boolq -o runs/boolq --lambda 0.01 --resume\n\n"
             "  accelerate launch --multi_gpu --num_processes 2 $(which firstskip) train -m smollm2-135m "
             "-d builtin:boolq -o runs/ddp --skip-target 0.25\n\n"
             "The recipe and every option: docs/training.md.")
def train(
    model: Annotated[str, typer.Option("--model", "-m", help="Base model: name, hub id, path.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="The run folder to write.")],
    skip_target: Annotated[Optional[float], typer.Option(help="Fraction of layers to skip on average.")] = None,
    saving_target: Annotated[Optional[float], typer.Option(
        help="Or: fraction of the layer executions to save over the generated tokens (token-weighted).")] = None,
    lam: Annotated[Optional[float], typer.Option("--lambda", help="λ mode instead of a target (λ = 0.01).")] = None,
    lora: Annotated[bool, typer.Option(help="Then train LoRA under the skip sets.", show_default=False)] = False,
    merge: Annotated[bool, typer.Option(help="Also save merged weights (RUN/model).", show_default=False)] = False,
    static: Annotated[Optional[str], typer.Option(
        help="No routers, LoRA under one set: shortgpt, uls, last, random, layers:3,4,5 or none.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Steps per phase (default 120, LoRA 30).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the data instead of steps.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Routers' learning rate (default 3e-3).")] = None,
    lora_steps: Annotated[Optional[int], typer.Option(help="LoRA steps (default --max-steps or 30).")] = None,
    lora_lr: Annotated[Optional[float], typer.Option(help="LoRA learning rate (default 1e-3).")] = None,
    lora_rank: Annotated[Optional[int], typer.Option(help="LoRA rank (default 8).")] = None,
    prefill: Annotated[Optional[str], typer.Option(
        help="full (default) or early: decide on the prompt's first quarter, the rest skips too.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Rows per step, all processes (default 8).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Data order, holdout, init (default 0).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many examples per dataset.")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per example (default 256).")] = None,
    holdout: Annotated[Optional[int], typer.Option(help="Held out per dataset (default 32).")] = None,
    resume: Annotated[bool, typer.Option(help="Go on from the last checkpoint.", show_default=False)] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out.", show_default=False)] = False,
    threads: ThreadsOpt = None,
    dtype: Annotated[str, typer.Option(help="float32 (default), bfloat16 or float16.", show_default=False)] = "float32",
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda ... (default: accelerate's).")] = None,
) -> None:
    """Train routers on a frozen base model (then LoRA with --lora) into a run folder (train splits)."""
    from firstskip.train import train as train_run

    _set_threads(threads)
    if skip_target is not None and saving_target is not None:
        raise FirstSkipError("give --skip-target or --saving-target, not both")
    target = skip_target if saving_target is None else saving_target  # a decode saving when token-weighted
    options = dict(skip_target=target, lam=lam, max_steps=max_steps, epochs=epochs, lr=lr, batch_size=batch_size,
                   seed=seed, limit=limit, max_length=max_length, holdout=holdout, lora_steps=lora_steps,
                   lora_lr=lora_lr, lora_rank=lora_rank, device=device, static=static, prefill=prefill)
    fsm = train_run(model, data, out, lora=lora, merge=merge, resume=resume, overwrite=overwrite, dtype=dtype,
                    token_weighted=saving_target is not None,
                    **{k: v for k, v in options.items() if v is not None})
    typer.echo(json.dumps({"run": str(out), "threshold": fsm.config.threshold,
                           "calibration": fsm.config.training.get("calibration"), "static_skip": fsm.config.static_skip}))


@app.command(epilog="Examples:\n\n"
             "  firstskip calibrate --run runs/mix --data ../shared/data/samsum --data ../shared/data/xsum "
             "--data ../shared/data/boolq --skip-target 0.25\n\n"
             "  firstskip calibrate --run runs/mix --data ../shared/data/samsum --data ../shared/data/xsum "
             "--data ../shared/data/boolq --saving-target 0.3 --snap 8\n\n"
             "  firstskip calibrate --run runs/mix --data builtin:boolq --max-drop 0.05 --limit 64")
def calibrate(
    run: Annotated[Path, typer.Option("--run", "-r", help="A trained run folder.")],
    data: DataOpt,
    skip_target: Annotated[Optional[float], typer.Option(help="Mean fraction of all layers to skip per prompt.")] = None,
    saving_target: Annotated[Optional[float], typer.Option(
        help="Token-weighted decode saving: fraction of layer executions saved over the generated tokens "
             "(each prompt weighs its reference's length).")] = None,
    max_drop: Annotated[Optional[float], typer.Option(
        help="Largest skip ratio whose response loss grows by at most this fraction (0.05 = 5%).")] = None,
    snap: Annotated[Optional[int], typer.Option(
        help="Also learn K skip sets from the routers' decisions for the snapped decision (generate --snapped, "
             "eval method first-snapped).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Examples per dataset: the first of a seeded shuffle of the "
                                                 "train split (with the training seed and the default, exactly "
                                                 "those `train` held out).")] = None,
    seed: Annotated[Optional[int], typer.Option(
        help="Seed of the shuffle (default: the run's training seed).")] = None,
) -> None:
    """Choose the skip threshold on held-out training data (never a test split) and store it in the run."""
    import dataclasses

    from firstskip import artifacts
    from firstskip.train import calibrate as calibrate_run
    from firstskip.train import held_out_examples

    if seed is None:  # a run trained with --seed 1 held out the first examples of *that* shuffle
        seed = artifacts.load_config(run).training.get("routers", {}).get("seed", 0)
    result = calibrate_run(run, held_out_examples(data, limit, seed), skip_target, max_drop,
                           saving_target=saving_target, snap=snap)
    typer.echo(json.dumps(dataclasses.asdict(result)))


@app.command(epilog="Examples:\n\n"
             "  firstskip export --run runs/mix --task-set builtin:xsum --out out/mix-xsum\n\n"
             "  firstskip export -m smollm2-135m --skip 10-17 --out out/smollm2-22\n\n"
             "  firstskip export -m smollm2-135m --skip 10-17 --format gguf --out out/smollm2-22-gguf")
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (new or empty).")],
    model: ModelOpt = None,
    run: RunOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="pruned (a Hugging Face folder), gguf (llama.cpp; "
                                                      "models that come from a GGUF file) or vllm (every layer "
                                                      "and the routers, for the firstskip-vllm plugin; --run).")] = "pruned",
    skip: Annotated[Optional[str], typer.Option(help="Layers to remove, e.g. 10,11,12 or 10-17.")] = None,
    task_set: Annotated[Optional[str], typer.Option(
        help="Remove the skip set the run's routers choose most often on this dataset's test prompts.")] = None,
    limit: Annotated[int, typer.Option(help="Test prompts read for --task-set.")] = 100,
    dtype: Annotated[str, typer.Option(help="The checkpoint's dtype: float32, bfloat16 or float16.")] = "float32",
) -> None:
    """Write a plain, smaller checkpoint with one skip set's layers removed (LoRA merged)."""
    from firstskip.export import export as export_checkpoint

    result = export_checkpoint(out, fmt, model=model, run=run, skip=parse_layers(skip), task_set=task_set,
                               limit=limit, dtype=dtype)
    typer.echo(json.dumps(result))


@app.command(epilog="Examples:\n\n"
             "  firstskip serve -m smollm2-135m --port 8000\n\n"
             "  firstskip serve --run runs/mix --max-batch-size 16 --max-queue 128 --api-key secret\n\n"
             "  firstskip serve --run runs/mix --budget 0.25 --served-model-name mix\n\n"
             "Then: curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
             "-d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"max_tokens\": 16}'")
def serve(
    model: ModelOpt = None,
    run: RunOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch_size: Annotated[int, typer.Option(help="Requests decoded together at most.")] = 8,
    max_queue: Annotated[int, typer.Option(help="Requests waiting for a batch slot at most; more get 429.")] = 64,
    max_model_len: Annotated[Optional[int], typer.Option(
        help="Prompt + answer tokens a request may take (default: the model's context); the KV "
             "cache is sized for it once instead of growing with the longest request.")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="FIRSTSKIP_API_KEY", help="Refuse /v1 requests without 'Authorization: Bearer KEY' (401).")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(
        help="The model id clients name (default: the run folder's name or --model).")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Default decision: keep layer l iff p_l >= this.")] = None,
    budget: Annotated[Optional[float], typer.Option(help="Default decision: skip this fraction of layers.")] = None,
    grace: Annotated[float, typer.Option(help="On SIGTERM, seconds running requests may take to finish "
                                         "before they are cancelled.")] = 30.0,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = "cpu",
    compile_: CompileOpt = False,
) -> None:
    """Serve the model over HTTP with OpenAI's API (completions, chat, streaming), skipping per request."""
    from firstskip.server import bound_native_caches, server

    bound_native_caches()
    _set_threads(threads)
    typer.echo(f"loading {run or model} ...", err=True)
    dtype = weights(dtype, device)
    fsm = load(model, run, dtype, device)
    fsm.set_decision(threshold=threshold, budget=budget)
    compiled = compile_ and fsm.engine.compile()
    name = served_model_name or (run.name if run is not None else model)
    srv = server(fsm, name, host, port, grace, max_batch_size=max_batch_size, max_queue=max_queue, api_key=api_key,
                 max_model_len=max_model_len)
    cfg = fsm.config
    decision = f"budget {cfg.skip_ratio}" if cfg.decision == "budget" else f"threshold {cfg.threshold}"
    typer.echo(f"firstskip serve: {name} ({cfg.num_layers} layers, {decision}, {cfg.prefill} prefill, {dtype}{', compiled' if compiled else ''}) "
               f"on http://{host}:{port}/v1 "
               f"(batch {max_batch_size}, queue {max_queue}{', API key' if api_key else ''})", err=True)
    srv.run()


@app.command(epilog="Examples:\n\n  firstskip demo --quick\n\n  firstskip demo --out my-demo")
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the run, the evaluation, the plots and report.md.")] = Path(
        "firstskip-demo"),
    quick: Annotated[bool, typer.Option(help="A first look in a few minutes (fewer steps and items).")] = False,
) -> None:
    """Train FiRST on the packaged model and offline data, evaluate it and write a report.

    Interrupted, it resumes where it stopped when run again with the same --out.
    """
    from firstskip.demo import example_command, run_demo, table

    results = run_demo(out, quick=quick)
    typer.echo("\n".join(table(results)))
    typer.echo(f"\nreport: {out / 'report.md'}\ntry: {example_command(out / 'run')}")


def main() -> None:
    """Console entry point: user mistakes become one line on stderr and exit code 2."""
    try:
        app()
    except FirstSkipError as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None
