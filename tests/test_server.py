"""`firstskip serve`: OpenAI's API over the engine's running batch, checked with the `openai` client.

A server runs in-process (uvicorn in a thread, 127.0.0.1, a free port) on the packaged SmolLM2 with
hand-set routers, so different prompts skip different layers. Every answer must equal what
`FirstSkipModel.generate` gives for the same request alone (greedy, fp32), however many requests
share the batch; bad input gets an OpenAI-style error with a 4xx; a client that goes away leaves
the batch at once; shutdown ends running streams with a finish reason and ``[DONE]``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from firstskip.engine import Sampling
from firstskip.errors import FirstSkipError
from firstskip.modeling import FirstSkipModel
from firstskip.server import NATIVE_CACHES, Job, bound_native_caches, build, server

NAME = "smollm2-test"
TOKENS = 8
PROMPTS = ["What is the capital of France?", "Name three fruits.", "Why is the sky blue?",
           "Write a haiku about rain."]


@pytest.fixture(scope="module")
def fsm():
    """SmolLM2 whose routers keep layers 8-24 with input-dependent probabilities around 0.5."""
    torch.manual_seed(0)
    model = FirstSkipModel.from_base("smollm2-135m", router_pooling="mean-all")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer, router in enumerate(model.routers.routers):
            if 8 <= layer <= 24:
                router.down.weight.copy_(torch.randn(router.down.weight.shape, generator=gen) * 0.6)
                router.down.bias.fill_(0.2 if layer % 2 else -0.2)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server in a thread of this process."""

    def __init__(self, fsm, grace: float = 30.0, **limits) -> None:
        self.port = free_port()
        self.server = server(fsm, NAME, "127.0.0.1", self.port, grace, **limits)
        self.worker = self.server.worker
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.server.handle_exit(signal.SIGTERM, None)
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def srv(fsm):
    running = Running(fsm, max_batch_size=4, max_queue=16)
    yield running
    running.stop()


def solo(fsm, prompt: str, raw: bool, n: int = TOKENS, **kwargs):
    return fsm.generate(prompt, Sampling(max_new_tokens=n), raw=raw, **kwargs)[0]


def test_completions_and_chat_equal_generate_whole_and_streamed(fsm, srv):
    prompt = PROMPTS[0]
    raw, chat = solo(fsm, prompt, raw=True), solo(fsm, prompt, raw=False)
    out = srv.client.completions.create(model=NAME, prompt=prompt, max_tokens=TOKENS, temperature=0)
    assert out.choices[0].text == raw.text and out.usage.completion_tokens == raw.new_tokens
    assert out.usage.prompt_tokens == raw.prompt_tokens and out.model == NAME
    assert out.firstskip["skipped_layers"] == raw.skipped_layers  # the extension rides along

    out = srv.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=TOKENS, temperature=0)
    assert out.choices[0].message.content == chat.text and out.usage.completion_tokens == chat.new_tokens
    assert out.choices[0].finish_reason == {"eos": "stop"}.get(chat.finish_reason, chat.finish_reason)

    chunks = list(srv.client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.new_tokens
    assert chunks[0].firstskip["skipped_layers"] == chat.skipped_layers

    chunks = list(srv.client.completions.create(model=NAME, prompt=prompt, max_tokens=TOKENS, temperature=0,
                                                stream=True))
    assert "".join(c.choices[0].text for c in chunks) == raw.text
    assert chunks[-1].usage.total_tokens == raw.prompt_tokens + raw.new_tokens  # usage without asking too


def test_ignore_eos_decodes_max_tokens_past_the_models_end(fsm, srv, monkeypatch):
    body = dict(model=NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    out = srv.client.completions.create(**body, extra_body={"ignore_eos": True, "firstskip": {"return_token_ids": True}})
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    first = out.firstskip["token_ids"][0]
    monkeypatch.setattr(type(fsm), "eos_token_ids", property(lambda self: [first]))  # the answer's first token ends it
    ended = srv.client.completions.create(**body)
    assert ended.usage.completion_tokens < 5 and ended.choices[0].finish_reason == "stop"
    assert srv.client.completions.create(**body, extra_body={"ignore_eos": True}).usage.completion_tokens == 5


def test_the_stream_is_server_sent_events_ending_with_done(srv):
    body = {"prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_requests_each_equal_their_solo_run(fsm, srv):
    jobs = [(p, i % 2 == 0, {"skip": [10, 11]} if i == 3 else None) for i, p in enumerate(PROMPTS)]
    expected = [solo(fsm, p, raw, skip=(ext or {}).get("skip")) for p, raw, ext in jobs]
    assert len({tuple(g.skipped_layers) for g in expected}) > 1  # the batch mixes skip sets
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def ask(i: int) -> None:
        prompt, raw, ext = jobs[i]
        extra = {"extra_body": {"firstskip": ext}} if ext else {}
        barrier.wait(timeout=30)
        if raw:
            stream = srv.client.completions.create(model=NAME, prompt=prompt, max_tokens=TOKENS, temperature=0,
                                                   stream=True, **extra)
            results[i] = "".join(c.choices[0].text for c in stream)
        else:
            out = srv.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                                     max_tokens=TOKENS, temperature=0, **extra)
            results[i] = out.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [g.text for g in expected]
    metrics = httpx.get(srv.url + "/metrics").text
    rows = float(_metric(metrics, "firstskip_decode_step_rows_total"))
    assert rows > float(_metric(metrics, "firstskip_decode_steps_total"))  # some steps ran several requests


def test_a_stop_string_cuts_streamed_and_whole_text_alike(fsm, srv):
    full = solo(fsm, PROMPTS[2], raw=False, n=12).text
    stop = " " + full.split()[3]  # a word inside the answer
    expected = fsm.generate(PROMPTS[2], Sampling(max_new_tokens=12), stop=[stop])[0]
    messages = [{"role": "user", "content": PROMPTS[2]}]
    whole = srv.client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                               stop=stop)
    chunks = list(srv.client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                                     stop=[stop], stream=True))
    assert whole.choices[0].message.content == expected.text == "".join(c.choices[0].delta.content or ""
                                                                         for c in chunks)
    assert stop not in expected.text and whole.choices[0].finish_reason == "stop"


def test_per_request_decisions_and_keep_probabilities(fsm, srv):
    def ask(ext):
        return srv.client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=2, temperature=0,
                                             extra_body={"firstskip": ext}).firstskip

    assert ask({"skip": [12, 10, 11]})["skipped_layers"] == [10, 11, 12]
    assert len(ask({"budget": 0.25})["skipped_layers"]) == 8  # round(0.25 * 30)
    assert ask({"threshold": 0.0})["skipped_layers"] == []
    probs = ask({"return_keep_probs": True})["keep_probs"]
    assert len(probs) == 30 and all(0 <= p <= 1 for p in probs)
    assert fsm.config.threshold == 0.5 and fsm.config.decision == "threshold"  # the model's own is untouched


def _metric(text: str, name: str) -> str:
    return next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")
                or line.startswith(name + "{"))


LONG = "word " * 9000


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": "   "}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "firstskip": {"threshold": 0.3, "budget": 0.2}}, 400, "firstskip"),
    ("/v1/completions", {"prompt": "hi", "firstskip": {"skip": [3, 99]}}, 400, "firstskip.skip"),
    ("/v1/completions", {"prompt": "hi", "firstskip": {"threshold": 1.5}}, 400, "firstskip.threshold"),
    ("/v1/completions", {"prompt": "hi", "firstskip": {"thresold": 0.3}}, 400, "firstskip.thresold"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/nothing", {}, 404, None),
])
def test_bad_input_gets_an_openai_error_with_a_4xx(srv, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(srv.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["message"] and "Traceback" not in response.text


def test_the_openai_client_sees_its_own_exceptions(srv):
    with pytest.raises(openai.NotFoundError):
        srv.client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        srv.client.completions.create(model=NAME, prompt=LONG, max_tokens=2)


def test_a_client_that_disconnects_mid_stream_leaves_the_batch(srv):
    stream = srv.client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=200, temperature=0,
                                           stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert len(srv.worker.batch.requests) == 1
    stream.close()
    metrics = _until_cancelled(srv, 1)
    assert _metric(metrics, "firstskip_running_requests") == "0" and not srv.worker.batch.requests
    assert all(not slots.owners for slots in srv.worker.batch.pool.layers)  # its cache slots are free

    body = {"prompt": PROMPTS[3], "max_tokens": 200, "temperature": 0}  # a whole answer, given up on
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json=body, timeout=httpx.Timeout(1.5, connect=5))
    _until_cancelled(srv, 2)


def _until_cancelled(srv, count: int) -> str:
    """/metrics once ``count`` requests have been cancelled and none runs (20 s at most)."""
    deadline = time.monotonic() + 20
    while True:
        metrics = httpx.get(srv.url + "/metrics").text
        if f'firstskip_requests_finished_total{{reason="cancelled"}} {count}' in metrics and not srv.worker.running:
            return metrics
        assert time.monotonic() < deadline, "the request is still in the batch"
        time.sleep(0.05)


def test_health_models_and_metrics(srv):
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    (model,) = srv.client.models.list().data
    assert model.id == NAME and model.firstskip["num_layers"] == 30
    text = httpx.get(srv.url + "/metrics").text
    for name in ("requests_total", "generation_tokens_total", "queue_length", "running_requests",
                 "time_to_first_token_seconds_count", "skip_ratio_sum"):
        assert f"firstskip_{name}" in text


def test_metrics_count_prefill_and_decode_work_in_layer_runs_and_seconds(srv):
    """The saving a workload achieved (1 - runs / full) and where the engine's time went read straight
    off /metrics."""
    names = ("decode_layer_runs", "decode_layer_runs_full", "prefill_layer_runs", "prefill_layer_runs_full",
             "prefill_seconds", "decode_seconds")

    def counts() -> dict[str, float]:
        text = httpx.get(srv.url + "/metrics").text
        return {name: float(_metric(text, f"firstskip_{name}_total")) for name in names}

    before = counts()
    done = srv.client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                         extra_body={"firstskip": {"skip": [10, 11, 12]}})
    delta = {k: v - before[k] for k, v in counts().items()}
    assert delta["decode_layer_runs_full"] == 5 * 30  # the first token comes from prefill
    assert delta["decode_layer_runs"] == 5 * 27
    # `full` prefill: the prompt ran every layer, whatever the set
    assert delta["prefill_layer_runs"] == delta["prefill_layer_runs_full"] == done.usage.prompt_tokens * 30
    assert delta["prefill_seconds"] > 0 and delta["decode_seconds"] > 0


def test_api_key_and_a_full_queue(fsm):
    app, service = build(fsm, NAME, max_batch_size=1, max_queue=1, api_key="sesame")
    client = TestClient(app)  # no lifespan: the engine thread never starts, so the queue stays full
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/health").status_code == 200  # health stays open for load balancers
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="sesame", http_client=client, max_retries=0)
    assert oai.models.list().data[0].id == NAME
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client).models.list()
    service.worker.queue.append(Job([1], Sampling(), None, None, (), None))  # someone is waiting already
    response = client.post("/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer sesame"})
    assert response.status_code == 429 and response.headers["Retry-After"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_a_model_without_tokenizer_takes_token_ids():
    tiny = FirstSkipModel.from_base("random:tiny-llama")
    app, _ = build(tiny, "tiny")
    ids = [5, 17, 42, 9]
    expected = tiny.engine.generate([ids], Sampling(max_new_tokens=5)).pop().token_ids
    with TestClient(app) as client:
        body = {"prompt": ids, "max_tokens": 5, "temperature": 0, "firstskip": {"return_token_ids": True}}
        out = client.post("/v1/completions", json=body).json()
        assert out["firstskip"]["token_ids"] == expected and out["usage"]["completion_tokens"] == len(expected)
        text = client.post("/v1/completions", json={"prompt": "hi"})
        assert text.status_code == 400 and "token ids" in text.json()["error"]["message"]


def test_bound_native_caches_caps_what_the_user_left_unset(monkeypatch):
    first, second = NATIVE_CACHES
    monkeypatch.delenv(first, raising=False)
    monkeypatch.setenv(second, "512")
    bound_native_caches(64)
    assert os.environ[first] == "64" and os.environ[second] == "512"


def test_max_model_len_refuses_longer_requests_and_sizes_the_cache_once():
    tiny = FirstSkipModel.from_base("random:tiny-llama")
    app, service = build(tiny, "tiny", max_model_len=40)
    pool = service.worker.batch.pool
    sizes = []
    with TestClient(app) as client:
        for n in (5, 32):  # the second is longer and fills the context: the cache does not grow for it
            body = {"prompt": list(range(3, 3 + n)), "max_tokens": 8, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 200
            sizes.append(pool.nbytes())
        too_long = client.post("/v1/completions", json={"prompt": list(range(3, 44)), "max_tokens": 1})
        no_room = client.post("/v1/completions", json={"prompt": list(range(3, 38)), "max_tokens": 8})
        assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 40
    assert sizes[0] > 0 and sizes[1] == sizes[0]
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert no_room.status_code == 400 and no_room.json()["error"]["param"] == "max_tokens"
    with pytest.raises(FirstSkipError, match="max-model-len"):
        build(tiny, "tiny", max_model_len=10**9)


def test_shutdown_ends_running_streams_cleanly(fsm):
    running = Running(fsm, grace=0.5)
    body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 300, "temperature": 0, "stream": True}  # counts on
    events: list[str] = []
    with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=60) as response:
        for line in filter(None, response.iter_lines()):
            events.append(line)
            if len(events) == 3:
                threading.Thread(target=running.stop).start()  # as SIGTERM would
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "abort"
    running.thread.join(timeout=30)
    assert not running.thread.is_alive() and not running.worker.thread.is_alive()
    assert not running.worker.batch.requests
