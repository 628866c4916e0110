"""The run folder: JSON and safetensors only, every file written atomically.

A run folder holds ``config.json`` (schema version, base model reference, base fingerprint,
router and decision settings), ``routers.safetensors`` and, after LoRA, ``adapter/`` (peft's own
``adapter_config.json`` + ``adapter_model.safetensors``) or, when merged, ``model/``.
``config.json`` is written last: a folder without it is not a run, so a crash mid-save never
leaves a run that loads half-written weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from firstskip.config import FirstSkipConfig
from firstskip.errors import FirstSkipError
from firstskip.families import decoder_layers

CONFIG_NAME = "config.json"
ROUTERS_NAME = "routers.safetensors"
ADAPTER_DIR = "adapter"
MERGED_DIR = "model"


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(tmp_path)`` and move the result into place in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_dir(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(tmp_folder)`` and move the folder into place; an older folder is swapped out only
    once the new one is complete (it stays as ``.NAME.old-*`` if a crash falls between the renames)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should read like any folder
    try:
        write(str(tmp))
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies a base model: shape facts plus a hash of a few weights.

    Hashing the first and last decoder layers' first parameter catches a different checkpoint of
    the same architecture without reading every weight.
    """
    config = model.config
    layers = decoder_layers(model)
    digest = hashlib.sha256()
    for layer in (layers[0], layers[-1]):
        param = next(layer.parameters()).detach().float().cpu().contiguous()
        digest.update(param.numpy().tobytes())
    return {
        "model_type": config.model_type,
        "num_layers": len(layers),
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "weights_sha256": digest.hexdigest()[:16],
    }


def check_fingerprint(expected: dict[str, Any], model: nn.Module, run_dir: str | os.PathLike) -> None:
    """Refuse to put a run's routers on a base model they were not trained for."""
    if not expected:
        return
    actual = fingerprint(model)
    diff = [f"{k}: run has {expected[k]!r}, model has {actual.get(k)!r}"
            for k in expected if expected[k] != actual.get(k)]
    if diff:
        raise FirstSkipError(f"run {run_dir} was trained on a different base model ({'; '.join(diff)})")


def save_run(run_dir: str | os.PathLike, config: FirstSkipConfig, routers: nn.Module) -> None:
    """Write routers then config.json (the commit marker) into ``run_dir``."""
    write_tensors(Path(run_dir) / ROUTERS_NAME, routers.state_dict(), {"format": "pt"})
    save_config(run_dir, config)


def save_config(run_dir: str | os.PathLike, config: FirstSkipConfig) -> None:
    """Rewrite config.json alone (a new threshold after calibration)."""
    write_text(Path(run_dir) / CONFIG_NAME, config.to_json() + "\n")


def load_config(run_dir: str | os.PathLike) -> FirstSkipConfig:
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise FirstSkipError(f"{run_dir} is not a firstskip run (no {CONFIG_NAME}); train one with `firstskip train`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FirstSkipError(f"{path} is not valid JSON ({err})") from err
    return FirstSkipConfig.from_dict(data)


def load_routers(run_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(run_dir) / ROUTERS_NAME
    if not path.is_file():
        raise FirstSkipError(f"run {run_dir} has no {ROUTERS_NAME}: it holds no trained routers")
    return load_file(path)
