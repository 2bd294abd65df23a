"""LoRA layers for ``nn.Linear`` (and transformers' ``Conv1D``), ``nn.Embedding`` and ``nn.ConvNd``.

Attribute and parameter names are the reference library's (``lora_A``, ``lora_B``,
``lora_embedding_A``, ``lora_embedding_B``, ``lora_magnitude_vector``, ``lora_dropout``, and the
``r``/``lora_alpha``/``scaling``/... dicts), so ``model.state_dict()`` keys, and therefore
checkpoint keys, are the same in both libraries. The math is the reference's too, so outputs of
the same adapter agree to float precision:

* plain LoRA: ``y = base(x) + scaling * B(A(dropout(x)))``, ``scaling = alpha / r`` (or
  ``alpha / sqrt(r)`` with rsLoRA);
* DoRA: the adapted weight's per-output norm is rescaled to the learned magnitude ``m``:
  ``y = base(x) + (m / n - 1) * (base(x) - bias) + (m / n) * scaling * B(A(x))`` with
  ``n = ||W + scaling * B A||`` per output unit (detached);
* ``lora_bias``: ``lora_B`` carries a bias, folded into the base bias on merge.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft_core.errors import ConfigError
from peft_core.layer import AdapterLayer, linear_init_bound, new_linear, new_module
from peft_core.quantization import dequantized_weight
from peft_core.targeting import pattern_value
from torch import nn

from peft_lora.combination import combine_into
from peft_lora.config import LoraConfig
from peft_lora.corda import corda_init
from peft_lora.dora import DoraMagnitude, conv_weight_norm, linear_weight_norm
from peft_lora.dropout import dropout_input
from peft_lora.init import olora_init, pissa_init
from peft_lora.init_configs import init_options
from peft_lora.loftq import loftq_init

__all__ = [
    "BASE_PLACEHOLDER",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "Linear",
    "LoraLayer",
    "is_transformers_conv1d",
]

BASE_PLACEHOLDER = "__base__"
"""Name that selects the bare base model for a sample in a mixed-adapter batch."""


def is_transformers_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D``, without importing transformers.

    If transformers was never imported, no module can be one of its classes.
    """
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def _tensors_of(item: nn.Module | torch.Tensor) -> list[torch.Tensor]:
    """The parameters of a factor (a tensor, or a module: a leaf's own without a generator walk)."""
    if isinstance(item, torch.Tensor):
        return [item]
    if not item._modules:
        return [p for p in item._parameters.values() if p is not None]
    return list(item.parameters())


def _output_hooked(module: nn.Module) -> bool:
    """Whether a forward hook (the module's own or a global one) may hold on to its output."""
    from torch.nn.modules import module as module_mod

    return bool(module._forward_hooks or getattr(module_mod, "_global_forward_hooks", None))


def _set_requires_grad(item: nn.Module | torch.Tensor, flag: bool) -> None:
    for tensor in _tensors_of(item):
        tensor.requires_grad_(flag)


def _transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight


def _factors_for_delta(
    weight_A: torch.Tensor, weight_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """``A``, ``B`` to multiply, and the dtype to return the delta in.

    Half-precision matmuls are slow (or missing) on many CPUs: there the delta is computed in float32.
    """
    dtype = weight_A.dtype
    if weight_B.device.type == "cpu" and weight_B.dtype in (torch.float16, torch.bfloat16):
        return weight_A.float(), weight_B.float(), dtype
    return weight_A, weight_B, dtype


class LoraLayer(AdapterLayer):
    """What every LoRA layer shares: per-adapter bookkeeping, scaling, merging (incl. DoRA), mixed batches.

    Subclasses create the factors (``_create_factors``), initialise them (``_init_factors``),
    compute the DoRA magnitude (``_init_dora``) and implement ``forward``,
    ``get_delta_weight`` and the DoRA helpers ``_dora_merge_norm``/``_dora_factor``.
    """

    adapter_layer_names = (
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
    )
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "use_dora", "use_rslora", "lora_bias")

    def __init__(self, base_layer: nn.Module, *, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int]
        self.lora_alpha: dict[str, float]
        self.scaling: dict[str, float]
        self.use_dora: dict[str, bool]
        self.use_rslora: dict[str, bool]
        self.lora_bias: dict[str, bool]
        # Straight into __dict__ and _modules (this object is new, so no name is taken):
        # nn.Module.__setattr__ only adds checks, and a model gets thousands of these layers.
        in_features, out_features = self._features(self.get_base_layer())
        self.__dict__.update(
            r={},
            lora_alpha={},
            scaling={},
            use_dora={},
            use_rslora={},
            lora_bias={},
            fan_in_fan_out=fan_in_fan_out,
            # DoRA: the weight norm each merged adapter was merged with, needed to unmerge it exactly.
            _dora_merge_norms={},
            in_features=in_features,
            out_features=out_features,
        )
        self._modules.update(
            lora_dropout=new_module(nn.ModuleDict),
            lora_A=new_module(nn.ModuleDict),
            lora_B=new_module(nn.ModuleDict),
            lora_embedding_A=new_module(nn.ParameterDict),
            lora_embedding_B=new_module(nn.ParameterDict),
            lora_magnitude_vector=new_module(nn.ModuleDict),
        )

    def _features(self, base: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, config: LoraConfig, *, key: str = "", **kwargs: Any) -> None:
        """Add ``adapter_name``; ``key`` (the module's name) selects ``rank_pattern``/``alpha_pattern``."""
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        if not isinstance(r, int) or r <= 0:
            raise ConfigError(f"The rank for module {key!r} must be a positive integer, got r={r!r}.")
        self._check_config(config, r, key)
        if config.lora_bias and getattr(self.get_base_layer(), "bias", None) is None:
            warnings.warn(
                f"lora_bias=True was passed, but the target {key!r} ({type(self.get_base_layer()).__name__}) has no "
                "bias, so this adapter cannot be merged.",
                UserWarning,
                stacklevel=2,
            )
        try:
            self.r[adapter_name] = r
            self.lora_alpha[adapter_name] = alpha
            self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
            self.use_rslora[adapter_name] = config.use_rslora
            self.use_dora[adapter_name] = config.use_dora
            self.lora_bias[adapter_name] = config.lora_bias
            self.lora_dropout[adapter_name] = (
                new_module(nn.Dropout, p=config.lora_dropout)
                if config.lora_dropout > 0.0
                else new_module(nn.Identity)
            )
            self._create_factors(adapter_name, r, config.lora_bias)
            # LoftQ needs its options, not only the init's name; they are read during the init only.
            self.__dict__["_loftq_options"] = (
                init_options("loftq_config", config.loftq_config)
                if config.init_lora_weights == "loftq"
                else None
            )
            try:
                self._init_factors(adapter_name, config.init_lora_weights, key)
            finally:
                del self.__dict__["_loftq_options"]
            if not self._factors_fit_base(adapter_name):
                self._move_adapter_to_device_of_base_layer(adapter_name)
            if config.use_dora:
                self._init_dora(adapter_name)
        except BaseException:
            # leave no half-built adapter behind (the layer may hold other adapters)
            for attr in self.adapter_layer_names + self.other_param_names:
                container = getattr(self, attr)
                if adapter_name in container:
                    del container[adapter_name]
            raise
        self.set_adapter(self.active_adapters)

    def _check_config(self, config: LoraConfig, r: int, key: str) -> None:
        """Refuse options this layer type does not support (override per type)."""

    def _factors_fit_base(self, adapter_name: str) -> bool:
        """Whether the new factors already sit on the base weight's device in its float dtype.

        Then moving them is a no-op, and skipping it saves a third of creating a layer (``.to``
        walks every factor module), which adds up over hundreds of targeted modules.
        """
        ref = getattr(self.get_base_layer(), "weight", None)
        if not isinstance(ref, torch.Tensor) or not ref.dtype.is_floating_point or ref.device.type == "meta":
            return False
        modules = self._modules
        for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            container = modules[attr]
            if adapter_name not in container:
                continue
            for tensor in _tensors_of(container[adapter_name]):
                if tensor.device != ref.device or tensor.dtype != ref.dtype:
                    return False
        return True

    def _create_factors(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        raise NotImplementedError

    def _init_factors(self, adapter_name: str, init: bool | str, key: str) -> None:
        raise NotImplementedError

    def _init_dora(self, adapter_name: str) -> None:
        raise NotImplementedError

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._dora_merge_norms.pop(adapter_name, None)

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds, in insertion order (every one has an ``r``)."""
        return list(self.r)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Activate ``adapter_names``; only their parameters train (the core's rule, in fewer steps).

        Called for every layer on each switch, so it sets the factors' flags directly instead of
        walking each factor module.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        active = set(names)
        modules = self._modules
        for attr in self.adapter_layer_names:
            container = modules[attr]
            for name, item in container.items():
                _set_requires_grad(item, name in active)
        self._active_adapters = names

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.lora_A or adapter_name in self.lora_embedding_A

    # ------------------------------------------------------------------ hot-swapping
    hotswap_fixed_fields = ("use_dora", "lora_dropout", "lora_bias", "fan_in_fan_out")
    rank_padded_attributes = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")

    def hotswap_update(self, adapter_name: str, config: LoraConfig, key: str) -> None:
        """Take the swapped-in adapter's scale (its r, alpha, patterns and rsLoRA) for ``key``."""
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, alpha
        self.use_rslora[adapter_name] = config.use_rslora
        current = self.scaling[adapter_name]
        if isinstance(current, torch.Tensor):
            current.fill_(scale)  # in place: a compiled graph holds this tensor
        else:
            self.scaling[adapter_name] = scale

    def live_rank(self, adapter_name: str) -> int:
        """The rank of ``adapter_name``'s tensors as they are (padded or not)."""
        if adapter_name in self.lora_embedding_A:
            return int(self.lora_embedding_A[adapter_name].shape[0])
        return int(self.lora_A[adapter_name].weight.shape[0])

    @torch.no_grad()
    def pad_rank(self, adapter_name: str, rank: int) -> None:
        """Zero-pad ``adapter_name`` to ``rank`` (zero rows of A, zero columns of B add nothing)."""
        current = self.live_rank(adapter_name)
        if rank < current:
            raise ValueError(
                f"Cannot pad adapter {adapter_name!r} of rank {current} down to target_rank={rank}; pass a target_rank "
                "at least as large as every adapter's rank."
            )
        if rank == current:
            return
        if getattr(self.get_base_layer(), "groups", 1) != 1:
            raise ValueError(
                f"Cannot pad adapter {adapter_name!r}: its base is a grouped convolution, whose LoRA rank is split "
                "across the groups."
            )

        def padded(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(tensor.shape)
            shape[dim] = rank
            out = tensor.new_zeros(shape)
            out.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
            return out

        if adapter_name in self.lora_embedding_A:
            self.lora_embedding_A[adapter_name].data = padded(self.lora_embedding_A[adapter_name], 0)
            self.lora_embedding_B[adapter_name].data = padded(self.lora_embedding_B[adapter_name], 1)
        else:
            lora_A, lora_B = self.lora_A[adapter_name], self.lora_B[adapter_name]
            lora_A.weight.data = padded(lora_A.weight, 0)
            lora_B.weight.data = padded(lora_B.weight, 1)
            for module, attr in ((lora_A, "out_features"), (lora_A, "out_channels")):
                if hasattr(module, attr):
                    setattr(module, attr, rank)
            for module, attr in ((lora_B, "in_features"), (lora_B, "in_channels")):
                if hasattr(module, attr):
                    setattr(module, attr, rank)
        # The same scale, now described by the padded rank.
        scale = float(self.scaling[adapter_name])
        self.r[adapter_name] = rank
        self.lora_alpha[adapter_name] = scale * (math.sqrt(rank) if self.use_rslora[adapter_name] else rank)

    # ------------------------------------------------------------------ scaling
    def _initial_scaling(self, adapter_name: str) -> float:
        r, alpha = self.r[adapter_name], self.lora_alpha[adapter_name]
        return alpha / math.sqrt(r) if self.use_rslora.get(adapter_name, False) else alpha / r

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """Set ``adapter_name``'s scaling to ``scale`` times its initial value (from r and alpha)."""
        if adapter_name in self.scaling:
            self.scaling[adapter_name] = scale * self._initial_scaling(adapter_name)

    def scale_layer(self, scale: float) -> None:
        """Multiply the scaling of the active adapters by ``scale``."""
        for name in self.active_adapters:
            if self.has_adapter(name):
                self.scaling[name] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide the active adapters' scaling by ``scale``, or reset it to the initial value."""
        for name in self.active_adapters:
            if self.has_adapter(name):
                self.scaling[name] = (
                    self._initial_scaling(name) if scale is None else self.scaling[name] / scale
                )

    # ------------------------------------------------------------------ combining
    def combine_adapters(
        self, target: str, sources: list[str], weights: list[float], combination_type: str, **options: Any
    ) -> None:
        """Write ``target`` from ``sources`` (see :mod:`peft_lora.combination` for the types)."""
        held = [(s, w) for s, w in zip(sources, weights) if self.has_adapter(s)]
        combine_into(self, target, held, combination_type, options)

    def factor_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``: the tensors of ``lora_A``/``lora_B`` (rank on A's first, B's second dimension)."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def delta_as_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        """A delta in the base weight's layout as the (out, in) matrix ``B @ A`` factors."""
        return _transpose(delta, self.fan_in_fan_out)

    # ------------------------------------------------------------------ merging
    def _check_mergeable(self, adapter_name: str) -> None:
        if self.lora_bias.get(adapter_name) and getattr(self.get_base_layer(), "bias", None) is None:
            raise RuntimeError(
                f"Cannot merge adapter {adapter_name!r}: it has lora_bias=True but the base layer has no bias to "
                "fold it into. Keep it unmerged."
            )

    def _dora_merge_norm(
        self, adapter_name: str, base_weight: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        """DoRA: the norm of ``base_weight + delta`` per output unit (magnitude layout)."""
        raise NotImplementedError

    def _dora_factor(self, adapter_name: str, norm: torch.Tensor) -> torch.Tensor:
        """DoRA: ``magnitude / norm`` shaped to broadcast against the base weight."""
        raise NotImplementedError

    def _base_weight_unmerged(self) -> torch.Tensor:
        """The base weight without the adapters merged so far (DoRA norms are taken on it, as in forward)."""
        weight = self.get_base_layer().weight.detach()
        for name in reversed(self.merged_adapters):
            weight = self._unmerged_weight(name, weight)
        return weight

    def _merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.get_delta_weight(adapter_name)
        if not self.use_dora.get(adapter_name):
            return weight + delta.to(weight.dtype)
        norm = self._dora_merge_norm(adapter_name, self._base_weight_unmerged(), delta).detach()
        self._dora_merge_norms[adapter_name] = norm
        return (self._dora_factor(adapter_name, norm) * (weight + delta)).to(weight.dtype)

    def _unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.get_delta_weight(adapter_name)
        if not self.use_dora.get(adapter_name):
            return weight - delta.to(weight.dtype)
        factor = self._dora_factor(adapter_name, self._dora_merge_norms[adapter_name])
        return (weight / factor - delta).to(weight.dtype)

    def _add_delta_(self, adapter_name: str, weight: torch.Tensor, sign: float) -> None:
        """``weight += sign * delta`` in place; layers whose delta is one matmul fuse it (see Linear)."""
        delta = self.get_delta_weight(adapter_name).to(weight.dtype)
        if sign > 0:
            weight += delta
        else:
            weight -= delta

    def _bias_delta(self, adapter_name: str) -> torch.Tensor | None:
        if not self.lora_bias.get(adapter_name) or adapter_name not in self.lora_B:
            return None
        return self.lora_B[adapter_name].bias * self.scaling[adapter_name]

    @torch.no_grad()
    def merge_one(self, adapter_name: str, *, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_name)
        base = self.get_base_layer()
        if not safe_merge and not self.use_dora.get(adapter_name):
            # In place: no fresh weight-sized tensor (and its page faults) per layer.
            self._add_delta_(adapter_name, base.weight.data, 1.0)
            bias_delta = self._bias_delta(adapter_name)
            if bias_delta is not None:
                base.bias.data += bias_delta.to(base.bias.dtype)
            return
        new_weight = self._merged_weight(adapter_name, base.weight.data)
        bias_delta = self._bias_delta(adapter_name)
        new_bias = None if bias_delta is None else base.bias.data + bias_delta.to(base.bias.dtype)
        if safe_merge:
            for tensor in (new_weight, new_bias):
                if tensor is not None and not torch.isfinite(tensor).all():
                    self._dora_merge_norms.pop(adapter_name, None)
                    raise ValueError(
                        f"NaNs or infs detected in the merged weights of adapter {adapter_name!r}; the base weights "
                        "were left unchanged. The adapter is likely broken (check its training run)."
                    )
        base.weight.data = new_weight
        if new_bias is not None:
            base.bias.data = new_bias

    @torch.no_grad()
    def unmerge_one(self, adapter_name: str) -> None:
        base = self.get_base_layer()
        if self.use_dora.get(adapter_name):
            base.weight.data = self._unmerged_weight(adapter_name, base.weight.data)
        else:
            self._add_delta_(adapter_name, base.weight.data, -1.0)
        self._dora_merge_norms.pop(adapter_name, None)
        bias_delta = self._bias_delta(adapter_name)
        if bias_delta is not None:
            base.bias.data = base.bias.data - bias_delta.to(base.bias.dtype)

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

    def _check_mixed_batch(self, x: torch.Tensor, adapter_names: list[str]) -> None:
        if len(x) != len(adapter_names):
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {len(x)} samples; pass one "
                "adapter name per sample."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass adapter_names while adapters are merged; call unmerge_adapter() first."
            )
        for name in set(adapter_names) - {BASE_PLACEHOLDER}:
            if self.use_dora.get(name, False):
                raise ValueError(
                    f"adapter_names cannot select the DoRA adapter {name!r}; DoRA needs whole batches."
                )

    @staticmethod
    def _sub_batches(adapter_names: list[str]) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(adapter_names):
            groups.setdefault(name, []).append(index)
        return groups

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Each sample runs with its own adapter (``BASE_PLACEHOLDER`` for none); layers with lora_A/lora_B."""
        self._check_mixed_batch(x, adapter_names)
        result = self.base_layer(x, *args, **kwargs)
        for name, indices in self._sub_batches(adapter_names).items():
            if name == BASE_PLACEHOLDER or name not in self.lora_A:
                continue
            lora_A = self.lora_A[name]
            sub_batch = x[indices].to(lora_A.weight.dtype)
            output = self.lora_B[name](lora_A(self.lora_dropout[name](sub_batch))) * self.scaling[name]
            result[indices] += output.to(result.dtype)
        return result

    def checkpoint_suffix(self, attr: str, rest: str) -> str:
        # The reference writes the DoRA magnitude as "lora_magnitude_vector" (no ".weight").
        if attr == "lora_magnitude_vector" and rest == "weight":
            return ""
        return rest

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


# ---------------------------------------------------------------------- Linear / Conv1D
class Linear(LoraLayer):
    """LoRA on ``nn.Linear``, or on transformers' ``Conv1D`` with ``fan_in_fan_out=True``.

    ``lora_A``/``lora_B`` are ``nn.Linear(in, r)``/``nn.Linear(r, out)``; for ``Conv1D``, whose
    weight is stored (in, out), the delta is transposed on merge.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        *,
        key: str = "",
        fan_in_fan_out: bool = False,
    ) -> None:
        super().__init__(base_layer, fan_in_fan_out=fan_in_fan_out)
        self.__dict__.update(is_target_conv_1d_layer=fan_in_fan_out, _active_adapters=[adapter_name])
        self.update_layer(adapter_name, config, key=key)

    def _features(self, base: nn.Module) -> tuple[int, int]:
        if isinstance(base, nn.Linear):
            return base.in_features, base.out_features
        n_in, n_out = base.weight.shape  # Conv1D stores (in, out)
        return int(n_in), int(n_out)

    def _create_factors(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_A[adapter_name] = new_linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = new_linear(r, self.out_features, bias=lora_bias)

    def _init_factors(self, adapter_name: str, init: bool | str, key: str) -> None:
        if init is False:
            return
        lora_A, lora_B = self.lora_A[adapter_name], self.lora_B[adapter_name]
        r, scaling = self.r[adapter_name], self.scaling[adapter_name]
        if init is True or init == "gaussian":
            _reset_linear_factors(lora_A, lora_B, init, r)
        elif init == "eva":
            # A is replaced by initialize_lora_eva_weights; B zero keeps the output unchanged until then.
            _reset_linear_factors(lora_A, lora_B, True, r)
        elif init == "corda":
            corda_init(
                lora_A.weight,
                lora_B.weight,
                self.get_base_layer(),
                r=r,
                scaling=scaling,
                fan_in_fan_out=self.fan_in_fan_out,
                key=key,
            )
        elif init == "loftq":
            loftq_init(
                lora_A.weight,
                lora_B.weight,
                self.get_base_layer().weight,
                r=r,
                scaling=scaling,
                fan_in_fan_out=self.fan_in_fan_out,
                options=self._loftq_options,
            )
        elif init == "olora":
            olora_init(
                lora_A.weight,
                lora_B.weight,
                self.get_base_layer().weight,
                r=r,
                scaling=scaling,
                fan_in_fan_out=self.fan_in_fan_out,
            )
        else:
            pissa_init(
                lora_A.weight,
                lora_B.weight,
                self.get_base_layer().weight,
                r=r,
                scaling=scaling,
                fan_in_fan_out=self.fan_in_fan_out,
                init=str(init),
            )

    @torch.no_grad()
    def _init_dora(self, adapter_name: str) -> None:
        weight_A = self.lora_A[adapter_name].weight
        weight_B = self.lora_B[adapter_name].weight
        half = weight_A.dtype == torch.float16  # fp16 matmuls may be missing on CPU
        lora_weight = weight_B.float() @ weight_A.float() if half else weight_B @ weight_A
        if half:
            lora_weight = lora_weight.half()
        base_weight = _transpose(
            dequantized_weight(self.get_base_layer()).to(weight_A.device), self.fan_in_fan_out
        )
        norm = linear_weight_norm(base_weight, lora_weight, self.scaling[adapter_name])
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm)

    def _add_delta_(self, adapter_name: str, weight: torch.Tensor, sign: float) -> None:
        # One GEMM accumulating into the weight: no delta-sized temporaries, one pass over it,
        # where the plain ``weight += scaling * B @ A`` makes two and three passes.
        weight_A, weight_B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        half_on_cpu = weight.device.type == "cpu" and weight.dtype in (torch.float16, torch.bfloat16)
        if (
            half_on_cpu
            or not weight_A.dtype == weight_B.dtype == weight.dtype
            or weight_A.device != weight.device
        ):
            super()._add_delta_(adapter_name, weight, sign)
            return
        alpha = sign * self.scaling[adapter_name]
        if self.fan_in_fan_out:  # Conv1D stores (in, out): add (B @ A)^T = A^T @ B^T
            weight.addmm_(weight_A.T, weight_B.T, alpha=alpha)
        else:
            weight.addmm_(weight_B, weight_A, alpha=alpha)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * B @ A``, in the base weight's layout (transposed for ``Conv1D``)."""
        weight_A, weight_B, dtype = _factors_for_delta(
            self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        )
        delta = _transpose(weight_B @ weight_A, self.fan_in_fan_out) * self.scaling[adapter_name]
        return delta.to(dtype)

    def _dora_merge_norm(
        self, adapter_name: str, base_weight: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        return linear_weight_norm(
            _transpose(base_weight, self.fan_in_fan_out), _transpose(delta, self.fan_in_fan_out), 1.0
        )

    def _dora_factor(self, adapter_name: str, norm: torch.Tensor) -> torch.Tensor:
        factor = (self.lora_magnitude_vector[adapter_name].weight / norm).view(-1, 1)
        return _transpose(factor, self.fan_in_fan_out)

    def _dora_output(
        self, adapter_name: str, x: torch.Tensor, result: torch.Tensor
    ) -> torch.Tensor:  # the DoRA term added to ``result``
        lora_A = self.lora_A[adapter_name]
        lora_B = self.lora_B[adapter_name]
        dropout = self.lora_dropout[adapter_name]
        scaling = self.scaling[adapter_name]
        base = self.get_base_layer()
        if isinstance(dropout, nn.Identity) or not self.training:
            base_result: torch.Tensor | None = result
        else:
            # with dropout the base term must be recomputed on the dropped-out input
            x = dropout(x)
            base_result = None
        lora_weight = (lora_B.weight @ lora_A.weight).to(x.dtype)
        weight = dequantized_weight(base).to(x.dtype)
        norm = linear_weight_norm(
            _transpose(weight, self.fan_in_fan_out), lora_weight.detach(), scaling
        ).detach()
        mag_norm_scale = (self.lora_magnitude_vector[adapter_name].weight / norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is None:
            base_result = F.linear(x, _transpose(weight, self.fan_in_fan_out))
        elif getattr(base, "bias", None) is not None:
            base_result = base_result - base.bias
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Each sample with its own adapter; several adapters run as one batched product.

        A loop over the adapters launches a handful of kernels per adapter. Here the factors of
        the adapters present are stacked (ranks zero-padded to the largest, which adds exact
        zeros) and every sample is multiplied by its own pair with ``bmm``: the launches stay
        the same whatever the number of adapters. Cases the batched path does not cover
        (active dropout, ``lora_bias``, mixed dtypes, one adapter) take the loop.
        """
        self._check_mixed_batch(x, adapter_names)
        present = [n for n in dict.fromkeys(adapter_names) if n != BASE_PLACEHOLDER and n in self.lora_A]
        if len(present) < 2 or x.dim() < 2 or not self._can_batch_adapters(present, x):
            return super()._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        slot = {name: i for i, name in enumerate(present)}
        rows = [i for i, name in enumerate(adapter_names) if name in slot]
        which = torch.tensor([slot[adapter_names[i]] for i in rows], device=x.device)
        rank = max(self.r[n] for n in present)
        weights_A = [self.lora_A[n].weight for n in present]
        weights_B = [self.lora_B[n].weight for n in present]
        stack_A = torch.stack(
            [F.pad(w, (0, 0, 0, rank - w.shape[0])) if w.shape[0] < rank else w for w in weights_A]
        )
        stack_B = torch.stack(
            [F.pad(w, (0, rank - w.shape[1])) if w.shape[1] < rank else w for w in weights_B]
        )
        scaling = torch.tensor([self.scaling[n] for n in present], device=x.device, dtype=stack_A.dtype)
        every_row = len(rows) == len(adapter_names)
        sub = x if every_row else x[torch.tensor(rows, device=x.device)]
        sub = sub.to(stack_A.dtype).reshape(len(rows), -1, self.in_features)
        # scaled at rank width, where it is cheap
        hidden = torch.bmm(sub, stack_A[which].transpose(1, 2)) * scaling[which].view(-1, 1, 1)
        factors_B = stack_B[which].transpose(1, 2)
        plain_base = type(self.base_layer) is nn.Linear and not _output_hooked(self.base_layer)
        if every_row and plain_base and result.dtype == hidden.dtype:
            # As in forward: F.linear's output is not saved for backward, so the second product
            # can accumulate into it, with no output-sized temporary.
            result.view(len(rows), -1, self.out_features).baddbmm_(hidden, factors_B)
            return result
        output = torch.bmm(hidden, factors_B).reshape(len(rows), *result.shape[1:]).to(result.dtype)
        if every_row:
            return result + output
        result[torch.tensor(rows, device=x.device)] += output
        return result

    def _can_batch_adapters(self, present: list[str], x: torch.Tensor) -> bool:
        dtype = self.lora_A[present[0]].weight.dtype
        for name in present:
            dropout = self.lora_dropout[name]
            if self.lora_bias.get(name) or (self.training and not isinstance(dropout, nn.Identity)):
                return False
            if self.lora_A[name].weight.dtype != dtype or self.lora_B[name].weight.dtype != dtype:
                return False
        return x.shape[-1] == self.in_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        early = self._forward_preamble(x, args, kwargs)
        if early is not None:
            return early
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        plain_base = type(self.base_layer) is nn.Linear and not _output_hooked(self.base_layer)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A = self.lora_A[name]
            x = self._cast_to_adapter_dtype(x, lora_A.weight.dtype)
            if self.use_dora.get(name):
                result = result + self._dora_output(name, x, result)
                continue
            dropped, factor = dropout_input(self.lora_dropout[name], x)
            output = self.lora_B[name](lora_A(dropped))
            scaling = self.scaling[name] * factor
            if plain_base and output.dtype == result.dtype:
                # F.linear's output is not saved for backward, so it can take the scaled sum in
                # place: one fused pass, no extra tensor of the output's size per layer.
                result.add_(output, alpha=scaling)
            else:
                result = result + output * scaling
        return result.to(result_dtype)


@torch.no_grad()
def _reset_linear_factors(lora_A: nn.Module, lora_B: nn.Module, init: bool | str, r: int) -> None:
    """Identity init of ``B(A(x))``: A random (Kaiming-uniform or Gaussian 1/r), B (and its bias) zero."""
    weight = lora_A.weight
    if init is True:
        # kaiming_uniform_(a=sqrt(5)), the same draws without its per-call bookkeeping
        bound = linear_init_bound(weight.shape[1] * math.prod(weight.shape[2:]))  # fan_in, as torch counts it
        weight.uniform_(-bound, bound)
    else:
        weight.normal_(0.0, 1 / r)
    lora_B.weight.zero_()
    if lora_B.bias is not None:
        lora_B.bias.zero_()


# ---------------------------------------------------------------------- Embedding
class Embedding(LoraLayer):
    """LoRA on ``nn.Embedding``: ``lookup(x, A^T) @ B^T * scaling`` added to the base embedding.

    ``lora_embedding_A`` is (r, num_embeddings) and ``lora_embedding_B`` is (embedding_dim, r),
    as in the reference. Like the reference, ``lora_dropout`` is not applied to embeddings and
    ``lora_bias`` is not supported.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, *, key: str = ""
    ) -> None:
        super().__init__(base_layer)
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, config, key=key)

    def _features(self, base: nn.Module) -> tuple[int, int]:
        return base.num_embeddings, base.embedding_dim

    def _check_config(self, config: LoraConfig, r: int, key: str) -> None:
        if config.lora_bias:
            raise ConfigError(
                f"lora_bias=True is not supported for embedding layers ({key!r}); set lora_bias=False or leave "
                "embeddings out of target_modules."
            )

    def _create_factors(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn((r, self.in_features)))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn((self.out_features, r)))

    def _init_factors(self, adapter_name: str, init: bool | str, key: str) -> None:
        if init is False:
            return
        if init not in (True, "gaussian"):
            # The reference library silently falls back to the default init here; say so.
            warnings.warn(
                f"init_lora_weights={init!r} applies to linear layers only; the embedding {key!r} gets the default "
                "LoRA init (A zeros, B Gaussian).",
                UserWarning,
                stacklevel=4,
            )
        # Identity init: A zeros, B Gaussian (the original LoRA code's choice for embeddings).
        nn.init.zeros_(self.lora_embedding_A[adapter_name])
        nn.init.normal_(self.lora_embedding_B[adapter_name])

    @torch.no_grad()
    def _init_dora(self, adapter_name: str) -> None:
        weight_A = self.lora_embedding_A[adapter_name]
        weight_B = self.lora_embedding_B[adapter_name]
        half = weight_A.dtype == torch.float16
        lora_weight = weight_B.float() @ weight_A.float() if half else weight_B @ weight_A
        if half:
            lora_weight = lora_weight.half()
        base_weight = self.get_base_layer().weight.to(weight_A.device).T
        norm = linear_weight_norm(base_weight, lora_weight, self.scaling[adapter_name])
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm)

    def factor_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def delta_as_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T  # the base weight is (num_embeddings, embedding_dim); B @ A is its transpose

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * (B @ A)^T``: (num_embeddings, embedding_dim) like the base weight."""
        weight_A, weight_B, dtype = _factors_for_delta(
            self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        )
        delta = (weight_B @ weight_A).T * self.scaling[adapter_name]
        return delta.to(dtype)

    def _dora_merge_norm(
        self, adapter_name: str, base_weight: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        return linear_weight_norm(base_weight.T, delta.T, 1.0)

    def _dora_factor(self, adapter_name: str, norm: torch.Tensor) -> torch.Tensor:
        return (self.lora_magnitude_vector[adapter_name].weight / norm).view(1, -1)

    def _embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(
            x,
            weight,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )

    def _embed_scale(self) -> torch.Tensor | None:
        """The scalar some embeddings (e.g. Gemma's) multiply their output by; LoRA's share must follow."""
        base = self.get_base_layer()
        scale = getattr(base, "embed_scale", None)
        if isinstance(scale, (int, float)):
            return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
        if isinstance(scale, torch.Tensor):
            if scale.numel() != 1:
                raise ValueError(
                    f"embed_scale of {type(base).__name__} has shape {tuple(scale.shape)}; only a scalar is supported."
                )
            return scale
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        early = self._forward_preamble(x, args, kwargs)
        if early is not None:
            return early
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        embed_scale = self._embed_scale()
        for name in self.active_adapters:
            if name not in self.lora_embedding_A:
                continue
            embedding_A = self.lora_embedding_A[name].T
            embedding_B = self.lora_embedding_B[name].T
            scaling = self.scaling[name]
            if self.use_dora.get(name):
                mag_norm_scale, dora_output = self._dora_parts(name, x, embedding_A, embedding_B, scaling)
                if embed_scale is not None:
                    dora_output = dora_output * embed_scale.to(dora_output.dtype)
                result = mag_norm_scale * result + dora_output
            else:
                output = (self._embed(x, embedding_A) @ embedding_B) * scaling
                if embed_scale is not None:
                    output = output * embed_scale.to(output.dtype)
                result = result + output
        return result.to(result_dtype)

    def _dora_parts(
        self,
        adapter_name: str,
        x: torch.Tensor,
        embedding_A: torch.Tensor,
        embedding_B: torch.Tensor,
        scaling: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DoRA on an embedding: the factor for the base output, and the rescaled LoRA output."""
        lora_weight = (embedding_A @ embedding_B).T
        norm = linear_weight_norm(self.get_base_layer().weight.T, lora_weight.detach(), scaling).detach()
        mag_norm_scale = self.lora_magnitude_vector[adapter_name].weight / norm
        return mag_norm_scale, mag_norm_scale * (self._embed(x, embedding_A) @ embedding_B) * scaling

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        self._check_mixed_batch(x, adapter_names)
        result = self.base_layer(x, *args, **kwargs)
        embed_scale = self._embed_scale()
        for name, indices in self._sub_batches(adapter_names).items():
            if name == BASE_PLACEHOLDER or name not in self.lora_embedding_A:
                continue
            output = (
                self._embed(x[indices], self.lora_embedding_A[name].T) @ self.lora_embedding_B[name].T
            ) * (self.scaling[name])
            if embed_scale is not None:
                output = output * embed_scale.to(output.dtype)
            result[indices] += output.to(result.dtype)
        return result


# ---------------------------------------------------------------------- Conv
class _ConvNd(LoraLayer):
    """LoRA on ``nn.Conv{1,2,3}d``: ``lora_A`` has the base kernel (r output channels), ``lora_B`` is 1x1."""

    _conv_fn: Any = None
    _kernel_dim = 0

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, *, key: str = ""
    ) -> None:
        super().__init__(base_layer)
        weight_dim = self.get_base_layer().weight.dim()
        if weight_dim != self._kernel_dim:
            raise ValueError(
                f"{type(self).__name__} needs a {self._kernel_dim}-d conv kernel, got {weight_dim}-d for {key!r}."
            )
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, config, key=key)
        if self.get_base_layer().groups > 1:
            warnings.warn(
                f"LoRA on the grouped conv {key!r} (groups={self.get_base_layer().groups}) cannot be merged.",
                UserWarning,
                stacklevel=3,
            )

    def _features(self, base: nn.Module) -> tuple[int, int]:
        return base.in_channels, base.out_channels

    def _check_config(self, config: LoraConfig, r: int, key: str) -> None:
        groups = self.get_base_layer().groups
        if r % groups != 0:
            raise ConfigError(
                f"{key!r} is a conv with groups={groups}; the LoRA rank must be divisible by it, got r={r}. Choose "
                "another r (or a rank_pattern entry for this module), or leave it out of target_modules."
            )
        if config.use_dora and groups > 1:
            raise ConfigError(f"DoRA is not supported on the grouped conv {key!r} (groups={groups}).")
        init = config.init_lora_weights
        if init not in (True, False, "gaussian"):
            raise ConfigError(
                f"init_lora_weights={init!r} is not supported for conv layers ({key!r}); use True, False or "
                "'gaussian', or leave conv layers out of target_modules."
            )

    def _create_factors(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        base = self.get_base_layer()
        conv = type(base)
        ones = (1,) * (self._kernel_dim - 2)
        # Same constructor arguments as the reference (no dilation/padding_mode on lora_A), so the
        # adapted outputs agree.
        self.lora_A[adapter_name] = conv(
            self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False
        )
        self.lora_B[adapter_name] = conv(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias)

    def _init_factors(self, adapter_name: str, init: bool | str, key: str) -> None:
        if init is not False:
            _reset_linear_factors(
                self.lora_A[adapter_name], self.lora_B[adapter_name], init, self.r[adapter_name]
            )

    def _lora_weight(self, adapter_name: str) -> torch.Tensor:
        """``B @ A`` as a kernel of the base weight's shape (1x1 lora_B folded into lora_A)."""
        weight_A = self.lora_A[adapter_name].weight
        weight_B = self.lora_B[adapter_name].weight
        r = weight_A.shape[0]
        return torch.mm(weight_B.view(-1, r), weight_A.view(r, -1)).reshape(
            self.get_base_layer().weight.shape
        )

    @torch.no_grad()
    def _init_dora(self, adapter_name: str) -> None:
        weight_A = self.lora_A[adapter_name].weight
        half = weight_A.dtype == torch.float16
        if half:
            weight_B = self.lora_B[adapter_name].weight
            r = weight_A.shape[0]
            lora_weight = torch.mm(weight_B.float().view(-1, r), weight_A.float().view(r, -1)).half()
            lora_weight = lora_weight.reshape(self.get_base_layer().weight.shape)
        else:
            lora_weight = self._lora_weight(adapter_name)
        base_weight = self.get_base_layer().weight.to(weight_A.device)
        norm = conv_weight_norm(base_weight, lora_weight, self.scaling[adapter_name])
        self.lora_magnitude_vector[adapter_name] = DoraMagnitude(norm)

    def delta_as_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.flatten(1)  # (out, in * kernel): lora_B is (out, r, 1...), lora_A (r, in, kernel...)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling`` times the kernel equivalent to ``lora_B(lora_A(.))``."""
        weight_A, weight_B, dtype = _factors_for_delta(
            self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        )
        if all(k == 1 for k in self.get_base_layer().weight.shape[2:]):
            delta = torch.mm(weight_B.flatten(1), weight_A.flatten(1)).view(
                self.get_base_layer().weight.shape
            )
        else:
            # Composing the two convs is itself a convolution of A's kernel (as a batch) with B.
            delta = self._conv_fn(weight_A.transpose(0, 1), weight_B).transpose(0, 1)
        delta = delta * self.scaling[adapter_name]
        return delta.to(dtype)

    def _check_mergeable(self, adapter_name: str) -> None:
        if self.get_base_layer().groups > 1:
            raise NotImplementedError(
                f"Merging LoRA into a grouped conv (groups={self.get_base_layer().groups}) is not supported; keep "
                "the adapter unmerged."
            )
        super()._check_mergeable(adapter_name)

    def _dora_view(self) -> tuple[int, ...]:
        return (-1,) + (1,) * (self._kernel_dim - 1)

    def _dora_merge_norm(
        self, adapter_name: str, base_weight: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        return conv_weight_norm(base_weight, delta, 1.0)

    def _dora_factor(self, adapter_name: str, norm: torch.Tensor) -> torch.Tensor:
        return (self.lora_magnitude_vector[adapter_name].weight / norm).view(*self._dora_view())

    def _dora_output(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lora_A = self.lora_A[adapter_name]
        lora_B = self.lora_B[adapter_name]
        dropout = self.lora_dropout[adapter_name]
        scaling = self.scaling[adapter_name]
        base = self.get_base_layer()
        if isinstance(dropout, nn.Identity) or not self.training:
            base_result: torch.Tensor | None = result
        else:
            x = dropout(x)
            base_result = None
        weight = base.weight
        norm = conv_weight_norm(weight, self._lora_weight(adapter_name).detach(), scaling).detach()
        mag_norm_scale = self.lora_magnitude_vector[adapter_name].weight / norm
        if base_result is None:
            base_result = self._conv_fn(
                x,
                weight.to(x.dtype),
                bias=None,
                stride=base.stride,
                padding=base.padding,
                dilation=base.dilation,
                groups=base.groups,
            )
        elif base.bias is not None:
            base_result = base_result - base.bias.view((1, -1) + (1,) * (base_result.dim() - 2))
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_B(lora_A(x)) * scaling

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        early = self._forward_preamble(x, args, kwargs)
        if early is not None:
            return early
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A = self.lora_A[name]
            x = self._cast_to_adapter_dtype(x, lora_A.weight.dtype)
            if self.use_dora.get(name):
                result = result + self._dora_output(name, x, result)
            else:
                result = result + self.lora_B[name](lora_A(self.lora_dropout[name](x))) * self.scaling[name]
        return result.to(result_dtype)


class Conv1d(_ConvNd):
    """LoRA on ``nn.Conv1d``."""

    _conv_fn = staticmethod(F.conv1d)
    _kernel_dim = 3


class Conv2d(_ConvNd):
    """LoRA on ``nn.Conv2d``."""

    _conv_fn = staticmethod(F.conv2d)
    _kernel_dim = 4


class Conv3d(_ConvNd):
    """LoRA on ``nn.Conv3d``."""

    _conv_fn = staticmethod(F.conv3d)
    _kernel_dim = 5
