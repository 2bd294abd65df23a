"""OFT layers for ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding``.

An adapter is one :class:`~peft_oft.rotation.OFTRotation` per layer: a block-diagonal
(approximately, with the Neumann series) orthogonal matrix ``M`` of the reference's layout,
stored under the reference's names (``oft_R`` for linear and conv layers, ``oft_embedding_R`` for
embeddings), so ``model.state_dict()`` and checkpoint keys are the same in both libraries.

* Linear: the input is rotated, ``y = base(x M)``; merging sets ``W <- W M^T``.
* Conv2d: every input patch (``in_channels * kh * kw`` values, channel-major as the weight is
  flattened) is rotated, which is the convolution with ``W_flat M^T``. The forward computes that
  weight and convolves with it, so merged and unmerged outputs agree for every input size,
  stride, padding and dilation (the reference instead rotates overlapping patches of the input
  and sums them back, which agrees with its own merge only when the output is 1x1).
* Embedding: the output rows are rotated, ``y = emb(x) M``; merging sets ``W <- W M``.

Several active adapters apply one after the other, in activation order (``x M1 M2 ...``);
merging composes them in the same order, and unmerging multiplies by the inverses (the
transposes for the exact Cayley transform).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft_core.layer import AdapterLayer, check_adapters_to_merge
from torch import nn

from peft_oft.config import OFTConfig
from peft_oft.rotation import OFTRotation, split_dimension

__all__ = ["Conv2d", "Embedding", "Linear", "OFTLayer"]


def _raise_if_not_finite(adapter_name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(
            f"NaNs or infs detected in the merged weights of adapter {adapter_name!r}; the base weights were "
            "left unchanged. The adapter is likely broken (check its training run)."
        )


def _rotate_last(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(blocks)`` over the last dimension of ``x``."""
    n, b, _ = blocks.shape
    rotated = torch.einsum("...nk,nkc->...nc", x.reshape(*x.shape[:-1], n, b), blocks)
    return rotated.reshape(x.shape)


def _rotate_last_transposed(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(blocks)^T`` over the last dimension of ``x``."""
    return _rotate_last(x, blocks.transpose(-2, -1))


class OFTLayer(AdapterLayer):
    """What every OFT layer shares: the rotations, their initialisation and merging.

    Subclasses set ``rotation_attr`` (the reference's attribute name), say how large the rotated
    dimension is (``_rotated_dim``) and how a rotation acts on the base weight (``_apply``).
    """

    adapter_layer_names: tuple[str, ...] = ("oft_R",)
    other_param_names: tuple[str, ...] = ("r", "oft_block_size", "module_dropout")
    rotation_attr = "oft_R"
    # Whether M acts on the input side of the weight (W M^T) rather than the output side (W M).
    input_side = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: OFTConfig, *, key: str = "") -> None:
        super().__init__(base_layer)
        setattr(self, self.rotation_attr, nn.ModuleDict())
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}
        self.module_dropout: dict[str, float] = {}
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, config, key=key)

    @property
    def rotations(self) -> nn.ModuleDict:
        return getattr(self, self.rotation_attr)

    def _rotated_dim(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, config: OFTConfig, *, key: str = "", **kwargs: Any) -> None:
        """Add ``adapter_name``: ``r`` blocks of size ``oft_block_size`` over the rotated dimension.

        ``key`` (the module's name) only labels the warning given when the configured block size or
        count does not divide this layer's dimension and is moved to the nearest divisor.
        """
        dim = self._rotated_dim()
        r, block_size, message = split_dimension(dim, config.r, config.oft_block_size)
        if message is not None:
            where = f" for {key!r}" if key else ""
            warnings.warn(f"OFT{where}: {message}", UserWarning, stacklevel=4)
        rotation = OFTRotation(
            n_blocks=r,
            block_size=block_size,
            block_share=config.block_share,
            coft=config.coft,
            eps=float(config.eps),
            use_cayley_neumann=config.use_cayley_neumann,
            num_cayley_neumann_terms=config.num_cayley_neumann_terms,
        )
        # The reference's draws: zeros (the identity) by default, normal(0, 0.1) otherwise, so a seeded
        # init_weights=False adapter is identical in both libraries.
        with torch.no_grad():
            if config.init_weights:
                rotation.weight.zero_()
            else:
                rotation.weight.normal_(mean=0.0, std=0.1)
        self.rotations[adapter_name] = rotation
        self.r[adapter_name] = r
        self.oft_block_size[adapter_name] = block_size
        self.module_dropout[adapter_name] = float(config.module_dropout)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _blocks(self, adapter_name: str) -> torch.Tensor:
        """The rotation blocks a forward uses: with dropout, and COFT's stored projection, in training."""
        dropout = self.module_dropout[adapter_name] if self.training else 0.0
        return self.rotations[adapter_name].blocks(dropout=dropout, write=self.training)

    def _active(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.rotations]

    def _base_forward_if_inactive(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """The base output when no adapter applies (disabled, merged), else None."""
        if self.disable_adapters:
            # As in the reference: disabling a merged layer unmerges it, so the output is the base's.
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or not self._active():
            return self.base_layer(x, *args, **kwargs)
        return None

    # ------------------------------------------------------------------ merging
    def _apply(self, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``weight`` (float, the base layout) transformed by the block-diagonal ``blocks``."""
        flat = weight.reshape(weight.shape[0], -1)
        out = _rotate_last_transposed(flat, blocks) if self.input_side else _rotate_last(flat, blocks)
        return out.reshape(weight.shape)

    def _merged_weight(self, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        work = blocks.dtype if blocks.dtype in (torch.float32, torch.float64) else torch.float32
        return self._apply(weight.to(work), blocks.to(work)).to(weight.dtype)

    def _merge_order(self, names: list[str]) -> list[str]:
        # x M1 M2 W^T = x (W M2^T M1^T)^T: an input-side rotation merged later acts earlier, so the
        # adapters are folded in last-first to compute what the unmerged forward computes.
        return list(reversed(names)) if self.input_side else list(names)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.rotations]
        for name in self._merge_order(names):
            self.merge_one(name, safe_merge=safe_merge)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def merge_one(self, adapter_name: str, *, safe_merge: bool = False) -> None:
        weight = self.get_base_layer().weight
        rotation = self.rotations[adapter_name]
        if safe_merge:
            _raise_if_not_finite(adapter_name, rotation.weight)
        merged = self._merged_weight(weight.data, rotation.blocks())
        if safe_merge:
            _raise_if_not_finite(adapter_name, merged)
        weight.data = merged

    @torch.no_grad()
    def unmerge_one(self, adapter_name: str) -> None:
        weight = self.get_base_layer().weight
        weight.data = self._merged_weight(weight.data, self.rotations[adapter_name].inverse_blocks())

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense orthogonal matrix of ``adapter_name`` (``blockdiag(R_1, ..., R_r)``).

        OFT merges multiplicatively (see :meth:`merge_one`), so this is the factor, not an additive
        delta; it is the matrix the reference calls the delta weight.
        """
        return torch.block_diag(*self.rotations[adapter_name].blocks())

    def __repr__(self) -> str:
        return "oft." + super().__repr__()


class Linear(OFTLayer):
    """OFT on ``nn.Linear``: the input is rotated, ``y = base(x M)``."""

    def _rotated_dim(self) -> int:
        return int(self.get_base_layer().in_features)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self._base_forward_if_inactive(x, args, kwargs)
        if result is not None:
            return result
        previous_dtype = x.dtype
        for name in self._active():
            blocks = self._blocks(name)
            x = _rotate_last(self._cast_to_adapter_dtype(x, blocks.dtype), blocks)
        return self.base_layer(x.to(previous_dtype), *args, **kwargs).to(previous_dtype)


class Conv2d(OFTLayer):
    """OFT on ``nn.Conv2d``: input patches are rotated, i.e. the kernel is ``W_flat M^T``.

    The rotated dimension is ``in_channels * kh * kw`` (non-square kernels too). Grouped
    convolutions are not supported (nor in the reference). The forward convolves with the rotated
    kernel, so it equals the merged layer for any input.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: OFTConfig, *, key: str = "") -> None:
        if isinstance(base_layer, AdapterLayer):
            raise TypeError(
                f"OFT cannot wrap {key or 'a Conv2d'!r}: it is already a {type(base_layer).__name__} of another "
                "method, and OFT's Conv2d rotates the convolution kernel itself. Adapt this conv with one method."
            )
        conv = base_layer
        if conv.groups != 1:
            raise ValueError(
                f"OFT cannot adapt {key or 'this Conv2d'!r}: it has groups={conv.groups}, and OFT rotates the whole "
                "(in_channels * kh * kw) input patch. Remove it from target_modules (or exclude it)."
            )
        super().__init__(base_layer, adapter_name, config, key=key)

    def _rotated_dim(self) -> int:
        conv = self.get_base_layer()
        kh, kw = conv.kernel_size
        return int(conv.in_channels * kh * kw)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self._base_forward_if_inactive(x, args, kwargs)
        if result is not None:
            return result
        conv = self.get_base_layer()
        weight = conv.weight
        for name in reversed(self._active()):  # the same composition as merging (see _merge_order)
            weight = self._merged_weight(weight, self._blocks(name))
        # The base layer's own _conv_forward keeps its padding mode, stride and dilation.
        return conv._conv_forward(x, weight, conv.bias)


class Embedding(OFTLayer):
    """OFT on ``nn.Embedding``: the looked-up rows are rotated, ``y = emb(x) M`` (merge: ``W M``)."""

    adapter_layer_names = ("oft_embedding_R",)
    rotation_attr = "oft_embedding_R"
    input_side = False

    def _rotated_dim(self) -> int:
        return int(self.get_base_layer().embedding_dim)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self._base_forward_if_inactive(x, args, kwargs)
        if result is not None:
            return result
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in self._active():
            blocks = self._blocks(name)
            result = _rotate_last(self._cast_to_adapter_dtype(result, blocks.dtype), blocks)
        return result.to(out_dtype)
