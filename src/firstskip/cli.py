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
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ...")]


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


def load(model: str | None, run: Path | None, dtype: str = "float32", device: str = "cpu"):
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
    prefill: Annotated[Optional[str], typer.Option(help="full (prompt runs every layer) or routed.")] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[Optional[float], typer.Option()] = None,
    top_k: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop when this text appears (repeatable).")] = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Generate text, skipping the layers the routers (or --skip) choose for this prompt."""
    from firstskip.engine import Sampling

    if prompt is None:
        prompt = sys.stdin.read()
    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed)
    fsm = load(model, run, dtype, device)
    fsm.set_decision(threshold=threshold, budget=budget, prefill=prefill)
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


@app.command(epilog="Example:\n\n  firstskip bench -m smollm2-135m --skip 10-17 --batch-size 1 "
                    "--prompt-len 256 --new-tokens 64 --json")
def bench(
    model: ModelOpt = None,
    run: RunOpt = None,
    skip: SkipOpt = None,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together.")] = 1,
    prompt_len: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 256,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt.")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed runs per variant (medians are reported).")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
) -> None:
    """Time the full model, FiRST and a physically pruned copy in one process."""
    from firstskip.bench import run_bench

    for name, value in (("--batch-size", batch_size), ("--prompt-len", prompt_len),
                        ("--new-tokens", new_tokens), ("--repeats", repeats)):
        if value < 1:
            raise FirstSkipError(f"{name} must be at least 1, got {value}")
    fsm = load(model, run, dtype, device)
    layers = parse_layers(skip)
    if layers is None and run is None:
        raise FirstSkipError("give --skip (e.g. --skip 10-17) or a trained --run whose routers choose")
    result = run_bench(fsm, layers, batch_size, prompt_len, new_tokens, repeats)
    if as_json:
        typer.echo(json.dumps(result))
        return
    _print_bench(result)


def _print_bench(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"decode speed, batch {result['setup']['batch_size']}, skip {result['setup']['skip']}")
    for col in ("variant", "decode tok/s", "TTFT s", "end-to-end s", "KV cache MB"):
        table.add_column(col)
    for name in ("full", "first", "pruned"):
        r = result[name]
        table.add_row(name, f"{r['decode_tok_s']:.1f}", f"{r['ttft_s']:.3f}", f"{r['e2e_s']:.2f}", f"{r['kv_cache_mb']:.1f}")
    console = Console()
    console.print(table)
    console.print(f"first/full {result['first_over_full']:.3f}x   first/pruned {result['first_over_pruned']:.3f}x")


@app.command(epilog="Example:\n\n  firstskip models")
def models() -> None:
    """List the packaged and cached models and the cache folder."""
    from firstskip.models import list_models

    for entry in list_models():
        typer.echo(json.dumps(entry))


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
