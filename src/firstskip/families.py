"""The one table of per-architecture facts.

Everything firstskip needs to know about a model family lives in `FAMILIES`: where the decoder
layers sit, which attribute of a layer holds the attention module (it carries ``layer_idx``, which a
pruned copy must renumber), which linear layers LoRA targets, a tiny config for seeded random test
models, and which modules the engine's own decode loop calls around the layers (embedding, final
norm, rotary table or learned positions). Every family's layer takes the hidden states, a mask,
its position table and a cache by keyword and returns a tensor (the transformers 5 convention), so
no per-family calling code is needed; sliding windows and layer types come from transformers' own
per-layer config. Adding a family is one row.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from firstskip.errors import FirstSkipError

_LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj")
# Small enough to run in milliseconds, big enough to have protected and skippable layers,
# grouped-query attention and a vocabulary that holds byte-level test prompts.
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)


@dataclass(frozen=True)
class Family:
    layers: str  # dotted path from the *ForCausalLM module to the decoder-layer ModuleList
    attention: str  # attribute of one decoder layer that holds its attention module
    lora_targets: tuple[str, ...]
    tiny: dict[str, Any] = field(default_factory=dict)  # config kwargs of a tiny random model
    # What the engine's own decode loop (`decoding.py`) calls around the layers. The embedding
    # module applies any scale itself (Gemma's); ``rotary`` is None where positions are learned
    # (``learned_positions``); ``rotary_by_type``: the rotary module takes the layer type
    # (Gemma 3's local and global bases). ``layer_step="llama"``: the layer has Llama's layout and
    # decodes through `decoding.llama_layer`; "module" calls its own forward. ``own_decode=False``
    # decodes through the model's forward.
    embed: str = "model.embed_tokens"
    norm: str = "model.norm"
    rotary: str | None = "model.rotary_emb"
    learned_positions: str | None = None
    rotary_by_type: bool = False
    layer_step: str = "module"
    own_decode: bool = True


FAMILIES: dict[str, Family] = {
    "llama": Family("model.layers", "self_attn", _LLAMA_LORA + ("gate_proj", "up_proj", "down_proj"), _TINY,
                    layer_step="llama"),
    "mistral": Family("model.layers", "self_attn", _LLAMA_LORA, {**_TINY, "sliding_window": 8}, layer_step="llama"),
    "qwen2": Family("model.layers", "self_attn", _LLAMA_LORA, _TINY, layer_step="llama"),
    "qwen3": Family("model.layers", "self_attn", _LLAMA_LORA, {**_TINY, "head_dim": 16}, layer_step="llama"),
    "gemma2": Family("model.layers", "self_attn", _LLAMA_LORA,
                     {**_TINY, "head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16}),
    "gemma3_text": Family("model.layers", "self_attn", _LLAMA_LORA,
                          {**_TINY, "head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
                           "sliding_window_pattern": 2}, rotary_by_type=True),
    "phi3": Family("model.layers", "self_attn", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
                   {**_TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gpt2": Family("transformer.h", "attn", ("c_attn", "c_proj", "c_fc"),
                   dict(n_embd=64, n_layer=6, n_head=4, vocab_size=256, n_positions=512,
                        bos_token_id=1, eos_token_id=2),
                   embed="transformer.wte", norm="transformer.ln_f", rotary=None, learned_positions="transformer.wpe"),
}


def family_of(model_or_config: Any) -> Family:
    """The table row for a model (or its config), or a one-line error naming what is supported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise FirstSkipError(
            f"unsupported model type {model_type!r}; supported: {', '.join(sorted(FAMILIES))} "
            "(add a row to firstskip/families.py)"
        )
    return FAMILIES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a causal LM (or of the one a peft wrapper holds), wherever its family keeps it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_submodule(family_of(base).layers)


def set_decoder_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    parent, _, name = family_of(model).layers.rpartition(".")
    setattr(model.get_submodule(parent), name, layers)


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """The keywords that hand a model's forward its KV cache: transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name warns until 5.40 drops it); earlier 5.x and
    remote-code models take ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through a peft wrapper
    return {cache_keyword(type(base)): cache, "use_cache": True}


@functools.cache
def cache_keyword(module_class: type) -> str:
    """``cache`` or ``past_key_values``: what a model's or a decoder layer's forward calls its cache."""
    return "cache" if "cache" in inspect.signature(module_class.forward).parameters else "past_key_values"
