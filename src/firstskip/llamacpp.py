"""llama.cpp, the runtime CPU users run instead, timed beside firstskip in the same process.

`firstskip bench --llamacpp Q8_0,Q4_1` adds one variant per GGUF type when llama-cpp-python is
installed (`benchmarks/setup_llamacpp.sh` builds it with the flags these CPUs need). Each decodes the
base model's own GGUF, requantized to that type where the file is another, with the same threads,
prompt and new tokens, timed like the engine: prefill of the prompt, then greedy decoding after it
(decoding from an empty cache would flatter it by about a third).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from firstskip.errors import FirstSkipError
from firstskip.models import cache_dir, source_gguf

GGUF_TYPES = ("F32", "BF16", "F16", "Q8_0", "Q4_1", "Q4_0")


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def gguf_for(base_model: str, kind: str) -> Path:
    """The base model's GGUF of type ``kind`` (``Q8_0``, ``F32`` ...), requantized once into the
    cache folder unless the source already is that type.

    Only packaged models come from a GGUF; a requantized file keeps the source's quality, so it is
    for timing, not for quality comparisons."""
    if kind not in GGUF_TYPES:
        raise FirstSkipError(f"unknown GGUF type {kind!r}; choose from {', '.join(GGUF_TYPES)}")
    folder = cache_dir() / "llamacpp"
    folder.mkdir(parents=True, exist_ok=True)
    src = source_gguf(base_model, folder)
    if src is None:
        raise FirstSkipError(f"--llamacpp needs a model that comes from a GGUF file (a packaged model), not {base_model}")
    if src.stem.endswith(f".{kind}"):
        return src
    dest = folder / f"{src.stem.rsplit('.', 1)[0]}.{kind}.gguf"
    if not dest.is_file():
        _quantize(src, dest, kind)
    return dest


def _quantize(src: Path, dest: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{'ALL' if kind == 'F32' else 'MOSTLY'}_{kind}")
    params.allow_requantize = True
    tmp = dest.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise FirstSkipError(f"llama.cpp could not requantize {src.name} to {kind}")
    tmp.replace(dest)


class LlamaCpp:
    """One llama.cpp context on a GGUF, timed like `bench.time_once` times the engine."""

    def __init__(self, gguf: Path, threads: int, context: int) -> None:
        import llama_cpp

        self.gguf = gguf
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=context, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)

    def greedy(self) -> int:
        """The argmax of the last evaluated token's logits (read in place: `Llama.eval` keeps them
        only with ``logits_all``)."""
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))))

    def tokens(self, prompt: list[int], new_tokens: int) -> Iterator[int]:
        """Greedy new tokens after ``prompt``, the first as soon as the prompt is evaluated."""
        self.llm.reset()
        self.llm.eval(prompt)
        for step in range(new_tokens):
            if step:
                self.llm.eval([token])
            token = self.greedy()
            yield token

    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        return list(self.tokens(prompt, new_tokens))

    def time_once(self, prompt: list[int], new_tokens: int) -> dict[str, Any]:
        start = time.perf_counter()
        stream = self.tokens(prompt, new_tokens)
        next(stream)
        prefilled = time.perf_counter()
        for _ in stream:
            pass
        end = time.perf_counter()
        return {"ttft_s": prefilled - start, "decode_tok_s": (new_tokens - 1) / max(end - prefilled, 1e-9),
                "e2e_s": end - start, "kv_cache_mb": None, "peak_mem_mb": None, "skip_sets": [[]]}
