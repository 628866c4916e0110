"""`firstskip serve`: an OpenAI-compatible HTTP server on one loaded FiRST model.

One engine thread owns the running `Batch`: it takes new requests from a bounded queue, prefills a
few of them between decode steps (each with its own decision settings), steps the batch, and hands
each request's new tokens to the HTTP side through that request's asyncio queue. The HTTP side
(FastAPI on uvicorn) only parses, tokenizes, detokenizes and formats; it never touches the batch.
A request that is cancelled (its client went away) is marked, and the engine thread takes it out of
the batch before the next step, freeing its cache slots.

FiRST extensions live under a ``firstskip`` key, so OpenAI clients ignore them: in the body
``{"threshold": 0.4} | {"budget": 0.25} | {"skip": [10, 11]}`` plus ``"return_keep_probs": true``,
in each response ``{"skipped_layers": [...], "num_layers": L, "keep_probs": [...]}`` (and the generated
``token_ids`` with ``"return_token_ids": true``, e.g. for a model without a tokenizer).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from firstskip.engine import Sampling
from firstskip.errors import FirstSkipError

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 256  # capped by what the context leaves
PREFILLS_PER_STEP = 2  # newcomers prefilled between two decode steps while others are running
ABORT = "abort"  # finish_reason of a request ended by shutdown
_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\])$")
# oneDNN's primitive cache and PyTorch's ideep cache: 1024 entries each unless set
NATIVE_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
NATIVE_CACHE_ENTRIES = 64


def bound_native_caches(entries: int = NATIVE_CACHE_ENTRIES) -> None:
    """Cap the two native caches that keep a CPU product's primitive per input shape.

    Every prompt length a server has not seen adds a few primitives (one per product shape) to
    each; at their default 1024 entries that is about 2 MiB a new length, hundreds of MiB before
    they evict anything, which looks like a leak. A prefill reuses its few shapes across layers,
    so 64 entries cost no speed. Both are read once, at the process's first oneDNN product: call
    this before loading or warming up a model. A variable already set is kept.
    """
    for name in NATIVE_CACHES:
        os.environ.setdefault(name, str(entries))


# -- request bodies --------------------------------------------------------------------------
class FirstSkipOptions(BaseModel):
    """The ``firstskip`` object of a request body: this request's decision, at most one of three."""

    model_config = ConfigDict(extra="forbid")
    threshold: Optional[float] = Field(None, ge=0, le=1)
    budget: Optional[float] = Field(None, ge=0, le=1)
    skip: Optional[list[int]] = None
    return_keep_probs: bool = False
    return_token_ids: bool = False


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None  # the chat API's newer name
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens whatever the model emits (benchmarks)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    firstskip: Optional[FirstSkipOptions] = None


class CompletionBody(_Common):
    prompt: Union[str, list[str], list[int]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict[str, Any]]]


class ChatBody(_Common):
    messages: list[ChatMessage]


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type, offending parameter, code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# -- the engine thread -----------------------------------------------------------------------
@dataclass(eq=False)
class Job:
    """One request between the HTTP side and the engine thread."""

    ids: list[int]
    sampling: Sampling
    skip: list[int] | None
    config: Any  # FirstSkipConfig or None (the engine's)
    stop: Sequence[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    ignore_eos: bool = False
    request: Any = None  # decoding.Request once joined
    sent: int = 0  # tokens already handed to the HTTP side

    def post(self, kind: str, payload: Any = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class QueueFull(Exception):
    pass


class Metrics:
    """Counters, gauges and histograms, rendered as Prometheus text (no extra dependency)."""

    TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
    RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.finished: collections.Counter[str] = collections.Counter()
        self.prompt_tokens = self.generation_tokens = self.steps = self.step_rows = 0
        self.layer_runs = self.layer_runs_full = 0  # decode work done, and what every layer would have cost
        self.prefill_layer_runs = self.prefill_layer_runs_full = 0  # the same for the prompts
        self.prefill_seconds = self.decode_seconds = 0.0  # the engine thread's busy time, by kind of pass
        self.ttft = [0] * (len(self.TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.skip = [0] * (len(self.RATIO_BUCKETS) + 1)
        self.skip_sum = 0.0

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[endpoint, status] += 1

    def observe_start(self, ttft: float, prompt_tokens: int, new_tokens: int, skip_ratio: float,
                      layer_runs: int, layers: int, seconds: float) -> None:
        with self.lock:
            self.prefill_seconds += seconds
            self.prefill_layer_runs += layer_runs
            self.prefill_layer_runs_full += prompt_tokens * layers
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += new_tokens
            self.ttft[_bucket(self.TTFT_BUCKETS, ttft)] += 1
            self.ttft_sum += ttft
            self.skip[_bucket(self.RATIO_BUCKETS, skip_ratio)] += 1
            self.skip_sum += skip_ratio

    def observe_step(self, rows: int, new_tokens: int, layer_runs: int, layers: int, seconds: float) -> None:
        with self.lock:
            self.decode_seconds += seconds
            self.steps += 1
            self.step_rows += rows
            self.generation_tokens += new_tokens
            self.layer_runs += layer_runs
            self.layer_runs_full += rows * layers

    def render(self, queued: int, running: int, capacity: int) -> str:
        p = "firstskip_"
        with self.lock:
            lines = [f"# TYPE {p}requests_total counter"]
            lines += [f'{p}requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            lines += [f"# TYPE {p}requests_finished_total counter"]
            lines += [f'{p}requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
            lines += [f"# TYPE {p}prompt_tokens_total counter", f"{p}prompt_tokens_total {self.prompt_tokens}",
                      f"# TYPE {p}generation_tokens_total counter", f"{p}generation_tokens_total {self.generation_tokens}",
                      f"# TYPE {p}decode_steps_total counter", f"{p}decode_steps_total {self.steps}",
                      f"# TYPE {p}decode_step_rows_total counter", f"{p}decode_step_rows_total {self.step_rows}",
                      f"# TYPE {p}decode_layer_runs_total counter", f"{p}decode_layer_runs_total {self.layer_runs}",
                      f"# TYPE {p}decode_layer_runs_full_total counter",
                      f"{p}decode_layer_runs_full_total {self.layer_runs_full}",
                      f"# TYPE {p}prefill_layer_runs_total counter", f"{p}prefill_layer_runs_total {self.prefill_layer_runs}",
                      f"# TYPE {p}prefill_layer_runs_full_total counter",
                      f"{p}prefill_layer_runs_full_total {self.prefill_layer_runs_full}",
                      f"# TYPE {p}prefill_seconds_total counter", f"{p}prefill_seconds_total {self.prefill_seconds:.6f}",
                      f"# TYPE {p}decode_seconds_total counter", f"{p}decode_seconds_total {self.decode_seconds:.6f}",
                      f"# TYPE {p}queue_length gauge", f"{p}queue_length {queued}",
                      f"# TYPE {p}running_requests gauge", f"{p}running_requests {running}",
                      f"# TYPE {p}max_batch_size gauge", f"{p}max_batch_size {capacity}"]
            lines += _histogram(f"{p}time_to_first_token_seconds", self.TTFT_BUCKETS, self.ttft, self.ttft_sum)
            lines += _histogram(f"{p}skip_ratio", self.RATIO_BUCKETS, self.skip, self.skip_sum)
        return "\n".join(lines) + "\n"


def _bucket(bounds: Sequence[float], value: float) -> int:
    return next((i for i, b in enumerate(bounds) if value <= b), len(bounds))


def _histogram(name: str, bounds: Sequence[float], counts: list[int], total: float) -> list[str]:
    lines, running = [f"# TYPE {name} histogram"], 0
    for bound, n in zip([*map(str, bounds), "+Inf"], counts):
        running += n
        lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
    return lines + [f"{name}_sum {total:.6f}", f"{name}_count {running}"]


class EngineWorker:
    """The thread that owns the running batch: admits queued jobs, steps, hands out tokens."""

    def __init__(self, fsm: Any, max_batch_size: int = 8, max_queue: int = 64, max_len: int = 256) -> None:
        self.fsm, self.engine = fsm, fsm.engine
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.batch = self.engine.new_batch(max_batch_size, max_len)
        self.metrics = Metrics()
        self.queue: collections.deque[Job] = collections.deque()
        self.running: dict[int, Job] = {}  # id(request) -> job
        self.wake = threading.Condition()
        self.closing = False  # no new jobs
        self.deadline: float | None = None  # after it, running jobs are cancelled
        self.thread = threading.Thread(target=self._run, name="firstskip-engine", daemon=True)

    # called from the HTTP side
    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.wake:
            if self.closing:
                raise APIError(503, "the server is shutting down", code="shutting_down", kind="server_error")
            if len(self.queue) >= self.max_queue:
                raise QueueFull
            self.queue.append(job)
            self.wake.notify()

    def cancel(self, job: Job) -> None:
        with self.wake:
            job.cancelled = True
            self.wake.notify()

    def shutdown(self, grace: float) -> None:
        """Refuse new jobs; running and queued ones may finish for ``grace`` seconds, then are cancelled."""
        with self.wake:
            self.closing = True
            self.deadline = time.perf_counter() + grace
            self.wake.notify()

    def stop(self, grace: float = 0.0) -> None:
        self.shutdown(grace)
        self.thread.join(timeout=grace + 30)

    @property
    def queued(self) -> int:
        return len(self.queue)

    # the engine thread
    def _run(self) -> None:
        while True:
            with self.wake:
                expired = self.deadline is not None and time.perf_counter() >= self.deadline
                if self.closing and (expired or not (self.queue or self.running)):
                    break
                if not self.queue and not self.running and not self.closing:
                    self.wake.wait(timeout=1.0)
                    continue
                admit = self._take(self.max_batch_size - len(self.running),
                                   PREFILLS_PER_STEP if self.running else self.max_batch_size)
            for job in admit:
                self._admit(job)
            self._drop_cancelled()
            if self.batch.requests:
                try:
                    self._step()
                except Exception as err:  # noqa: BLE001  (the running requests fail, the server goes on)
                    self._fail_running(APIError(500, f"decode step failed: {type(err).__name__}: {err}",
                                                kind="server_error"))
        self._end_all()

    def _take(self, free: int, most: int) -> list[Job]:
        taken: list[Job] = []
        while self.queue and len(taken) < min(free, most):
            job = self.queue.popleft()
            if job.cancelled:
                self._count("cancelled")
                job.post("done", None)
            else:
                taken.append(job)
        return taken

    def _admit(self, job: Job) -> None:
        began = time.perf_counter()
        try:
            pre = self.engine.prefill([job.ids], None if job.skip is None else [job.skip], config=job.config)
            eos = () if job.ignore_eos else self.fsm.eos_token_ids
            (request,) = self.engine.join(self.batch, pre, job.sampling, eos, self.fsm._stop_fn(job.stop))
        except FirstSkipError as err:
            job.post("error", APIError(400, str(err)))
            return
        except Exception as err:  # noqa: BLE001  (reported to the client, the server goes on)
            job.post("error", APIError(500, f"prefill failed: {type(err).__name__}: {err}", kind="server_error"))
            return
        job.request = request
        gen = request.generation
        now, config, skipped = time.perf_counter(), job.config or self.fsm.config, len(gen.skipped_layers)
        self.metrics.observe_start(now - job.arrived, len(job.ids), len(gen.token_ids), skipped / config.num_layers,
                                   config.prompt_layer_runs(len(job.ids), skipped), config.num_layers, now - began)
        job.post("start", gen)
        if request.done:
            self._finish(job)
        else:
            self.running[id(request)] = job
            self._send(job)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.running.values() if j.cancelled]:
            self.batch.leave(job.request)
            del self.running[id(job.request)]
            self._count("cancelled")
            job.post("done", None)

    def _step(self) -> None:
        rows = len(self.batch.requests)
        layer_runs = sum(len(owners) for _, _, owners in self.batch.plan())  # a row per layer that runs for it
        before = sum(len(j.request.generation.token_ids) for j in self.running.values())
        began = time.perf_counter()
        ended = self.batch.step()
        seconds = time.perf_counter() - began
        after = sum(len(j.request.generation.token_ids) for j in self.running.values())
        self.metrics.observe_step(rows, after - before, layer_runs, self.fsm.config.num_layers, seconds)
        for job in self.running.values():
            self._send(job)
        for request in ended:
            self._finish(self.running.pop(id(request)))

    def _fail_running(self, error: APIError) -> None:
        for job in list(self.running.values()):
            if job.request in self.batch.requests:
                self.batch.leave(job.request)
            job.post("error", error)
        self.running.clear()

    def _send(self, job: Job) -> None:
        ids = job.request.generation.token_ids
        if len(ids) > job.sent:
            job.post("tokens", ids[job.sent:])
            job.sent = len(ids)

    def _finish(self, job: Job, reason: str | None = None) -> None:
        self._send(job)
        reason = reason or job.request.generation.finish_reason
        self._count(reason)
        job.post("end", reason)

    def _count(self, reason: str) -> None:
        with self.metrics.lock:
            self.metrics.finished[reason] += 1

    def _end_all(self) -> None:
        """Shutdown: cancel what is still running or queued, each stream ending with a finish reason."""
        for job in list(self.running.values()):
            self.batch.leave(job.request)
            self._finish(job, ABORT)
        self.running.clear()
        with self.wake:
            while self.queue:
                self.queue.popleft().post("error", APIError(503, "the server shut down before this request started",
                                                            code="shutting_down", kind="server_error"))


# -- the HTTP side ---------------------------------------------------------------------------
class Service:
    """What the endpoints share: the model, its name, the worker and the limits."""

    def __init__(self, fsm: Any, name: str, max_batch_size: int = 8, max_queue: int = 64,
                 api_key: str | None = None, max_model_len: int | None = None) -> None:
        self.fsm, self.name, self.api_key = fsm, name, api_key
        self.context = getattr(fsm.model.config, "max_position_embeddings", None) or 1 << 30
        if max_model_len is not None:
            if not 2 <= max_model_len <= self.context:
                raise FirstSkipError(f"--max-model-len must lie in 2..{self.context} (the model's context), "
                                     f"got {max_model_len}")
            self.context = max_model_len
        # with a limit, every layer's KV slots are made that long at once and never grow after
        self.worker = EngineWorker(fsm, max_batch_size, max_queue, max_model_len or 256)
        self.created = int(time.time())

    # parsing a body into a job
    def job(self, body: _Common, ids: list[int], default_tokens: int) -> Job:
        if body.model is not None and body.model != self.name:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{self.name}`",
                           "model", "model_not_found")
        if body.n != 1:
            raise APIError(400, f"n must be 1 (this server generates one choice per request), got {body.n}", "n")
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt", "empty_prompt")
        room = self.context - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server's context is {self.context}",
                           "prompt", "context_length_exceeded")
        asked = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        max_tokens = min(default_tokens, room) if asked is None else asked
        if not 1 <= max_tokens <= room:
            raise APIError(400, f"max_tokens must lie in 1..{room} for this prompt ({len(ids)} tokens of a "
                           f"{self.context}-token context), got {max_tokens}", "max_tokens")
        greedy = body.temperature == 0
        sampling = Sampling(max_new_tokens=max_tokens, temperature=body.temperature,
                            top_p=None if greedy or body.top_p >= 1 else body.top_p,
                            top_k=None if greedy else body.top_k, seed=body.seed)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop takes at most 4 non-empty strings", "stop")
        skip, config = self.decision(body.firstskip)
        return Job(ids, sampling, skip, config, stop, asyncio.get_running_loop(), ignore_eos=body.ignore_eos)

    def decision(self, options: FirstSkipOptions | None) -> tuple[list[int] | None, Any]:
        if options is None:
            return None, None
        given = [k for k in ("threshold", "budget", "skip") if getattr(options, k) is not None]
        if len(given) > 1:
            raise APIError(400, f"firstskip takes one of threshold, budget or skip, got {', '.join(given)}",
                           "firstskip")
        num_layers = self.fsm.config.num_layers
        if options.skip is not None:
            bad = [i for i in options.skip if not 0 <= i < num_layers]
            if bad:
                raise APIError(400, f"firstskip.skip layers {bad} are outside 0..{num_layers - 1}", "firstskip.skip")
            return sorted(set(options.skip)), None
        try:
            if options.threshold is not None:
                return None, self.fsm.config.replace(decision="threshold", threshold=options.threshold)
            if options.budget is not None:
                prefill = "full" if self.fsm.config.prefill == "routed" else None  # a budget looks at every layer
                return None, self.fsm.config.replace(decision="budget", skip_ratio=options.budget, prefill=prefill)
        except FirstSkipError as err:
            raise APIError(400, str(err), "firstskip") from None
        return None, None

    def encode_prompt(self, prompt: str | list[str] | list[int]) -> list[int]:
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and prompt:
            vocab = self.fsm.model.config.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise APIError(400, f"token ids must lie in 0..{vocab - 1}", "prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "give one prompt per request (a list of several prompts is not supported)",
                               "prompt")
            prompt = prompt[0]
        if not prompt.strip():
            raise APIError(400, "the prompt is empty", "prompt", "empty_prompt")
        self.need_tokenizer()
        return list(self.fsm.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        if not messages:
            raise APIError(400, "messages is empty", "messages", "empty_prompt")
        self.need_tokenizer()
        turns = [{"role": m.role if m.role != "developer" else "system", "content": _text(m.content)} for m in messages]
        if not any(t["content"].strip() for t in turns):
            raise APIError(400, "every message is empty", "messages", "empty_prompt")
        if getattr(self.fsm.tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        return list(self.fsm.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))

    def need_tokenizer(self) -> None:
        if self.fsm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: give the prompt as token ids", "prompt")

    def decode(self, ids: list[int], stop: Sequence[str]) -> str:
        if self.fsm.tokenizer is None:
            return ""
        return self.fsm.decode(ids, stop)


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    parts = [p.get("text") for p in content if p.get("type") == "text"]
    if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
        raise APIError(400, "only text content parts are supported", "messages")
    return "".join(parts)


class TextStream:
    """Detokenizes a growing list of ids into text deltas, holding back what may still change: an
    incomplete UTF-8 character, or a tail that could be the start of a stop string."""

    def __init__(self, service: Service, stop: Sequence[str]) -> None:
        self.service, self.stop, self.ids, self.shown = service, stop, [], ""

    def delta(self, new: list[int], final: bool = False) -> str:
        self.ids.extend(new)
        text = self.service.decode(self.ids, self.stop)
        if not final:
            text = text.rstrip("\ufffd")
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        if not text.startswith(self.shown):  # the tokenizer re-spelled an earlier piece: send nothing twice
            return ""
        out, self.shown = text[len(self.shown):], text
        return out


def create_app(service: Service, grace: float = 30.0) -> FastAPI:
    """The FastAPI application; its lifespan starts and stops the engine thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        yield
        await asyncio.to_thread(service.worker.stop, grace)

    app = FastAPI(title="firstskip", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, err: APIError) -> JSONResponse:
        service.worker.metrics.count_request(request.url.path, err.status)
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = []
        for part in first.get("loc", ())[1:] if first.get("loc", ("",))[0] == "body" else first.get("loc", ()):
            if isinstance(part, str) and _UNION_TAG.match(part):  # pydantic names the union member tried
                break
            loc.append(str(part))
        if first.get("type") == "json_invalid" or loc == [] and first.get("type") == "model_attributes_type":
            message, param = "the request body must be a JSON object", None
        else:
            message, param = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}", ".".join(loc) or None
        return await api_error(request, APIError(400, message, param, first.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return await api_error(request, APIError(err.status_code, str(err.detail), kind=kind))

    @app.exception_handler(Exception)
    async def unexpected(request: HTTPRequest, err: Exception) -> JSONResponse:
        return await api_error(request, APIError(500, f"internal error: {type(err).__name__}", kind="server_error"))

    @app.middleware("http")
    async def authorize(request: HTTPRequest, call_next):
        if service.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {service.api_key}":
                return await api_error(request, APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                                         code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "shutting_down" if service.worker.closing else "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        w = service.worker
        return PlainTextResponse(w.metrics.render(w.queued, len(w.running), w.max_batch_size),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cfg = service.fsm.config
        return {"object": "list", "data": [{
            "id": service.name, "object": "model", "created": service.created, "owned_by": "firstskip",
            "max_model_len": service.context,
            "firstskip": {"num_layers": cfg.num_layers, "decision": cfg.decision, "threshold": cfg.threshold,
                          "budget": cfg.skip_ratio if cfg.decision == "budget" else None}}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HTTPRequest):
        job = service.job(body, service.encode_prompt(body.prompt), DEFAULT_COMPLETION_TOKENS)
        return await respond(request, body, job, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: HTTPRequest):
        job = service.job(body, service.encode_chat(body.messages), DEFAULT_CHAT_TOKENS)
        return await respond(request, body, job, "chat.completion")

    async def respond(request: HTTPRequest, body: _Common, job: Job, kind: str):
        try:
            service.worker.submit(job)
        except QueueFull:
            raise APIError(429, f"the queue is full ({service.worker.max_queue} waiting); retry shortly",
                           code="queue_full", kind="rate_limit_error", headers={"Retry-After": "1"}) from None
        service.worker.metrics.count_request(request.url.path, 200)
        meta = Meta(service, body, job, kind)
        if body.stream:
            return StreamingResponse(stream_events(meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole(request, meta)

    async def whole(request: HTTPRequest, meta: Meta) -> JSONResponse:
        async def watch() -> None:  # a client that goes away leaves the batch at once
            while (await request.receive())["type"] != "http.disconnect":
                pass
            service.worker.cancel(meta.job)

        watcher = asyncio.create_task(watch())
        ids: list[int] = []
        try:
            while True:
                kind, payload = await meta.job.events.get()
                if kind == "error":
                    raise payload
                if kind == "start":
                    meta.generation = payload
                elif kind == "tokens":
                    ids.extend(payload)
                elif kind == "end":
                    return JSONResponse(meta.whole(service.decode(ids, meta.job.stop), payload))
                elif kind == "done":  # cancelled: nobody reads this
                    return JSONResponse({}, status_code=499)
        except asyncio.CancelledError:
            service.worker.cancel(meta.job)
            raise
        finally:
            watcher.cancel()

    async def stream_events(meta: Meta) -> AsyncIterator[str]:
        text = TextStream(service, meta.job.stop)
        ended = False
        try:
            while True:
                kind, payload = await meta.job.events.get()
                if kind == "error":
                    yield f"data: {json.dumps(payload.body())}\n\n"
                    break
                if kind == "start":
                    meta.generation = payload
                    yield meta.chunk("", None, first=True)
                elif kind == "tokens":
                    delta = text.delta(payload)
                    if delta:
                        yield meta.chunk(delta, None)
                elif kind == "end":
                    ended = True
                    yield meta.chunk(text.delta([], final=True), payload, usage=True)
                    if meta.body.stream_options is not None and meta.body.stream_options.include_usage:
                        yield meta.usage_chunk()
                    break
                elif kind == "done":
                    ended = True
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not ended:  # the client went away (or an error): leave the batch now
                service.worker.cancel(meta.job)

    return app


class Meta:
    """Formats one request's responses (whole or chunks) in OpenAI's shapes."""

    def __init__(self, service: Service, body: _Common, job: Job, kind: str) -> None:
        self.service, self.body, self.job, self.kind = service, body, job, kind
        self.chat = kind == "chat.completion"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.generation: Any = None
        self.finished = False  # token ids go in the last chunk only

    def extension(self) -> dict[str, Any]:
        gen = self.generation
        out: dict[str, Any] = {"skipped_layers": gen.skipped_layers, "num_layers": self.service.fsm.config.num_layers}
        options = self.body.firstskip
        if options is not None and options.return_keep_probs:
            out["keep_probs"] = gen.keep_probs
        if options is not None and options.return_token_ids and self.finished:
            out["token_ids"] = list(gen.token_ids)
        return out

    def usage(self) -> dict[str, int]:
        new = len(self.generation.token_ids)
        return {"prompt_tokens": len(self.job.ids), "completion_tokens": new, "total_tokens": len(self.job.ids) + new}

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.service.name}

    def whole(self, text: str, reason: str) -> dict[str, Any]:
        self.finished = True
        choice: dict[str, Any] = {"index": 0, "finish_reason": _openai_reason(reason), "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self.head(self.kind), "choices": [choice], "usage": self.usage(), "firstskip": self.extension()}

    def chunk(self, text: str, reason: str | None, first: bool = False, usage: bool = False) -> str:
        self.finished = reason is not None
        choice: dict[str, Any] = {"index": 0, "finish_reason": _openai_reason(reason) if reason else None,
                                  "logprobs": None}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["text"] = text
        out = {**self.head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if first or reason:
            out["firstskip"] = self.extension()
        if usage:
            out["usage"] = self.usage()
        return f"data: {json.dumps(out)}\n\n"

    def usage_chunk(self) -> str:
        out = {**self.head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
               "usage": self.usage()}
        return f"data: {json.dumps(out)}\n\n"


def _openai_reason(reason: str) -> str:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


# -- running it ------------------------------------------------------------------------------
class FirstSkipServer(uvicorn.Server):
    """uvicorn's server, telling the engine thread to wind down as soon as a signal arrives: no new
    requests, running ones finish within the grace period, then are cancelled (finish_reason "abort")."""

    def __init__(self, config: uvicorn.Config, worker: EngineWorker, grace: float) -> None:
        super().__init__(config)
        self.worker, self.grace = worker, grace

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.worker.shutdown(self.grace)
        super().handle_exit(sig, frame)


def build(fsm: Any, name: str, max_batch_size: int = 8, max_queue: int = 64, api_key: str | None = None,
          grace: float = 30.0, max_model_len: int | None = None) -> tuple[FastAPI, Service]:
    if max_batch_size < 1 or max_queue < 1:
        raise FirstSkipError(f"--max-batch-size and --max-queue must be at least 1, got {max_batch_size} and {max_queue}")
    service = Service(fsm, name, max_batch_size, max_queue, api_key, max_model_len)
    return create_app(service, grace), service


def server(fsm: Any, name: str, host: str = "127.0.0.1", port: int = 8000, grace: float = 30.0,
           **limits: Any):
    """A uvicorn server (not started) for ``fsm``: call ``.run()``, or ``.serve()`` in a loop."""
    app, service = build(fsm, name, grace=grace, **limits)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=int(grace) + 5, lifespan="on")
    return FirstSkipServer(config, service.worker, grace)
