"""Initialisations of LoRA factors that are derived from the base weight (PiSSA, OLoRA).

Both put the top-``r`` part of the base weight into ``B @ A`` and replace the base weight by the
residual ``W - scaling * B @ A``, so the adapted layer's output is unchanged right after
initialisation while training starts from the weight's principal directions.
"""

from __future__ import annotations

import re

import torch
from peft_core.errors import ConfigError

__all__ = ["base_weight_as_out_in", "olora_init", "pissa_init", "require_float_weight"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QUANTIZE_AFTER = "Initialise on an unquantized model, then quantize the residual model."


def require_float_weight(weight: torch.Tensor, what: str, fix: str = _QUANTIZE_AFTER) -> None:
    """Weight-derived inits (PiSSA, OLoRA, CorDA, LoftQ) decompose the weight itself: refuse quantized storage."""
    if weight.dtype not in _FLOAT_DTYPES:
        raise ConfigError(
            f"init_lora_weights={what!r} needs a float32, float16 or bfloat16 base weight, got {weight.dtype}. {fix}"
        )


def base_weight_as_out_in(
    weight: torch.Tensor, fan_in_fan_out: bool, what: str, fix: str = _QUANTIZE_AFTER
) -> torch.Tensor:
    """The base weight in float32, as (out, in), for an init that decomposes it."""
    require_float_weight(weight, what, fix)
    weight = weight.detach().to(torch.float32)
    return weight.T if fan_in_fan_out else weight


def _check_rank(r: int, weight: torch.Tensor, what: str) -> None:
    if r > min(weight.shape):
        raise ConfigError(
            f"init_lora_weights={what!r} takes the top-r part of the base weight, so r must be at most "
            f"min(out, in) = {min(weight.shape)} for a weight of shape {tuple(weight.shape)}; got r={r}. "
            "Lower r (or set rank_pattern for this module)."
        )


def _store_residual(
    base_weight: torch.Tensor, residual: torch.Tensor, fan_in_fan_out: bool, dtype: torch.dtype
) -> None:
    residual = residual.T if fan_in_fan_out else residual
    base_weight.data = residual.to(dtype).contiguous()


@torch.no_grad()
def pissa_init(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    base_weight: torch.Tensor,
    *,
    r: int,
    scaling: float,
    fan_in_fan_out: bool,
    init: str,
) -> None:
    """PiSSA: ``A``/``B`` from the top-``r`` singular triplets of ``W`` (split as sqrt(S)).

    ``init`` is ``"pissa"`` (exact SVD) or ``"pissa_niter_<n>"`` (randomised SVD with ``n``
    subspace iterations). ``lora_A``/``lora_B`` are the factor weights, written in place.
    """
    weight = base_weight_as_out_in(base_weight, fan_in_fan_out, init)
    _check_rank(r, weight, init)
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        Ur, Sr, Vhr = U[:, :r], S[:r] / scaling, Vh[:r]
    else:
        match = re.fullmatch(r"pissa_niter_(\d+)", init)
        if match is None:
            raise ConfigError(f"init_lora_weights must be 'pissa' or 'pissa_niter_<n>', got {init!r}.")
        Ur, Sr, V = torch.svd_lowrank(weight, r, niter=int(match.group(1)))
        Sr = Sr / scaling
        Vhr = V.t()
    root = torch.diag(torch.sqrt(Sr))
    new_A = root @ Vhr
    new_B = Ur @ root
    lora_A.data = new_A
    lora_B.data = new_B
    _store_residual(base_weight, weight - scaling * new_B @ new_A, fan_in_fan_out, base_weight.dtype)


@torch.no_grad()
def olora_init(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    base_weight: torch.Tensor,
    *,
    r: int,
    scaling: float,
    fan_in_fan_out: bool,
) -> None:
    """OLoRA: ``B = Q[:, :r]`` and ``A = R[:r]`` from the QR decomposition of ``W``."""
    weight = base_weight_as_out_in(base_weight, fan_in_fan_out, "olora")
    _check_rank(r, weight, "olora")
    Q, R = torch.linalg.qr(weight)
    new_B, new_A = Q[:, :r].contiguous(), R[:r].contiguous()
    lora_A.data = new_A
    lora_B.data = new_B
    _store_residual(base_weight, weight - scaling * new_B @ new_A, fan_in_fan_out, base_weight.dtype)
