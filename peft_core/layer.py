"""The contract every layer-wrapping adapter fulfils, and the bookkeeping they all share.

A method's layer subclasses :class:`AdapterLayer`, keeps one entry per adapter name in the
``nn.ModuleDict``/``nn.ParameterDict`` attributes it lists in ``adapter_layer_names`` (trainable)
and the plain dicts in ``other_param_names`` (hyper-parameters), and implements ``update_layer``,
``forward`` and, when it merges through an additive weight delta, ``get_delta_weight``. The
core then handles activation, disabling, deletion, merge bookkeeping and state-dict keys.
"""

from __future__ import annotations

import functools
import math
import warnings
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peft_core.quantization import writable_float_weight

if TYPE_CHECKING:
    from peft_core.config import PeftConfig

__all__ = ["AdapterLayer", "check_adapters_to_merge", "linear_init_bound", "new_linear", "new_module"]


class AdapterLayer(nn.Module):
    """Base class of adapter layers that wrap a ``base_layer``.

    Class attributes a subclass sets:

    * ``adapter_layer_names`` - attributes holding per-adapter *trainable* modules/parameters
      (e.g. ``("lora_A", "lora_B")``); their entries form the adapter's state dict.
    * ``other_param_names`` - attributes holding per-adapter plain values (rank, scaling, ...).
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()
    peft_type: str | None = None
    """The method that created this layer; the core records it, so stacked methods tell their layers apart."""
    hotswap_fixed_fields: tuple[str, ...] | None = None
    """Config fields that must be equal for :func:`~peft_core.hotswap_adapter` (None: all that shape layers)."""
    rank_padded_attributes: tuple[str, ...] = ()
    """Attributes whose tensors may be zero-padded in their rank without changing the output."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        # Straight into _modules and __dict__ (nn.Module.__setattr__ only adds checks for a new
        # object): models get thousands of adapter layers.
        self._modules["base_layer"] = base_layer
        self.__dict__.update(_active_adapters=[], _disable_adapters=False, merged_adapters=[])

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def update_layer(self, adapter_name: str, config: PeftConfig, *, key: str = "", **kwargs: Any) -> None:
        """Create the parameters of ``adapter_name`` from ``config``.

        ``key`` is the module's dotted name in the base model, for per-module options such as
        ``rank_pattern``. Implementations should finish with
        ``self._move_adapter_to_device_of_base_layer(adapter_name)`` and ``self.set_adapter(...)``.
        """

    @abstractmethod
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Base output adapted by the active adapters (base output alone when disabled or merged)."""

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The additive change ``adapter_name`` makes to ``base_layer.weight`` (same shape)."""
        raise TypeError(
            f"{type(self).__name__} does not merge through an additive weight delta; it must override "
            "merge_one/unmerge_one instead."
        )

    # ------------------------------------------------------------------ merge contract
    def merge_one(self, adapter_name: str, *, safe_merge: bool = False) -> None:
        """Fold ``adapter_name`` into the base weight. The default adds ``get_delta_weight``."""
        weight = self.get_base_layer().weight
        delta = self.get_delta_weight(adapter_name).to(weight.dtype)
        if safe_merge:
            merged = weight.data + delta
            _raise_if_not_finite(merged, adapter_name)
            weight.data = merged
        else:
            weight.data += delta

    def unmerge_one(self, adapter_name: str) -> None:
        """Undo :meth:`merge_one`. The default subtracts ``get_delta_weight``."""
        weight = self.get_base_layer().weight
        weight.data -= self.get_delta_weight(adapter_name).to(weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the given (default: active) adapters into the base weights.

        Adapters that are already merged are skipped with a warning, so merging twice never
        applies an adapter twice.
        """
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.adapter_names]
        if not names:
            return
        # A quantized base is merged through a float view of its weight, re-quantized afterwards.
        with writable_float_weight(self.get_base_layer()):
            for name in names:
                self.merge_one(name, safe_merge=safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Unmerge every merged adapter, most recent first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            return
        with writable_float_weight(self.get_base_layer(), what="unmerge"):
            while self.merged_adapters:
                self.unmerge_one(self.merged_adapters.pop())

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # ------------------------------------------------------------------ combining
    @torch.no_grad()
    def combine_adapters(
        self,
        target: str,
        sources: list[str],
        weights: list[float],
        combination_type: str,
        **options: Any,
    ) -> None:
        """Fill ``target``'s tensors by combining the same tensors of ``sources``.

        ``combination_type`` names a strategy of the registry, called with ``options``.

        The default combines tensor by tensor, which is right for methods whose effect is linear
        in each tensor ((IA)³ vectors); sources this layer does not hold are skipped. A method
        whose combined adapter must be re-factorised overrides this.
        """
        # Imported here: the registry is built from the plugins, which import this module.
        from peft_core.plugins import get_registry

        strategy = get_registry().combination_strategy(combination_type)
        held = [(s, w) for s, w in zip(sources, weights) if s in self.adapter_names]
        source_tensors = {s: self._tensors_by_place(s) for s, _ in held}
        for place, tensor in self._tensors_by_place(target).items():
            parts = []
            for source, _ in held:
                part = source_tensors[source].get(place)
                if part is None or part.shape != tensor.shape:
                    shape = "missing" if part is None else f"of shape {tuple(part.shape)}"
                    raise ValueError(
                        f"Cannot combine adapter {source!r} into {target!r}: its {'.'.join(filter(None, place))} is "
                        f"{shape}, the combined adapter's is of shape {tuple(tensor.shape)}. The source adapters "
                        "must have the same shapes on every layer they share."
                    )
                parts.append(part)
            combined = strategy(parts, [w for _, w in held], **options) if parts else torch.zeros_like(tensor)
            tensor.data.copy_(combined)

    def _tensors_by_place(self, adapter_name: str) -> dict[tuple[str, str], torch.Tensor]:
        """``adapter_name``'s tensors keyed by (attribute, name inside it), comparable across adapters."""
        places: dict[tuple[str, str], torch.Tensor] = {}
        for attr in self.adapter_layer_names:
            container = getattr(self, attr, None)
            if container is None or adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, torch.Tensor):
                places[(attr, "")] = item
            else:
                places.update({(attr, rest): t for rest, t in item.state_dict(keep_vars=True).items()})
        return places

    # ------------------------------------------------------------------ adapters
    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds, in insertion order."""
        names: dict[str, None] = {}
        for attr in self.adapter_layer_names + self.other_param_names:
            for name in getattr(self, attr, {}):
                names.setdefault(name, None)
        return list(names)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapters[0] if len(self._active_adapters) == 1 else list(self._active_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def set_adapter(self, adapter_names: str | Iterable[str]) -> None:
        """Activate ``adapter_names`` (one name or several); only their parameters train."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            for name, item in container.items():
                item.requires_grad_(name in names)
        self._active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        """Turn the adapters' effect on or off without touching their parameters."""
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(
                f"Adapter {adapter_name!r} is merged into the base weights; unmerge it before deleting it."
            )
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        if adapter_name in self._active_adapters:
            remaining = [n for n in self._active_adapters if n != adapter_name]
            if not remaining and self.adapter_names:
                remaining = [self.adapter_names[0]]
            self.set_adapter(remaining)

    def get_base_layer(self) -> nn.Module:
        """The innermost wrapped module (adapters of several methods may be stacked)."""
        layer: nn.Module = self
        # A lookup in _modules: hasattr on an nn.Module without the name takes torch's slow,
        # raising path, on every layer of every model-wide loop.
        while (inner := layer._modules.get("base_layer")) is not None:
            layer = inner
        return layer

    @property
    def adapter_scaling(self) -> dict[str, Any] | None:
        """Per-adapter multipliers of each adapter's effect, or None for a method without one.

        The default is the layer's ``scaling`` dict (the reference library's convention, used by
        LoRA, LoHa, LoKr, AdaLoRA). :func:`~peft_core.rescale_adapter_scale` edits it in place, so
        a layer keeping its scale elsewhere overrides this with a dict-like view of it.
        """
        scaling = getattr(self, "scaling", None)
        return scaling if isinstance(scaling, dict) else None

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    # ------------------------------------------------------------------ hot-swapping
    def hotswap_update(self, adapter_name: str, config: PeftConfig, key: str) -> None:
        """Re-derive ``adapter_name``'s hyper-parameters (its scale) from a swapped-in ``config``.

        The default keeps them, so the core then requires equal ranks and alphas.
        """

    def pad_rank(self, adapter_name: str, rank: int) -> None:
        """Zero-pad ``adapter_name``'s :attr:`rank_padded_attributes` tensors to ``rank``."""
        raise TypeError(
            f"{type(self).__name__} declares rank-padded tensors but does not implement pad_rank."
        )

    # ------------------------------------------------------------------ serialization
    def checkpoint_suffix(self, attr: str, rest: str) -> str:
        """Map the part of a model key after ``<attr>.<adapter>.`` to its checkpoint form.

        The default keeps it, so ``lora_A.default.weight`` is saved as ``lora_A.weight``. A
        method whose file format differs from its module layout overrides this (it must stay
        injective, since loading inverts it).
        """
        return rest

    def adapter_state_items(self, adapter_name: str) -> Iterable[tuple[str, str, torch.Tensor]]:
        """``(model_suffix, checkpoint_suffix, tensor)`` for every tensor of ``adapter_name``.

        Suffixes are relative to this layer's own dotted name.
        """
        for attr in self.adapter_layer_names:
            container = getattr(self, attr, None)
            if container is None or adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, torch.Tensor):
                rest_items: Iterable[tuple[str, torch.Tensor]] = [("", item)]
            else:
                rest_items = item.state_dict(keep_vars=True).items()
            for rest, tensor in rest_items:
                model_suffix = f"{attr}.{adapter_name}" + (f".{rest}" if rest else "")
                ckpt_rest = self.checkpoint_suffix(attr, rest)
                ckpt_suffix = attr + (f".{ckpt_rest}" if ckpt_rest else "")
                yield model_suffix, ckpt_suffix, tensor

    def load_adapter_tensor(self, model_suffix: str, saved: torch.Tensor, value: torch.Tensor) -> None:
        """Write checkpoint tensor ``value`` where :meth:`adapter_state_items` found ``saved``.

        The default copies into ``saved``, the live tensor. A layer that saves derived copies
        (AdaLoRA saves only the triplets its rank allocator kept) overrides this to write into the
        tensors the copies came from. Shapes were checked against ``saved`` before any write.
        """
        saved.copy_(value.to(device=saved.device, dtype=saved.dtype))

    # ------------------------------------------------------------------ helpers for subclasses
    def _move_adapter_to_device_of_base_layer(self, adapter_name: str) -> None:
        """Put ``adapter_name``'s tensors on the base weight's device (and float dtype)."""
        base = self.get_base_layer()
        ref = None
        for name in ("weight", "qweight", "W_q"):
            ref = getattr(base, name, None)
            if isinstance(ref, torch.Tensor):
                break
        if not isinstance(ref, torch.Tensor) or ref.device.type == "meta":
            return
        dtype = ref.dtype if ref.dtype.is_floating_point else None
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                container[adapter_name] = nn.Parameter(
                    item.data.to(ref.device, dtype=dtype), requires_grad=item.requires_grad
                )
            else:
                container[adapter_name] = item.to(ref.device, dtype=dtype)

    def _cast_to_adapter_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x if x.dtype == dtype or not x.dtype.is_floating_point else x.to(dtype)


def check_adapters_to_merge(layer: AdapterLayer, adapter_names: list[str] | None) -> list[str]:
    """The adapters still to merge; already merged ones are dropped with a warning."""
    names = layer.active_adapters if adapter_names is None else list(adapter_names)
    already = [n for n in names if n in layer.merged_adapters]
    if already:
        warnings.warn(
            f"Adapters {already} are already merged; they are not merged again.", UserWarning, stacklevel=3
        )
    return [n for n in names if n not in layer.merged_adapters]


def _raise_if_not_finite(tensor: torch.Tensor, adapter_name: str) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(
            f"NaNs or infs detected in the merged weights of adapter {adapter_name!r}; the base weights were "
            "left unchanged. The adapter is likely broken (check its training run)."
        )


def new_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """``nn.Linear(in_features, out_features, bias)``: the same module and values, built faster.

    The values come from the same draws of the global generator as ``nn.Linear``'s own init,
    so a seed gives what it gives the reference library. Going through ``nn.Linear.__init__``
    costs four ``nn.Module.__setattr__`` calls and a Python Kaiming init per factor, a third
    of injecting a LoRA layer; models get thousands of factors.
    """
    layer = new_module(nn.Linear, in_features=in_features, out_features=out_features)
    bound = linear_init_bound(in_features)
    params = layer._parameters
    with torch.no_grad():
        params["weight"] = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        # nn.Linear bounds its bias by 1/sqrt(fan_in), computed apart from the weight's bound.
        bias_bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
        params["bias"] = (
            nn.Parameter(torch.empty(out_features).uniform_(-bias_bound, bias_bound)) if bias else None
        )
    return layer


@functools.lru_cache(maxsize=256)
def linear_init_bound(fan_in: int) -> float:
    """The bound of ``nn.init.kaiming_uniform_(w, a=math.sqrt(5))`` for ``fan_in``: ``nn.Linear``'s weight init.

    Computed step by step as torch does, so ``w.uniform_(-bound, bound)`` draws exactly what
    the init would, for a fraction of its per-call cost.
    """
    if fan_in == 0:
        return 0.0
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
    return math.sqrt(3.0) * (gain / math.sqrt(fan_in))


_FRESH_CONTAINERS = (dict, OrderedDict, set)


@functools.cache
def _module_template(cls: type[nn.Module]) -> tuple[dict[str, Any], tuple[tuple[str, type], ...]] | None:
    """What ``cls()`` leaves in a new instance's ``__dict__``: shared values, and containers to renew.

    Read off one real instance, so it follows the installed torch. A class that needs arguments
    gets ``nn.Module``'s own state only. None when the instance holds anything else (a tensor,
    a submodule): such a class is built through its ``__init__``.
    """
    try:
        instance = cls()
    except TypeError:  # needs arguments (nn.Linear): only nn.Module's own state, the caller sets the rest
        instance = cls.__new__(cls)
        nn.Module.__init__(instance)
    plain: dict[str, Any] = {}
    containers: list[tuple[str, type]] = []
    for name, value in vars(instance).items():
        if type(value) in _FRESH_CONTAINERS:
            if value:
                return None
            containers.append((name, type(value)))
        elif value is None or type(value) in (bool, int, float, str):
            plain[name] = value
        else:
            return None
    return plain, tuple(containers)


def new_module(cls: type[nn.Module], /, **attrs: Any) -> nn.Module:
    """A new ``cls()`` with ``attrs`` set, without running ``nn.Module.__init__``.

    That init sets seventeen attributes through ``object.__setattr__`` and checks its
    arguments: a third of creating an adapter layer's containers, and a model gets thousands.
    For classes whose ``__init__`` only sets plain values and empty containers (ModuleDict,
    ParameterDict, Identity, Dropout); any other goes through ``cls()`` as usual. A class whose
    ``__init__`` needs arguments (``nn.Linear``) gets only ``nn.Module``'s state, and the caller
    passes the rest in ``attrs``. ``attrs`` are set directly and unchecked, so they must be
    plain values the class would have set itself.
    """
    template = _module_template(cls)
    if template is None:
        module = cls()
        module.__dict__.update(attrs)
        return module
    plain, containers = template
    module = cls.__new__(cls)
    state = module.__dict__
    state.update(plain)
    for name, kind in containers:
        state[name] = kind()
    state.update(attrs)
    return module
