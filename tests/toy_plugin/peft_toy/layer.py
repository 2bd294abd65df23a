"""The TOY layer: the smallest ``nn.Linear`` adapter that merges through a weight delta."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_core.layer import AdapterLayer
from peft_toy.config import ToyConfig


def _direction(n: int) -> torch.Tensor:
    """A fixed, deterministic unit direction, so only ``toy_scale`` needs saving."""
    u = torch.cos(torch.arange(n, dtype=torch.float32) * 0.7 + 0.3)
    return u / u.norm()


class ToyLayer(AdapterLayer):
    """``y = base(x) + (x · u) s``: a rank-1 update whose delta ``s uᵀ`` does not depend on ``W``."""

    adapter_layer_names = ("toy_scale",)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.toy_scale = nn.ParameterDict()
        self.register_buffer("toy_direction", _direction(base_layer.in_features), persistent=False)

    def update_layer(self, adapter_name: str, config: ToyConfig, *, key: str = "", **kwargs: Any) -> None:
        n = self.get_base_layer().out_features
        values = torch.zeros(n) if config.init_weights else 0.5 * torch.randn(n)
        self.toy_scale[adapter_name] = nn.Parameter(values)
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        scale = self.toy_scale[adapter_name]
        return torch.outer(scale, self.toy_direction.to(scale))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return out
        for name in self.active_adapters:
            scale = self.toy_scale[name]
            projected = self._cast_to_adapter_dtype(x, scale.dtype) @ self.toy_direction.to(scale)
            out = out + (projected[..., None] * scale).to(out.dtype)
        return out
