"""Shared set-up: offline, in-process vLLM engines with a small KV cache, and the test models.

The models are written by firstskip itself (`make_fixtures.py`, run with firstskip's Python, by
default the checkout's ``.venv``; ``FIRSTSKIP_PYTHON`` names another), so what the plugin loads is
exactly what ``firstskip export`` writes. Engines are started as few times as possible (each costs
seconds): a test module computes everything one engine must answer in one place.
"""

from __future__ import annotations

import gc
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model lives in this process: layers can be counted
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes most of the machine's memory

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
# Settings every engine of a comparison shares (the plugin applies eager mode and no prefix caching itself).
COMMON = dict(dtype="float32", skip_tokenizer_init=True, seed=0, max_model_len=96, max_num_batched_tokens=32,
              block_size=32)
REFERENCE = dict(COMMON, enforce_eager=True, enable_prefix_caching=False)


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models of every family: base, FiRST run, vllm export, pruned export, firstskip's answers."""
    reuse = os.environ.get("FIRSTSKIP_VLLM_FIXTURES")  # a folder an earlier run wrote (development)
    if reuse and (Path(reuse) / "smollm2" / "expected.json").is_file():
        return Path(reuse)
    python = os.environ.get("FIRSTSKIP_PYTHON", str(REPO / ".venv" / "bin" / "python"))
    if not Path(python).exists():
        pytest.fail(f"firstskip's Python {python} is missing: create the checkout's .venv (README) or set FIRSTSKIP_PYTHON")
    out = tmp_path_factory.mktemp("fixtures")
    done = subprocess.run([python, str(HERE / "make_fixtures.py"), str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@contextmanager
def engine(model: Path, **settings: Any) -> Iterator[Any]:
    """An offline vLLM engine, shut down afterwards so the next one can start in this process."""
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    llm = LLM(model=str(model), **settings)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def greedy(max_tokens: int, **extra: Any) -> Any:
    """Greedy sampling of exactly ``max_tokens`` tokens, with FiRST extra args (``skip=`` -> ``firstskip_skip``)."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args={f"firstskip_{k}": v for k, v in extra.items()} or None)


def generate(llm: Any, prompts: list[list[int]], params: Any) -> list[list[int]]:
    """Token ids out, one list per prompt (all submitted together: they share the running batch)."""
    from vllm import TokensPrompt

    params = params if isinstance(params, list) else [params] * len(prompts)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def on_model(llm: Any, func: Any) -> Any:
    """Run ``func(model)`` in the (in-process) worker."""
    return llm.apply_model(func)[0]


