"""The typed registry plugins register into, and the core dispatches through.

Everything a method contributes is looked up here by its ``peft_type`` name; the core never
imports a method's package directly.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from attrs import define, field, frozen

from peft_core.combination import BUILTIN_STRATEGIES
from peft_core.errors import PluginConflictError, UnknownMethodError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from peft_core.config import PeftConfig
    from peft_core.layer import AdapterLayer
    from peft_core.quantization import QuantizationBackend


__all__ = [
    "Capabilities",
    "CombinationStrategy",
    "LayerContext",
    "LayerFactory",
    "MethodSpec",
    "Registry",
    "StateDictConverter",
    "plugin_hint",
]


@frozen(kw_only=True)
class Capabilities:
    """What a method can do; gates core behaviour and which conformance checks run."""

    mergeable: bool = True
    """Layers implement ``merge``/``unmerge`` into base weights."""
    prompt_learning: bool = False
    """The method changes inputs or the attention cache rather than layers."""
    mixable: bool = False
    """Adapters of this method may be stacked with other methods' adapters on one model."""
    quantized_bases: bool = False
    """Layers work on quantized base layers provided by a quantization backend."""
    identity_init: bool = True
    """A freshly initialised adapter (default init) leaves the base output unchanged."""
    mixed_batch: bool = False
    """``forward(..., adapter_names=[...])`` with one adapter per sample is supported."""
    weighted_combination: bool = False
    """``add_weighted_adapter`` is supported."""


@frozen(kw_only=True)
class LayerContext:
    """What a layer factory may need to know besides the target module itself."""

    key: str
    """Dotted name of the target module inside the base model."""
    model_config: Mapping[str, Any] = field(factory=dict)
    """The base model's config as a dict (``{}`` for a plain ``nn.Module``)."""


class LayerFactory(Protocol):
    def __call__(
        self, target: nn.Module, adapter_name: str, config: PeftConfig, context: LayerContext
    ) -> AdapterLayer | None: ...


class CombinationStrategy(Protocol):
    def __call__(self, deltas: list[torch.Tensor], weights: list[float], **options: Any) -> torch.Tensor: ...


class StateDictConverter(Protocol):
    def __call__(self, state_dict: dict[str, torch.Tensor], config: PeftConfig) -> dict | None: ...


@frozen(kw_only=True)
class MethodSpec:
    """One PEFT method as a plugin declares it."""

    peft_type: str
    """The name written as ``peft_type`` in ``adapter_config.json`` (e.g. ``"LORA"``)."""
    config_cls: type[PeftConfig]
    model_cls: type
    """The adapter-model class (a :class:`peft_core.tuner.AdapterModel` subclass) that injects the
    method's layers into a base model and manages them."""
    prefix: str
    """Parameter-name prefix of the method's trainable tensors (e.g. ``"lora_"``)."""
    capabilities: Capabilities = field(factory=Capabilities)
    default_target_modules: Mapping[str, tuple[str, ...] | str] = field(factory=dict)
    """Target modules to use per transformers ``model_type`` when a config names none: module
    names, or a regex over full module names (e.g. :data:`peft_core.default_targets.LORA_STYLE_DEFAULT_TARGETS`)."""
    plugin: str = ""
    """Distribution that registered this method; filled in by the plugin manager."""


@define
class _FactoryEntry:
    priority: int
    order: int
    factory: LayerFactory
    plugin: str


# Known methods of the reference library and the distribution that provides each here, so that an
# adapter of a method that is not installed names the package to install.
_KNOWN_PLUGINS = {
    "LORA": "peft-lora",
    "ADALORA": "peft-adalora",
    "IA3": "peft-ia3",
    "LOHA": "peft-loha",
    "LOKR": "peft-lokr",
    "OFT": "peft-oft",
    "BOFT": "peft-boft",
    "VERA": "peft-vera",
    "HRA": "peft-hra",
    "PROMPT_TUNING": "peft-prompt-tuning",
    "PREFIX_TUNING": "peft-prefix-tuning",
    "P_TUNING": "peft-p-tuning",
    "MULTITASK_PROMPT_TUNING": "peft-multitask-prompt-tuning",
    "ADAPTION_PROMPT": "peft-adaption-prompt",
    "CPT": "peft-cpt",
}


CORE_PLUGIN = "peft-core"
"""The name entries contributed by the core itself are recorded under."""


def plugin_hint(peft_type: str) -> str:
    """The distribution expected to provide ``peft_type``."""
    return _KNOWN_PLUGINS.get(peft_type.upper(), "peft-" + peft_type.lower().replace("_", "-"))


class Registry:
    """Methods, layer factories, combination strategies and converters, keyed by name.

    ``current_plugin`` is set by the plugin manager while a plugin's hooks run, so every entry
    records who contributed it.
    """

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict
        self.current_plugin = "<unknown>"
        self._methods: dict[str, MethodSpec] = {}
        self._factories: dict[str, list[_FactoryEntry]] = {}
        # The core's own strategies are there whatever plugins load; plugins add more by name.
        self._strategies: dict[str, tuple[CombinationStrategy, str]] = {
            name: (strategy, CORE_PLUGIN) for name, strategy in BUILTIN_STRATEGIES.items()
        }
        self._converters: dict[str, tuple[StateDictConverter, str]] = {}
        self._backends: dict[str, QuantizationBackend] = {}
        self._order = 0

    # ----------------------------------------------------------------- registration
    def register_method(self, spec: MethodSpec) -> None:
        name = spec.peft_type.upper()
        plugin = spec.plugin or self.current_plugin
        existing = self._methods.get(name)
        if existing is not None and existing.plugin != plugin:
            self._conflict(
                f"PEFT method {name!r} is provided by both {existing.plugin!r} and {plugin!r}; "
                f"keeping {existing.plugin!r}. Uninstall one of them, or disable one with "
                f"PEFT_CORE_DISABLE_PLUGINS."
            )
            return
        self._methods[name] = _with_plugin(spec, plugin, name)

    def register_layer_factory(self, peft_type: str, factory: LayerFactory, *, priority: int = 0) -> None:
        self._order += 1
        entries = self._factories.setdefault(peft_type.upper(), [])
        entries.append(_FactoryEntry(priority, self._order, factory, self.current_plugin))
        # Highest priority first; among equals, the earliest registration first.
        entries.sort(key=lambda e: (-e.priority, e.order))

    def register_combination_strategy(self, name: str, strategy: CombinationStrategy) -> None:
        if name in self._strategies and self._strategies[name][1] != self.current_plugin:
            self._conflict(
                f"combination strategy {name!r} is provided by both {self._strategies[name][1]!r} and "
                f"{self.current_plugin!r}; keeping the first."
            )
            return
        self._strategies[name] = (strategy, self.current_plugin)

    def register_state_dict_converter(self, name: str, converter: StateDictConverter) -> None:
        self._converters[name] = (converter, self.current_plugin)

    def register_quantization_backend(self, backend: QuantizationBackend) -> None:
        """Add a backend; the first registration of a name wins (a second one warns)."""
        from attrs import evolve

        existing = self._backends.get(backend.name)
        if existing is not None and existing.plugin != self.current_plugin:
            self._conflict(
                f"quantization backend {backend.name!r} is provided by both {existing.plugin!r} and "
                f"{self.current_plugin!r}; keeping the first."
            )
            return
        self._backends[backend.name] = evolve(backend, plugin=backend.plugin or self.current_plugin)

    def _conflict(self, message: str) -> None:
        if self.strict:
            raise PluginConflictError(message)
        warnings.warn(message, stacklevel=3)

    # ----------------------------------------------------------------- lookup
    def method(self, peft_type: str) -> MethodSpec:
        """The spec of ``peft_type``; raises :class:`UnknownMethodError` naming the plugin to install."""
        key = str(getattr(peft_type, "value", peft_type)).upper()
        try:
            return self._methods[key]
        except KeyError:
            raise UnknownMethodError(key, sorted(self._methods)) from None

    def has_method(self, peft_type: str) -> bool:
        return str(peft_type).upper() in self._methods

    @property
    def methods(self) -> Mapping[str, MethodSpec]:
        return dict(self._methods)

    def method_for_config_class(self, config_cls: type) -> MethodSpec | None:
        for spec in self._methods.values():
            if spec.config_cls is config_cls:
                return spec
        return None

    def layer_factories(self, peft_type: str) -> list[LayerFactory]:
        return [e.factory for e in self._factories.get(peft_type.upper(), [])]

    def layer_factory_origins(self, peft_type: str) -> list[tuple[str, int]]:
        return [(e.plugin, e.priority) for e in self._factories.get(peft_type.upper(), [])]

    def combination_strategy(self, name: str) -> CombinationStrategy:
        try:
            return self._strategies[name][0]
        except KeyError:
            raise ValueError(
                f"Unknown combination type {name!r}; available: {sorted(self._strategies)}. "
                "A plugin adds new ones through the peft_register_combination_strategies hook."
            ) from None

    @property
    def combination_strategies(self) -> Mapping[str, str]:
        return {name: plugin for name, (_, plugin) in self._strategies.items()}

    def state_dict_converters(self) -> list[tuple[str, StateDictConverter]]:
        return [(name, conv) for name, (conv, _) in self._converters.items()]

    @property
    def quantization_backends(self) -> Mapping[str, QuantizationBackend]:
        return dict(self._backends)

    def quantization_backend_for(self, module: nn.Module) -> QuantizationBackend | None:
        """The first registered backend whose ``handles`` accepts ``module``."""
        if not self._backends:
            return None
        for backend in self._backends.values():
            if backend.handles(module):
                return backend
        return None

    def config_class_by_name(self, class_name: str) -> type | None:
        for spec in self._methods.values():
            if spec.config_cls.__name__ == class_name:
                return spec.config_cls
        return None

    def contributions(self, plugin: str) -> dict[str, list[str]]:
        """What ``plugin`` registered, for ``peft-core plugins``."""
        return {
            "methods": sorted(n for n, s in self._methods.items() if s.plugin == plugin),
            "layer_factories": sorted(
                {m for m, entries in self._factories.items() for e in entries if e.plugin == plugin}
            ),
            "combination_strategies": sorted(n for n, (_, p) in self._strategies.items() if p == plugin),
            "state_dict_converters": sorted(n for n, (_, p) in self._converters.items() if p == plugin),
            "quantization_backends": sorted(n for n, b in self._backends.items() if b.plugin == plugin),
        }


def _with_plugin(spec: MethodSpec, plugin: str, name: str) -> MethodSpec:
    from attrs import evolve

    return evolve(spec, plugin=plugin, peft_type=name)
