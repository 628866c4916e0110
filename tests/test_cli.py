"""The command line: examples in --help, one-line errors with exit code 2, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from firstskip.cli import app, parse_layers
from firstskip.errors import FirstSkipError


def firstskip(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from firstskip.cli import main; main()", *args],
                          input=stdin, capture_output=True, text=True, timeout=600)


def test_parse_layers():
    assert parse_layers("3,4,5") == [3, 4, 5]
    assert parse_layers("10-12, 20") == [10, 11, 12, 20]
    with pytest.raises(FirstSkipError, match="layer numbers"):
        parse_layers("a,b")


def test_every_command_help_shows_an_example():
    for command in app.registered_commands:
        out = firstskip(command.name or command.callback.__name__, "--help")
        assert out.returncode == 0 and "firstskip " in out.stdout.split("Example")[-1], command


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "no-such-model", "--prompt", "hi"], "no-such-model"),
    (["generate", "--model", "random:tiny-llama", "--prompt", "hi", "--threshold", "1.5"], "threshold"),
    (["generate", "--model", "smollm2-135m", "--prompt", "hi", "--skip", "3,99"], "outside"),
    (["generate", "--model", "smollm2-135m", "--prompt", "   "], "empty prompt"),
    (["generate", "--model", "smollm2-135m", "--prompt", "word " * 9000], "context"),
    (["generate", "--prompt", "hi"], "exactly one of --model or --run"),
    (["bench", "--model", "random:tiny-llama"], "--skip"),
    (["bench", "--model", "random:tiny-llama", "--skip", "2", "--llamacpp", "Q8_0"], "--llamacpp"),
    (["train", "--model", "random:tiny-llama", "--data", "builtin:boolq", "--out", "never-written", "--dtype", "int8"],
     "float weights"),
    (["serve", "--model", "random:tiny-llama", "--max-queue", "0"], "--max-queue"),
])
def test_user_mistakes_get_one_line_and_exit_code_2(args, message):
    out = firstskip(*args)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr


def test_generate_json_on_the_packaged_model():
    out = firstskip("generate", "-m", "smollm2-135m", "--prompt", "What is the capital of France?",
                    "--skip", "10-13", "--max-new-tokens", "12", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["skipped_layers"] == [10, 11, 12, 13] and result["new_tokens"] == len(result["token_ids"])
    assert result["prompt_tokens"] > 5 and isinstance(result["text"], str)


def test_generate_reads_stdin_and_streams():
    out = firstskip("generate", "-m", "smollm2-135m", "--max-new-tokens", "8", "--stream",
                    stdin="What is the capital of France?")
    assert out.returncode == 0 and out.stdout.strip() and "skipping 0/30" in out.stderr


def test_bench_json_reports_three_variants():
    out = firstskip("bench", "-m", "random:tiny-llama", "--skip", "2,3", "--prompt-len", "16",
                    "--new-tokens", "4", "--repeats", "2", "--batch-size", "2", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {"full", "first", "pruned", "first_over_full", "first_over_pruned"} <= set(result)
    assert result["first"]["skipped_layers"] == [2, 3] and result["full"]["skipped_layers"] == []
    assert result["setup"]["dtype"] == "int8"  # the default on a CPU: the fastest format that passed


def test_the_default_weight_format_follows_the_device():
    from firstskip.quantize import default_format

    assert default_format("cpu") == "int8" and default_format("cuda:1") == "bfloat16"


def test_bench_times_llamacpp_beside_firstskip_when_it_is_installed():
    pytest.importorskip("llama_cpp")  # benchmark-only (benchmarks/setup_llamacpp.sh); not in the test install
    out = firstskip("bench", "-m", "smollm2-135m", "--skip", "10-17", "--dtype", "int8", "--llamacpp", "Q4_1",
                    "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert {"llamacpp_Q4_1", "full_over_llamacpp_Q4_1", "first_over_llamacpp_Q4_1"} <= set(result)
    assert result["setup"]["dtype"] == "int8" and result["setup"]["llamacpp_ggufs"]["llamacpp_Q4_1"].endswith("Q4_1.gguf")


def test_the_llamacpp_variant_decodes_what_the_model_says():
    """Its timed loop is a real greedy decode of the same prompt (the GGUF's own Q4_1 weights)."""
    pytest.importorskip("llama_cpp")
    from firstskip.llamacpp import LlamaCpp, gguf_for
    from firstskip.modeling import FirstSkipModel

    fsm = FirstSkipModel.from_base("smollm2-135m")
    ids = fsm.encode("What is the capital of France? Answer in one sentence.")
    anchor = LlamaCpp(gguf_for("smollm2-135m", "Q4_1"), 2, 128)
    assert "Paris" in fsm.tokenizer.decode(anchor.generate(ids, 8))
