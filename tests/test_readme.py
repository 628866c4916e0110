"""Every command in README.md runs, so the README cannot drift from the code.

The set-up commands' `firstskip` steps run as written (the venv and pip steps are what CI itself
runs). The command list runs top to bottom in a scratch folder, with options appended that keep
long commands short (click takes the last value of a repeated option). The serving example starts
its server, then runs its curl command and its `openai` client against it (on a free port).
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SERVE_MARK = "<!-- serve-example -->"
# Appended to long commands so the README test stays fast; the README shows the real settings.
FAST = {
    "bench": ["--repeats", "1", "--prompt-len", "32", "--new-tokens", "4"],
    "generate": ["--max-new-tokens", "8"],
    "train": ["--max-steps", "1", "--limit", "8", "--max-length", "96", "--batch-size", "2", "--holdout", "4"],
    "calibrate": ["--limit", "6"],
    "eval": ["--limit", "2", "--max-new-tokens", "8", "--speed-items", "1"],
    "inspect": ["--limit", "4"],
    "demo": ["--quick"],
}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def firstskip_commands(block: str) -> list[list[str]]:
    """Each `firstskip ...` (or `.venv/bin/firstskip ...`) step of a block, as argv."""
    commands = []
    for line in block.splitlines():
        for step in line.split("&&"):
            words = step.split()
            if not words or not words[0].endswith("firstskip"):  # e.g. a curl line continued with quotes
                continue
            argv = shlex.split(step.split(" #")[0])
            if not argv[0].startswith("pip"):
                commands.append(argv[1:])
    return commands


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "firstskip", *argv, *FAST.get(argv[0], [])], cwd=cwd,
                          capture_output=True, text=True, timeout=1200)


def test_readme_names_two_setup_commands_and_ci_runs_the_test_one():
    text = README.read_text()
    assert "<!-- main-command -->" in text and "<!-- test-command -->" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci  # .ci/run executes the block after this marker verbatim


def test_every_readme_command_runs(tmp_path):
    commands = [cmd for block in bash_blocks(README.read_text()) for cmd in firstskip_commands(block)
                if cmd[0] != "serve"]  # a server runs until stopped: test_readme_serving_example_runs
    assert {c[0] for c in commands} >= {"generate", "bench", "models", "train", "calibrate", "eval", "inspect", "demo"}
    for argv in commands:
        out = run(argv, tmp_path)
        assert out.returncode == 0, f"firstskip {' '.join(argv)} failed:\n{out.stderr[-3000:]}"
        if argv[0] == "demo":  # the table it prints is the one in the report it wrote
            table = [line for line in out.stdout.splitlines() if line.startswith("|")]
            report = (tmp_path / "firstskip-demo" / "report.md").read_text().splitlines()
            assert len(table) >= 3 and all(line in report for line in table)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before_serving = README.read_text().split(SERVE_MARK)[0]
    (block,) = re.findall(r"```python\n(.*?)```", before_serving, flags=re.S)
    exec(compile(block, "README.md", "exec"), {})


def test_readme_serving_example_runs(tmp_path, capfd):
    """The serving section: `firstskip serve ... &`, then the curl command, then the openai client."""
    text = README.read_text().split(SERVE_MARK)[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    shell = bash_blocks(text)[0].replace("8000", port)
    python = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0].replace("8000", port)
    serve_line, rest = shell.split("\n", 1)
    (argv,) = firstskip_commands(serve_line)
    assert argv[0] == "serve" and argv[-1] == "&"
    server = subprocess.Popen([sys.executable, "-m", "firstskip", *argv[:-1]], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "the README's server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        curl = subprocess.run(["bash", "-c", rest], capture_output=True, text=True, timeout=300)
        answer = json.loads(curl.stdout)
        assert curl.returncode == 0 and answer["choices"][0]["message"]["content"], curl.stdout + curl.stderr
        assert len(answer["firstskip"]["skipped_layers"]) == 8  # budget 0.25 of 30 layers
        exec(compile(python, "README.md", "exec"), {})
        assert capfd.readouterr().out.strip()  # the stream printed some text
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    assert server.returncode in (0, -signal.SIGTERM), err  # uvicorn re-raises the signal once it has shut down
    assert "firstskip serve: smollm2-135m (30 layers" in err and "Traceback" not in err
