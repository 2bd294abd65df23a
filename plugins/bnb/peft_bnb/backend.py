"""The two bitsandbytes layer kinds as peft-core quantization backends.

``Linear4bit`` (NF4/FP4, the QLoRA base) and ``Linear8bitLt`` (LLM.int8()) both subclass
``nn.Linear`` and run their own kernels in forward; what the core needs from them is a float
view of the weight and a way to store a merged one back, re-quantized with the layer's own
settings (quant type, block size, double quantization, storage dtype; int8 scales).

Recognising a layer needs no import: if bitsandbytes was never imported, no module can be one
of its classes, so a model without quantized layers never pays for importing it.
"""

from __future__ import annotations

import sys

import torch
from peft_core.quantization import QuantizationBackend
from torch import nn

__all__ = ["BNB_4BIT", "BNB_8BIT", "dequantize_4bit", "dequantize_8bit", "quantize_4bit", "quantize_8bit"]


def _bnb_class(name: str) -> type | None:
    modules = sys.modules.get("bitsandbytes.nn")
    return getattr(modules, name, None) if modules is not None else None


def _is(module: nn.Module, name: str) -> bool:
    cls = _bnb_class(name)
    return cls is not None and isinstance(module, cls)


# ---------------------------------------------------------------------- 4-bit
def _canonical_4bit(weight: torch.Tensor) -> tuple[torch.Tensor, object]:
    """``weight``'s 4-bit data and quant state in bitsandbytes' standard layout.

    On CPUs with AVX512-BF16, a ``Linear4bit`` run in eval mode without gradients repacks its
    weight in place into a CPU-only layout (``quant_state.packing_format_for_cpu``, with the
    block scales cast to bfloat16), which ``dequantize_4bit`` cannot read. This unpacks a copy,
    keeping those bfloat16 scales: the values the packed kernel computes with.
    """
    import copy

    import bitsandbytes as bnb

    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    packed_absmax = state.absmax
    state = copy.copy(state)  # the inverse rewrites the state's fields
    state.original_nested = False  # keep the scales as they are, not re-quantized
    data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
    # packing stored the scales as (blocks per row, rows); back to one per block, in order
    state.absmax = packed_absmax.T.contiguous().reshape(-1).float()
    return data, state


def prepare_4bit(module: nn.Module) -> None:
    """Keep ``module`` in the standard layout while adapters hold it.

    The AVX512-BF16 repacking (see :func:`_canonical_4bit`) happens at the layer's first
    inference forward; afterwards bitsandbytes raises on the next training forward, so a
    training run that evaluates in between (Trainer's eval loop) would crash, and the weights
    would differ from those the adapter was trained on. Adapted layers use the standard kernel.
    """
    import bitsandbytes as bnb

    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        data, state = _canonical_4bit(weight)
        settings = {
            k: getattr(weight, k) for k in ("quant_type", "blocksize", "compress_statistics", "quant_storage")
        }
        module.weight = bnb.nn.Params4bit(
            data, requires_grad=False, quant_state=state, bnb_quantized=True, module=module, **settings
        )
    module.support_avx512bf16_for_cpu = False


def dequantize_4bit(module: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb

    data, state = _canonical_4bit(module.weight)
    return bnb.functional.dequantize_4bit(data, state)


def requantize_4bit(module: nn.Module, weight: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = module.weight
    # The layer's own quantization settings; bitsandbytes quantizes when the data moves to a device.
    settings = {
        "quant_type": old.quant_type,
        "blocksize": old.blocksize,
        "compress_statistics": old.compress_statistics,
        "quant_storage": old.quant_storage,
        "module": module,
    }
    state = _canonical_4bit(old)[1] if old.quant_state is not None else None
    dtype = state.dtype if state is not None else weight.dtype
    fresh = bnb.nn.Params4bit(weight.to("cpu", dtype=dtype).contiguous(), requires_grad=False, **settings)
    module.weight = fresh.to(old.device)


def quantize_4bit(
    linear: nn.Linear, *, quant_type: str = "nf4", compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """A ``Linear4bit`` holding ``linear``'s weight (and a copy of its bias), on its device."""
    import bitsandbytes as bnb

    weight = linear.weight.detach()
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype or weight.dtype,
        quant_type=quant_type,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.to("cpu").clone(), requires_grad=False, quant_type=quant_type, module=layer
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(weight.device)


def _stored_absmax(quant_state) -> torch.Tensor:
    """The per-block scales as the layer stores them (8-bit themselves under double quantization)."""
    import bitsandbytes as bnb

    if getattr(quant_state, "nested", False):
        absmax = bnb.functional.dequantize_blockwise(quant_state.absmax, quant_state.state2)
        return absmax.float() + quant_state.offset
    return quant_state.absmax.float()


def error_bound_4bit(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Per element, for ``module`` holding ``weight`` quantized: half the widest gap of the 4-bit
    code times its block's scale, plus how far the stored scale is off the block's absmax.

    Each block of ``blocksize`` consecutive weights is divided by its scale and rounded to the
    nearest of 16 code values in [-1, 1]. The scale is the block's absmax, but under double
    quantization it is stored in 8 bits, so values are read back on a slightly stretched grid.
    """
    import bitsandbytes as bnb

    state = _canonical_4bit(module.weight)[1]
    code = torch.sort(bnb.functional.get_4bit_type(module.weight.quant_type, device="cpu").float()).values
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    flat = weight.detach().float().flatten().cpu()
    block = state.blocksize
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % block)).view(-1, block)
    absmax = padded.abs().amax(dim=1)
    stored = _stored_absmax(state).cpu().flatten()[: absmax.numel()]
    # Codes are picked with the exact absmax and read back with the stored one.
    per_block = half_gap * torch.maximum(stored, absmax) + (absmax - stored).abs() + 1e-6
    bound = per_block[:, None].expand(-1, block).flatten()[: flat.numel()]
    return bound.view_as(weight).to(weight.device)


# ---------------------------------------------------------------------- 8-bit
def _int8_scales(module: nn.Module) -> torch.Tensor:
    # After a forward, bitsandbytes moves the scales from the parameter into the layer's state.
    weight = module.weight
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    if scales is None:
        raise ValueError(f"{type(module).__name__} holds no int8 scales: its weight was never quantized.")
    return scales


def dequantize_8bit(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if weight.dtype != torch.int8:  # has_fp16_weights=True keeps a float weight
        return weight.data.clone()
    scales = _int8_scales(module).to(weight.device)
    return weight.data.float() * (scales.float().view(-1, 1) / 127.0)


def requantize_8bit(module: nn.Module, weight: torch.Tensor) -> None:
    import bitsandbytes as bnb

    old = module.weight
    fresh = bnb.nn.Int8Params(
        weight.to("cpu").contiguous(), requires_grad=False, has_fp16_weights=old.has_fp16_weights
    )
    module.weight = fresh.to(old.device)
    # The state caches the previous int8 matrix and scales; the next forward reads the new ones.
    module.state.CB = None
    module.state.SCB = None
    module.state.reset_grads()


def error_bound_8bit(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Per element: half an int8 step of its row (rows are scaled by their absmax to +-127), plus
    the float16 rounding bitsandbytes applies to the weight before quantizing it."""
    weight = weight.detach().float()
    absmax = weight.abs().amax(dim=1, keepdim=True)
    return absmax / 254.0 * 1.01 + weight.abs() * 2.0**-11 + 1e-7


def quantize_8bit(linear: nn.Linear) -> nn.Module:
    """A ``Linear8bitLt`` (int8 inference weights) holding ``linear``'s weight and bias."""
    import bitsandbytes as bnb

    weight = linear.weight.detach()
    layer = bnb.nn.Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        device="meta",
    )
    layer.weight = bnb.nn.Int8Params(weight.to("cpu").clone(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(weight.device)


BNB_4BIT = QuantizationBackend(
    name="bitsandbytes 4-bit",
    handles=lambda module: _is(module, "Linear4bit"),
    dequantize=dequantize_4bit,
    requantize=requantize_4bit,
    quantize_linear=quantize_4bit,
    weight_error_bound=error_bound_4bit,
    prepare=prepare_4bit,
)

BNB_8BIT = QuantizationBackend(
    name="bitsandbytes 8-bit",
    handles=lambda module: _is(module, "Linear8bitLt"),
    dequantize=dequantize_8bit,
    requantize=requantize_8bit,
    quantize_linear=quantize_8bit,
    weight_error_bound=error_bound_8bit,
)
