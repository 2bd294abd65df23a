"""LoftQ: quantization-aware LoRA init on an unquantized base (``init_lora_weights="loftq"``).

LoftQ looks for a quantized ``Q`` and a rank-``r`` ``B A`` with ``Q + B A`` close to ``W`` by
alternating two steps ``loftq_iter`` times: quantize what the low-rank part does not explain
(``Q = deq(quant(W - B A))``), then fit the low-rank part to what the quantization lost (the
top-``r`` SVD of ``W - Q``). The base weight is replaced by ``Q`` (kept dequantized, in the
base's dtype); quantize the saved base with the same scheme to train on a really quantized one.

The quantizers are written here in plain torch, no bitsandbytes: NF4 with one absmax scale per
block of 64 consecutive values (bitsandbytes' ``nf4`` code book and layout), and int8 with one
absmax scale per output row (bitsandbytes' vector-wise int8). Both are deterministic, and a
dequantized weight is a fixed point of its quantizer, so running the init again on a model whose
base already holds ``Q`` gives ``Q`` back.

One deliberate difference from the reference library: there, ``B A`` fits ``W - Q`` while the
layer adds ``scaling * B A``, so the init only helps when ``lora_alpha == r``. Here the factors
are divided by ``sqrt(scaling)`` so that ``Q + scaling * B A`` fits ``W`` for any alpha; with
``scaling == 1`` the factors are the reference's.
"""

from __future__ import annotations

import math

import torch
from peft_core.errors import ConfigError

from peft_lora.init import base_weight_as_out_in
from peft_lora.init_configs import LoftQConfig

__all__ = ["NF4_CODE", "loftq_init", "quantize_dequantize", "replace_lora_weights_loftq"]

NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
"""The 16 NormalFloat-4 levels (quantiles of a standard normal, scaled to [-1, 1], with an exact 0)."""

_NF4_BLOCK = 64


def _nf4_round_trip(weight: torch.Tensor, block_size: int = _NF4_BLOCK) -> torch.Tensor:
    flat = weight.reshape(-1)
    padding = (-flat.numel()) % block_size
    blocks = torch.nn.functional.pad(flat, (0, padding)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    code = NF4_CODE.to(weight.device)
    # The nearest level is found through the midpoints between levels (what a lookup does).
    midpoints = (code[1:] + code[:-1]) / 2
    index = torch.bucketize(blocks / scale, midpoints)
    dequantized = code[index] * absmax
    return dequantized.reshape(-1)[: flat.numel()].view_as(weight)


def _int8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    absmax = weight.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax)) / 127
    return torch.round(weight / scale).clamp_(-127, 127) * scale


def quantize_dequantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` (2-d, float32) quantized to ``bits`` (4: NF4, 8: int8) and back to float32."""
    if weight.dim() != 2:
        raise ValueError(f"LoftQ quantizes 2-d weights, got shape {tuple(weight.shape)}.")
    if bits == 4:
        return _nf4_round_trip(weight)
    if bits == 8:
        return _int8_round_trip(weight)
    raise ConfigError(f"LoftQ supports loftq_bits=4 (NF4) or 8 (int8), got {bits!r}.")


def _top_r_factors(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with ``L @ R`` the best rank-``r`` approximation of ``matrix`` (sqrt(S) on each side)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root.unsqueeze(1) * Vh[:r]


@torch.no_grad()
def loftq_init(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    base_weight: torch.Tensor,
    *,
    r: int,
    scaling: float,
    fan_in_fan_out: bool,
    options: LoftQConfig,
) -> None:
    """Write the LoftQ factors into ``lora_A``/``lora_B`` and ``Q`` into ``base_weight`` (in place)."""
    weight = base_weight_as_out_in(
        base_weight,
        fan_in_fan_out,
        "loftq",
        "LoftQ quantizes the unquantized weight itself. For a model already quantized with bitsandbytes, "
        "initialise the LoRA weights with replace_lora_weights_loftq instead.",
    )
    if r > min(weight.shape):
        raise ConfigError(
            f"init_lora_weights='loftq' fits a rank-r part of a weight of shape {tuple(weight.shape)}, so r must be at "
            f"most {min(weight.shape)}; got r={r}. Lower r (or set rank_pattern for this module)."
        )
    low_rank = torch.zeros_like(weight)
    for _ in range(options.loftq_iter):
        quantized = quantize_dequantize(weight - low_rank, options.loftq_bits)
        left, right = _top_r_factors(weight - quantized, r)
        low_rank = left @ right
    root = math.sqrt(scaling)
    lora_A.data = (right / root).to(lora_A.dtype).contiguous()
    lora_B.data = (left / root).to(lora_B.dtype).contiguous()
    quantized = quantized.T if fan_in_fan_out else quantized
    base_weight.data = quantized.to(base_weight.dtype).contiguous()


def _original_weights(peft_model, model_path: str | None):
    """A ``name -> tensor`` reader over the base model's unquantized safetensors files (read lazily)."""
    from pathlib import Path

    from safetensors import safe_open

    if model_path is None:
        name = getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", None)
        if not name:
            raise ValueError(
                "replace_lora_weights_loftq needs the unquantized weights: pass model_path, the directory (or "
                ".safetensors file) the base model was loaded from."
            )
        if Path(name).exists():
            model_path = name
        else:
            from huggingface_hub import snapshot_download

            model_path = snapshot_download(name, local_files_only=True, allow_patterns=["*.safetensors"])
    path = Path(model_path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"No .safetensors file under {str(path)!r}; replace_lora_weights_loftq reads the float weights there."
        )
    where = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))

    def read(key: str) -> torch.Tensor:
        for candidate in (key, key.removeprefix("model."), f"model.{key}"):
            if candidate in where:
                with safe_open(str(where[candidate]), framework="pt") as handle:
                    return handle.get_tensor(candidate)
        raise KeyError(f"{key!r} is not in the safetensors files under {str(path)!r}.")

    return read


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model, model_path: str | None = None, adapter_name: str = "default", callback=None
):
    """LoftQ (one step) for LoRA layers on an already-quantized base, of any quantization backend.

    For each LoRA layer whose base a registered quantization backend handles, the factors are set
    to the top-``r`` SVD of ``W - deq(Q)``, the part of the float weight ``W`` (read from the base
    model's safetensors files, ``model_path``) that quantization lost; divided by ``sqrt(scaling)``
    so that ``deq(Q) + scaling * B A`` fits ``W`` (the reference fits it only for ``lora_alpha == r``).
    ``callback(model, module_name) -> bool`` may reject a replacement, which is then undone.
    """
    from peft_core.quantization import backend_for

    from peft_lora.layer import LoraLayer

    read = _original_weights(peft_model, model_path)
    replaced = 0
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        base = module.get_base_layer()
        backend = backend_for(base)
        if backend is None:
            continue
        key = name.removeprefix(prefix)
        weight = read(key + ".weight").to(torch.float32)
        residual = weight.to(base.weight.device) - backend.dequantize(base).float()
        left, right = _top_r_factors(residual, module.r[adapter_name])
        root = math.sqrt(module.scaling[adapter_name])
        lora_A, lora_B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        before = (lora_A.data, lora_B.data)
        lora_A.data = (right / root).to(lora_A.dtype).contiguous()
        lora_B.data = (left / root).to(lora_B.dtype).contiguous()
        if callback is not None and not callback(peft_model, key):
            lora_A.data, lora_B.data = before
        replaced += 1
    if not replaced:
        raise ValueError(
            "replace_lora_weights_loftq found no LoRA layer on a quantized base layer; load the base quantized "
            "(e.g. 4-bit with bitsandbytes and the peft-bnb plugin) before adding LoRA."
        )
