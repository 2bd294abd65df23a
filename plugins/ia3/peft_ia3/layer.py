"""(IA)³ layers for ``nn.Linear`` (and transformers' ``Conv1D``) and ``nn.Conv2d``/``nn.Conv3d``.

Each adapter is one learned vector ``ia3_l`` (the reference library's parameter name, so
``model.state_dict()`` and checkpoint keys are the same in both libraries):

* output scaling (the default): ``y = base(x) * l`` with one entry per output unit; merging
  multiplies the weight's output rows and the bias by ``l``;
* input scaling (targets listed in ``feedforward_modules``): ``y = base(x * l)`` with one entry
  per input unit; merging multiplies the weight's input columns by ``l`` (the bias is untouched).

Several active adapters multiply. Whether an adapter scales inputs or outputs is recorded per
adapter, so adapters of one layer may differ in that. Merging is multiplicative, so
unmerging divides; a vector entry of exactly zero cannot be undone (a warning says so).
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from peft_core.layer import AdapterLayer
from torch import nn

from peft_ia3.config import IA3Config

__all__ = ["Conv2d", "Conv3d", "IA3Layer", "Linear", "is_feedforward", "is_transformers_conv1d"]


def is_transformers_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D``, without importing transformers."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def is_feedforward(config: IA3Config, key: str) -> bool:
    """Whether the module named ``key`` is a feedforward module of ``config`` (its input is scaled).

    As in the reference library, a regex must match the whole name, and a list entry matches any
    name that *ends with* it (a plain suffix, without a dot boundary).
    """
    modules = config.feedforward_modules
    if modules is None:
        return False
    if isinstance(modules, str):
        return re.fullmatch(modules, key) is not None
    return any(key.endswith(name) for name in modules)


def _product(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    scale = vectors[0]
    for vector in vectors[1:]:
        scale = scale * vector
    return scale


def _raise_if_not_finite(adapter_name: str, *tensors: torch.Tensor | None) -> None:
    for tensor in tensors:
        if tensor is not None and not torch.isfinite(tensor).all():
            raise ValueError(
                f"NaNs or infs detected in the merged weights of adapter {adapter_name!r}; the base weights were "
                "left unchanged. The adapter is likely broken (check its training run)."
            )


class IA3Layer(AdapterLayer):
    """What every (IA)³ layer shares: the vectors, their initialisation and multiplicative merging.

    Subclasses define the vector's shape (``_vector_shape``), how it broadcasts against the base
    weight (``_weight_scale``) and ``forward``.
    """

    adapter_layer_names = ("ia3_l",)
    other_param_names = ("is_feedforward",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        self.in_features, self.out_features = self._features(self.get_base_layer())

    def _features(self, base: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def _vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        raise NotImplementedError

    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        """``adapter_name``'s vector shaped to multiply the base weight element-wise."""
        raise NotImplementedError

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, config: IA3Config, *, key: str = "", **kwargs: Any) -> None:
        """Add ``adapter_name``; ``key`` (the module's name) decides input vs output scaling."""
        feedforward = is_feedforward(config, key)
        # The same draw as the reference (a normal vector, then ones for the default init), so that a
        # seeded init_ia3_weights=False adapter is identical in both libraries.
        vector = torch.randn(self._vector_shape(feedforward))
        if config.init_ia3_weights:
            vector.fill_(1.0)
        self.ia3_l[adapter_name] = nn.Parameter(vector)
        self.is_feedforward[adapter_name] = feedforward
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _active_vectors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(input-scaling, output-scaling) vectors of the active adapters, in activation order."""
        inputs: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        for name in self.active_adapters:
            if name in self.ia3_l:
                (inputs if self.is_feedforward[name] else outputs).append(self.ia3_l[name])
        return inputs, outputs

    def _base_forward_if_inactive(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """The base output when no adapter applies (disabled, merged), else None."""
        if self.disable_adapters:
            # As in the reference: disabling a merged layer unmerges it, so the output is the base's.
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return None

    # ------------------------------------------------------------------ merging
    def _bias_scale(self, adapter_name: str) -> torch.Tensor | None:
        """Output scaling also scales the bias; input scaling leaves it alone."""
        bias = getattr(self.get_base_layer(), "bias", None)
        if self.is_feedforward[adapter_name] or bias is None:
            return None
        return self.ia3_l[adapter_name].detach().reshape(bias.shape)

    @torch.no_grad()
    def merge_one(self, adapter_name: str, *, safe_merge: bool = False) -> None:
        base = self.get_base_layer()
        weight = torch.mul(base.weight.data, self._weight_scale(adapter_name).detach()).to(base.weight.dtype)
        bias_scale = self._bias_scale(adapter_name)
        bias = None if bias_scale is None else torch.mul(base.bias.data, bias_scale).to(base.bias.dtype)
        if safe_merge:
            _raise_if_not_finite(adapter_name, weight, bias)
        base.weight.data = weight
        if bias is not None:
            base.bias.data = bias

    @torch.no_grad()
    def unmerge_one(self, adapter_name: str) -> None:
        base = self.get_base_layer()
        base.weight.data = self._divide(
            base.weight.data, self._weight_scale(adapter_name).detach(), adapter_name
        )
        bias_scale = self._bias_scale(adapter_name)
        if bias_scale is not None:
            base.bias.data = self._divide(base.bias.data, bias_scale, adapter_name)

    @staticmethod
    def _divide(tensor: torch.Tensor, scale: torch.Tensor, adapter_name: str) -> torch.Tensor:
        zero = scale == 0
        if zero.any():
            warnings.warn(
                f"Adapter {adapter_name!r} scales some units by exactly 0, so unmerging cannot restore their base "
                "weights (they stay 0). Keep a copy of the base model if you need to unmerge such an adapter.",
                UserWarning,
                stacklevel=4,
            )
            scale = torch.where(zero, torch.ones_like(scale), scale)
        return torch.div(tensor, scale).to(tensor.dtype)

    def __repr__(self) -> str:
        return "ia3." + super().__repr__()


class Linear(IA3Layer):
    """(IA)³ on ``nn.Linear``, or on transformers' ``Conv1D`` with ``fan_in_fan_out=True``.

    The vector has shape ``(out, 1)`` for output scaling and ``(1, in)`` for input scaling
    (the reference's layout); for ``Conv1D``, whose weight is stored (in, out), it is transposed
    when merging.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: IA3Config,
        *,
        key: str = "",
        fan_in_fan_out: bool = False,
    ) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, config, key=key)

    def _features(self, base: nn.Module) -> tuple[int, int]:
        if isinstance(base, nn.Linear):
            return base.in_features, base.out_features
        n_in, n_out = base.weight.shape  # Conv1D stores (in, out)
        return int(n_in), int(n_out)

    def _vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        return (1, self.in_features) if feedforward else (self.out_features, 1)

    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        vector = self.ia3_l[adapter_name]
        return vector.T if self.fan_in_fan_out else vector

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self._base_forward_if_inactive(x, args, kwargs)
        if result is not None:
            return result
        inputs, outputs = self._active_vectors()
        if inputs:
            scale = _product([v.flatten() for v in inputs])
            x = (x.to(scale.dtype) * scale).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if outputs:
            result = (result * _product([v.flatten() for v in outputs])).to(result.dtype)
        return result


class _ConvNd(IA3Layer):
    """(IA)³ on ``nn.Conv2d``/``nn.Conv3d``: the vector has shape ``(1, channels, 1, ...)``."""

    kernel_dim = 0

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: IA3Config, *, key: str = "") -> None:
        super().__init__(base_layer)
        weight_dim = self.get_base_layer().weight.dim()
        if weight_dim != self.kernel_dim:
            raise ValueError(
                f"{type(self).__name__} needs a base weight with {self.kernel_dim} dimensions, got {weight_dim}."
            )
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, config, key=key)

    def _features(self, base: nn.Module) -> tuple[int, int]:
        return base.in_channels, base.out_channels

    def _vector_shape(self, feedforward: bool) -> tuple[int, ...]:
        channels = self.in_features if feedforward else self.out_features
        return (1, channels) + (1,) * (self.kernel_dim - 2)

    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        vector = self.ia3_l[adapter_name]
        if not self.is_feedforward[adapter_name]:
            return vector.transpose(0, 1)  # (out, 1, 1, ...): one factor per output channel
        base = self.get_base_layer()
        if base.groups == 1:
            return vector  # (1, in, 1, ...): one factor per input channel
        # Grouped: output channel o of group g sees input channels g*in_per_group ... (g+1)*in_per_group - 1.
        groups = base.groups
        in_per_group = base.in_channels // groups
        out_per_group = base.out_channels // groups
        trailing = vector.shape[2:]
        per_group = vector.reshape(groups, 1, in_per_group, *trailing)
        return per_group.expand(groups, out_per_group, in_per_group, *trailing).reshape(
            base.out_channels, in_per_group, *trailing
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self._base_forward_if_inactive(x, args, kwargs)
        if result is not None:
            return result
        previous_dtype = x.dtype
        inputs, outputs = self._active_vectors()
        if inputs:
            scale = _product(inputs)
            x = (x.to(scale.dtype) * scale).to(self.get_base_layer().weight.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if outputs:
            scale = _product(outputs)
            result = result.to(scale.dtype) * scale
        return result.to(previous_dtype)


class Conv2d(_ConvNd):
    """(IA)³ on ``nn.Conv2d``."""

    kernel_dim = 4


class Conv3d(_ConvNd):
    """(IA)³ on ``nn.Conv3d``."""

    kernel_dim = 5
