"""`train`: the whole recipe, from a model name and data specs to a finished run folder.

This is what `firstskip train` runs. Data: the train split of each dataset, shuffled with the seed;
in target mode the first ``holdout`` examples of each are kept out of training for calibration
(`firstskip calibrate` with the same seed and ``--limit <= holdout`` reads exactly those); the next
``limit`` examples are trained on, mixed across datasets. Then phase 1, calibration (target mode),
phase 2 under the calibrated threshold, and calibration again (the adapter moves the routers'
inputs a little). Every phase can be resumed; a finished phase is not run again.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from firstskip import artifacts
from firstskip.baselines import BaselineContext, block_influence, static_skip_set
from firstskip.data import Example, collate, encode_example, load_examples, mix_examples
from firstskip.errors import FirstSkipError
from firstskip.modeling import FirstSkipModel
from firstskip.models import model_reference
from firstskip.quantize import WEIGHT_FORMATS
from firstskip.train.calibrate import calibrate
from firstskip.train.loop import CHECKPOINT_DIR, LOG_NAME, Encoded, on_main, process_state
from firstskip.train.phases import LoraTraining, RouterTraining, train_lora, train_routers

# The measured smollm2-135m recipe on 2 CPU cores (docs/training.md); steps and learning rates are
# the defaults of RouterTraining and LoraTraining.
DEFAULT_MAX_LENGTH = 256
DEFAULT_HOLDOUT = 32
DEFAULT_BATCH_SIZE = 8


def train(model: str, data: Sequence[str], out: str | os.PathLike, *, skip_target: float | None = None,
          lam: float | None = None, lora: bool = False, merge: bool = False, max_steps: int | None = None,
          epochs: float | None = None, lr: float | None = None, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
          limit: int | None = None, max_length: int = DEFAULT_MAX_LENGTH, holdout: int = DEFAULT_HOLDOUT,
          lora_steps: int | None = None, lora_lr: float | None = None, lora_rank: int | None = None,
          static: str | None = None, prefill: str | None = None, token_weighted: bool = False,
          resume: bool = False, overwrite: bool = False,
          dtype: str = "float32", device: str | None = None, progress: bool = True) -> FirstSkipModel:
    """Train routers (and LoRA) on one or more datasets into the run folder ``out``.

    Args:
        model: base model (packaged name, hub id, folder).
        data: dataset specs (folder, .jsonl, ``hf:``, ``builtin:``); their train splits are mixed.
        out: the run folder.
        skip_target: target mode: skip this fraction of all layers on average (then calibrated).
        token_weighted: the target is a token-weighted decode saving instead (`RouterTraining`), and
            calibration meets it as one (`calibrate`'s ``saving_target``).
        lam: λ mode: weight of the mean keep-probability (default 0.01 when no target is given).
        lora: run phase 2 (LoRA under the learned skip sets) after the routers.
        merge: save the adapter merged into the weights as well (needs ``lora``).
        max_steps: optimizer steps per phase (default: the settings' own, 120 and 30).
        epochs: passes over the data instead of a number of steps.
        lr: routers' learning rate (LoRA's is ``lora_lr``).
        batch_size: examples per step, over all processes.
        seed: data order, held-out split and LoRA initialisation.
        limit: train on at most this many examples per dataset.
        max_length: tokens per example (the prompt is cut from the left).
        holdout: examples per dataset kept out of training for calibration (target mode).
        lora_steps: optimizer steps of phase 2 (default: ``max_steps`` if given).
        lora_lr: LoRA learning rate; lora_rank: LoRA rank.
        static: a static-set run instead of routers, the fair rival of FiRST: LoRA (phase 2, same
            settings) trained under one skip set that every prompt uses. ``shortgpt``, ``uls``,
            ``last`` or ``random`` with k = round(skip_target x layers); ``layers:3,4,5``; ``none`` for a
            plain LoRA that skips nothing. Needs ``lora``.
        prefill: ``early`` trains for `early` prefill: calibration reads the prompts' decision tokens
            (`FirstSkipConfig.decision_tokens`) and the LoRA learns with the rest of each prompt
            skipping; the routers (trained on prompt prefixes) are the same. Default: ``full``, or
            the run's own when resuming.
        resume: go on from the run's last checkpoint and skip finished phases.
        overwrite: replace an existing run in ``out``.
        dtype: base model dtype; device: where it runs (default: accelerate's choice for this process).
        progress: show progress bars.
    """
    _check_args(data, skip_target, lam, merge, lora, resume, overwrite)
    if static is not None and not lora:
        raise FirstSkipError("--static trains a LoRA under a fixed skip set; add --lora")
    if prefill not in (None, "full", "early"):
        raise FirstSkipError(f"training models prefill 'full' or 'early', got {prefill!r}")
    out = Path(out)
    if max_steps is not None and epochs is not None:
        raise FirstSkipError("give --max-steps or --epochs, not both")
    if dtype in WEIGHT_FORMATS:
        raise FirstSkipError(f"training needs float weights; {dtype} is for generate, eval, bench and serve")
    length = {"steps": None, "epochs": epochs} if epochs is not None else _given(steps=max_steps)
    routers_settings = RouterTraining(**length, **_given(lr=lr, lam=lam), batch_size=batch_size, seed=seed,
                                      skip_target=skip_target, token_weighted=token_weighted)
    lora_length = _given(steps=lora_steps) or length
    lora_settings = LoraTraining(**lora_length, **_given(lr=lora_lr, rank=lora_rank), batch_size=batch_size, seed=seed)
    _prepare_out(out, resume, overwrite)  # only once every setting is valid: --overwrite must not lose a run to a typo
    routed = static is None
    held_out, examples = split_examples(data, seed, holdout if skip_target is not None and routed else 0, limit)
    fsm = _load(model, out, resume, seed, dtype, device)
    if prefill is not None and routed:
        fsm.update_config(prefill=prefill)
    if fsm.tokenizer is None:
        raise FirstSkipError(f"{model} has no tokenizer, so text data cannot be encoded; train on token ids with "
                             "firstskip.train.train_routers instead")
    encoded = [encode_example(fsm.tokenizer, ex, max_length) for ex in examples]
    if not routed and fsm.config.static_skip is None:
        layers = static_layers(fsm, static, skip_target, encoded, seed)
        fsm.update_config(static_skip=layers, training={**fsm.config.training, "static": {"spec": static, "layers": layers}})
    # Each step below is skipped when the run already records it, so --resume picks up after any of them.
    if routed and "routers" not in fsm.config.training:
        train_routers(fsm, encoded, out, routers_settings, resume=resume, progress=progress)
    target = {"saving_target" if token_weighted else "skip_target": skip_target}
    if routed and skip_target is not None and "calibration" not in fsm.config.training:
        calibrate(out, held_out, **target, model=fsm)  # whole prompts, as inference will score them
    if lora and fsm.config.lora is None:
        train_lora(fsm, encoded, out, lora_settings, merge=merge, resume=resume, progress=progress)
    if routed and lora and skip_target is not None and "calibration_before_lora" not in fsm.config.training:
        # The adapter moves the routers' inputs a little: calibrate again, keeping the first one.
        fsm.update_config(training={**fsm.config.training,
                                    "calibration_before_lora": fsm.config.training["calibration"]})
        calibrate(out, held_out, **target, model=fsm)
    return fsm


STATIC_SETS = ("shortgpt", "uls", "last", "random")
SHORTGPT_ITEMS = 32  # training examples whose block influence ranks the layers for ShortGPT


def static_layers(fsm: FirstSkipModel, spec: str, skip_target: float | None, encoded: Encoded,
                  seed: int = 0) -> list[int]:
    """The skip set named by ``--static``: a baseline's set of k = round(skip_target x layers) layers,
    measured on this model (ShortGPT's block influence on the first training examples), an explicit
    ``layers:3,4,5``, or ``none`` (a plain LoRA)."""
    config = fsm.config
    if spec == "none":
        return []
    if spec.startswith("layers:"):
        try:
            layers = sorted({int(part) for part in spec.removeprefix("layers:").split(",") if part.strip()})
        except ValueError:
            raise FirstSkipError(f"--static layers: takes layer numbers like layers:3,4,5, got {spec!r}") from None
        config.replace(static_skip=layers)  # range check
        return layers
    if spec not in STATIC_SETS:
        raise FirstSkipError(f"--static takes {', '.join(STATIC_SETS)}, layers:3,4,5 or none; got {spec!r}")
    if skip_target is None:
        raise FirstSkipError(f"--static {spec} needs --skip-target: it skips round(target x layers) layers")
    bi = None
    if spec == "shortgpt":
        pad = getattr(fsm.tokenizer, "pad_token_id", None) or 0
        batches = (collate(encoded[s:s + 8], pad) for s in range(0, min(len(encoded), SHORTGPT_ITEMS), 8))
        bi = block_influence(fsm.model, ({"input_ids": b.input_ids, "attention_mask": b.attention_mask} for b in batches))
    ctx = BaselineContext(config.num_layers, tuple(config.protected), seed, block_influence=bi)
    return static_skip_set(spec, ctx, int(skip_target * config.num_layers + 0.5))


def _check_args(data: Sequence[str], skip_target: float | None, lam: float | None, merge: bool, lora: bool,
                resume: bool, overwrite: bool) -> None:
    if not data:
        raise FirstSkipError("give at least one --data")
    if skip_target is not None and lam is not None:
        raise FirstSkipError("give --skip-target (target mode) or --lambda (λ mode), not both")
    if merge and not lora:
        raise FirstSkipError("--merge folds the LoRA adapter into the weights; add --lora")
    if resume and overwrite:
        raise FirstSkipError("--resume continues a run and --overwrite replaces it; give one of them")


def _given(**values: object) -> dict[str, object]:
    """Only the arguments the caller set, so the settings' own defaults apply to the rest."""
    return {k: v for k, v in values.items() if v is not None}


_RUN_FILES = (artifacts.CONFIG_NAME, artifacts.ROUTERS_NAME, artifacts.ADAPTER_DIR, artifacts.MERGED_DIR,
              CHECKPOINT_DIR, LOG_NAME)


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch an existing run unless told; --overwrite removes its files (config.json first,
    so the folder stops being a run before anything it needs is gone)."""
    found = [name for name in _RUN_FILES if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        what = "a run" if (out / artifacts.CONFIG_NAME).exists() else "a partial run (checkpoint)"
        raise FirstSkipError(f"{out} already holds {what}; pass --resume to continue it or --overwrite to replace it")

    def remove() -> None:
        for name in found:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    on_main(remove)


def held_out_examples(specs: Sequence[str], n: int | None = None, seed: int = 0,
                      split: str = "train") -> list[Example]:
    """The first ``n`` (default `DEFAULT_HOLDOUT`) examples of each dataset's seeded shuffle, mixed:
    with the training seed and split these are exactly the examples `train` held out for calibration."""
    n = n or DEFAULT_HOLDOUT
    return mix_examples([load_examples(spec, split, shuffle=True, seed=seed)[:n] for spec in specs], seed)


def split_examples(specs: Sequence[str], seed: int, holdout: int, limit: int | None) -> tuple[list[Example], list[Example]]:
    """(held-out, training) examples: per dataset, a seeded shuffle cut into its first ``holdout``
    (as `held_out_examples`) and the next ``limit``; each side mixed across datasets."""
    held, train = [], []
    for spec in specs:
        examples = load_examples(spec, "train", shuffle=True, seed=seed)
        if len(examples) <= holdout:
            raise FirstSkipError(f"{spec} has {len(examples)} training examples, not more than the {holdout} "
                                 "held out for calibration; lower --holdout or add data")
        held.append(examples[:holdout])
        train.append(examples[holdout:][:limit])
    return mix_examples(held, seed), mix_examples(train, seed)


def _load(model: str, out: Path, resume: bool, seed: int, dtype: str, device: str | None) -> FirstSkipModel:
    """The base model, or the run so far when resuming after a finished phase."""
    if device is None:
        device = str(process_state().device)  # under `accelerate launch`, this process's device
    if not (resume and (out / artifacts.CONFIG_NAME).is_file()):
        torch.manual_seed(seed)  # the routers' first layers are drawn at random
        return FirstSkipModel.from_base(model, dtype=dtype, device=device)
    config = artifacts.load_config(out)
    if config.base_model != model_reference(model):
        raise FirstSkipError(f"{out} was trained on {config.base_model}, not {model}; pass --model {config.base_model}")
    return FirstSkipModel.from_pretrained(out, dtype=dtype, device=device)
