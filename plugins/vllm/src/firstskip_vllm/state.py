"""Per-request FiRST state, and the table that says which request sits in which batch slot.

No request id reaches a vLLM model: a step's tokens are laid out by persistent-batch slot, and slots
move when requests finish, are preempted or are reordered. A logits processor is the supported hook
that sees every such change: vLLM calls its ``update_state(BatchUpdate)`` before each forward pass,
after all moves. `FirstSkipBatchState` mirrors those changes into `SLOTS` (slot -> `RequestState`),
which the model reads in the same worker process.

The state itself hangs on the request's own ``SamplingParams`` object (one per request in the worker,
kept while the request is preempted or left out of a step), so router sums, the decided skip set and
how much of the prompt was scored survive a request leaving the batch and coming back.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from firstskip_vllm.settings import Overrides, SettingsError, parse_overrides

_ATTR = "_firstskip_state"
SLOTS: dict[int, RequestState] = {}  # persistent-batch slot -> the request in it (this worker)
RECORDS: OrderedDict[str, dict[str, Any]] = OrderedDict()  # firstskip_record name -> its decision
MAX_RECORDS = 1024
EVENTS: Counter[str] = Counter()  # slot changes seen (added / removed / moved), for tests and debugging
NUM_LAYERS: int | None = None  # the served model's layer count, set while the engine config is built


@dataclass
class RequestState:
    """What FiRST keeps for one request between steps."""

    prompt_len: int
    overrides: Overrides
    skip: list[int] | None = None  # decided (or forced) skip set; None while the prompt is being scored
    skip_mask: torch.Tensor | None = None  # the same as a bool [L] tensor
    sums: torch.Tensor | None = None  # per-layer sum of pooled per-token keep probabilities so far
    count: int = 0  # pooled tokens so far
    scored_upto: int = 0  # prompt positions below this are in ``sums`` (a recomputed chunk is not counted twice)
    keep_probs: list[float] | None = field(default=None, repr=False)

    def set_skip(self, skip: list[int], num_layers: int, keep_probs: list[float] | None = None) -> None:
        self.skip = sorted(skip)
        self.skip_mask = torch.zeros(num_layers, dtype=torch.bool)
        self.skip_mask[self.skip] = True
        self.keep_probs = keep_probs
        if self.overrides.record is not None:
            RECORDS[self.overrides.record] = {"skip": self.skip, "keep_probs": keep_probs,
                                              "prompt_len": self.prompt_len}
            while len(RECORDS) > MAX_RECORDS:
                RECORDS.popitem(last=False)


def request_state(params: SamplingParams, prompt_ids: list[int] | None) -> RequestState:
    """The request's state, created on its first arrival in the batch and found again afterwards."""
    state = getattr(params, _ATTR, None)
    if state is None:
        if prompt_ids is None:
            raise SettingsError("FiRST needs prompt token ids (prompt embeddings are not supported)")
        state = RequestState(len(prompt_ids), parse_overrides(params.extra_args))
        setattr(params, _ATTR, state)  # SamplingParams keeps a __dict__ (msgspec dict=True)
    return state


class FirstSkipBatchState(LogitsProcessor):
    """Keeps `SLOTS` in step with vLLM's persistent batch; leaves the logits untouched.

    Installed through the ``vllm.logits_processors`` entry point, so it runs in every engine of the
    environment; for a model that is not a FiRST export the table is simply never read.
    """

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        parse_overrides(sampling_params.extra_args, NUM_LAYERS)  # a bad override is HTTP 400, not a failed step

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        SLOTS.clear()  # a new persistent batch starts empty

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update:
            EVENTS.update(added=len(batch_update.added), removed=len(batch_update.removed),
                          moved=len(batch_update.moved))
        process_dict_updates(SLOTS, batch_update, lambda params, prompt, _out: request_state(params, prompt))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
