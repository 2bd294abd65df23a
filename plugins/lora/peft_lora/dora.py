"""DoRA (weight-decomposed LoRA): the magnitude holder and the column-norm formulas.

DoRA rescales each output unit of the adapted weight ``W + s * B @ A`` to a learned magnitude
``m``: ``W' = m * (W + s B A) / ||W + s B A||``, with the norm taken per output unit and treated
as a constant during backpropagation (section 4.3 of the DoRA paper). The layers in
:mod:`peft_lora.layer` apply this in their forward and merge; this module holds what they share.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DoraMagnitude", "conv_weight_norm", "linear_weight_norm"]


class DoraMagnitude(nn.Module):
    """The learned magnitude of one adapter, kept as the parameter ``weight``.

    The reference library stores it the same way (``lora_magnitude_vector.<adapter>.weight`` in
    the model) but writes it to checkpoints without the ``.weight`` suffix; the layers map the
    key accordingly (see ``LoraLayer.checkpoint_suffix``).
    """

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude, requires_grad=True)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


def linear_weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """Per-output L2 norm of ``weight + scaling * lora_weight``, both laid out (out, in)."""
    adapted = weight + scaling * lora_weight
    return torch.linalg.norm(adapted, dim=1).to(adapted.dtype)


def conv_weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """Per-output-channel L2 norm of a conv kernel, shaped ``(1, out, 1, ...)`` like the magnitude."""
    adapted = weight + scaling * lora_weight
    dims = tuple(range(1, adapted.dim()))
    return adapted.norm(p=2, dim=dims, keepdim=True).transpose(1, 0)
