"""firstskip-vllm: serve a FiRST run (``firstskip export --format vllm``) with vLLM.

vLLM loads this through the ``vllm.general_plugins`` entry point in every process it starts;
`register` adds the FiRST architectures to vLLM's model registry (by name, imported lazily) and
their engine-config hook. The per-slot request table is kept by a logits processor that vLLM loads
through the ``vllm.logits_processors`` entry point (`state.FirstSkipBatchState`).
"""

from __future__ import annotations

ARCHITECTURES = ("FirstSkipLlamaForCausalLM", "FirstSkipMistralForCausalLM", "FirstSkipQwen2ForCausalLM",
                 "FirstSkipQwen3ForCausalLM")
SUPPORTED_VLLM = "0.32."


def register() -> None:
    """Register the FiRST architectures with vLLM (safe to call more than once)."""
    import vllm
    from vllm import ModelRegistry
    from vllm.logger import init_logger
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from firstskip_vllm.engine import FirstSkipEngineConfig

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        init_logger(__name__).warning("firstskip-vllm is tested with vLLM %sx, this is %s",
                                      SUPPORTED_VLLM, vllm.__version__)
    supported = set(ModelRegistry.get_supported_archs())
    for name in ARCHITECTURES:
        if name not in supported:
            ModelRegistry.register_model(name, f"firstskip_vllm.models:{name}")
        MODELS_CONFIG_MAP[name] = FirstSkipEngineConfig
