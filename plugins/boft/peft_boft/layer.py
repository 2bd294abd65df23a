"""BOFT layers for ``nn.Linear`` and ``nn.Conv2d``.

Each adapter holds the reference library's two tensors, under its names and shapes (so
``model.state_dict()`` and checkpoint keys are the same in both libraries):

* ``boft_R``: ``(boft_n_butterfly_factor, block_num, block_size, block_size)``, whose Cayley
  transforms are the orthogonal blocks of the butterfly rotation ``Rot`` (see
  :mod:`peft_boft.butterfly`);
* ``boft_s``: one scale per output unit, ``(out, 1)`` for a linear layer and ``(1, out)`` for a
  convolution.

The adapted weight is ``W' = s * (W_flat @ Rot.T)``, with ``W_flat`` the weight as
``(out, rotated dimension)`` (a convolution's filters flattened over (in, kh, kw)); the bias is
left alone. The permutation matrices the reference keeps as a non-persistent ``boft_P`` buffer
are index vectors here, computed once per geometry and never saved (neither library saves them).

Several active adapters compose: ``W' = s_1 * ... * s_k * W_flat @ Rot_1.T @ ... @ Rot_k.T`` for
active adapters ``1 .. k`` in order, which is also what merging them one after the other gives.
Merging writes ``W'`` into the base weight; unmerging applies the inverse (``Rot`` is orthogonal,
so its inverse is its transpose) and divides by the scale.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft_core.layer import AdapterLayer
from torch import nn

from peft_boft.butterfly import (
    MultiplicativeDropout,
    cayley,
    compute_dtype,
    dense_rotation,
    resolve_blocks,
    rotate,
)
from peft_boft.config import BOFTConfig

__all__ = ["BOFTLayer", "Conv2d", "Linear"]


def _raise_if_not_finite(tensor: torch.Tensor, adapter_name: str) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(
            f"NaNs or infs detected in the merged weights of adapter {adapter_name!r}; the base weights were "
            "left unchanged. The adapter is likely broken (check its training run)."
        )


class BOFTLayer(AdapterLayer):
    """What every BOFT layer shares: parameters, their initialisation, and merging by rotation.

    Subclasses say how large the rotated dimension is (``_rotated_dim``), how the scale is laid
    out (``_scale_shape``), how to describe the layer in errors, and implement ``forward``.
    """

    adapter_layer_names = ("boft_R", "boft_s")
    other_param_names = ("boft_block_size", "boft_block_num", "boft_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_dropout = nn.ModuleDict()
        self.in_features, self.out_features = self._features(self.get_base_layer())

    # ------------------------------------------------------------------ per layer type
    def _features(self, base: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def _rotated_dim(self) -> int:
        """Length of the vectors the rotation acts on (a row of the flattened weight)."""
        return self.get_base_layer().weight[0].numel()

    def _scale_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def _describe(self, key: str) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, config: BOFTConfig, *, key: str = "", **kwargs: Any) -> None:
        """Add ``adapter_name``, with the block geometry ``config`` gives for this layer's size."""
        factors = config.boft_n_butterfly_factor
        block_size, block_num = resolve_blocks(
            self._rotated_dim(),
            config.boft_block_size,
            config.boft_block_num,
            factors,
            where=self._describe(key),
        )
        p = float(config.boft_dropout)
        self.boft_dropout[adapter_name] = MultiplicativeDropout(p) if p > 0.0 else nn.Identity()
        rotation = torch.zeros(factors, block_num, block_size, block_size)
        scale = torch.ones(self._scale_shape())
        if not config.init_weights:
            # The reference's draws, in its order (the rotation, then the scale), so that the same seed
            # gives the same random adapter in both libraries.
            nn.init.normal_(rotation, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        self.boft_R[adapter_name] = nn.Parameter(rotation)
        self.boft_s[adapter_name] = nn.Parameter(scale)
        self.boft_block_size[adapter_name] = block_size
        self.boft_block_num[adapter_name] = block_num
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _active_names(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.boft_R]

    def _blocks(self, adapter_name: str, *, dropout: bool) -> torch.Tensor:
        """The orthogonal blocks of ``adapter_name`` (with its dropout, when training, if ``dropout``)."""
        blocks = cayley(self.boft_R[adapter_name])
        return self.boft_dropout[adapter_name](blocks) if dropout else blocks

    def _scale(self, adapter_name: str) -> torch.Tensor:
        return self.boft_s[adapter_name].reshape(-1)

    def _compute_dtype(self, names: list[str]) -> torch.dtype:
        dtype = self.get_base_layer().weight.dtype
        for name in names:
            dtype = torch.promote_types(dtype, compute_dtype(self.boft_R[name]))
        return torch.promote_types(dtype, torch.float32)

    def get_rotation(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Rot, s)``: the dense orthogonal matrix and the per-output scale of ``adapter_name``.

        What the reference's ``get_delta_weight`` returns; the layers themselves never build the
        dense matrix.
        """
        return dense_rotation(self._blocks(adapter_name, dropout=False)), self._scale(adapter_name)

    def _transformed_weight(self, weight: torch.Tensor, names: list[str], *, dropout: bool) -> torch.Tensor:
        """``s * (W_flat @ Rot_1.T @ ... @ Rot_k.T)`` in the compute dtype, shaped like ``weight``."""
        dtype = self._compute_dtype(names)
        flat = weight.reshape(weight.shape[0], -1).to(dtype)
        scale = torch.ones(flat.shape[0], device=flat.device, dtype=dtype)
        for name in names:
            flat = rotate(flat, self._blocks(name, dropout=dropout).to(dtype), transpose=True)
            scale = scale * self._scale(name).to(dtype)
        return (flat * scale[:, None]).reshape(weight.shape)

    # ------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge_one(self, adapter_name: str, *, safe_merge: bool = False) -> None:
        weight = self.get_base_layer().weight
        merged = self._transformed_weight(weight.data, [adapter_name], dropout=False)
        if safe_merge:
            _raise_if_not_finite(merged, adapter_name)
        weight.data = merged.to(weight.dtype).contiguous()

    @torch.no_grad()
    def unmerge_one(self, adapter_name: str) -> None:
        weight = self.get_base_layer().weight
        dtype = self._compute_dtype([adapter_name])
        scale = self._scale(adapter_name).to(dtype)
        zero = scale == 0
        if zero.any():
            warnings.warn(
                f"Adapter {adapter_name!r} scales some output units by exactly 0, so unmerging cannot restore their "
                "base weights (they stay 0). Keep a copy of the base model if you need to unmerge such an adapter.",
                UserWarning,
                stacklevel=4,
            )
            scale = torch.where(zero, torch.ones_like(scale), scale)
        flat = weight.data.reshape(weight.shape[0], -1).to(dtype) / scale[:, None]
        # The inverse of x -> x @ Rot.T is x -> x @ Rot, since Rot is orthogonal.
        restored = rotate(flat, self._blocks(adapter_name, dropout=False).to(dtype))
        weight.data = restored.reshape(weight.shape).to(weight.dtype).contiguous()

    # ------------------------------------------------------------------ forward helpers
    def _base_forward_if_inactive(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """The base output when no adapter applies (disabled, merged, none active), else None."""
        if self.disable_adapters:
            # As in the reference: disabling a merged layer unmerges it, so the output is the base's.
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or not self._active_names():
            return self.base_layer(x, *args, **kwargs)
        return None

    def __repr__(self) -> str:
        return "boft." + super().__repr__()


class Linear(BOFTLayer):
    """BOFT on ``nn.Linear``: ``y = s * (base(x @ Rot) - b) + b``.

    The rotation is applied to the input (a gather and a block product per butterfly factor,
    ``O(n * block_size)`` per token), and the base layer then runs unchanged; the scale acts on
    the output before the bias, exactly as merging ``W' = s * (W @ Rot.T)`` does.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: BOFTConfig, *, key: str = ""
    ) -> None:
        super().__init__(base_layer)
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, config, key=key)

    def _features(self, base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features

    def _scale_shape(self) -> tuple[int, int]:
        return (self.out_features, 1)

    def _describe(self, key: str) -> str:
        return f"BOFT on the nn.Linear {key!r} (in_features={self.in_features})"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self._base_forward_if_inactive(x, args, kwargs)
        if result is not None:
            return result
        names = self._active_names()
        dtype = self._compute_dtype(names)
        # Blocks in activation order (dropout draws as in the reference); x @ Rot_k @ ... @ Rot_1 applies
        # the last adapter's rotation first.
        blocks = [self._blocks(name, dropout=True).to(dtype) for name in names]
        rotated = x.to(dtype)
        for factor_blocks in reversed(blocks):
            rotated = rotate(rotated, factor_blocks)
        scale = self._scale(names[0]).to(dtype)
        for name in names[1:]:
            scale = scale * self._scale(name).to(dtype)
        output = self.base_layer(rotated.to(x.dtype), *args, **kwargs).to(dtype) * scale
        bias = self.get_base_layer().bias
        if bias is not None:
            # s * (y - b) + b, written so that s == 1 returns y bit for bit.
            output = output + bias.to(dtype) * (1 - scale)
        return output.to(x.dtype)


class Conv2d(BOFTLayer):
    """BOFT on ``nn.Conv2d``: the base convolution with the rotated, rescaled filters.

    A filter is rotated as one vector over (in_channels // groups, kh, kw), flattened in that
    order (the reference's layout). The convolution is the base layer's own (its stride, padding,
    padding mode, dilation and groups), so the unmerged output equals the merged one for every
    geometry.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: BOFTConfig, *, key: str = ""
    ) -> None:
        super().__init__(base_layer)
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, config, key=key)

    def _features(self, base: nn.Module) -> tuple[int, int]:
        return base.in_channels, base.out_channels

    def _scale_shape(self) -> tuple[int, int]:
        return (1, self.out_features)

    def _describe(self, key: str) -> str:
        base = self.get_base_layer()
        kh, kw = base.kernel_size
        groups = f" // groups {base.groups}" if base.groups > 1 else ""
        return (
            f"BOFT on the nn.Conv2d {key!r} (rotated dimension = in_channels {base.in_channels}{groups} x kernel "
            f"{kh}x{kw} = {self._rotated_dim()})"
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self._base_forward_if_inactive(x, args, kwargs)
        if result is not None:
            return result
        base = self.get_base_layer()
        weight = self._transformed_weight(base.weight, self._active_names(), dropout=True).to(
            base.weight.dtype
        )
        return base._conv_forward(x.to(weight.dtype), weight, base.bias).to(x.dtype)
