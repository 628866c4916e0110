"""The server's admission loop in one process, without HTTP: the mixed workload's prompts queue,
up to 8 run at a time, newcomers prefill between decode steps (2 at a time while others run, as
`firstskip serve` does), and every decode step is timed. Separates what the engine spends on a
workload from what the HTTP side adds, and shows stalls (a step over a second: a compile).

``--mode both`` runs FiRST and skipping off in paired, interleaved repeats on one compiled engine
(the first of a pair alternates), so the two see the same machine; with ``--ignore-eos`` both do
equal work and the pair's ratio is a throughput ratio, printed against its physical bounds: the
decode bound ``1 / (1 - s)`` for the row-weighted decode saving ``s`` (the issue's: layers only),
the bound on what the layers each step actually ran can save (a layer some row keeps runs), the
step bound ``1 / (1 - (1 - f) s)``, where ``f`` is the share of an 8-row step that runs no layer
(embedding, LM head, sampling; measured in each pair), and the time bound
``1 / (1 - decode share x (1 - f) s)``: the prompt runs every layer, so only the decode steps'
share of skipping off's time can shrink.

Reproduce (nothing else running; "off" keeps every layer, as ``serve --threshold 0``):
    python benchmarks/server_loop.py --run runs/sec4s0 --mode first --requests 40
    python benchmarks/server_loop.py --run runs/sec4s0 --mode both --pairs 6 --requests 48 --ignore-eos
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

from firstskip.artifacts import write_json
from firstskip.data import encode_prompt
from firstskip.engine import Sampling
from firstskip.modeling import FirstSkipModel
from firstskip.server import PREFILLS_PER_STEP
from serve_load import prompts


def run_once(fsm: FirstSkipModel, mode: str, args: argparse.Namespace) -> dict:
    """The queue served once; seconds in prefill and decode, and what the decode steps ran."""
    engine, layers = fsm.engine, fsm.config.num_layers
    config = fsm.config.replace(threshold=0.0) if mode == "off" else None
    eos = () if args.ignore_eos else fsm.eos_token_ids
    queue = collections.deque(encode_prompt(fsm.tokenizer, p) for _, p in
                              prompts(["samsum", "xsum", "boolq"], 200, 0)[:args.requests])
    prompt_tokens = sum(map(len, queue))
    batch, steps, prefill_s, start = engine.new_batch(args.batch), [], 0.0, time.perf_counter()
    kept = ran = context = 0  # row-layers and layers the decode steps ran; positions their rows attend over
    while queue or batch.requests:
        for _ in range(min(args.batch - len(batch.requests), PREFILLS_PER_STEP if batch.requests else args.batch)):
            if queue:
                began = time.perf_counter()
                engine.join(batch, engine.prefill([queue.popleft()], config=config),
                            Sampling(max_new_tokens=args.max_tokens), eos)
                prefill_s += time.perf_counter() - began
        if batch.requests:
            plan, rows = batch.plan(), len(batch.requests)
            kept += sum(len(owners) for _, _, owners in plan)
            ran += len(plan)
            context += sum(r.length for r in batch.requests)
            began = time.perf_counter()
            batch.step()
            steps.append((rows, time.perf_counter() - began))
    wall = time.perf_counter() - start
    decode_s, tokens = sum(s for _, s in steps), sum(r for r, _ in steps)
    return {"mode": mode, "prompt_tokens": prompt_tokens, "prefill_s": round(prefill_s, 2),
            "decode_s": round(decode_s, 2), "wall_s": round(wall, 2), "steps": len(steps),
            "rows_per_step": round(tokens / len(steps), 2), "decode_tokens": tokens,
            "ms_per_row_step": round(1000 * decode_s / tokens, 2), "mean_context": round(context / tokens),
            "median_step_ms": round(1000 * sorted(s for _, s in steps)[len(steps) // 2], 1),
            "decode_saving": round(1 - kept / (tokens * layers), 4),
            "layers_run_saving": round(1 - ran / (len(steps) * layers), 4),
            "slow_steps": [[i, rows, round(s, 1)] for i, (rows, s) in enumerate(steps) if s > 1]}


def step_floor(fsm: FirstSkipModel, rows: int, steps: int = 32) -> float:
    """The share of a decode step of ``rows`` rows that no skip can save (embedding, LM head,
    sampling): the step with every layer skipped over the step with none, on short prompts."""
    engine, layers = fsm.engine, fsm.config.num_layers
    prompt = encode_prompt(fsm.tokenizer, prompts(["samsum"], 1, 0)[0][1])

    def seconds(skip: list[int]) -> float:
        pre = engine.prefill([prompt] * rows, skip=[skip] * rows, routers=False)
        began = time.perf_counter()
        engine.decode(pre, Sampling(max_new_tokens=steps + 1))
        return time.perf_counter() - began

    return statistics.median(seconds(list(range(layers))) / seconds([]) for _ in range(3))


def pair_summary(first: dict, off: dict, floor: float) -> dict:
    """FiRST against skipping off, one pair: ratios and the bounds the module's docstring defines."""
    s = first["decode_saving"]
    decode_share = off["decode_s"] / off["wall_s"]
    out = {"tokens_per_s_ratio": (first["decode_tokens"] / first["wall_s"]) / (off["decode_tokens"] / off["wall_s"]),
           "decode_step_ratio": off["ms_per_row_step"] / first["ms_per_row_step"],
           "bound_decode": 1 / (1 - s), "bound_layers_run": 1 / (1 - first["layers_run_saving"]),
           "bound_step": 1 / (1 - (1 - floor) * s), "bound_time": 1 / (1 - decode_share * (1 - floor) * s),
           "off_decode_share": decode_share, "step_floor": floor}
    out["share_of_decode_bound"] = out["tokens_per_s_ratio"] / out["bound_decode"]
    out["share_of_time_bound"] = out["tokens_per_s_ratio"] / out["bound_time"]
    out["decode_step_share_of_decode_bound"] = out["decode_step_ratio"] / out["bound_decode"]
    out["decode_step_share_of_step_bound"] = out["decode_step_ratio"] / out["bound_step"]
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--mode", choices=("first", "off", "both"), default="first")
    parser.add_argument("--pairs", type=int, default=3, help="Repeats of each mode with --mode both.")
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ignore-eos", action="store_true", help="Decode max-tokens for every request (equal work).")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", help="Write every run and the summary to this JSON file.")
    args = parser.parse_args()
    fsm = FirstSkipModel.from_pretrained(args.run, dtype=args.dtype)
    fsm.engine.compile()
    if args.mode != "both":
        print(json.dumps(run_once(fsm, args.mode, args)))
        return
    for mode in ("first", "off"):  # warm-up: the first prefills and steps of a process run slow
        run_once(fsm, mode, argparse.Namespace(**{**vars(args), "requests": args.batch, "max_tokens": 8}))
    runs, pairs = [], []
    for i in range(args.pairs):
        order = ("first", "off") if i % 2 == 0 else ("off", "first")
        pair = {mode: run_once(fsm, mode, args) for mode in order}
        runs += [pair[m] for m in order]
        pairs.append(pair_summary(pair["first"], pair["off"], step_floor(fsm, args.batch)))
        print(json.dumps({"pair": i, "order": order, **pairs[-1]}), flush=True)
    summary = {key: round(statistics.median(p[key] for p in pairs), 3) for key in pairs[0]}
    print(json.dumps({"median": summary}))
    if args.out:
        write_json(args.out, {"args": vars(args), "runs": runs, "pairs": pairs, "median": summary})


if __name__ == "__main__":
    main()
