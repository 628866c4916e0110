"""Int8 weights for CPU decoding, on torch's own weight-only int8 kernel.

CPU decode is bound by the bytes of weights read per token; int8 reads a quarter of float32's. Each
``nn.Linear`` of the decoder layers and the LM head becomes an `Int8Linear`: weights quantized once
per output channel (symmetric int8, scales from the float32 weights), activations and everything
else in bfloat16. A decode step's product is ``torch._weight_int8pack_mm`` (the int8 weights are
read as they are; about three times faster than a bfloat16 product at one row). Its time grows
with the rows, so a call with many rows (a prompt) multiplies by the dequantized bfloat16 weights.
Activations are never quantized: int8 products with dynamically quantized activations
(``quantized::linear_dynamic``) lost about 6% of SAMSum's ROUGE-L on a trained run, since the
inputs of ``down_proj`` carry outliers a single 8-bit range cannot hold.

Embeddings, norms and attention run in bfloat16; the routers stay float32. A LoRA adapter must be
merged first, so quantizing keeps its effect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from firstskip.errors import FirstSkipError
from firstskip.families import decoder_layers

WEIGHT_FORMATS = ("int8",)
PACKED_ROWS = 16  # up to this many rows the int8 kernel is faster than dequantizing (measured on 2 cores)


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` int8 per output channel and ``x`` bfloat16."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        quantized = (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", quantized.contiguous())  # the kernel reads it row-major
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if rows.shape[0] <= PACKED_ROWS:
            out = torch._weight_int8pack_mm(rows.contiguous(), self.weight_int8, self.scales)
            out = out if self.bias is None else out + self.bias
        else:
            out = F.linear(rows, self.weight_int8.to(torch.bfloat16) * self.scales[:, None], self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of the decoder layers and the LM head with `Int8Linear`, in place,
    and cast the rest to bfloat16. A tied LM head gets its own int8 copy; the embedding table stays
    bfloat16 for lookups."""
    if next(model.parameters()).device.type != "cpu":
        raise FirstSkipError("int8 weights run on the CPU only (torch's int8 weight kernel); use --dtype bfloat16 on a GPU")
    if not hasattr(torch, "_weight_int8pack_mm"):
        raise FirstSkipError("this torch build has no int8 weight kernel (torch._weight_int8pack_mm); use --dtype bfloat16")
    for layer in decoder_layers(model):
        _swap_linears(layer)
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        model.set_output_embeddings(Int8Linear(head))
    return model.to(torch.bfloat16)  # what is left in float: embeddings, norms, biases


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
