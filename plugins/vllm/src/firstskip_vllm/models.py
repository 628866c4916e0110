"""FiRST versions of vLLM's Llama, Mistral, Qwen2 and Qwen3 models, by wrapping vLLM's classes.

Each class is vLLM's own model with three additions (`FirstSkipMixin`): one router per decoder layer
(``firstskip_routers.*``, loaded from the export by vLLM's normal weight loader), every decoder layer's
class swapped for a skippable subclass (`skipping.make_skippable`), and a forward that plans the
step before vLLM's forward runs and settles router scores after it. No model code is copied.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from firstskip_vllm.engine import check_engine
from firstskip_vllm.settings import Settings, SettingsError
from firstskip_vllm.skipping import Controller, make_routers, make_skippable

ROUTER_PREFIX = "firstskip_routers."


class FirstSkipMixin:
    """Routers, skippable layers and step planning on top of a vLLM ``*ForCausalLM``."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        check_engine(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        settings = Settings.from_hf_config(vllm_config.model_config.hf_config)
        self.firstskip_routers = make_routers(settings, next(self.parameters()).device)
        self.firstskip = Controller(settings, self.firstskip_routers)
        for index, layer in enumerate(self.model.layers):
            make_skippable(layer, index, self.firstskip)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.firstskip.begin(positions.shape[-1], positions.device)
        try:
            return super().forward(input_ids, positions, *args, **kwargs)
        finally:
            self.firstskip.end()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loader for the model's own weights; the routers' tensors by name."""
        routers: dict[str, torch.Tensor] = {}

        def model_weights() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.startswith(ROUTER_PREFIX):
                    routers[name.removeprefix(ROUTER_PREFIX)] = tensor
                else:
                    yield name, tensor

        loaded = set(super().load_weights(model_weights()))
        expected = set(self.firstskip_routers.state_dict())
        if set(routers) != expected:
            missing = sorted(expected - set(routers))[:3]
            raise SettingsError(f"the export's router tensors do not match its settings (missing e.g. {missing}); "
                                "re-export with `firstskip export --format vllm`")
        self.firstskip_routers.load_state_dict({k: v.float() for k, v in routers.items()})
        return loaded | {ROUTER_PREFIX + name for name in expected}


class FirstSkipLlamaForCausalLM(FirstSkipMixin, LlamaForCausalLM):
    """Llama (and Llama-layout models such as SmolLM2) with FiRST skipping."""


class FirstSkipMistralForCausalLM(FirstSkipMixin, MistralForCausalLM):
    """Mistral with FiRST skipping."""


class FirstSkipQwen2ForCausalLM(FirstSkipMixin, Qwen2ForCausalLM):
    """Qwen2 / Qwen2.5 with FiRST skipping."""


class FirstSkipQwen3ForCausalLM(FirstSkipMixin, Qwen3ForCausalLM):
    """Qwen3 with FiRST skipping."""


ARCHITECTURES = {cls.__name__: cls for cls in (FirstSkipLlamaForCausalLM, FirstSkipMistralForCausalLM,
                                               FirstSkipQwen2ForCausalLM, FirstSkipQwen3ForCausalLM)}
