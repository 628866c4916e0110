"""Int8 weights for CPU decoding, on torch's own quantized kernels (fbgemm).

CPU decode is bound by the bytes of weights read per token; int8 reads a quarter of fp32's. Each
``nn.Linear`` of the decoder layers and the LM head becomes an `Int8Linear`: weights quantized once
per output channel (symmetric, int8), activations quantized per call (dynamic quantization), and
the product taken by ``quantized::linear_dynamic``, which packs the weights for the CPU's vector
units. Embeddings, norms and the routers stay in float32. A LoRA adapter must already be merged:
quantizing after merging keeps the adapter's effect in the int8 weights.

Activations are quantized over the whole call, so a row's result can differ slightly with what
else is in its batch (greedy outputs compared in `benchmarks/dtype_agreement.py`).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from firstskip.errors import FirstSkipError
from firstskip.families import decoder_layers

WEIGHT_FORMATS = ("int8",)


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` int8 per output channel, prepacked for fbgemm."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        zero = torch.zeros(weight.shape[0], dtype=torch.int64)
        with warnings.catch_warnings():  # torch plans to move quantized tensors out; `quantize_int8` checks for the kernel
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            qweight = torch.quantize_per_channel(weight, scales.double(), zero, 0, torch.qint8)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:  # one row (a decode step at batch 1) has a scale of its own
            out = torch.ops.quantized.linear_dynamic(x, self._packed, False)
        else:  # the kernel quantizes the whole call with one scale: give every row the same range
            scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-6)
            out = torch.ops.quantized.linear_dynamic(x / scale, self._packed, False) * scale
        return out if self.bias is None else out + self.bias

    def __deepcopy__(self, memo: dict[int, Any]) -> Int8Linear:
        """Copies share the packed weights (never written after packing), as `pruned_copy` shares
        a float model's parameters."""
        twin = copy.copy(self)
        twin._parameters = dict(self._parameters)  # the bias, shared as `pruned_copy` shares parameters
        return twin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of the decoder layers and the LM head with `Int8Linear`, in place.

    A tied LM head gets its own int8 copy; the embedding keeps the float32 table for lookups.
    """
    if next(model.parameters()).device.type != "cpu":
        raise FirstSkipError("int8 weights run on the CPU only (torch's fbgemm kernels); use --dtype bfloat16 on a GPU")
    if not hasattr(torch.ops.quantized, "linear_dynamic") or "fbgemm" not in torch.backends.quantized.supported_engines:
        raise FirstSkipError("this torch build has no fbgemm int8 kernels; use --dtype float32")
    torch.backends.quantized.engine = "fbgemm"
    for layer in decoder_layers(model):
        _swap_linears(layer)
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        model.set_output_embeddings(Int8Linear(head))
    return model


def weight_format(model: nn.Module) -> str:
    """``int8``, or the dtype of the model's float weights (``float32``, ``bfloat16`` ...)."""
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return "int8"
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _swap_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, Conv1D):  # GPT-2's linear layers store the weight transposed
            child = _as_linear(child)
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            _swap_linears(child)


def _as_linear(conv: Conv1D) -> nn.Linear:
    linear = nn.Linear(*conv.weight.shape, bias=conv.bias is not None)
    linear.weight.data = conv.weight.detach().t()
    if conv.bias is not None:
        linear.bias.data = conv.bias.detach()
    return linear
