"""The engine settings FiRST needs, applied while vLLM builds its config and checked again in the worker.

- Eager mode: a step's skipped layers depend on the requests in it, so the forward branches in Python;
  torch.compile (CPU) or CUDA graphs (GPU) would record one path. Eager mode gives up vLLM's compiled
  and graph-captured steps (docs/vllm.md says what that costs).
- Prefix caching off: a cached prompt prefix is never run again, so its tokens would never reach the
  routers and a request's skip set would depend on what an earlier request left in the cache.
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

from firstskip_vllm.settings import Settings, SettingsError

logger = init_logger(__name__)


def check_engine(vllm_config: Any) -> None:
    """The engine settings FiRST needs; `FirstSkipEngineConfig` sets them, this catches a config it never saw."""
    from vllm.config import CompilationMode

    problems = []
    if vllm_config.compilation_config.mode != CompilationMode.NONE:
        problems.append("eager mode (--enforce-eager): skipping branches per request, which a compiled "
                        "graph would bake in")
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append("prefix caching off (--no-enable-prefix-caching): the routers must see every prompt token")
    if problems:
        raise SettingsError("FiRST models need " + " and ".join(problems))


class FirstSkipEngineConfig:
    """vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``): runs in the API process while the
    engine config is built, so the settings FiRST needs are applied before any worker starts."""

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        from firstskip_vllm import state

        model_config, cache_config = vllm_config.model_config, vllm_config.cache_config
        if vllm_config.speculative_config is not None:
            raise SettingsError("FiRST models do not support speculative decoding (its logits processors are off)")
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise SettingsError("FiRST models do not support pipeline parallelism yet (a budget decision needs "
                                "every layer's router); use tensor parallelism")
        settings = Settings.from_hf_config(model_config.hf_config)
        state.NUM_LAYERS = settings.num_layers  # so a request's forced set is range-checked at the API
        if not model_config.enforce_eager:
            logger.warning("FiRST: enforce_eager set (per-request skipping needs eager mode; no torch.compile "
                           "or CUDA graphs)")
            model_config.enforce_eager = True
        if cache_config.enable_prefix_caching:
            logger.warning("FiRST: prefix caching off (cached prompt tokens would never reach the routers)")
            cache_config.enable_prefix_caching = False
