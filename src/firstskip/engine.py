"""The generation engine: prefill decides each sequence's skip set, decode runs the kept layers only.

The engine works on token ids and skip sets; it never sees text, datasets or losses (the tokenizer
lives in `firstskip.modeling`). Its hot path is small on purpose: ``_step`` is one forward call of
the model with a fixed list of layers to run, with no router and no per-token Python decision, so
a static-cache / CUDA-graph path can replace it later without touching prefill or sampling.

A batch is prefilled and decoded together (left padding). A layer skipped by every row does not
run; a layer kept by only some rows runs for those rows alone; a row produces what it produces
alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from firstskip.config import FirstSkipConfig
from firstskip.errors import FirstSkipError
from firstskip.families import cache_kwargs
from firstskip.routers import RouterBank, decide
from firstskip.skipping import SkipCache, SkipController

StopFn = Callable[[list[int]], bool]  # generated ids of one row -> stop now?


@dataclass
class Sampling:
    """Decoding settings; temperature 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise FirstSkipError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise FirstSkipError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise FirstSkipError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise FirstSkipError(f"top_k must be at least 1, got {self.top_k}")


@dataclass
class Generation:
    """One sequence's result: generated ids (prompt excluded) and the layers it skipped."""

    token_ids: list[int]
    skipped_layers: list[int]
    keep_probs: list[float] | None
    prompt_tokens: int
    finish_reason: str = "length"  # "eos", "stop" or "length"
    text: str | None = None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Prefilled:
    """The state after prefill: next-token logits, the cache and each row's decisions."""

    logits: torch.Tensor  # [B, V]
    cache: SkipCache
    mask: torch.Tensor | None  # [B, P] attention mask, None when no row is padded
    positions: torch.Tensor  # [B] position id of each row's last prompt token
    skip: torch.Tensor  # [B, L] bool
    probs: torch.Tensor | None  # [B, L] keep-probabilities, None without routers
    prompt_lens: list[int] = field(default_factory=list)


class Engine:
    """Generates with per-sequence layer skipping on a Hugging Face causal LM."""

    def __init__(self, model: torch.nn.Module, config: FirstSkipConfig, routers: RouterBank | None = None,
                 pad_token_id: int = 0) -> None:
        self.model, self.config, self.routers = model, config, routers
        self.controller = SkipController(model, config, routers)
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device

    @contextmanager
    def routers_off(self) -> Iterator[None]:
        """Prefill as the plain model: routers neither run nor decide (forced skip sets, or none).

        Baselines and the full model are timed like this, so their time to first token carries no
        router cost that they would not pay in deployment.
        """
        routers, self.routers = self.routers, None
        self.controller.routers = None
        try:
            yield
        finally:
            self.routers = self.controller.routers = routers

    # -- prefill ---------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], skip: Sequence[Sequence[int]] | None = None) -> Prefilled:
        """Run the prompts, let routers (or a forced skip set per row) fix each row's skip set."""
        ids, mask = self._left_pad(prompts)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        forced = self.forced_skip(skip, len(prompts))
        cache = SkipCache(self.model.config)
        ctl = self.controller
        with ctl.mode_ctx("prefill", prompt_mask=mask, skip=forced):
            logits = self.model(input_ids=ids, attention_mask=None if mask.all() else mask,
                                position_ids=positions, **cache_kwargs(self.model, cache),
                                logits_to_keep=1).logits[:, -1]
            probs = torch.stack(ctl.probs, dim=-1) if self.routers is not None else None
            routed_skip = ctl.skip
        skip_mask = self._final_skip(forced, routed_skip, probs, len(prompts))
        return Prefilled(logits, cache, None if mask.all() else mask, positions[:, -1], skip_mask, probs,
                         [len(p) for p in prompts])

    def _final_skip(self, forced, routed_skip, probs, batch: int) -> torch.Tensor:
        if forced is not None:
            return forced
        if self.config.prefill == "routed" and routed_skip is not None:
            return routed_skip
        if probs is None:
            return torch.zeros(batch, self.config.num_layers, dtype=torch.bool, device=self.device)
        return decide(probs, self.config)

    def forced_skip(self, skip: Sequence[Sequence[int]] | None, batch: int) -> torch.Tensor | None:
        if skip is None:
            return None
        if len(skip) != batch:
            raise FirstSkipError(f"got {len(skip)} skip sets for {batch} prompts")
        out = torch.zeros(batch, self.config.num_layers, dtype=torch.bool, device=self.device)
        for row, layers in enumerate(skip):
            bad = [i for i in layers if not 0 <= i < self.config.num_layers]
            if bad:
                raise FirstSkipError(f"skip layers {bad} are outside 0..{self.config.num_layers - 1}")
            out[row, list(layers)] = True
        return out

    def _left_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise FirstSkipError("empty prompt: give at least one token")
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = max(len(p) for p in prompts)
        if limit is not None and longest >= limit:
            raise FirstSkipError(f"prompt of {longest} tokens does not fit the model's context of {limit}")
        ids = torch.full((len(prompts), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, longest - len(prompt):] = True
        return ids.to(self.device), mask.to(self.device)

    # -- decode ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling | None = None,
                 skip: Sequence[Sequence[int]] | None = None, eos_token_ids: Sequence[int] = (),
                 stop: StopFn | None = None) -> list[Generation]:
        """Generate for a batch of prompts; each row gets its own skip set."""
        return self.decode(self.prefill(prompts, skip), sampling, eos_token_ids, stop)

    def decode(self, pre: Prefilled, sampling: Sampling | None = None, eos_token_ids: Sequence[int] = (),
               stop: StopFn | None = None) -> list[Generation]:
        """Decode every row of a prefilled batch together, each row skipping its own layers."""
        gens = [self._new_generation(pre, row) for row in range(pre.skip.shape[0])]
        steps = self._decode_steps(pre, sampling or Sampling())
        for column in steps:
            if all([_finished(gen, token, eos_token_ids, stop) for gen, token in zip(gens, column)]):
                steps.close()
        return gens

    def stream(self, prompt: Sequence[int], sampling: Sampling | None = None, skip: Sequence[int] | None = None,
               eos_token_ids: Sequence[int] = (), stop: StopFn | None = None) -> Stream:
        """Iterate over one prompt's new token ids as they are produced."""
        pre = self.prefill([prompt], None if skip is None else [skip])
        return Stream(self, pre, sampling or Sampling(), eos_token_ids, stop)

    def _new_generation(self, pre: Prefilled, row: int) -> Generation:
        probs = None if pre.probs is None else [round(float(p), 6) for p in pre.probs[row]]
        skipped = pre.skip[row].nonzero().squeeze(-1).tolist()
        return Generation([], skipped, probs, pre.prompt_lens[row])

    @torch.inference_mode()
    def _decode_steps(self, pre: Prefilled, sampling: Sampling) -> Iterator[list[int]]:
        """Yield one column of new tokens per step."""
        cache, mask, positions, logits = pre.cache, pre.mask, pre.positions, pre.logits
        cache.freeze(set(pre.skip.all(dim=0).nonzero().squeeze(-1).tolist()))
        generator = _generator(sampling.seed, self.device)
        self.controller.set_decode(pre.skip)
        try:
            for step in range(sampling.max_new_tokens):
                tokens = sample(logits, sampling, generator)
                yield tokens.tolist()
                if step + 1 == sampling.max_new_tokens:
                    return
                positions = positions + 1
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
                logits = self._step(tokens, positions, mask, cache)
        finally:
            self.controller.mode = "off"

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
              cache: SkipCache) -> torch.Tensor:
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                         **cache_kwargs(self.model, cache), logits_to_keep=1)
        return out.logits[:, -1]


class Stream:
    """An iterator of new token ids for one prompt; ``result`` holds the Generation once done."""

    def __init__(self, engine: Engine, pre: Prefilled, sampling: Sampling, eos: Sequence[int],
                 stop: StopFn | None) -> None:
        self.result = engine._new_generation(pre, 0)
        self._steps = engine._decode_steps(pre, sampling)
        self._eos, self._stop = eos, stop

    @property
    def skipped_layers(self) -> list[int]:
        return self.result.skipped_layers

    def __iter__(self) -> Iterator[int]:
        for (token,) in self._steps:
            done = _finished(self.result, token, self._eos, self._stop)
            if self.result.finish_reason != "eos":
                yield token
            if done:
                self._steps.close()
                return


def _finished(gen: Generation, token: int, eos: Sequence[int], stop: StopFn | None) -> bool:
    """Append ``token`` to a running generation; True once it has ended. EOS is not kept."""
    if gen.finish_reason != "length":
        return True
    if token in eos:
        gen.finish_reason = "eos"
        return True
    gen.token_ids.append(token)
    if stop is not None and stop(gen.token_ids):
        gen.finish_reason = "stop"
        return True
    return False


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row: argmax when greedy, else temperature, top-k and top-p sampling."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= sampling.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
