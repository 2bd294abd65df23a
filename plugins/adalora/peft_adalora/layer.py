"""AdaLoRA layers: an SVD-form update on ``nn.Linear`` (and transformers' ``Conv1D``) and ``nn.Conv2d``.

Each adapter holds the reference library's parameters, under its names, so ``state_dict`` keys
and checkpoint keys are the same in both libraries:

* ``lora_A`` (``Q``, right singular vectors), shape ``(r, in_features)`` (conv:
  ``(r, in_channels * kh * kw)``);
* ``lora_E`` (``Λ``, singular values), shape ``(r, 1)``;
* ``lora_B`` (``P``, left singular vectors), shape ``(out_features, r)``;
* ``ranknum``, a frozen one-element parameter holding the rank the scale is divided by; it is
  not saved (it is always ``init_r``, or 0 for a layer pruned to rank 0, as in the reference).

The update is ``ΔW = P (Q ⊙ Λ) * scaling / (ranknum + 1e-5)`` with ``scaling = lora_alpha``
(``r`` when ``lora_alpha <= 0``), computed with the reference's operation order so outputs agree
to the last bit. The rank allocator prunes a triplet by zeroing its entry of ``lora_E``; the
layer remembers which triplets are kept (``rank_mask``), and saves only those, as the reference
does.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
from peft_core.errors import ConfigError, TargetModulesError
from peft_core.layer import AdapterLayer
from peft_core.quantization import weight_shape
from torch import nn

from peft_adalora.config import AdaLoraConfig, rank_pattern_key

__all__ = ["AdaLoraLayer", "SVDConv2d", "SVDLinear", "is_transformers_conv1d", "pattern_mask"]

_EPS = 1e-5  # added to ranknum, as in the reference


def is_transformers_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D``, without importing transformers.

    If transformers was never imported, no module can be one of its classes.
    """
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def pattern_mask(
    rank_pattern: dict[str, list[bool]] | None, module_key: str, adapter_name: str
) -> list[bool] | None:
    """The kept-triplet mask ``rank_pattern`` gives the layer at ``module_key``, or None.

    Keys are ``"<module>.lora_E"`` (the file format); the form with the adapter name appended,
    which the reference uses in memory before its first save, is accepted too.
    """
    if not rank_pattern:
        return None
    key = rank_pattern_key(module_key)
    for candidate in (key, f"{key}.{adapter_name}"):
        if candidate in rank_pattern:
            return list(rank_pattern[candidate])
    return None


def _triplet_dim(model_suffix: str) -> int:
    """The dimension that indexes the triplets: ``lora_B``'s columns, ``lora_A``'s and ``lora_E``'s rows."""
    return 1 if model_suffix.startswith("lora_B.") else 0


class AdaLoraLayer(AdapterLayer):
    """What every AdaLoRA layer shares: the triplets, their init, merging and pruned saving.

    Subclasses say how many columns ``lora_A`` has (``_a_columns``), how ``P (Q ⊙ Λ)`` maps onto
    the base weight (``get_delta_weight``) and implement ``forward``.
    """

    adapter_layer_names = ("lora_A", "lora_B", "lora_E")
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "ranknum", "rank_mask")

    def __init__(self, base_layer: nn.Module, *, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.rank_mask: dict[str, list[bool]] = {}
        """Per adapter, which triplets the rank allocator keeps (set by the adapter model)."""
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = self._features(self.get_base_layer())

    def _features(self, base: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def _a_columns(self) -> int:
        return self.in_features

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, config: AdaLoraConfig, *, key: str = "", **kwargs: Any) -> None:
        """Add ``adapter_name`` with ``init_r`` triplets, or ``sum(mask)`` if ``rank_pattern`` lists ``key``."""
        mask = pattern_mask(config.rank_pattern, key, adapter_name)
        rank = config.init_r if mask is None else sum(mask)
        try:
            self._create(adapter_name, rank, config)
        except BaseException:
            # leave no half-built adapter behind (the layer may hold other adapters)
            for attr in self.adapter_layer_names + self.other_param_names:
                container = getattr(self, attr)
                if adapter_name in container:
                    del container[adapter_name]
            raise
        self.set_adapter(self.active_adapters)

    def _create(self, adapter_name: str, rank: int, config: AdaLoraConfig) -> None:
        self.r[adapter_name] = rank
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha if config.lora_alpha > 0 else float(rank)
        self.lora_dropout[adapter_name] = (
            nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0.0 else nn.Identity()
        )
        # The reference's draws, in its order (A, E, B, then one for ranknum), so the same seed
        # gives the same factors in both libraries.
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(rank, self._a_columns()))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(rank, 1))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, rank))
        ranknum = torch.randn(1)
        # A pruned layer keeps the scale of its unpruned rank (the reference copies ranknum over
        # when it resizes a layer to a rank_pattern); a layer pruned to nothing gets 0.
        ranknum.fill_(float(config.init_r) if rank > 0 else 0.0)
        self.ranknum[adapter_name] = nn.Parameter(ranknum, requires_grad=False)
        if config.init_lora_weights:
            with torch.no_grad():
                nn.init.zeros_(self.lora_E[adapter_name])
                nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def set_rank_mask(self, adapter_name: str, mask: Iterable[bool] | None) -> None:
        """Record which triplets of ``adapter_name`` are kept (None: all); saving keeps only those."""
        if mask is None:
            self.rank_mask.pop(adapter_name, None)
            return
        mask = [bool(m) for m in mask]
        if len(mask) != self.r[adapter_name]:
            raise ConfigError(
                f"A rank mask of length {len(mask)} does not fit adapter {adapter_name!r} of rank "
                f"{self.r[adapter_name]}; the rank_pattern was made for a different adapter."
            )
        self.rank_mask[adapter_name] = mask

    # ------------------------------------------------------------------ the update
    def _scale(self, adapter_name: str) -> torch.Tensor:
        return self.ranknum[adapter_name] + _EPS

    def _svd_product(self, adapter_name: str) -> torch.Tensor:
        """``P (Q ⊙ Λ)``, of shape ``(out_features, lora_A columns)``."""
        return self.lora_B[adapter_name] @ (self.lora_A[adapter_name] * self.lora_E[adapter_name])

    # ------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge_one(self, adapter_name: str, *, safe_merge: bool = False) -> None:
        # Added in the delta's precision and rounded once, like the reference's in-place add.
        weight = self.get_base_layer().weight
        delta = self.get_delta_weight(adapter_name)
        if safe_merge:
            merged = weight.data.clone()
            merged += delta
            if not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs or infs detected in the merged weights of adapter {adapter_name!r}; the base weights "
                    "were left unchanged. The adapter is likely broken (check its training run)."
                )
            weight.data = merged
        else:
            weight.data += delta

    @torch.no_grad()
    def unmerge_one(self, adapter_name: str) -> None:
        self.get_base_layer().weight.data -= self.get_delta_weight(adapter_name)

    # ------------------------------------------------------------------ forward helpers
    def _forward_preamble(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """The base output when no adapter applies (disabled, merged), else None."""
        if self.disable_adapters:
            # Like the reference: disabling a merged layer unmerges it, so the output is the base's.
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return None

    def _active_here(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.lora_A]

    # ------------------------------------------------------------------ serialization
    def adapter_state_items(self, adapter_name: str) -> Iterable[tuple[str, str, torch.Tensor]]:
        """The adapter's tensors; of a layer pruned in place, copies of the kept triplets only.

        The checkpoint then has the pruned shapes, as the reference saves them;
        :meth:`load_adapter_tensor` writes such a checkpoint back into the kept triplets.
        """
        keep = self._kept(adapter_name)
        for model_suffix, ckpt_suffix, tensor in super().adapter_state_items(adapter_name):
            if keep is not None:
                index = keep.nonzero().view(-1).to(tensor.device)
                tensor = tensor.detach().index_select(_triplet_dim(model_suffix), index)
            yield model_suffix, ckpt_suffix, tensor

    def load_adapter_tensor(self, model_suffix: str, saved: torch.Tensor, value: torch.Tensor) -> None:
        attr, adapter_name = model_suffix.split(".")[:2]
        keep = self._kept(adapter_name)
        if keep is None:
            super().load_adapter_tensor(model_suffix, saved, value)
            return
        live = getattr(self, attr)[adapter_name]
        index = keep.nonzero().view(-1).to(live.device)
        live.index_copy_(_triplet_dim(model_suffix), index, value.to(device=live.device, dtype=live.dtype))

    def _kept(self, adapter_name: str) -> torch.Tensor | None:
        mask = self.rank_mask.get(adapter_name)
        if mask is None or adapter_name not in self.lora_A:
            return None
        if len(mask) != self.lora_A[adapter_name].shape[0] or all(mask):
            return None
        return torch.tensor(mask, dtype=torch.bool)

    def __repr__(self) -> str:
        return "adalora." + super().__repr__()


class SVDLinear(AdaLoraLayer):
    """AdaLoRA on ``nn.Linear``, or on transformers' ``Conv1D`` with ``fan_in_fan_out=True``.

    For ``Conv1D``, whose weight is stored (in, out), the delta is transposed on merge.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: AdaLoraConfig,
        *,
        key: str = "",
        fan_in_fan_out: bool = False,
    ) -> None:
        super().__init__(base_layer, fan_in_fan_out=fan_in_fan_out)
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, config, key=key)

    def _features(self, base: nn.Module) -> tuple[int, int]:
        if isinstance(base, nn.Linear):
            return base.in_features, base.out_features
        n_in, n_out = base.weight.shape  # Conv1D stores (in, out)
        return int(n_in), int(n_out)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``P (Q ⊙ Λ) * scaling / (ranknum + 1e-5)`` in the base weight's layout."""
        product = self._svd_product(adapter_name)
        if self.fan_in_fan_out:
            product = product.T
        return product * self.scaling[adapter_name] / self._scale(adapter_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        early = self._forward_preamble(x, args, kwargs)
        if early is not None:
            return early
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in self._active_here():
            lora_A, lora_B, lora_E = self.lora_A[name], self.lora_B[name], self.lora_E[name]
            x = self._cast_to_adapter_dtype(x, lora_A.dtype)
            update = (self.lora_dropout[name](x) @ (lora_A * lora_E).T @ lora_B.T) * self.scaling[name]
            # summed in the update's precision and rounded once per adapter, as the reference's in-place add
            result = (result + update / self._scale(name)).to(result_dtype)
        return result


class SVDConv2d(AdaLoraLayer):
    """AdaLoRA on ``nn.Conv2d``: ``P (Q ⊙ Λ)`` reshaped to the kernel, applied as a second convolution.

    ``lora_A`` has one column per input channel and kernel position, as in the reference.
    Grouped convolutions are not supported (nor in the reference, which fails on them).
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: AdaLoraConfig, *, key: str = ""
    ) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, AdapterLayer) else base_layer
        if base.groups != 1:
            raise TargetModulesError(
                f"AdaLoRA cannot adapt {key!r}, a grouped Conv2d (groups={base.groups}): its update has one column "
                "per input channel and kernel position. Leave it out of target_modules (e.g. with exclude_modules)."
            )
        super().__init__(base_layer)
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, config, key=key)

    def _features(self, base: nn.Module) -> tuple[int, int]:
        return base.in_channels, base.out_channels

    def _a_columns(self) -> int:
        kernel = self.get_base_layer().kernel_size
        return self.in_features * kernel[0] * kernel[1]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``P (Q ⊙ Λ) * scaling / (ranknum + 1e-5)`` reshaped to the base kernel."""
        delta = self._svd_product(adapter_name) * self.scaling[adapter_name] / self._scale(adapter_name)
        return delta.reshape(weight_shape(self.get_base_layer()))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        early = self._forward_preamble(x, args, kwargs)
        if early is not None:
            return early
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        base = self.get_base_layer()
        for name in self._active_here():
            x = self._cast_to_adapter_dtype(x, self.lora_A[name].dtype)
            # The base layer's own convolution routine, so padding modes other than zeros are honoured
            # exactly as in the merged layer.
            update = base._conv_forward(self.lora_dropout[name](x), self.get_delta_weight(name), None)
            result = (result + update).to(result_dtype)
        return result
