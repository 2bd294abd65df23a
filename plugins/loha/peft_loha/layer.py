"""LoHa layers for ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

The update is the Hadamard (element-wise) product of two low-rank matrices,

    delta W = alpha / r * (W1a @ W1b) * (W2a @ W2b),

reshaped to the base weight. Parameter names and shapes are the reference library's, so state
dicts and checkpoints match key for key:

* flattened (Linear, and convs without ``use_effective_conv2d``): ``hada_w{1,2}_a`` (out, r) and
  ``hada_w{1,2}_b`` (r, in * prod(kernel)); the kernel is folded into the input dimension;
* effective conv (kernel larger than 1): a core ``hada_t{1,2}`` (r, r, *kernel) with
  ``hada_w{1,2}_a`` (r, out) and ``hada_w{1,2}_b`` (r, in) as its mode factors; a Conv1d kernel
  is stored as (k, 1), like a (k, 1) Conv2d kernel.

The identity init zeroes ``hada_w2_b`` and draws the rest Kaiming-uniform, in the reference's order,
so the same seed gives the same factors in both libraries.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft_core.delta_layer import CONV1D, CONV2D, LINEAR, DeltaWeightLayer
from peft_core.errors import ConfigError
from peft_core.quantization import weight_shape
from peft_core.targeting import pattern_value
from torch import nn

from peft_loha.config import LoHaConfig

__all__ = ["LAYER_TYPES", "Conv1d", "Conv2d", "Linear", "LoHaLayer", "hadamard_cp_factor"]


def hadamard_cp_factor(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """One CP-style factor of an effective conv: ``core`` (r, r, kh, kw) contracted with
    ``out_factor`` (r, out) on its first mode and ``in_factor`` (r, in) on its second,
    giving an (out, in, kh, kw) kernel."""
    return torch.einsum("abhw,bi,ao->oihw", core, in_factor, out_factor)


class LoHaLayer(DeltaWeightLayer):
    """LoHa on one base layer; the subclasses only name the base-layer type."""

    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: LoHaConfig, *, key: str = ""
    ) -> None:
        super().__init__(base_layer)
        self.hada_w1_a = nn.ParameterDict()
        self.hada_w1_b = nn.ParameterDict()
        self.hada_w2_a = nn.ParameterDict()
        self.hada_w2_b = nn.ParameterDict()
        self.hada_t1 = nn.ParameterDict()
        self.hada_t2 = nn.ParameterDict()
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, config, key=key)

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, config: LoHaConfig, *, key: str = "", **kwargs: Any) -> None:
        """Add ``adapter_name``; ``key`` (the module's name) selects ``rank_pattern``/``alpha_pattern``."""
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.alpha)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ConfigError(f"The rank for module {key!r} must be a positive integer, got r={r!r}.")
        self._set_hyper_parameters(adapter_name, r, alpha, config)
        self._create_factors(adapter_name, r, self._uses_effective_conv(config.use_effective_conv2d))
        self._init_factors(adapter_name, identity=config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _uses_effective_conv(self, requested: bool) -> bool:
        # A kernel of size 1 has nothing to factor: the flattened form is the same map, cheaper.
        return requested and self.kind != LINEAR and any(k != 1 for k in self._kernel_size())

    def _create_factors(self, adapter_name: str, r: int, effective: bool) -> None:
        out_dim, in_dim, kernel = self.out_features, self._in_per_group(), self._kernel_size()
        if effective:
            core_shape = (r, r, *kernel) if self.kind == CONV2D else (r, r, kernel[0], 1)
            for i in (1, 2):
                getattr(self, f"hada_t{i}")[adapter_name] = nn.Parameter(torch.empty(core_shape))
                getattr(self, f"hada_w{i}_a")[adapter_name] = nn.Parameter(torch.empty(r, out_dim))
                getattr(self, f"hada_w{i}_b")[adapter_name] = nn.Parameter(torch.empty(r, in_dim))
        else:
            flat_in = in_dim * math.prod(kernel)
            for i in (1, 2):
                getattr(self, f"hada_w{i}_a")[adapter_name] = nn.Parameter(torch.empty(out_dim, r))
                getattr(self, f"hada_w{i}_b")[adapter_name] = nn.Parameter(torch.empty(r, flat_in))

    @torch.no_grad()
    def _init_factors(self, adapter_name: str, *, identity: bool) -> None:
        def kaiming(param: torch.Tensor) -> None:
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))

        kaiming(self.hada_w1_a[adapter_name])
        kaiming(self.hada_w1_b[adapter_name])
        kaiming(self.hada_w2_a[adapter_name])
        # One zero factor makes the Hadamard product, hence the delta, zero.
        if identity:
            nn.init.zeros_(self.hada_w2_b[adapter_name])
        else:
            kaiming(self.hada_w2_b[adapter_name])
        if adapter_name in self.hada_t1:
            kaiming(self.hada_t1[adapter_name])
            kaiming(self.hada_t2[adapter_name])

    # ------------------------------------------------------------------ the delta
    def get_delta_weight(self, adapter_name: str, *, apply_rank_dropout: bool = False) -> torch.Tensor:
        scale = self.scaling[adapter_name]
        if adapter_name in self.hada_t1:
            first = hadamard_cp_factor(
                self.hada_t1[adapter_name], self.hada_w1_a[adapter_name], self.hada_w1_b[adapter_name]
            )
            second = hadamard_cp_factor(
                self.hada_t2[adapter_name], self.hada_w2_a[adapter_name], self.hada_w2_b[adapter_name]
            )
        else:
            first = self.hada_w1_a[adapter_name] @ self.hada_w1_b[adapter_name]
            second = self.hada_w2_a[adapter_name] @ self.hada_w2_b[adapter_name]
        weight = (first * second * scale).reshape(weight_shape(self.get_base_layer()))
        if apply_rank_dropout:
            weight = weight * self._rank_dropout_mask(adapter_name, weight)
        return weight

    def _rank_dropout_mask(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """Keep each output row with probability ``1 - rank_dropout``; rescale by the kept fraction.

        The draw (``torch.rand(out)`` on the CPU generator) is the reference library's, so seeded
        runs drop the same rows. If every row is dropped the mask is zero (the reference divides
        by zero there).
        """
        keep = (torch.rand(weight.size(0)) > self.rank_dropout[adapter_name]).to(weight.dtype)
        kept = keep.mean()
        if kept > 0:
            keep = keep / kept
        return keep.view(-1, *[1] * (weight.dim() - 1)).to(weight.device)

    def __repr__(self) -> str:
        return "loha." + super().__repr__()


class Linear(LoHaLayer):
    """LoHa on ``nn.Linear``: the delta is applied with ``F.linear``."""


class Conv1d(LoHaLayer):
    """LoHa on ``nn.Conv1d``: the delta is a kernel applied with the base convolution's settings."""


class Conv2d(LoHaLayer):
    """LoHa on ``nn.Conv2d``: the delta is a kernel applied with the base convolution's settings."""


LAYER_TYPES = {LINEAR: Linear, CONV1D: Conv1d, CONV2D: Conv2d}
"""The LoHa layer class for each base-layer kind."""
