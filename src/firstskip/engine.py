"""The generation engine: prefill decides each sequence's skip set, decode runs the kept layers only.

The engine works on token ids and skip sets; it never sees text, datasets or losses (the tokenizer
lives in `firstskip.modeling`). Prefill is the model's own forward (left-padded), during which the
routers score the prompt; decoding is the engine's own loop (`decoding.py`): each request's kept
layers only, its KV in a slot of a pool, with no router and no per-token Python decision beyond
sampling and stop checks. Requests join and leave a running `Batch` between steps. A layer skipped
by every row does not run; a layer kept by some rows runs for those rows alone; a row produces what
it produces alone.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from firstskip.config import FirstSkipConfig
from firstskip.decoding import Batch, LayerStack, Request, StopFn
from firstskip.errors import FirstSkipError
from firstskip.families import cache_kwargs, family_of
from firstskip.routers import RouterBank, decide
from firstskip.skipping import SkipCache, SkipController


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
    """The state after prefill: next-token logits, the prompt's cache and each row's decisions."""

    logits: torch.Tensor  # [B, V]
    cache: DynamicCache | None  # None when ``parts`` hold the rows' caches
    mask: torch.Tensor | None  # [B, P] attention mask, None when no row is padded
    positions: torch.Tensor  # [B] position id of each row's last prompt token
    skip: torch.Tensor  # [B, L] bool
    probs: torch.Tensor | None  # [B, L] keep-probabilities, None without routers
    prompt_lens: list[int] = field(default_factory=list)
    parts: list[Prefilled] | None = None  # `early` prefill of a batch: each row's own prefill

    def kv(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Row ``row``'s prompt keys and values [kv_heads, P, head_dim] per layer it keeps, else None."""
        if self.parts is not None:
            return self.parts[row].kv(0)
        pad = max(self.prompt_lens) - self.prompt_lens[row]  # prompts are left-padded to the longest
        return [None if self.skip[row, i] else (layer.keys[row, :, pad:], layer.values[row, :, pad:])
                for i, layer in enumerate(self.cache.layers)]


class Engine:
    """Generates with per-sequence layer skipping on a Hugging Face causal LM.

    The engine holds only what all generations share (model, routers, default decision settings);
    each generation's state lives in its own `Prefilled`, `Batch` and `Request`, so any number of
    generations and streams may run on one engine, interleaved or in threads.
    """

    def __init__(self, model: torch.nn.Module, config: FirstSkipConfig, routers: RouterBank | None = None,
                 pad_token_id: int = 0) -> None:
        self.model, self.config, self.routers = model, config, routers
        self.controller = SkipController(model, config, routers)
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self.stack = LayerStack(model, self.controller.inner) if family_of(model).own_decode else None
        if self.stack is None:
            _notice(f"{model.config.model_type}: decoding through the model's own forward (slower; "
                    "no joining a running batch)")

    def compile(self) -> bool:
        """Compile the decode loop's layer steps now (tens of seconds, once per process): three
        short generations compile the three programs a batch ever needs (one row in a pool of one,
        several rows, and one row in a pool of several: a layer only one running request keeps),
        so no stream stalls on a compile later. Where that cannot be done, decoding stays eager
        with a one-line notice; returns which."""
        why = "this family decodes through the model's own forward" if self.stack is None else self.stack.compile()
        if why is not None:
            _notice(f"decoding eager: {why}")
            return False
        for skip in ([[]], [[], []], [[], [0]]):
            self.generate([[self.pad_token_id] * 4] * len(skip), Sampling(max_new_tokens=3), skip=skip)
        return True

    # -- prefill ---------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], skip: Sequence[Sequence[int]] | None = None,
                config: FirstSkipConfig | None = None, routers: bool = True) -> Prefilled:
        """Run the prompts, let routers (or a forced skip set per row) fix each row's skip set.

        ``config``: decision settings for these prompts only (default: the engine's).
        ``routers=False`` prefills as the plain model (forced skip sets, or none): baselines and the
        full model are timed so, carrying no router cost they would not pay in deployment.
        """
        config = config or self.config
        if skip is None and config.static_skip is not None:  # a static-set run: no router decides
            skip, routers = [config.static_skip] * len(prompts), False
        heads = [config.decision_tokens(len(p)) for p in prompts]
        if all(h == len(p) for h, p in zip(heads, prompts)):
            return self._prefill(prompts, skip, config, routers)
        if len(prompts) == 1:
            return self._prefill_early(prompts[0], heads[0], skip, config, routers)
        # `early` prefill: where rows split at different points, each row is prefilled alone, so a
        # row in a batch reads exactly the share of its prompt it reads alone
        return _stack([self.prefill([p], None if skip is None else [s], config, routers)
                       for p, s in zip(prompts, skip or [None] * len(prompts))])

    def _prefill(self, prompts: Sequence[Sequence[int]], skip: Sequence[Sequence[int]] | None,
                 config: FirstSkipConfig, routers: bool, cache: DynamicCache | None = None) -> Prefilled:
        ids, mask = self._left_pad(prompts)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        forced = self.forced_skip(skip, len(prompts))
        if cache is None:
            cache = DynamicCache() if self.stack is not None else SkipCache(self.model.config)
        use_routers = routers and self.routers is not None
        with self.controller.mode_ctx("prefill", prompt_mask=mask, skip=forced, config=config,
                                      routers=use_routers) as state:
            logits = self.model(input_ids=ids, attention_mask=None if mask.all() else mask,
                                position_ids=positions, **cache_kwargs(self.model, cache),
                                logits_to_keep=1).logits[:, -1]
        probs = state.stacked_probs()
        skip_mask = _final_skip(config, forced, state.skip, probs, len(prompts), self.device)
        return Prefilled(logits, cache, None if mask.all() else mask, positions[:, -1], skip_mask, probs,
                         [len(p) for p in prompts])

    def _prefill_early(self, prompt: Sequence[int], head: int, skip: Sequence[Sequence[int]] | None,
                       config: FirstSkipConfig, routers: bool) -> Prefilled:
        """`early` prefill of one prompt: its first ``head`` tokens run every layer while the routers
        score them and decide; the rest runs only the kept layers, as its generated tokens will."""
        # the engine's own loop reads every prompt position of a kept layer (`kv`): plain layers, as in
        # `_prefill`; the fallback loop goes on in this cache, with the model's sliding-window layers
        cache = SkipCache(self.model.config if self.stack is None else None)
        pre = self._prefill([prompt[:head]], skip, config.replace(prefill="full"), routers, cache)
        cache.freeze(set(pre.skip[0].nonzero().squeeze(-1).tolist()))
        ids = torch.tensor([list(prompt[head:])], dtype=torch.long, device=self.device)
        positions = torch.arange(head, len(prompt), device=self.device)[None]
        with self.controller.decode_ctx(pre.skip):
            logits = self.model(input_ids=ids, position_ids=positions, **cache_kwargs(self.model, cache),
                                logits_to_keep=1).logits[:, -1]
        return Prefilled(logits, cache, None, positions[:, -1], pre.skip, pre.probs, [len(prompt)])

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
               stop: StopFn | None = None, batch: Batch | None = None) -> list[Generation]:
        """Decode every row of a prefilled batch, each row skipping its own layers; a row leaves the
        batch as soon as it ends. ``batch``: run in this (empty) batch, e.g. to read its pool."""
        sampling = sampling or Sampling()
        if self.stack is None:
            return _forward_decode(self, pre, sampling, eos_token_ids, stop)
        batch = batch or self.new_batch(len(pre.prompt_lens), max(pre.prompt_lens) + sampling.max_new_tokens)
        requests = self.join(batch, pre, sampling, eos_token_ids, stop)
        while batch.requests:
            batch.step()
        return [r.generation for r in requests]

    def new_batch(self, capacity: int = 1, max_len: int = 0) -> Batch:
        """An empty running batch; ``capacity`` and ``max_len`` size its cache pool (it grows)."""
        if self.stack is None:
            raise FirstSkipError(f"{self.model.config.model_type} decodes through the model's forward, "
                                 "which cannot join requests into a running batch")
        return Batch(self.stack, self.config.num_layers, capacity, max_len)

    def join(self, batch: Batch, pre: Prefilled, sampling: Sampling | None = None,
             eos_token_ids: Sequence[int] = (), stop: StopFn | None = None) -> list[Request]:
        """Sample each prefilled row's first token and add the rows that go on to ``batch``."""
        sampling = sampling or Sampling()
        greedy = pre.logits.argmax(-1).tolist()
        requests = []
        for row in range(len(pre.prompt_lens)):
            gen = self._new_generation(pre, row)
            generator = _generator(sampling.seed, self.device)
            draw = functools.partial(_sample_one, sampling=sampling, generator=generator)
            first = greedy[row] if sampling.temperature == 0 else draw(pre.logits[row])
            finished = functools.partial(_finished, gen, eos=eos_token_ids, stop=stop)
            request = Request(gen, pre.prompt_lens[row], first, draw, finished, sampling.max_new_tokens - 1,
                              sampling.temperature == 0)
            requests.append(request)
            if finished(first) or request.budget == 0:
                request.done = True
            else:
                batch.join(request, pre.kv(row))
        return requests

    def stream(self, prompt: Sequence[int], sampling: Sampling | None = None, skip: Sequence[int] | None = None,
               eos_token_ids: Sequence[int] = (), stop: StopFn | None = None) -> Stream:
        """Iterate over one prompt's new token ids as they are produced."""
        pre = self.prefill([prompt], None if skip is None else [skip])
        return Stream(self, pre, sampling or Sampling(), eos_token_ids, stop)

    def _new_generation(self, pre: Prefilled, row: int) -> Generation:
        probs = None if pre.probs is None else [round(float(p), 6) for p in pre.probs[row]]
        skipped = pre.skip[row].nonzero().squeeze(-1).tolist()
        return Generation([], skipped, probs, pre.prompt_lens[row])


class Stream:
    """An iterator of new token ids for one prompt; ``result`` holds the Generation once done.

    It owns its batch (of one request) and steps it only when asked for the next token, so streams
    and other generations on the same engine can be interleaved freely.
    """

    def __init__(self, engine: Engine, pre: Prefilled, sampling: Sampling, eos: Sequence[int],
                 stop: StopFn | None) -> None:
        self._engine, self._pre, self._sampling, self._eos, self._stop = engine, pre, sampling, eos, stop
        self.result = engine._new_generation(pre, 0)

    @property
    def skipped_layers(self) -> list[int]:
        return self.result.skipped_layers

    def __iter__(self) -> Iterator[int]:
        if self._engine.stack is None:
            gens = _forward_decode(self._engine, self._pre, self._sampling, self._eos, self._stop)
            self.result = gens[0]
            yield from self.result.token_ids
            return
        batch = self._engine.new_batch(1, self._pre.prompt_lens[0] + self._sampling.max_new_tokens)
        (request,) = self._engine.join(batch, self._pre, self._sampling, self._eos, self._stop)
        self.result = request.generation
        sent = 0
        while True:
            yield from self.result.token_ids[sent:]
            sent = len(self.result.token_ids)
            if request.done:
                return
            batch.step()


def _stack(rows: list[Prefilled]) -> Prefilled:
    """Single-row prefills as one batch for the decode loop, which reads the rows' caches through `kv`."""
    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(r, name) for r in rows])

    probs = None if rows[0].probs is None else cat("probs")
    return Prefilled(cat("logits"), None, None, cat("positions"), cat("skip"), probs,
                     [r.prompt_lens[0] for r in rows], parts=rows)


def _final_skip(config: FirstSkipConfig, forced: torch.Tensor | None, routed: torch.Tensor | None,
                probs: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    if forced is not None:
        return forced
    if config.prefill == "routed" and routed is not None:
        return routed
    if probs is None:
        return torch.zeros(batch, config.num_layers, dtype=torch.bool, device=device)
    return decide(probs, config)


@torch.inference_mode()
def _forward_decode(engine: Engine, pre: Prefilled, sampling: Sampling, eos: Sequence[int],
                    stop: StopFn | None) -> list[Generation]:
    """The fallback decode loop of a family the engine's own loop does not run: every step is one
    call of the model's forward, the layers' skipping plan held by this call's own `Pass`."""
    if pre.cache is None:
        raise FirstSkipError(f"{engine.model.config.model_type} decodes through the model's forward, which cannot "
                             "decode a batch prefilled 'early'; give it one prompt at a time")
    gens = [engine._new_generation(pre, row) for row in range(pre.skip.shape[0])]
    cache, mask, positions, logits = pre.cache, pre.mask, pre.positions, pre.logits
    cache.freeze(set(pre.skip.all(dim=0).nonzero().squeeze(-1).tolist()))
    generator = _generator(sampling.seed, engine.device)
    with engine.controller.decode_ctx(pre.skip):
        for step in range(sampling.max_new_tokens):
            tokens = sample(logits, sampling, generator)
            if all([_finished(gen, token, eos, stop) for gen, token in zip(gens, tokens.tolist())]):
                break
            if step + 1 == sampling.max_new_tokens:
                break
            positions = positions + 1
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            logits = engine.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                                  **cache_kwargs(engine.model, cache), logits_to_keep=1).logits[:, -1]
    return gens


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


def _sample_one(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    return int(sample(logits[None], sampling, generator)[0])


@functools.cache
def _notice(message: str) -> None:
    print(f"firstskip: {message}", file=sys.stderr)


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
