"""A base for layers whose adapter is a dense weight delta rebuilt from small factors.

Methods of the LyCORIS family (LoHa, LoKr, ...) rebuild a full ``delta W`` from their factors
and apply it as ``base(x) + op(x, delta W)``, where ``op`` is the base layer's own linear map
(``F.linear`` or the base convolution). None of that depends on how the factors are combined,
so it lives in the core for every such method: the per-adapter hyper-parameters (``r``,
``alpha``, ``scaling``, dropouts) under the reference library's attribute names, the forward
pass with module dropout, exact merging, scaling, and a cache of the delta for evaluation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_core.layer import AdapterLayer
from peft_core.quantization import is_adaptable_linear, weight_shape

__all__ = ["CONV1D", "CONV2D", "LINEAR", "DeltaWeightLayer", "layer_kind", "weight_shape"]

LINEAR, CONV1D, CONV2D = "linear", "conv1d", "conv2d"


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"``, ``"conv2d"``, or None for base layers these methods do not adapt.

    Modules with a plain floating-point weight qualify, and quantized linears that a registered
    quantization backend handles (their forward is ``base(x) + op(x, delta)`` all the same).
    """
    if isinstance(module, nn.Linear) and is_adaptable_linear(module):
        return LINEAR
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        return None
    if isinstance(module, nn.Conv2d):
        return CONV2D
    if isinstance(module, nn.Conv1d):
        return CONV1D
    if isinstance(module, nn.Linear):
        return LINEAR
    return None


# Convolutions are left out: their products sum over channels x kernel, where rounding the
# folded weight once moves outputs of large magnitude by more than the 1e-5 the reference
# comparisons allow.
_FOLDABLE = (nn.Linear,)


def _tensor_stamp(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global ones) around its forward."""
    from torch.nn.modules import module as module_mod

    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(module_mod, "_global_forward_hooks", None)
        or getattr(module_mod, "_global_forward_pre_hooks", None)
    )


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


class DeltaWeightLayer(AdapterLayer):
    """Base of delta-weight adapter layers on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

    A subclass lists its factor containers in ``adapter_layer_names`` and implements
    ``update_layer`` and ``get_delta_weight(adapter_name, apply_rank_dropout=...)``, which returns
    the scaled delta in the base weight's shape.

    In eval mode the delta of each adapter is cached (``cache_delta``, on by default), since
    rebuilding it costs more than the forward itself for small batches. The cache holds exactly
    the tensor a recomputation would give: it is used only outside training and autocast, never
    when autograd must reach the factors, and only while every factor is the same tensor at the
    same version counter, with the same scaling. In-place edits through ``param.data`` bypass
    autograd's version counter; call :meth:`clear_delta_cache` after such edits. The price is
    memory: one delta (the size of the base weight) per cached layer and adapter; set
    ``cache_delta = False`` on a layer (or class) to trade it back for compute. Eval forwards of
    enough rows fold the deltas into the weight for the call (see :meth:`_folded_forward`), so
    they cost one product like the base layer's, not two.
    """

    other_param_names = ("r", "alpha", "scaling", "rank_dropout", "rank_dropout_scale", "module_dropout")
    cache_delta: bool = True
    fold_min_rows: int = 32

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}
        self._delta_cache: dict[str, tuple[tuple, list[torch.Tensor], torch.Tensor]] = {}
        base = self.get_base_layer()
        kind = layer_kind(base)
        if kind is None:
            raise TypeError(
                f"{type(self).__name__} adapts nn.Linear, nn.Conv1d and nn.Conv2d layers, got {type(base).__name__}."
            )
        self.kind = kind
        if kind == LINEAR:
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            self.in_features, self.out_features = base.in_channels, base.out_channels

    # ------------------------------------------------------------------ to implement
    def get_delta_weight(self, adapter_name: str, *, apply_rank_dropout: bool = False) -> torch.Tensor:
        """``scaling`` times the rebuilt update, shaped like the base weight.

        With ``apply_rank_dropout`` (training only), whole output rows are dropped at random.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses
    def _set_hyper_parameters(self, adapter_name: str, r: int, alpha: float, config: Any) -> None:
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
        self._delta_cache.pop(adapter_name, None)

    def _kernel_size(self) -> tuple[int, ...]:
        """The base convolution's kernel size (``()`` for a linear layer)."""
        return () if self.kind == LINEAR else tuple(self.get_base_layer().kernel_size)

    def _in_per_group(self) -> int:
        base = self.get_base_layer()
        return self.in_features if self.kind == LINEAR else base.in_channels // base.groups

    def _adapter_tensors(self, adapter_name: str) -> list[torch.Tensor]:
        tensors = []
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                tensors.append(container[adapter_name])
        return tensors

    # ------------------------------------------------------------------ forward
    def _delta_forward(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The base layer's linear map with ``delta`` as its weight and no bias."""
        if self.kind == LINEAR:
            return F.linear(x, delta)
        # The base convolution's own routine, so its stride, padding (and padding_mode),
        # dilation and groups apply: the unmerged output then equals the merged one.
        return self.get_base_layer()._conv_forward(x, delta, None)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self.disable_adapters:
            # As in the reference library, disabling a merged layer unmerges it.
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs).to(previous_dtype)
        if not self.training and not self.merged and not args and not kwargs:
            folded = self._folded_forward(x)
            if folded is not None:
                return folded.to(previous_dtype)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result.to(previous_dtype)
        for name in self.active_adapters:
            if name not in self.r:
                continue
            if self.training:
                # One draw per adapter and step, even when module_dropout is 0, as the reference
                # library draws: seeded training runs then see the same random stream.
                if not bool(torch.rand(1) > self.module_dropout[name]):
                    continue
                delta = self.get_delta_weight(name, apply_rank_dropout=bool(self.rank_dropout[name]))
            else:
                delta = self._eval_delta(name)
            result = result + self._delta_forward(self._cast_to_adapter_dtype(x, delta.dtype), delta)
        return result.to(previous_dtype)

    def _folded_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Eval only: ``op(x, W + deltas)``, one product instead of two, or None where it does not apply.

        ``base(x) + op(x, delta)`` runs a second dense product as large as the base layer's, so
        an unmerged LyCORIS linear would cost twice the base. Folding the (cached) deltas into the
        weight for the call is the same map (merging shows it), rounded once instead of twice; the
        sum is not kept, so the cache's memory stays one delta per adapter. It applies to a plain
        ``nn.Linear`` without hooks (whose own forward would be skipped), with input, weight and
        deltas of one dtype, outside autocast, and to inputs of at least ``fold_min_rows`` rows:
        below that, adding the weights costs more than the second product.
        """
        base = self.base_layer
        if (
            type(base) not in _FOLDABLE
            or _has_hooks(base)
            or x.numel() < self.fold_min_rows * self.in_features
        ):
            return None
        weight = base.weight
        names = [name for name in self.active_adapters if name in self.r]
        if not names or x.dtype != weight.dtype or _autocast_enabled(weight.device.type):
            return None
        deltas = [self._eval_delta(name) for name in names]
        if any(delta.dtype != weight.dtype or delta.shape != weight.shape for delta in deltas):
            return None
        effective = weight + deltas[0]
        for delta in deltas[1:]:
            effective = effective + delta
        return F.linear(x, effective, base.bias)

    def _delta_stamp(self, adapter_name: str, tensors: list[torch.Tensor]) -> tuple:
        """What a cached delta of ``adapter_name`` depends on (see the class docstring)."""
        return (
            self.scaling[adapter_name],
            torch.is_inference_mode_enabled(),
            tuple(_tensor_stamp(t) for t in tensors),
        )

    # ------------------------------------------------------------------ eval cache
    def _eval_delta(self, adapter_name: str) -> torch.Tensor:
        tensors = self._adapter_tensors(adapter_name)
        if (
            not self.cache_delta
            or not tensors
            or _autocast_enabled(tensors[0].device.type)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        ):
            return self.get_delta_weight(adapter_name)
        stamp = self._delta_stamp(adapter_name, tensors)
        entry = self._delta_cache.get(adapter_name)
        if entry is not None and entry[0] == stamp:
            return entry[2]
        with torch.no_grad():
            delta = self.get_delta_weight(adapter_name)
        # The detached views keep the factors' storages alive while cached, so a data pointer in
        # the stamp cannot be reused by a different tensor.
        self._delta_cache[adapter_name] = (stamp, [t.detach() for t in tensors], delta)
        return delta

    def clear_delta_cache(self) -> None:
        """Forget the cached deltas (they are rebuilt on the next eval forward)."""
        self._delta_cache.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles start without the cache: it is derived data, as large as the base weights.
        state = self.__dict__.copy()
        state["_delta_cache"] = {}
        return state

    def train(self, mode: bool = True) -> DeltaWeightLayer:
        self._delta_cache.clear()
        return super().train(mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._delta_cache.pop(adapter_name, None)

    # ------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge_one(self, adapter_name: str, *, safe_merge: bool = False) -> None:
        # The delta is added in the promoted dtype and rounded once into the weight's dtype, as
        # the reference library's in-place ``weight += delta`` does.
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
        self._delta_cache.pop(adapter_name, None)

    @torch.no_grad()
    def unmerge_one(self, adapter_name: str) -> None:
        self.get_base_layer().weight.data -= self.get_delta_weight(adapter_name)

    # ------------------------------------------------------------------ scaling
    def set_scale(self, adapter_name: str, scale: float) -> None:
        """Set ``adapter_name``'s scaling to ``scale * alpha / r``."""
        if adapter_name in self.r:
            self.scaling[adapter_name] = scale * self.alpha[adapter_name] / self.r[adapter_name]

    def scale_layer(self, scale: float) -> None:
        """Multiply the active adapters' scaling by ``scale``."""
        if scale == 1:
            return
        for name in self.active_adapters:
            if name in self.r:
                self.scaling[name] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide the active adapters' scaling by ``scale``, or reset it to ``alpha / r``."""
        for name in self.active_adapters:
            if name in self.r:
                self.scaling[name] = (
                    self.alpha[name] / self.r[name] if scale is None else self.scaling[name] / scale
                )
