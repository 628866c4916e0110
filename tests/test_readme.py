"""Every command in README.md runs, so the README cannot drift from the code.

The set-up commands' `firstskip` steps run as written (the venv and pip steps are what CI itself
runs). The command list runs top to bottom in a scratch folder, with options appended that keep
long commands short (click takes the last value of a repeated option).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
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
            argv = shlex.split(step.split(" #")[0])
            if argv and argv[0].endswith("firstskip") and not argv[0].startswith("pip"):
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
    commands = [cmd for block in bash_blocks(README.read_text()) for cmd in firstskip_commands(block)]
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
    (block,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    exec(compile(block, "README.md", "exec"), {})
