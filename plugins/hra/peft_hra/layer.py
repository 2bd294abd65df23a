"""HRA layers for ``nn.Linear`` and ``nn.Conv2d``.

Each adapter is one parameter ``hra_u`` of shape ``(d, r)`` (the reference library's name and
layout, so ``model.state_dict()`` and checkpoint keys are the same in both libraries): ``r``
reflection vectors in the layer's input space, ``d = in_features`` for a linear layer and
``d = in_channels / groups * kh * kw`` (one filter, flattened) for a convolution. The adapted
weight is ``W @ R`` with ``R`` the chain of reflections (see :mod:`peft_hra.householder`), i.e. the
reflections act on the input side; the bias is untouched.

Several active adapters compose: ``W @ R_1 @ R_2`` for adapters 1 then 2, merged or not.
Merging replaces ``W`` by ``W @ R``; unmerging multiplies by ``R^T = R^-1`` (the reversed chain),
which restores ``W`` up to rounding, since ``R`` is orthogonal.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft_core.layer import AdapterLayer
from torch import nn

from peft_hra.config import HRAConfig
from peft_hra.householder import apply_chain, compute_dtype, initial_vectors

__all__ = ["Conv2d", "HRALayer", "Linear", "reflection_dim"]


def reflection_dim(base: nn.Module) -> int:
    """The dimension ``d`` HRA reflects in for ``base``: the length of one row of its flattened weight."""
    if isinstance(base, nn.Conv2d):
        return base.in_channels // base.groups * math.prod(base.kernel_size)
    if isinstance(base, nn.Linear):
        return base.in_features
    raise TypeError(f"HRA has no layer for a {type(base).__name__}; it adapts nn.Linear and nn.Conv2d.")


class HRALayer(AdapterLayer):
    """What every HRA layer shares: the vectors, their initialisation and merging by rotation.

    Subclasses implement ``forward``; the weight side (merging, and the convolution's forward)
    works on the base weight flattened to ``(out, d)``.
    """

    adapter_layer_names = ("hra_u",)
    other_param_names = ("hra_r", "hra_apply_GS")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: HRAConfig, *, key: str = "") -> None:
        super().__init__(base_layer)
        self.hra_u = nn.ParameterDict()
        self.hra_r: dict[str, int] = {}
        self.hra_apply_GS: dict[str, bool] = {}
        self.dim = reflection_dim(self.get_base_layer())
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, config, key=key)

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, config: HRAConfig, *, key: str = "", **kwargs: Any) -> None:
        """Add ``adapter_name`` with ``config.r`` vectors drawn as the reference draws them."""
        r, where = config.r, f" of {key!r}" if key else ""
        if config.apply_GS and r > self.dim:
            raise ValueError(
                f"apply_GS=True needs r <= {self.dim}, the dimension HRA reflects in{where} ({self._dim_text()}): "
                f"Gram-Schmidt cannot make r={r} vectors orthonormal there. Use r <= {self.dim}, or apply_GS=False."
            )
        if config.apply_GS and config.init_weights and r % 2 == 0:
            raise ValueError(
                f"apply_GS=True cannot start from HRA's identity init{where}: Gram-Schmidt leaves the second "
                "vector of each equal pair as a zero vector, whose direction is undefined (peft 0.21.2 then "
                "reflects along rounding noise, or outputs NaN). Pass init_weights=False (random vectors), or "
                "apply_GS=False for an identity start."
            )
        self.hra_u[adapter_name] = nn.Parameter(
            initial_vectors(self.dim, r, init_weights=config.init_weights)
        )
        self.hra_r[adapter_name] = r
        self.hra_apply_GS[adapter_name] = config.apply_GS
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _dim_text(self) -> str:
        return f"in_features={self.dim}"

    def _chain(self, rows: torch.Tensor, adapter_name: str, *, inverse: bool) -> torch.Tensor:
        return apply_chain(
            rows, self.hra_u[adapter_name], apply_GS=self.hra_apply_GS[adapter_name], inverse=inverse
        )

    def _active_names(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.hra_u]

    def _compute_dtype(self, names: list[str]) -> torch.dtype:
        dtype = torch.float32
        for name in names:
            dtype = torch.promote_types(dtype, compute_dtype(self.hra_u[name]))
        return dtype

    def rotated_weight(self, names: list[str], *, inverse: bool = False) -> torch.Tensor:
        """The base weight times the chains of ``names`` (``W @ R_1 @ R_2 ...``), in the weight's shape.

        ``inverse=True`` gives ``W @ ... @ R_2^T @ R_1^T`` instead, which undoes the former. The
        result is in the computation dtype (at least float32); the caller casts it.
        """
        weight = self.get_base_layer().weight
        rows = weight.reshape(weight.shape[0], -1).to(self._compute_dtype(names))
        for name in reversed(names) if inverse else names:
            rows = self._chain(rows, name, inverse=inverse)
        return rows.reshape(weight.shape)

    def _base_output_if_inactive(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """The base output when no adapter applies (disabled, merged, none active), else None."""
        if self.disable_adapters:
            # As in the reference: disabling a merged layer unmerges it, so the output is the base's.
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or not self._active_names():
            return self.base_layer(x, *args, **kwargs)
        return None

    # ------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge_one(self, adapter_name: str, *, safe_merge: bool = False) -> None:
        """``W <- W @ R``: fold the reflections into the base weight."""
        weight = self.get_base_layer().weight
        merged = self.rotated_weight([adapter_name]).to(weight.dtype)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(
                f"NaNs or infs detected in the merged weights of adapter {adapter_name!r}; the base weights were "
                "left unchanged. The adapter is likely broken (check its training run)."
            )
        weight.data = merged

    @torch.no_grad()
    def unmerge_one(self, adapter_name: str) -> None:
        """``W <- W @ R^T``: since ``R`` is orthogonal this restores the base weight."""
        weight = self.get_base_layer().weight
        weight.data = self.rotated_weight([adapter_name], inverse=True).to(weight.dtype)

    def __repr__(self) -> str:
        return "hra." + super().__repr__()


class Linear(HRALayer):
    """HRA on ``nn.Linear``: ``hra_u`` has shape ``(in_features, r)``.

    The forward reflects the input (``x @ R^T``, ``O(r * in)`` per row) and runs the base layer
    on it, which equals using the weight ``W @ R`` without making a copy of the weight.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self._base_output_if_inactive(x, args, kwargs)
        if result is not None:
            return result
        names = self._active_names()
        # x @ (R_1 @ R_2)^T = (x @ R_2^T) @ R_1^T: the last adapter's chain acts first.
        hidden = x.to(self._compute_dtype(names))
        for name in reversed(names):
            hidden = self._chain(hidden, name, inverse=True)
        return self.base_layer(hidden.to(x.dtype), *args, **kwargs)


class Conv2d(HRALayer):
    """HRA on ``nn.Conv2d``: ``hra_u`` has shape ``(in_channels / groups * kh * kw, r)``.

    Each filter, flattened in the weight's own ``(in, kh, kw)`` order, is rotated: the forward
    builds ``W @ R`` (``O(r * out * d)``) and convolves with it through the base layer's own
    convolution, so stride, padding (including ``"same"`` and non-zero padding modes), dilation and
    groups act exactly as in the base layer and as after merging.
    """

    def _dim_text(self) -> str:
        base = self.get_base_layer()
        kh, kw = base.kernel_size
        return (
            f"in_channels / groups * kernel height * width = {base.in_channels // base.groups} * {kh} * {kw}"
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self._base_output_if_inactive(x, args, kwargs)
        if result is not None:
            return result
        base = self.get_base_layer()
        weight = self.rotated_weight(self._active_names()).to(base.weight.dtype)
        return base._conv_forward(x, weight, base.bias)
