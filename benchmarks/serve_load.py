"""Load test of `firstskip serve`: N concurrent streaming chat clients for T seconds, loopback only.

Each client sends test prompts from several tasks (SAMSum, XSum, BoolQ under ../shared/data, mixed
in a seeded order) one after another as streaming chat requests, and records time to first token
(the first chunk with text), completion tokens (the usage of the last chunk) and any error (a non-200
status, an error event, a stream without ``[DONE]``, a timeout). No client starts a request after T
seconds; requests in flight then get --timeout seconds to end. With --pid, the server's resident
memory is sampled every second from /proc/PID/status.

    firstskip serve --run runs/mix --max-batch-size 8 --max-queue 64 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 64 --seconds 120 --pid $!

Prints one JSON object (also written to --out): errors by kind, p50/p99 time to first token,
completion tokens per second over the run, requests, RSS at start, after warm-up and at the end, and
(from firstskip's /metrics) the decode saving, the share of decode layer runs its skipping saved, and
the engine thread's time in prefill passes and in decode steps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from firstskip.data import load_examples

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def prompts(names: list[str], per_task: int, seed: int) -> list[tuple[str, str]]:
    """(task, prompt) pairs: the first ``per_task`` test prompts of each dataset, shuffled together."""
    out = [(name, ex.prompt) for name in names for ex in load_examples(str(DATA / name), "test", per_task)]
    random.Random(seed).shuffle(out)
    return out


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Stats:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.tokens = 0
        self.requests = 0
        self.errors: dict[str, int] = {}
        self.by_task: dict[str, int] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def one_request(client: httpx.AsyncClient, url: str, model: str | None, task: str, prompt: str,
                      max_tokens: int, stats: Stats, headers: dict[str, str], ignore_eos: bool = False) -> None:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:  # vLLM's and firstskip's extension: every request decodes max_tokens
        body["ignore_eos"] = True
    if model:
        body["model"] = model
    start, first, usage, done = time.perf_counter(), None, None, False
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            stats.error(f"http {response.status_code}")
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                stats.error(f"stream error {event['error'].get('code') or event['error'].get('type')}")
                return
            choices = event.get("choices") or []
            if first is None and (any(c.get("delta", {}).get("content") for c in choices)
                                  or any(c.get("finish_reason") for c in choices)):
                first = time.perf_counter() - start
            usage = event.get("usage") or usage
    if not done or usage is None:
        stats.error("stream without [DONE] or usage")
        return
    stats.requests += 1
    stats.tokens += usage["completion_tokens"]
    stats.by_task[task] = stats.by_task.get(task, 0) + 1
    if first is not None:
        stats.ttft.append(first)


async def client_loop(i: int, args: argparse.Namespace, items: list[tuple[str, str]], stats: Stats,
                      end: float, budget: list[int]) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout, connect=10)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=1)) as client:
        n = i
        while time.perf_counter() < end and budget[0] > 0:
            budget[0] -= 1
            task, prompt = items[n % len(items)]
            n += args.clients
            try:
                await one_request(client, args.url, args.model, task, prompt, args.max_tokens, stats, headers,
                                  args.ignore_eos)
            except (httpx.HTTPError, json.JSONDecodeError) as err:
                stats.error(type(err).__name__)


async def memory_loop(pid: int, samples: list[tuple[float, int]], start: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        value = rss_kib(pid)
        if value is not None:
            samples.append((round(time.perf_counter() - start, 1), value))
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


async def counters(url: str, api_key: str | None) -> dict[str, float]:
    """firstskip's unlabelled counters from /metrics (empty from a server without them, such as vLLM's)."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url + "/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    values = {}
    for line in response.text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("firstskip_") and name.endswith("_total"):
            values[name[len("firstskip_"):-len("_total")]] = float(value)
    return values


def engine_work(before: dict[str, float], after: dict[str, float], elapsed: float) -> dict | None:
    """What firstskip's engine did during the run: the share of decoder-layer executions its skipping
    saved over the generated tokens (decode), over the prompts and over both, and where its thread's
    time went (prefill passes, decode steps; the rest is waiting or Python)."""
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    if not delta.get("decode_layer_runs_full"):
        return None
    busy = {k: round(delta[f"{k}_seconds"], 1) for k in ("prefill", "decode") if f"{k}_seconds" in delta}
    runs = {k: (delta.get(f"{k}_layer_runs", 0.0), delta.get(f"{k}_layer_runs_full", 0.0)) for k in ("decode", "prefill")}
    done, full = (sum(pair) for pair in zip(*runs.values()))
    return {"decode_saving": round(1 - runs["decode"][0] / runs["decode"][1], 4),
            "prompt_saving": round(1 - runs["prefill"][0] / runs["prefill"][1], 4) if runs["prefill"][1] else None,
            "saving": round(1 - done / full, 4),
            "seconds": busy, "share_of_run": {k: round(v / elapsed, 3) for k, v in busy.items()},
            "prompt_tokens": int(delta["prompt_tokens"]), "decode_steps": int(delta["decode_steps"]),
            "mean_rows_per_step": round(delta["decode_step_rows"] / max(1.0, delta["decode_steps"]), 2)}


async def main(args: argparse.Namespace) -> dict:
    items = prompts(args.data, args.per_task, args.seed)
    stats, samples, stop = Stats(), [], asyncio.Event()
    work_before = await counters(args.url, args.api_key)
    start = time.perf_counter()
    end = start + args.seconds
    memory = asyncio.create_task(memory_loop(args.pid, samples, start, stop)) if args.pid else None
    budget = [args.max_requests]
    await asyncio.gather(*(client_loop(i, args, items, stats, end, budget) for i in range(args.clients)))
    elapsed = time.perf_counter() - start
    stop.set()
    if memory is not None:
        await memory
    warm = [kib for t, kib in samples if t >= args.warmup]
    work = engine_work(work_before, await counters(args.url, args.api_key), elapsed)
    return {
        "url": args.url, "clients": args.clients, "seconds": round(elapsed, 1), "max_tokens": args.max_tokens,
        "ignore_eos": args.ignore_eos,
        "requests": stats.requests, "requests_by_task": stats.by_task,
        "errors": sum(stats.errors.values()), "errors_by_kind": stats.errors,
        "ttft_p50_s": percentile(stats.ttft, 0.5), "ttft_p99_s": percentile(stats.ttft, 0.99),
        "ttft_mean_s": round(statistics.fmean(stats.ttft), 3) if stats.ttft else None,
        "completion_tokens": stats.tokens, "tokens_per_s": round(stats.tokens / elapsed, 2),
        "decode_saving": work and work.pop("decode_saving"), "engine": work,
        "rss_mib": None if not samples else {
            "start": round(samples[0][1] / 1024, 1), "after_warmup": round(warm[0] / 1024, 1) if warm else None,
            "end": round(samples[-1][1] / 1024, 1), "max": round(max(k for _, k in samples) / 1024, 1),
            "growth_after_warmup": round((samples[-1][1] - warm[0]) / 1024, 1) if warm else None,
            "series_s_mib": " ".join(f"{t:g}:{k / 1024:.0f}" for t, k in samples[::max(1, len(samples) // 20)])},
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="The server (loopback addresses only).")
    p.add_argument("--clients", type=int, default=64, help="Concurrent streaming clients.")
    p.add_argument("--seconds", type=float, default=120.0, help="No request starts after this many seconds.")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request.")
    p.add_argument("--ignore-eos", action="store_true",
                   help="Every request decodes --max-tokens tokens (ignore_eos), so servers whose models end "
                        "answers at different points do the same work.")
    p.add_argument("--timeout", type=float, default=300.0, help="Seconds one request may take at most.")
    p.add_argument("--max-requests", type=int, default=100_000, help="Requests in all, at most.")
    p.add_argument("--data", nargs="+", default=["samsum", "xsum", "boolq"], help="Datasets under ../shared/data.")
    p.add_argument("--per-task", type=int, default=200,
                   help="Test prompts read from each dataset (enough that no prompt repeats: a server's "
                        "prefix cache would answer a repeat without prefilling it).")
    p.add_argument("--model", default=None, help="The model id to send (default: none, the server's own).")
    p.add_argument("--api-key", default=None)
    p.add_argument("--pid", type=int, default=None, help="The server's process id, for its memory over time.")
    p.add_argument("--warmup", type=float, default=None, help="Seconds of warm-up (default: a tenth of --seconds).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="Also write the JSON result here.")
    args = p.parse_args(argv)
    host = urlparse(args.url).hostname
    if host not in LOOPBACK:
        p.error(f"--url must point at this machine (127.0.0.1, localhost or ::1), got {host!r}")
    if not 1 <= args.clients <= 1024 or args.seconds <= 0 or args.max_tokens < 1:
        p.error("--clients must lie in 1..1024, --seconds and --max-tokens must be positive")
    args.warmup = args.seconds / 10 if args.warmup is None else args.warmup
    return args


if __name__ == "__main__":
    arguments = parse()
    result = asyncio.run(main(arguments))
    text = json.dumps(result, indent=1)
    print(text)
    if arguments.out is not None:
        arguments.out.parent.mkdir(parents=True, exist_ok=True)
        arguments.out.write_text(text + "\n")
    sys.exit(1 if result["errors"] else 0)
