"""Dropout on the LoRA branch's input, cheaper on CPU than ``nn.Dropout`` with the same law.

torch's CPU ``bernoulli_`` costs about 10 ns per element: on a LoRA training step it was 13% of
the time (the dropout masks are as large as every targeted layer's input). Here one 64-bit
draw gives two keep/drop decisions, each with 32-bit resolution (finer than ``bernoulli_``'s
float draws), and the mask is kept as ``bool`` for backward, a quarter of the float mask's memory.
The ``1 / (1 - p)`` rescale is not applied to the input but folded into the branch's scaling,
which multiplies the rank-``r`` path's output anyway: the same function, one pass less.

Elsewhere (CUDA and other devices, custom dropout modules, ``p`` of 0 or 1) the module itself runs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_INT32_MIN = -(2**31)
_INT64_MIN = -(2**63)


def keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A ``bool`` tensor of ``shape`` whose entries are True with probability ``1 - p``, independently.

    Drawn from torch's default generator for ``device``, so ``torch.manual_seed`` reproduces it.
    """
    numel = math.prod(shape)
    bits = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device).random_(_INT64_MIN, None)
    # p below 2**-33 rounds to "keep all": the largest int32 threshold keeps all but 1 in 2**32
    threshold = min(_INT32_MIN + round((1.0 - p) * 2**32), 2**31 - 1)
    return (bits.view(torch.int32)[:numel] < threshold).view(shape)


def dropout_input(dropout: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(input for lora_A, factor for the branch's output)``: together they equal ``dropout(x)``'s effect."""
    if type(dropout) is nn.Dropout and dropout.training and x.device.type == "cpu" and 0.0 < dropout.p < 1.0:
        return x * keep_mask(x.shape, dropout.p), 1.0 / (1.0 - dropout.p)
    return dropout(x), 1.0
