"""`FirstSkipModel`: a base model, its routers and tokenizer, shaped like transformers and peft.

``FirstSkipModel.from_base("smollm2-135m")`` starts an untrained FiRST model (routers say keep
everything, so it behaves as the base); ``save_pretrained`` / ``from_pretrained`` move it through
a run folder; ``generate`` and ``stream`` take text and return text plus each prompt's skip set.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from firstskip import artifacts
from firstskip.config import FirstSkipConfig
from firstskip.data import encode_prompt, template_span
from firstskip.engine import Engine, Generation, Sampling, StopFn, Stream
from firstskip.errors import FirstSkipError
from firstskip.families import decoder_layers
from firstskip.models import load_model, model_reference, torch_dtype
from firstskip.quantize import WEIGHT_FORMATS, quantize
from firstskip.routers import RouterBank


class FirstSkipModel:
    """A Hugging Face causal LM with one router per decoder layer."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: FirstSkipConfig,
                 routers: RouterBank | None = None) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.routers = (routers or RouterBank(config)).to(next(model.parameters()).device)
        self._engine: Engine | None = None

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_base(cls, name: str, dtype: str | torch.dtype = "float32", device: str = "cpu",
                  **config: Any) -> FirstSkipModel:
        """A new FiRST model on a base (hub id, folder, packaged name or ``random:<preset>``)."""
        model, tokenizer = load_model(name, dtype=_load_dtype(dtype), device=device)
        fsm = cls.wrap(model, tokenizer, base_model=model_reference(name), **config)
        fsm.model = to_format(fsm.model, dtype)  # after the fingerprint, which reads float weights
        return fsm

    @classmethod
    def wrap(cls, model: torch.nn.Module, tokenizer: Any = None, **config: Any) -> FirstSkipModel:
        """A new FiRST model on an already loaded base model.

        With a chat tokenizer, the routers' mean leaves out the template's fixed tokens
        (``template_tokens``, see `RouterBank.keep_probability`) unless ``config`` says otherwise.
        """
        if tokenizer is not None and "template_tokens" not in config:
            config["template_tokens"] = template_span(tokenizer)
        cfg = FirstSkipConfig(num_layers=len(decoder_layers(model)), hidden_size=model.config.hidden_size,
                              fingerprint=artifacts.fingerprint(model), **config)
        return cls(model, tokenizer, cfg)

    @classmethod
    def from_pretrained(cls, run_dir: str | os.PathLike, model: torch.nn.Module | None = None,
                        tokenizer: Any = None, dtype: str | torch.dtype = "float32", device: str = "cpu",
                        merge_adapter: bool = True, adapter: bool = True) -> FirstSkipModel:
        """Load a run folder; its base is loaded from the reference it stores unless given.

        ``adapter=False`` puts the routers on the plain base model, without the run's LoRA (the
        router-only ablation). A merged run records only the merged weights' fingerprint, so then
        the base it names is loaded unchecked.
        """
        config = artifacts.load_config(run_dir)
        # 4-bit weights keep the base's own grid (the packaged Q4_1 weights exactly) and the LoRA runs
        # beside them: rounding merged weights to 4 bits rounds most of the adapter's change away.
        beside = model is None and dtype == "int4" and adapter and config.lora is not None
        if beside and not (Path(run_dir) / artifacts.ADAPTER_DIR).is_dir():
            raise FirstSkipError(f"int4 runs the LoRA beside the 4-bit weights, and {run_dir} keeps no "
                                 f"{artifacts.ADAPTER_DIR}/ folder; use --dtype int8")
        from_merged = adapter and config.merged and not beside
        cast = None
        if model is None:
            # The base is loaded as the run was trained on it (float32), so its fingerprint can be
            # checked and the adapter merged at full precision, then cast to the format asked for.
            model, tokenizer = load_model(_base_path(run_dir, config, from_merged), dtype="float32", device=device)
            cast = dtype
        if cast == "int8" and adapter and not merge_adapter:
            raise FirstSkipError("int8 weights need the adapter merged first (leave merge_adapter on)")
        if from_merged or not config.merged:  # a merged run's fingerprint is of the merged weights
            artifacts.check_fingerprint(config.fingerprint, model, run_dir)
        if adapter and not from_merged:
            model = _with_adapter(model, Path(run_dir), config, merge_adapter and not beside)
        if cast is not None:
            model = to_format(model, cast)
        routers = RouterBank(config)
        routers.load_state_dict(artifacts.load_routers(run_dir))
        return cls(model, tokenizer, config, routers)

    def save_pretrained(self, run_dir: str | os.PathLike) -> None:
        artifacts.save_run(run_dir, self.config, self.routers)

    # -- inference -------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self.model.eval()
            self.routers.eval()
            pad = getattr(self.tokenizer, "pad_token_id", None) or 0
            self._engine = Engine(self.model, self.config, self.routers, pad_token_id=pad)
        return self._engine

    def set_decision(self, threshold: float | None = None, budget: float | None = None,
                     prefill: str | None = None) -> None:
        """Change how skip sets are chosen at inference, without retraining."""
        changes: dict[str, Any] = {"threshold": threshold, "prefill": prefill}
        if budget is not None:
            changes.update(decision="budget", skip_ratio=budget)
        elif threshold is not None:
            changes["decision"] = "threshold"
        self.update_config(**changes)

    def update_config(self, **changes: Any) -> None:
        """Change config fields (checked again; ``None`` values are ignored), engine included."""
        self.config = self.config.replace(**changes)
        if self._engine is not None:
            self._engine.config = self._engine.controller.config = self.config

    def encode(self, prompt: str, raw: bool = False) -> list[int]:
        """Token ids for a prompt: the chat template for instruct models unless ``raw``."""
        if not prompt.strip():
            raise FirstSkipError("empty prompt: give some text with --prompt or on standard input")
        if self.tokenizer is None:
            raise FirstSkipError("this model has no tokenizer (random models take token ids, not text)")
        return encode_prompt(self.tokenizer, prompt, chat=False if raw else None)

    def generate(self, prompts: str | Sequence[str], sampling: Sampling | None = None, raw: bool = False,
                 skip: Sequence[int] | None = None, stop: Sequence[str] = ()) -> list[Generation]:
        """Generate for one prompt or a batch; each result carries its text and skip set."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [self.encode(p, raw) for p in prompts]
        gens = self.engine.generate(ids, sampling, None if skip is None else [list(skip)] * len(ids),
                                    self.eos_token_ids, self._stop_fn(stop))
        for gen in gens:
            gen.text = self.decode(gen.token_ids, stop)
        return gens

    def stream(self, prompt: str, sampling: Sampling | None = None, raw: bool = False,
               skip: Sequence[int] | None = None, stop: Sequence[str] = ()) -> Stream:
        return self.engine.stream(self.encode(prompt, raw), sampling, skip, self.eos_token_ids, self._stop_fn(stop))

    @property
    def eos_token_ids(self) -> list[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        return ids + ([tok_eos] if tok_eos is not None and tok_eos not in ids else [])

    def decode(self, ids: Sequence[int], stop: Sequence[str] = ()) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        for s in stop:
            text = text.split(s)[0]
        return text

    def _stop_fn(self, stop: Sequence[str]) -> StopFn | None:
        if not stop:
            return None
        longest = max(len(s) for s in stop)

        def hit(ids: list[int]) -> bool:
            # Only the tail can hold a new stop string; decoding it keeps the check cheap.
            tail = self.tokenizer.decode(ids[-(longest + 8):], skip_special_tokens=True)
            return any(s in tail for s in stop)

        return hit


def _load_dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    """The dtype a model is loaded in before `to_format`: int8 starts from float32."""
    return "float32" if dtype in WEIGHT_FORMATS else dtype


def to_format(model: torch.nn.Module, dtype: str | torch.dtype) -> torch.nn.Module:
    """Cast a float32 model to ``dtype``, or quantize its linear layers (``int8``, ``int4``)."""
    if dtype in WEIGHT_FORMATS:
        return quantize(model, dtype)
    cast = torch_dtype(dtype)
    return model if cast == torch.float32 else model.to(cast)


def _base_path(run_dir: str | os.PathLike, config: FirstSkipConfig, merged: bool) -> str:
    if merged:
        return str(Path(run_dir) / artifacts.MERGED_DIR)
    if not config.base_model:
        raise FirstSkipError(f"run {run_dir} does not record its base model; pass model= to from_pretrained")
    return config.base_model


@contextmanager
def peft_quietly() -> Iterator[None]:
    """peft 0.21 reads transformers' deprecated ``is_gradient_checkpointing``, which warns from
    transformers 5.24 on: a warning about neither the user's code nor ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def _with_adapter(model: torch.nn.Module, run_dir: Path, config: FirstSkipConfig, merge: bool) -> torch.nn.Module:
    """Put the run's LoRA adapter on the base; merged, since an unmerged adapter slows decoding."""
    adapter = run_dir / artifacts.ADAPTER_DIR
    if config.lora is None or not adapter.is_dir():  # config.json says if it is part of the run
        return model
    from peft import PeftModel

    with peft_quietly():
        peft_model = PeftModel.from_pretrained(model, adapter)
    return peft_model.merge_and_unload() if merge else peft_model
