"""Decode speed in vLLM: the FiRST plugin skipping a set vs vLLM serving the pruned export of that set
vs vLLM serving the full model, same engine settings, repeats interleaved (batch 1 by default).

Run with the plugin's environment (``plugins/vllm/ci.sh`` builds ``.venv-vllm``) on two exports of one
run::

    firstskip export --run runs/sec4s0 --format vllm --out out/sec4s0-vllm
    firstskip export --run runs/sec4s0 --skip 10-17 --out out/sec4s0-pruned
    .venv-vllm/bin/python benchmarks/vllm_speed.py --export out/sec4s0-vllm --pruned out/sec4s0-pruned \\
        --skip 10-17 --out benchmarks/results/vllm_speed.json

The full model is the vllm export's own weights served as the plain family (a folder of links, without
the routers). Each variant runs in its own engine (all three alive at once, so repeats can alternate);
every engine is eager with prefix caching off (the plugin needs both; the others get them too). The
plugin's request forces the set through ``extra_args`` and runs its prompt through every layer (FiRST's
``full`` prefill), so it decodes from the same KV as the full model. Decode time of a request is
(time to generate N tokens) - (time to generate 1), both measured alone; a repeat gives a ratio per
pair, and the medians of those ratios are reported.

``--batch B`` sends B requests at once (different prompts of the same length); decode speed is then
B × (N - 1) tokens over the time difference. With ``--mixed`` a fourth variant, ``plugin-mixed``,
gives request i the set shifted by ``i × --shift`` layers (kept inside the model): rows with
different sets, where a layer some rows keep runs for all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

def parse_layers(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def plain_copy(export: Path, dest: Path) -> Path:
    """The export's weights as the plain family: links to its files, config without FiRST's keys."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in export.iterdir():
        if item.name in ("config.json", "firstskip_routers.safetensors") or (dest / item.name).exists():
            continue
        (dest / item.name).symlink_to(item.resolve())
    config = json.loads((export / "config.json").read_text())
    config.pop("firstskip")
    config["architectures"] = [a.removeprefix("FirstSkip") for a in config["architectures"]]
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def timed(llm, prompts: list[list[int]], max_tokens: int, extras: list[dict | None]) -> float:
    from vllm import SamplingParams, TokensPrompt

    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=e) for e in extras]
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return elapsed


def shifted(skip: list[int], shift: int, num_layers: int) -> list[int]:
    """``skip`` moved up by ``shift`` layers, kept clear of the first and last layer."""
    top = num_layers - 2 - max(skip)
    return [i + min(shift, top) for i in skip]


def measure(engines: dict, extras: dict[str, list[dict | None]], prompts: list[list[int]], new_tokens: int,
            repeats: int) -> dict[str, list[float]]:
    """Decode tokens/s of each variant per repeat; the order alternates so drift hits all alike."""
    variants = list(extras)
    for name in variants:  # warm-up: first requests pay one-off costs
        timed(engines[name], prompts, 4, extras[name])
    decode: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats):
        for name in variants if repeat % 2 == 0 else variants[::-1]:
            t_one = timed(engines[name], prompts, 1, extras[name])
            t_all = timed(engines[name], prompts, new_tokens, extras[name])
            decode[name].append(len(prompts) * (new_tokens - 1) / (t_all - t_one))
        print(json.dumps({"repeat": repeat, **{k: round(v[-1], 2) for k, v in decode.items()}}), flush=True)
    return decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True, help="firstskip export --format vllm folder")
    parser.add_argument("--pruned", type=Path, required=True, help="firstskip export --format pruned folder of --skip")
    parser.add_argument("--skip", required=True, help="the pruned export's set, e.g. 10-17")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mixed", action="store_true", help="add plugin-mixed: each request its own set")
    parser.add_argument("--shift", type=int, default=4, help="--mixed: layers between consecutive requests' sets")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from vllm import LLM

    skip = parse_layers(args.skip)
    settings = dict(dtype="float32", max_model_len=1024, enforce_eager=True, enable_prefix_caching=False, seed=0)
    folders = {"plugin": args.export, "pruned": args.pruned, "full": plain_copy(args.export, args.export.with_name(
        args.export.name + "-plain"))}
    engines = {name: LLM(model=str(folder), **settings) for name, folder in folders.items()}
    num_layers = json.loads((args.export / "config.json").read_text())["num_hidden_layers"]
    prompts = [[(i * 7919 + 104729 * b) % 20000 + 100 for i in range(args.prompt_len)] for b in range(args.batch)]
    extras = {"plugin": [{"firstskip_skip": skip}] * args.batch, "pruned": [None] * args.batch,
              "full": [None] * args.batch}
    if args.mixed:
        engines["plugin-mixed"] = engines["plugin"]
        extras["plugin-mixed"] = [{"firstskip_skip": shifted(skip, b * args.shift, num_layers)} for b in range(args.batch)]
    decode = measure(engines, extras, prompts, args.new_tokens, args.repeats)
    pairs = [("plugin", "pruned"), ("plugin", "full"), ("pruned", "full")] + (
        [("plugin-mixed", "full"), ("plugin-mixed", "plugin")] if args.mixed else [])
    ratios = {f"{a}/{b}": [x / y for x, y in zip(decode[a], decode[b])] for a, b in pairs}
    result = {"skip": skip, "skipped_share": len(skip) / num_layers, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "batch": args.batch,
              "mixed_sets": [e["firstskip_skip"] for e in extras["plugin-mixed"]] if args.mixed else None,
              "engine": settings, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "decode_tok_s": decode, "decode_tok_s_median": {k: statistics.median(v) for k, v in decode.items()},
              "ratio_median": {k: statistics.median(v) for k, v in ratios.items()}, "ratios": ratios}
    print(json.dumps({"decode_tok_s_median": result["decode_tok_s_median"], "ratio_median": result["ratio_median"]}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
