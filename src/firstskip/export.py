"""Export one fixed skip set as a plain, smaller checkpoint that any engine loads unchanged.

A user who settles on one skip set (chosen by hand, or the set a run's routers pick most often on a
task) needs no router and no firstskip at serving time: the skipped layers can simply be deleted.

- ``pruned``: a Hugging Face folder (``config.json``, safetensors, tokenizer) with those decoder
  layers removed and the rest renumbered, ``num_hidden_layers`` reduced and per-layer config lists
  (``layer_types``) cut the same way; a run's LoRA adapter is merged first.
- ``gguf``: for a model that came from a GGUF file (the packaged models), that file copied with the
  skipped ``blk.N.*`` tensors dropped, the others renumbered and ``<arch>.block_count`` (and any
  per-layer metadata array) cut; tensors keep their quantization, except those a run's LoRA changed
  (llama GGUFs), which are written merged, in float32.

- ``vllm``: every layer kept, for the ``firstskip-vllm`` plugin (``plugins/vllm``): the merged weights,
  the routers as tensors (``firstskip_routers.safetensors``), the decision settings under
  ``config.json``'s ``firstskip`` key and ``architectures`` naming the plugin's model class.

Each writes a ``firstskip_export.json`` beside the weights saying what was exported and why.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from firstskip import artifacts
from firstskip.config import FirstSkipConfig
from firstskip.errors import FirstSkipError

FORMATS = ("pruned", "gguf", "vllm")
INFO_NAME = "firstskip_export.json"
GGUF_NAME = "model.gguf"
VLLM_ROUTERS_NAME = "firstskip_routers.safetensors"
VLLM_ROUTER_PREFIX = "firstskip_routers."  # the plugin's parameter names: firstskip_routers.<layer>.<...>
VLLM_SETTINGS_VERSION = 1
# Families the vLLM plugin wraps (vLLM's classes take a decoder-layer type, so no model code is copied).
VLLM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Config fields holding one entry per decoder layer, cut like the layers themselves.
PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")
# Where a run trained under one fixed skip set records it; such a run exports that set by default.


def most_common_skip_set(fsm: Any, prompts: Sequence[str] | Sequence[Sequence[int]],
                         batch_size: int = 8) -> tuple[list[int], float]:
    """The skip set a FiRST model's routers choose most often on ``prompts``, and its share of them.

    Each prompt (text, encoded with the chat template as inference does, or token ids) is scored
    by a full prefill and decided by the model's current decision settings (threshold or budget),
    as `firstskip generate` decides. Ties go to the smaller set, then the lower layer numbers.
    """
    from firstskip.data import encode_prompt
    from firstskip.routers import decide
    from firstskip.train.calibrate import keep_probs

    if not prompts:
        raise FirstSkipError("no prompts to choose a skip set on")
    encoded = [encode_prompt(fsm.tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    skip = decide(keep_probs(fsm, [(ids, len(ids)) for ids in encoded], batch_size), fsm.config)
    counts = Counter(tuple(row.nonzero().squeeze(-1).tolist()) for row in skip)
    chosen, count = min(counts.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))
    return list(chosen), count / len(encoded)


def export(out: str | os.PathLike, fmt: str = "pruned", *, model: str | None = None,
           run: str | os.PathLike | None = None, skip: Sequence[int] | None = None, task_set: str | None = None,
           limit: int = 100, dtype: str = "float32") -> dict[str, Any]:
    """Write the model of ``--model`` or ``--run`` with one skip set removed; returns what was written.

    Args:
        out: a folder that does not exist yet or is empty; it appears only once complete.
        fmt: ``pruned`` (Hugging Face folder) or ``gguf`` (models that came from a GGUF file).
        model / run: a base model name, or a run folder (its LoRA is merged). Exactly one.
        skip: the layers to remove. Without it (and without ``task_set``) a run trained under a
            static set exports that set.
        task_set: a dataset spec; the set is the run's most common choice on its first ``limit``
            test prompts (`most_common_skip_set`).
        dtype: the pruned checkpoint's dtype (GGUF tensors keep theirs).
    """
    out = Path(out)
    if fmt not in FORMATS:
        raise FirstSkipError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FirstSkipError(f"{out} already exists and is not an empty folder; choose a new --out")
    if (model is None) == (run is None):
        raise FirstSkipError("give exactly one of --model or --run")
    if skip is not None and task_set is not None:
        raise FirstSkipError("give at most one of --skip or --task-set")
    if task_set is not None and run is None:
        raise FirstSkipError("--task-set needs a --run: its routers choose the skip set")
    if fmt == "vllm":
        return _export_vllm(out, model, run, skip, task_set, dtype)
    config = artifacts.load_config(run) if run is not None else None
    source = "--skip"
    if skip is None and task_set is None:
        skip, source = static_skip_set(config), "the run's static set"
        if skip is None:
            raise FirstSkipError("give --skip (e.g. --skip 10-12)" + (
                "" if run is None else " or --task-set DATA (the run's most common skip set on its test prompts)"))
    info = {"format": fmt, "base_model": config.base_model if config else model,
            "run": None if run is None else str(Path(run).resolve())}
    if fmt == "gguf":
        return _export_gguf(out, model, run, config, skip, task_set, limit, info | {"skip_source": source})
    fsm = _load(model, run, dtype)
    if task_set is not None:
        skip, source = _task_set(fsm, task_set, limit)
    keep = kept_layers(skip, fsm.config.num_layers)
    info |= {"skip": sorted(set(skip)), "kept_layers": keep, "num_layers": fsm.config.num_layers,
             "skip_source": source, "dtype": dtype}
    artifacts.atomic_dir(out, lambda tmp: _write_pruned(Path(tmp), fsm, keep, info))
    return {"out": str(out), **info}


def static_skip_set(config: FirstSkipConfig | None) -> list[int] | None:
    """The fixed skip set a run was trained under, or None for a routed run (or a plain base)."""
    if config is None or not config.static_skip:  # a plain LoRA run (static set []) has nothing to remove
        return None
    return list(config.static_skip)


def kept_layers(skip: Sequence[int], num_layers: int) -> list[int]:
    """The layers left after removing ``skip``; a set out of range, empty or holding every layer is an error."""
    bad = sorted(i for i in set(skip) if not 0 <= i < num_layers)
    if bad:
        raise FirstSkipError(f"skip layers {bad} are outside 0..{num_layers - 1}")
    if not skip:
        raise FirstSkipError("the skip set is empty: the export would be the full model")
    keep = [i for i in range(num_layers) if i not in set(skip)]
    if not keep:
        raise FirstSkipError(f"the skip set holds all {num_layers} layers; keep at least one")
    return keep


# --- pruned: a Hugging Face folder ------------------------------------------------------------------

def _load(model: str | None, run: str | os.PathLike | None, dtype: str) -> Any:
    from firstskip.modeling import FirstSkipModel

    if run is not None:
        return FirstSkipModel.from_pretrained(run, dtype=dtype)
    return FirstSkipModel.from_base(model, dtype=dtype)


def _task_set(fsm: Any, spec: str, limit: int) -> tuple[list[int], str]:
    from firstskip.data import load_examples

    if fsm.tokenizer is None:
        raise FirstSkipError("--task-set needs a model with a tokenizer (random models have none)")
    examples = load_examples(spec, "test", limit=limit)
    if not examples:
        raise FirstSkipError(f"{spec} has no test prompts")
    skip, share = most_common_skip_set(fsm, [ex.prompt for ex in examples])
    if not skip:
        raise FirstSkipError(f"on {spec} the run's routers most often skip no layer ({share:.0%} of "
                             f"{len(examples)} prompts); nothing to export")
    return skip, f"most common set on {spec}: {share:.0%} of {len(examples)} test prompts"


def _write_pruned(folder: Path, fsm: Any, keep: list[int], info: dict[str, Any]) -> None:
    from firstskip.skipping import pruned_copy

    skip = [i for i in range(fsm.config.num_layers) if i not in keep]
    with fsm.engine.controller.detached():  # copy the layers without the engine's forward hooks
        pruned = pruned_copy(fsm.model, skip)
    for key in PER_LAYER_CONFIG:  # pruned_copy cuts layer_types; cut any other per-layer list too
        value = getattr(pruned.config, key, None)
        if isinstance(value, list) and len(value) == fsm.config.num_layers:
            setattr(pruned.config, key, [value[i] for i in keep])
    pruned.save_pretrained(folder)
    if fsm.tokenizer is not None:
        fsm.tokenizer.save_pretrained(folder)
    _write_info(folder, info)


def _write_info(folder: Path, info: dict[str, Any]) -> None:
    (folder / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# --- vllm: every layer, the routers and the decision, for the firstskip-vllm plugin ----------------------

def _export_vllm(out: Path, model: str | None, run: str | os.PathLike | None, skip: Sequence[int] | None,
                 task_set: str | None, dtype: str) -> dict[str, Any]:
    """Check the input, then write the plugin's folder atomically; returns what was written."""
    if run is None:
        raise FirstSkipError(f"--format vllm needs a --run with trained routers, not --model {model}; "
                             "use --format pruned for a plain checkpoint")
    if skip is not None or task_set is not None:
        raise FirstSkipError("--format vllm keeps every layer and lets the routers choose; --skip and "
                             "--task-set are for --format pruned or gguf (a request can force a set through extra_args)")
    config = artifacts.load_config(run)
    routers = artifacts.load_routers(run)  # a run without routers.safetensors is a one-line error here
    fsm = _load(None, run, dtype)
    architecture = vllm_architecture(fsm.model.config)
    info = {"format": "vllm", "base_model": config.base_model, "run": str(Path(run).resolve()),
            "architecture": architecture, "num_layers": config.num_layers, "dtype": dtype}
    artifacts.atomic_dir(out, lambda tmp: _write_vllm(Path(tmp), fsm, routers, architecture, info))
    return {"out": str(out), **info, "settings": vllm_settings(config)}


def vllm_architecture(hf_config: Any) -> str:
    """The plugin's class for a model: ``FirstSkip`` + the model's own (``FirstSkipLlamaForCausalLM``)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in VLLM_FAMILIES:
        raise FirstSkipError(f"the vLLM plugin supports {', '.join(VLLM_FAMILIES)}, not {model_type!r}; "
                             "use --format pruned for a plain checkpoint vLLM serves as it is")
    return "FirstSkip" + (hf_config.architectures or [f"{model_type.capitalize()}ForCausalLM"])[0]


def vllm_settings(config: FirstSkipConfig) -> dict[str, Any]:
    """What the plugin needs to score and decide, resolved (no defaults left for it to know)."""
    if config.prefill == "early":  # vLLM's chunked prefill gives no place to decide on a prompt's start
        raise FirstSkipError("the vLLM plugin prefills 'full' or 'routed', and this run is trained for 'early' "
                             "prefill; serve it with firstskip serve")
    return {"version": VLLM_SETTINGS_VERSION, "num_layers": config.num_layers, "hidden_size": config.hidden_size,
            "router_dim": config.router_dim, "router_activation": "gelu", "router_norm_eps": 1e-5,
            "pooling": config.router_pooling,
            "template_tokens": list(config.template_tokens or [0, 0]) if config.router_pooling == "mean" else [0, 0],
            "protected_layers": config.protected, "decision": config.decision, "threshold": config.threshold,
            "budget_k": config.budget_k if config.decision == "budget" else None,
            "snap_sets": config.snap_sets if config.decision == "snapped" else None, "prefill": config.prefill,
            "static_skip": None if config.static_skip is None else sorted(config.static_skip)}


def _write_vllm(folder: Path, fsm: Any, routers: dict[str, Any], architecture: str, info: dict[str, Any]) -> None:
    fsm.model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    # save_pretrained names the model's own class; the plugin's goes in afterwards, with the settings
    config |= {"architectures": [architecture], "firstskip": vllm_settings(fsm.config)}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if fsm.tokenizer is not None:
        fsm.tokenizer.save_pretrained(folder)
    tensors = {VLLM_ROUTER_PREFIX + key.removeprefix("routers."): value.float() for key, value in routers.items()}
    artifacts.write_tensors(folder / VLLM_ROUTERS_NAME, tensors, {"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded weights: vLLM reads only the files the index names
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"].update(dict.fromkeys(tensors, VLLM_ROUTERS_NAME))
        index.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    _write_info(folder, info)


# --- gguf: the source GGUF with blocks removed --------------------------------------------------------

def _export_gguf(out: Path, model: str | None, run: str | os.PathLike | None, config: FirstSkipConfig | None,
                 skip: Sequence[int] | None, task_set: str | None, limit: int, info: dict[str, Any]) -> dict[str, Any]:
    from firstskip.models import source_gguf

    base = info["base_model"]
    if not base:
        raise FirstSkipError(f"run {run} does not record its base model")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=_parent(out)) as work:
        src = source_gguf(base, Path(work))
        if src is None:
            raise FirstSkipError(f"gguf export works for models that come from a GGUF file (the packaged "
                                 f"models), not {base!r}; use --format pruned")
        adapted = config is not None and (config.merged or config.lora is not None)
        fsm = _load(model, run, "float32") if task_set is not None or adapted else None
        if task_set is not None:
            skip, info["skip_source"] = _task_set(fsm, task_set, limit)
        info["source_gguf"] = src.name
        written = _write_gguf_dir(out, src, skip, info, fsm.model if adapted else None, base)
    return {"out": str(out), **written}


def _parent(out: Path) -> Path:
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    return out.absolute().parent


def _write_gguf_dir(out: Path, src: Path, skip: Sequence[int], info: dict[str, Any], adapted: Any,
                    base: str) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    num_layers = int(reader.fields[f"{arch}.block_count"].contents())
    keep = kept_layers(skip, num_layers)
    replace = {} if adapted is None else adapted_tensors(reader, adapted, base)
    info |= {"skip": sorted(set(skip)), "kept_layers": keep, "num_layers": num_layers, "file": GGUF_NAME,
             "lora_changed_tensors": len(replace)}

    def write(tmp: str) -> None:
        write_pruned_gguf(reader, Path(tmp) / GGUF_NAME, keep, replace)
        _write_info(Path(tmp), info)

    artifacts.atomic_dir(out, write)
    return info


def adapted_tensors(reader: Any, adapted: Any, base: str) -> dict[str, Any]:
    """GGUF name -> float32 array (GGUF's layout) of every weight a run's merged LoRA changed.

    The base model is loaded again and compared weight by weight, so whatever the adapter touched is
    found without trusting its config. Only llama GGUFs are handled: their q/k rows are permuted the
    way llama.cpp's converter does, which transformers undoes when it reads them.
    """
    import torch
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    from firstskip.models import load_model

    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise FirstSkipError(f"gguf export of a LoRA run is supported for llama GGUFs only, not {arch!r}; "
                             "use --format pruned")
    config = adapted.config
    names = get_tensor_name_map({v: k for k, v in MODEL_ARCH_NAMES.items()}[arch], config.num_hidden_layers)
    plain = load_model(base)[0].state_dict()
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    out = {}
    for key, weight in adapted.state_dict().items():
        if torch.equal(weight, plain[key]):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise FirstSkipError(f"the run changes {key}, which has no GGUF name; use --format pruned")
        array = weight.detach().float().cpu().numpy()
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        out[name] = _permute(array, heads[kind]) if kind in heads and array.ndim == 2 else array
    return out


def _permute(weight: Any, n_head: int) -> Any:
    """Hugging Face q/k rows -> llama.cpp's order (its converter's ``permute``)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_pruned_gguf(reader: Any, dest: Path, keep: list[int], replace: dict[str, Any] | None = None) -> None:
    """Copy a GGUF (a ``GGUFReader``) to ``dest`` keeping only blocks ``keep``, renumbered 0..len-1.

    Metadata is copied as is except ``<arch>.block_count`` and any ``<arch>.*`` array with one entry
    per block, which are cut; tensor data is copied byte for byte (quantized stays quantized), except
    tensors named (by their source name) in ``replace``, written as the given float32 arrays.
    """
    from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

    arch = reader.fields["general.architecture"].contents()
    num_layers = int(reader.fields[f"{arch}.block_count"].contents())
    writer = GGUFWriter(dest, arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer adds the first; the second are the reader's header, not metadata
        vtype, value = field.types[0], field.contents()
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        if field.name == f"{arch}.block_count":
            value = len(keep)
        elif field.name.startswith(f"{arch}.") and sub_type is not None and len(value) == num_layers:
            value = [value[i] for i in keep]
        elif field.name == "general.alignment":
            writer.data_alignment = int(value)
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
    renumber = {old: new for new, old in enumerate(keep)}
    replace = replace or {}
    tensors = [(name, replace.get(t.name), t) for t in reader.tensors
               if (name := _renamed(t.name, renumber)) is not None]
    for name, new, tensor in tensors:
        if new is None:
            writer.add_tensor_info(name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
        else:
            writer.add_tensor_info(name, new.shape, new.dtype, new.nbytes, GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, new, tensor in tensors:
        writer.write_tensor_data(tensor.data if new is None else new, tensor_endianess=reader.endianess)
    writer.close()


def _renamed(name: str, renumber: dict[int, int]) -> str | None:
    """``blk.N.rest`` -> ``blk.M.rest`` with N's new number M, None for a removed block; others as they are."""
    found = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if found is None:
        return name
    new = renumber.get(int(found[1]))
    return None if new is None else f"blk.{new}.{found[2]}"
