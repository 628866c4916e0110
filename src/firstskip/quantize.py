"""Int8 and int4 weights for CPU decoding, on torch's own weight-only kernels.

CPU decode is bound by the bytes of weights read per token; int8 reads a quarter of float32's, int4
an eighth. Each ``nn.Linear`` of the decoder layers and the LM head becomes a `QuantLinear`, and
everything else (embeddings, norms, attention, activations) runs in bfloat16:

- ``int8``: symmetric int8 per output channel; a decode step's product is
  ``torch._weight_int8pack_mm``.
- ``int4``: the decoder layers' linear layers in asymmetric 4-bit per group of 32 inputs (a scale
  and a zero per group, the layout of GGUF's Q4_1 blocks, so the packaged models' Q4_1 weights fit
  it); a decode step's product is ``torch._weight_int4pack_mm_for_cpu`` on the packed weights. The
  LM head stays int8, as llama.cpp's 4-bit mixes keep the output matrix wider: 4 bits move the
  packaged model's head weights by 9% (its GGUF does not hold them on a 4-bit grid).

Both kernels are about three times faster than a bfloat16 product for one row, but their time grows
with the rows, so a call with many rows (a prompt) multiplies by the dequantized weights (int4
unpacks them from the kernel's own packed codes), in bfloat16 where the CPU multiplies it natively
and in float32 where it does not (`prompt_dtype`). Activations are never quantized: int8
products with dynamically quantized activations (``quantized::linear_dynamic``) lost about 6% of
SAMSum's ROUGE-L on a trained run, since the inputs of ``down_proj`` carry outliers a single 8-bit
range cannot hold. The routers stay float32.

For a decode step, the projections of a layer that read the same input (q, k, v; gate, up) can be
one product (`stacked`), a product's fixed cost being a large share of a small matrix's.

A run's LoRA adapter is merged before int8. Int4 keeps it beside the 4-bit weights instead, in
bfloat16 (``x A^T B^T`` added to each product): a LoRA moves a weight by far less than half a 4-bit
step, so rounding merged weights to 4 bits rounds most of the adapter's change away (on the default
recipe's run, every greedy output changed and SAMSum lost half its ROUGE-L).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from firstskip.errors import FirstSkipError
from firstskip.families import decoder_layers

WEIGHT_FORMATS = ("int8", "int4")
PACKED_ROWS = 16  # up to this many rows the packed kernels are faster than dequantizing (measured on 2 cores)
INT4_GROUP = 32


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` quantized and ``x`` bfloat16; subclasses hold the weights."""

    ROWS: tuple[str, ...] = ()  # the buffers that hold one output's weights per row, in output order

    def __init__(self, linear: nn.Linear, lora: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16),
                                                                  requires_grad=False)
        # An adapter kept beside the weights: A [r, in] and B^T [r, out], its scaling folded into B;
        # both lay the sums of a decode step's side path along contiguous memory
        a, b = (None, None) if lora is None else (lora[0].detach(), lora[1].detach().T)
        self.register_buffer("lora_a", None if a is None else a.to(torch.bfloat16).contiguous())
        self.register_buffer("lora_bt", None if b is None else b.to(torch.bfloat16).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        packed = rows.shape[0] <= PACKED_ROWS
        rows = rows.to(torch.bfloat16 if packed else prompt_dtype())
        out = self.packed_product(rows.contiguous()) if packed else self.dense_product(rows)
        out = out if self.bias is None else out + self.bias
        if self.lora_a is not None:
            out = out + self._lora(rows)
        return out.to(torch.bfloat16).reshape(*x.shape[:-1], self.out_features)

    def _lora(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows A^T B^T``. For a decode step's few rows as products and sums, which a compiled
        step fuses into its own kernels (two matrix products each would cost more than the 4-bit one)."""
        if rows.shape[0] > PACKED_ROWS:
            return (rows @ self.lora_a.T.to(rows.dtype)) @ self.lora_bt.to(rows.dtype)
        low = (rows[:, None, :] * self.lora_a).sum(-1)  # [n, r]
        return (low[:, :, None] * self.lora_bt).sum(1)  # [n, out]

    def packed_product(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_product(self, rows: torch.Tensor) -> torch.Tensor:
        """Many rows (a prompt): a product with the weights dequantized to the rows' dtype."""
        return F.linear(rows, self.dequantized(rows.dtype))

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        lora = "" if self.lora_a is None else f", LoRA r={self.lora_a.shape[0]} beside"
        return f"in_features={self.in_features}, out_features={self.out_features}, {type(self).__name__}{lora}"


class Int8Linear(QuantLinear):
    """Symmetric int8 per output channel."""

    ROWS = ("weight_int8", "scales")

    def __init__(self, linear: nn.Linear, lora: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__(linear, lora)
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        quantized = (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", quantized.contiguous())  # the kernel reads it row-major
        self.register_buffer("scales", scales.to(torch.bfloat16))

    def packed_product(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(rows, self.weight_int8, self.scales)

    def dense_product(self, rows: torch.Tensor) -> torch.Tensor:
        """The int8 weights in the rows' dtype (exact: integers up to 127), the scales applied to the
        product's outputs instead of to every weight: a pass over the weights less per prompt."""
        return F.linear(rows, self.weight_int8.to(rows.dtype)) * self.scales.to(rows.dtype)

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.scales[:, None].to(dtype)


class Int4Linear(QuantLinear):
    """Asymmetric 4-bit per group of `INT4_GROUP` inputs: ``w = (code - 8) * scale + zero``, the
    layout of torch's CPU int4 kernel."""

    ROWS = ("packed", "codes")  # packed in blocks of 64 outputs; ``scales_zeros`` is [groups, out, 2]

    def __init__(self, linear: nn.Linear, lora: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__(linear, lora)
        groups = linear.weight.detach().float().reshape(self.out_features, -1, INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-8)
        codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15)
        codes = codes.reshape(self.out_features, self.in_features).to(torch.int32)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(codes, 1))
        # A prompt's product dequantizes the packed codes; a layout not read back keeps its own copy
        unpacked = _unpack_int4(self.packed, self.out_features, self.in_features)
        self.register_buffer("codes", None if unpacked is not None and torch.equal(unpacked, codes.to(torch.uint8))
                             else codes.to(torch.uint8))
        zero = low + 8 * scale
        self.register_buffer("scales_zeros", torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous())

    def packed_product(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales_zeros)

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        scale, zero = self.scales_zeros.to(dtype).unbind(-1)  # [groups, out] each
        codes = self.codes if self.codes is not None else _unpack_int4(self.packed, self.out_features, self.in_features)
        codes = codes.to(dtype).reshape(self.out_features, -1, INT4_GROUP) - 8
        return (codes * scale.t()[..., None] + zero.t()[..., None]).reshape(self.out_features, self.in_features)


def stacked(parts: Sequence[nn.Module]) -> QuantLinear | None:
    """One module whose output is the parts' outputs side by side (``[q | k | v]``), for a decode
    step, where a product's fixed cost is a large share of a small matrix's. The parts' weights
    become views of the stacked ones, so nothing is stored twice and the parts still serve prompts.
    None where the parts do not stack: not all of one quantized kind with the same inputs, or int4
    outputs not in whole blocks of 64 (the packed layout)."""
    kind, first = type(parts[0]), parts[0]
    if (not issubclass(kind, QuantLinear) or any(type(p) is not kind or p.in_features != first.in_features
                                                  or (p.bias is None) != (first.bias is None) for p in parts)
            or (kind is Int4Linear and any(p.out_features % 64 for p in parts))):
        return None
    whole = kind.__new__(kind)
    out = sum(p.out_features for p in parts)
    QuantLinear.__init__(whole, nn.Linear(first.in_features, out, bias=first.bias is not None, device="meta"),
                         _stacked_lora(parts))
    if first.bias is not None:
        whole.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    for name in kind.ROWS:
        if getattr(first, name) is not None:
            whole.register_buffer(name, torch.cat([getattr(p, name) for p in parts]))
    if kind is Int4Linear:
        whole.register_buffer("scales_zeros", torch.cat([p.scales_zeros for p in parts], 1))
    start = 0
    for p in parts:  # each part's rows, read from the stacked tensors
        rows = slice(start, start + p.out_features)
        for name in (*kind.ROWS, "bias"):
            if getattr(p, name) is not None:
                tensor = getattr(whole, name)[rows]
                setattr(p, name, nn.Parameter(tensor, requires_grad=False) if name == "bias" else tensor)
        start = rows.stop
    return whole


def _stacked_lora(parts: Sequence[QuantLinear]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The parts' adapters as one: their A stacked, their B block-diagonal (a part without one adds
    nothing), as ``(A, B)``."""
    if all(p.lora_a is None for p in parts):
        return None
    ranks = [0 if p.lora_a is None else p.lora_a.shape[0] for p in parts]
    a = torch.cat([p.lora_a for p in parts if p.lora_a is not None])
    b = torch.zeros(sum(p.out_features for p in parts), sum(ranks), dtype=a.dtype)
    row = col = 0
    for p, rank in zip(parts, ranks):
        if rank:
            b[row:row + p.out_features, col:col + rank] = p.lora_bt.T
        row, col = row + p.out_features, col + rank
    return a, b


def _unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor | None:
    """The [n, k] codes of torch's CPU int4 layout, None where n is not whole blocks of it."""
    block = _int4_block()
    return None if block is None or n % block else _unpack_blocks(packed, n, k, block)


def _unpack_blocks(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """Blocks of ``block`` outputs; per pair of inputs, a byte holds outputs j and j + block / 2."""
    half = block // 2
    grouped = packed.view(n // block, k // 2, block)
    low, high = grouped & 15, grouped >> 4
    even = torch.cat([low[..., :half], high[..., :half]], -1)  # input 2i, the block's outputs
    odd = torch.cat([low[..., half:], high[..., half:]], -1)  # input 2i + 1
    return torch.stack([even, odd], 2).reshape(n // block, k, block).permute(0, 2, 1).reshape(n, k)


@functools.cache
def _int4_block() -> int | None:
    """Outputs per block of the int4 layout on this CPU (64 with AVX-512, 32 with AVX2), read off a
    packed probe; None where neither reads it back."""
    probe = torch.randint(0, 16, (64, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    return next((b for b in (64, 32) if torch.equal(_unpack_blocks(packed, 64, 64, b).to(torch.int32), probe)), None)


@functools.cache
def prompt_dtype() -> torch.dtype:
    """The dtype of a prompt's products: bfloat16 where oneDNN multiplies it (AVX-512, AMX), else
    float32, since there torch falls back to a plain loop: on an AVX2 CPU a bfloat16 prompt product
    ran at a seventh of float32's speed. Decode steps stay bfloat16 everywhere: the packed kernels
    have no vectorized float32 path."""
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def default_format(device: str | torch.device = "cpu") -> str:
    """The CLI's weight format when none is given: the fastest that passed the quality check
    (benchmarks/README.md, "int8 weights" and "int4 weights"). On a CPU that is int8: a trained run
    decodes as fast in int8 with its LoRA merged as in int4 with the LoRA beside, and starts sooner.
    The packed kernels are CPU ones, so a GPU gets bfloat16."""
    return "int8" if torch.device(device).type == "cpu" else "bfloat16"


def quantize(model: nn.Module, fmt: str) -> nn.Module:
    """Replace every ``nn.Linear`` of the decoder layers with ``fmt``'s `QuantLinear` and the LM head
    with an int8 one, in place, and cast the rest to bfloat16. A tied LM head gets its own
    quantized copy; the embedding table stays bfloat16 for lookups. A layer whose shape does not
    fit the int4 kernel's tiles (inputs in groups of 32, outputs a multiple of 16) gets int8."""
    if next(model.parameters()).device.type != "cpu":
        raise FirstSkipError(f"{fmt} weights run on the CPU only (torch's CPU kernels); use --dtype bfloat16 on a GPU")
    kernel = {"int8": "_weight_int8pack_mm", "int4": "_weight_int4pack_mm_for_cpu"}[fmt]
    if not hasattr(torch, kernel):
        raise FirstSkipError(f"this torch build has no {fmt} weight kernel (torch.{kernel}); use --dtype bfloat16")
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers become side paths
    for layer in decoder_layers(model):
        _swap_linears(layer, fmt)
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        model.set_output_embeddings(Int8Linear(head))
    return model.to(torch.bfloat16)  # what is left in float: embeddings, norms, biases


def weight_format(model: nn.Module) -> str:
    """``int8``, or the dtype of the model's float weights (``float32``, ``bfloat16`` ...)."""
    if any(isinstance(m, Int4Linear) for m in model.modules()):
        return "int4"
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return "int8"
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _quantized(linear: nn.Linear, fmt: str, lora: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantLinear:
    if fmt == "int4" and linear.in_features % INT4_GROUP == 0 and linear.out_features % 16 == 0:  # the kernel's tiles
        return Int4Linear(linear, lora)
    return Int8Linear(linear, lora)


def _swap_linears(module: nn.Module, fmt: str) -> None:
    for name, child in module.named_children():
        lora = None
        if hasattr(child, "lora_A") and hasattr(child, "base_layer"):  # a peft LoRA layer, not merged
            lora, child = _lora_factors(child), child.base_layer
        if isinstance(child, Conv1D):  # GPT-2's linear layers store the weight transposed
            child = _as_linear(child)
        if isinstance(child, nn.Linear):
            setattr(module, name, _quantized(child, fmt, lora))
        else:
            _swap_linears(child, fmt)


def _lora_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A peft LoRA layer's active adapter as ``(A, scaling * B)`` (None without one)."""
    names = [n for n in layer.active_adapters if n in layer.lora_A]
    if not names:
        return None
    if len(names) > 1 or layer.use_dora.get(names[0]):
        raise FirstSkipError("quantized weights take one plain LoRA adapter beside them")
    a, b = layer.lora_A[names[0]].weight, layer.lora_B[names[0]].weight  # x @ A^T @ B^T, Conv1D too
    return a.float(), b.float() * layer.scaling[names[0]]


def _as_linear(conv: Conv1D) -> nn.Linear:
    linear = nn.Linear(*conv.weight.shape, bias=conv.bias is not None)
    linear.weight.data = conv.weight.detach().t()
    if conv.bias is not None:
        linear.bias.data = conv.bias.detach()
    return linear
