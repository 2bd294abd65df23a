"""The method-agnostic adapter model: injects a method's layers and manages its adapters.

One class serves every layer-wrapping method; a plugin subclasses it only for behaviour its
method really needs (see the ``_`` override points). The registry supplies the layers.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Collection, Iterator
from typing import Any

import torch
from torch import nn

from peft_core.combination import check_weighted_request
from peft_core.config import PeftConfig
from peft_core.errors import ConfigError, TargetModulesError
from peft_core.layer import AdapterLayer
from peft_core.modules_to_save import ModulesToSaveWrapper
from peft_core.plugins import get_registry
from peft_core.quantization import backend_for, install_hint, quantized_library
from peft_core.registry import LayerContext, MethodSpec
from peft_core.targeting import ALL_LINEAR, expand_all_linear, match_target, unmatched_entries
from peft_core.walk import through_base_layer, walk

__all__ = ["AdapterModel", "model_config_dict"]


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The base model's config as a plain dict (``{}`` for models without one)."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config) if isinstance(config, dict) else {}


def _get_submodule(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    parent_key, _, name = key.rpartition(".")
    parent = model.get_submodule(parent_key) if parent_key else model
    return parent, getattr(parent, name), name


class AdapterModel(nn.Module):
    """Holds ``model`` (the base, with adapter layers injected) and the per-adapter configs."""

    def __init__(
        self,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str = "default",
        *,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        loading: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.spec: MethodSpec = get_registry().method(config.peft_type or "")
        self.active_adapters: list[str] = [adapter_name]
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.low_cpu_mem_usage = low_cpu_mem_usage
        self.inject_adapter(adapter_name, config, loading=loading)

    # ------------------------------------------------------------------ attribute forwarding
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def prefix(self) -> str:
        return self.spec.prefix

    @property
    def active_adapter(self) -> str | list[str]:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    # ------------------------------------------------------------------ override points
    def _prepare_adapter_config(self, config: PeftConfig, model_config: dict[str, Any]) -> PeftConfig:
        """Fill in ``target_modules`` from the method's defaults for the model type."""
        if hasattr(config, "target_modules") and config.target_modules is None:
            model_type = model_config.get("model_type")
            defaults = self.spec.default_target_modules.get(model_type or "")
            if not defaults:
                raise ConfigError(
                    f"target_modules is not set and {self.spec.peft_type} has no default targets for model_type "
                    f"{model_type!r}. Pass target_modules (a list of module names, a regex, or 'all-linear')."
                )
            # A regex default (a string) stands as it is; names become a list, as the reference writes them.
            config = config.copy(target_modules=defaults if isinstance(defaults, str) else list(defaults))
        return config

    def _validate_new_adapter(self, config: PeftConfig) -> None:
        """Refuse a config that cannot coexist with the adapters already present."""

    def _config_for_loading(self, config: PeftConfig) -> PeftConfig:
        """The config used to build layers that a checkpoint will overwrite."""
        return config

    def _mark_only_adapters_as_trainable(self) -> None:
        self._freeze_base()
        for adapter in self.active_adapters:
            config = self.peft_config.get(adapter)
            # An adapter loaded for inference trains nothing, its biases included.
            if config is None or config.inference_mode:
                continue
            bias = getattr(config, "bias", "none")
            if bias == "none":
                continue
            if bias == "all":
                # An original that a modules_to_save wrapper does not run (it runs a copy) stays frozen.
                idle = {
                    id(p)
                    for m in self.model.modules()
                    if isinstance(m, ModulesToSaveWrapper) and m.active_adapter is not None
                    for p in m.original_module.parameters()
                }
                for name, param in self.model.named_parameters():
                    if (name.endswith(".bias") or name == "bias") and id(param) not in idle:
                        param.requires_grad_(True)
            elif bias == f"{self.prefix}only":
                for module in self.adapter_layers():
                    base_bias = getattr(module.get_base_layer(), "bias", None)
                    if isinstance(base_bias, nn.Parameter):
                        base_bias.requires_grad_(True)
            else:
                raise ConfigError(f"bias={bias!r} is not one of 'none', 'all', '{self.prefix}only'.")

    # ------------------------------------------------------------------ injection
    def owns(self, module: nn.Module) -> bool:
        """Whether ``module`` is an adapter layer of this model's method.

        Layers of other methods may sit in the same model (stacked, in a mixed model); every
        loop of this class touches only its own.
        """
        return isinstance(module, AdapterLayer) and layer_method(module) == self.spec.peft_type

    def _manages(self, module: nn.Module) -> bool:
        return isinstance(module, ModulesToSaveWrapper) or self.owns(module)

    def adapter_layers(self) -> Iterator[AdapterLayer]:
        for _, module in self.named_adapter_layers():
            yield module

    def named_adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for name, module in self._named_managed():
            if not isinstance(module, ModulesToSaveWrapper):
                yield name, module  # type: ignore[misc]

    def _named_managed(self) -> Iterator[tuple[str, nn.Module]]:
        """This method's adapter layers and the modules_to_save wrappers, in ``named_modules`` order.

        The walk enters a layer of this method only through its ``base_layer`` (where another
        method's layer may be stacked): the factor modules inside, most of an adapted model's
        modules, never hold a layer, and every model-wide loop of this class walks the model.
        """
        owns = self.owns
        for name, module in walk(self.model, lambda m: through_base_layer(m) if owns(m) else m._modules):
            if owns(module) or isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def _create_layer(
        self, target: nn.Module, adapter_name: str, config: PeftConfig, context: LayerContext
    ) -> AdapterLayer:
        self._check_quantized_base(target, context.key)
        for factory in get_registry().layer_factories(self.spec.peft_type):
            layer = factory(target, adapter_name, config, context)
            if layer is not None:
                layer.peft_type = self.spec.peft_type
                return layer
        origins = ", ".join(p for p, _ in get_registry().layer_factory_origins(self.spec.peft_type)) or "none"
        raise TargetModulesError(
            f"Target module {context.key!r} is a {type(target).__module__}.{type(target).__name__}, which "
            f"{self.spec.peft_type} cannot wrap (layer factories from: {origins}). Remove it from target_modules, "
            "or install a plugin that registers a layer factory for this module type."
        )

    def _check_quantized_base(self, target: nn.Module, key: str) -> None:
        """Refuse a quantized base layer that no backend handles, or that this method cannot adapt."""
        base = target.get_base_layer() if isinstance(target, AdapterLayer) else target
        library = quantized_library(base)
        if library is None:
            return
        backend = backend_for(base)
        if backend is None:
            hint = install_hint(library)
            fix = f"Install it with `pip install {hint}`" if hint.startswith("peft-") else f"Install {hint}"
            raise TargetModulesError(
                f"Target module {key!r} is a quantized layer ({type(base).__module__}.{type(base).__name__}) that "
                f"no installed quantization backend handles, so {self.spec.peft_type} cannot wrap it. {fix}: a "
                "quantization backend teaches every method these layers. Or leave the module out of target_modules."
            )
        if not self.spec.capabilities.quantized_bases:
            able = sorted(n for n, s in get_registry().methods.items() if s.capabilities.quantized_bases)
            raise TargetModulesError(
                f"Target module {key!r} is a {backend.name} layer, and {self.spec.peft_type} does not declare "
                f"support for quantized base layers. Methods that do: {able}. Use one of them, or exclude the "
                "quantized modules from target_modules."
            )
        if backend.prepare is not None:
            backend.prepare(base)

    def _target_keys(self, config: PeftConfig) -> list[str]:
        """Names of the modules ``config`` targets, in ``named_modules`` order.

        Never inside an adapter layer (of any method), a modules_to_save wrapper or a module of
        this method's own (``<prefix>*``): the walk does not enter them, where a filter over
        ``named_modules`` would visit and reject each of their many modules.
        """
        targets = getattr(config, "target_modules", None)
        prefix = self.prefix

        def children_of(module: nn.Module) -> dict[str, nn.Module | None]:
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                return {}
            return {
                name: child
                for name, child in module._modules.items()
                if name not in _NEVER_TARGETED and not (prefix and name.startswith(prefix))
            }

        keys = [
            key
            for key, module in walk(self.model, children_of)
            if key and not isinstance(module, ModulesToSaveWrapper) and match_target(config, key)
        ]
        if not keys:
            kinds = sorted(
                {k.split(".")[-1] for k, m in self.model.named_modules() if isinstance(m, nn.Linear)}
            )
            raise TargetModulesError(
                f"target_modules={targets!r} matched no module of the model"
                + (" (after exclude_modules/layers_to_transform)" if _has_filters(config) else "")
                + f". Linear layers in this model are named: {kinds[:20]}."
            )
        if isinstance(targets, (list, tuple, set, frozenset)):
            # An entry that a target matched is matched; only the rest needs every module's name.
            missing = unmatched_entries(sorted(targets), keys)
            if missing:
                missing = unmatched_entries(missing, (k for k, _ in self.model.named_modules()))
            if missing:
                warnings.warn(
                    f"target_modules entries {missing} matched no module of the model and were ignored.",
                    UserWarning,
                    stacklevel=4,
                )
        return keys

    def _freeze_base(self) -> None:
        """Freeze every parameter outside the adapters (outside ``<prefix>*`` modules and modules_to_save copies).

        A walk over modules rather than ``named_parameters``, which builds a dotted name for each
        of the adapters' tensors only for them to be skipped.
        """
        prefix = self.prefix
        if not prefix or "." in prefix:  # a prefix that spans module names: match full names
            for name, param in self.model.named_parameters():
                if prefix not in name and "modules_to_save." not in name:
                    param.requires_grad_(False)
            return
        seen: set[int] = set()
        stack: list[nn.Module] = [self.model]
        while stack:
            module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            for name, param in module._parameters.items():
                if param is not None and prefix not in name:
                    param.requires_grad_(False)
            wrapper = isinstance(module, ModulesToSaveWrapper)
            for name, child in module._modules.items():
                # modules_to_save copies are handled by their wrapper's set_adapter.
                if child is None or prefix in name or (wrapper and name == "modules_to_save"):
                    continue
                stack.append(child)

    def _freeze_adapter(self, adapter_name: str, managed: list[nn.Module] | None = None) -> None:
        """Freeze ``adapter_name``'s tensors (an adapter in inference mode trains nothing)."""
        for module in self._managed() if managed is None else managed:
            if isinstance(module, ModulesToSaveWrapper):
                copy = (
                    module.modules_to_save[adapter_name] if adapter_name in module.modules_to_save else None
                )
                params = copy.parameters() if copy is not None else ()
            else:
                params = _adapter_tensors(module, adapter_name)
            for param in params:
                param.requires_grad_(False)

    def _managed(self) -> list[nn.Module]:
        return [module for _, module in self._named_managed()]

    def inject_adapter(self, adapter_name: str, config: PeftConfig, *, loading: bool = False) -> None:
        """Add ``adapter_name``: wrap (or extend) every targeted module, and set up modules_to_save."""
        with _collector_paused():
            self._inject_adapter(adapter_name, config, loading=loading)

    def _inject_adapter(self, adapter_name: str, config: PeftConfig, *, loading: bool) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(
                f"An adapter named {adapter_name!r} already exists; delete it or pick another name."
            )
        _check_adapter_name(adapter_name)
        spec = get_registry().method(config.peft_type or "")
        if spec.peft_type != self.spec.peft_type:
            raise ConfigError(
                f"Cannot add a {spec.peft_type} adapter to a model holding {self.spec.peft_type} adapters; use "
                "get_peft_model(..., mixed=True) to combine methods."
            )
        model_config = model_config_dict(self.model)
        config = self._prepare_adapter_config(config, model_config)
        if getattr(config, "target_modules", None) == ALL_LINEAR:
            config = config.copy(target_modules=expand_all_linear(self.model))
        self._validate_new_adapter(config)
        build_config = self._config_for_loading(config) if loading else config

        self.peft_config[adapter_name] = config
        created: set[int] = set()
        try:
            keys = self._target_keys(config)
            # One walk instead of a root-to-leaf lookup per key; a key under a module replaced
            # in this loop is looked up afresh.
            modules = dict(self.model.named_modules())
            replaced: set[str] = set()
            for key in keys:
                parent_key, _, name = key.rpartition(".")
                parent = modules.get(parent_key)
                if parent is None or _has_prefix_in(parent_key, replaced):
                    parent, target, name = _get_submodule(self.model, key)
                else:
                    target = getattr(parent, name)
                context = LayerContext(key=key, model_config=model_config)
                if self.owns(target):
                    target.update_layer(adapter_name, build_config, key=key)
                    target.set_adapter(self._layer_active(target))
                else:
                    # Its active adapters are set with every other layer's below (set_adapter).
                    layer = self._create_layer(target, adapter_name, build_config, context)
                    setattr(parent, name, layer)
                    replaced.add(key)
                    created.add(id(layer))
            self._add_modules_to_save(adapter_name, config)
        except BaseException:
            self._remove_adapter_everywhere(adapter_name)
            del self.peft_config[adapter_name]
            raise

        # New adapter modules start enabled and in training mode; follow the model's state instead
        # (adapters disabled stay disabled, dropout stays off in eval).
        managed = self._managed()
        was_disabled = any(m.disable_adapters for m in managed if id(m) not in created)
        training = self.model.training
        for module in managed:
            _set_training(module, training)
            if was_disabled:
                module.enable_adapters(False)
        if self.autocast_adapter_dtype:
            self._upcast_adapter(adapter_name, managed)
        self._activate(self.active_adapters, managed, fresh=created)
        self._mark_only_adapters_as_trainable()
        if config.inference_mode and adapter_name not in self.active_adapters:  # _activate froze active ones
            self._freeze_adapter(adapter_name, managed)

    def _layer_active(self, layer: AdapterLayer) -> list[str]:
        return [n for n in self.active_adapters if n in layer.adapter_names]

    def _add_modules_to_save(self, adapter_name: str, config: PeftConfig) -> None:
        names = getattr(config, "modules_to_save", None)
        if not names:
            return
        found = False
        for key, _module in list(self.model.named_modules()):
            if not key or any(p in {"modules_to_save", "original_module"} for p in key.split(".")):
                continue
            if not any(key == m or key.endswith("." + m) for m in names):
                continue
            found = True
            parent, target, name = _get_submodule(self.model, key)
            if isinstance(target, ModulesToSaveWrapper):
                target.update(adapter_name)
            else:
                setattr(parent, name, ModulesToSaveWrapper(target, adapter_name))
        if not found:
            raise TargetModulesError(
                f"modules_to_save={names!r} matched no module of the model; check the module names."
            )

    def _upcast_adapter(self, adapter_name: str, managed: list[nn.Module] | None = None) -> None:
        """Keep half-precision adapters in float32, as training them in fp16/bf16 is unstable."""
        for layer in self._managed() if managed is None else managed:
            if isinstance(layer, ModulesToSaveWrapper):
                continue
            for param in _adapter_tensors(layer, adapter_name):
                if param.dtype in (torch.float16, torch.bfloat16):
                    param.data = param.data.float()

    def _remove_adapter_everywhere(self, adapter_name: str) -> None:
        """Delete every trace of ``adapter_name`` and unwrap modules left holding no adapter."""
        for module in self._managed():
            if self.owns(module) and adapter_name in module.merged_adapters:
                continue
            module.delete_adapter(adapter_name)
        for key, module in list(self._named_managed()):
            if self.owns(module) and not module.adapter_names:
                parent, _, name = _get_submodule(self.model, key)
                setattr(parent, name, module.base_layer)
            elif isinstance(module, ModulesToSaveWrapper) and not module.adapter_names:
                parent, _, name = _get_submodule(self.model, key)
                setattr(parent, name, module.original_module)

    # ------------------------------------------------------------------ adapter management
    def add_adapter(self, adapter_name: str, config: PeftConfig, *, loading: bool = False) -> None:
        self.inject_adapter(adapter_name, config, loading=loading)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        self._activate(adapter_names, self._managed())

    def _activate(
        self, adapter_names: str | list[str], managed: list[nn.Module], *, fresh: Collection[int] = ()
    ) -> None:
        """Make ``adapter_names`` the active adapters of every layer in ``managed``.

        Layers in ``fresh`` (ids of layers created a moment ago, which activated their one
        adapter themselves) are skipped where that already is the wanted set.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; available: {list(self.peft_config)}.")
        for module in managed:
            if isinstance(module, ModulesToSaveWrapper):
                module.set_adapter(names)
                continue
            if module.merged:
                warnings.warn(
                    "Adapters are merged; unmerging before switching adapters.", UserWarning, stacklevel=3
                )
                module.unmerge()
            wanted = [n for n in names if n in module.adapter_names]
            if id(module) in fresh and module.active_adapters == wanted:
                continue
            module.set_adapter(wanted)
        self.active_adapters = names
        # set_adapter turns requires_grad on for active adapters; inference-mode adapters stay frozen.
        for adapter in names:
            if self.peft_config[adapter].inference_mode:
                self._freeze_adapter(adapter, managed)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; available: {list(self.peft_config)}.")
        for layer in self.adapter_layers():
            if adapter_name in layer.merged_adapters:
                raise ValueError(
                    f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it."
                )
        del self.peft_config[adapter_name]
        for module in self._managed():
            module.delete_adapter(adapter_name)
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.active_adapters = remaining
        if remaining:
            self.set_adapter(remaining)

    def _set_adapter_layers(self, enabled: bool) -> None:
        for module in self._managed():
            module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        for layer in self.adapter_layers():
            if layer.merged:
                warnings.warn(
                    "Disabling adapters while they are merged has no effect on the merged weights; unmerge first.",
                    UserWarning,
                    stacklevel=2,
                )
                break
        self._set_adapter_layers(False)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        states = {m: m.disable_adapters for m in self._managed()}
        self.disable_adapter_layers()
        try:
            yield
        finally:
            for module, was_disabled in states.items():
                module.enable_adapters(not was_disabled)

    # ------------------------------------------------------------------ merging
    def _check_mergeable(self) -> None:
        if not self.spec.capabilities.mergeable:
            raise TypeError(f"{self.spec.peft_type} adapters cannot be merged into the base weights.")

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the base weights.

        With ``safe_merge`` every merged weight is checked for NaN/inf, and the targeted base
        weights are kept as copies until all layers are done, so a failure restores them bit for bit.
        """
        self._check_mergeable()
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; available: {list(self.peft_config)}.")
        snapshots: list[tuple[AdapterLayer, list[str], dict[str, torch.Tensor]]] = []
        try:
            for layer in self.adapter_layers():
                todo = [n for n in names if n in layer.adapter_names]
                if safe_merge:
                    base = layer.get_base_layer()
                    saved = {k: p.detach().clone() for k, p in base.named_parameters(recurse=False)}
                    snapshots.append((layer, list(layer.merged_adapters), saved))
                layer.merge(safe_merge=safe_merge, adapter_names=todo)
        except Exception:
            with torch.no_grad():
                for layer, merged, saved in snapshots:
                    base = layer.get_base_layer()
                    for k, value in saved.items():
                        getattr(base, k).data.copy_(value)
                    layer.merged_adapters[:] = merged
            raise

    def unmerge_adapter(self) -> None:
        for layer in self.adapter_layers():
            if layer.merged:
                layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain base model."""
        self._check_mergeable()
        return self._unload(
            merge=True, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def unload(self) -> nn.Module:
        """Remove every adapter layer (unmerging first) and return the untouched base model."""
        return self._unload(merge=False)

    def _outermost_managed(self) -> list[tuple[nn.Module, str, nn.Module]]:
        """``(parent, name, module)`` of the adapter layers and wrappers not inside another one.

        One walk that does not descend into them: what is inside goes with them when they are
        replaced, and their factor modules are most of a model's modules.
        """
        found = []
        seen = {id(self.model)}
        stack = [self.model]
        while stack:
            parent = stack.pop()
            for name, child in parent._modules.items():
                if child is None or id(child) in seen:
                    continue
                seen.add(id(child))
                if self._manages(child):
                    found.append((parent, name, child))
                else:
                    stack.append(child)
        return found

    def _unload(
        self,
        *,
        merge: bool,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        if merge:
            # Merge everything before unwrapping anything, so a failed safe merge leaves the model as it was.
            self.merge_adapter(adapter_names=names, safe_merge=safe_merge)
        found = self._outermost_managed()
        iterator: Any = found
        if progressbar:
            from tqdm.auto import tqdm

            iterator = tqdm(found, desc="Unloading " + ("and merging " if merge else "") + "model")
        for parent, name, module in iterator:
            if isinstance(module, AdapterLayer):
                if not merge and module.merged:
                    module.unmerge()
                # One level only: layers of other methods stacked below stay (mixed models).
                setattr(parent, name, module.base_layer)
            elif isinstance(module, ModulesToSaveWrapper):
                setattr(parent, name, module.active_module if merge else module.original_module)
        return self.model

    # ------------------------------------------------------------------ combining
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "linear",
        **options: Any,
    ) -> None:
        """Add ``adapter_name``, built by combining ``adapters`` with ``weights``.

        ``combination_type`` names a strategy of the registry; ``options`` go to it. The new
        adapter is not activated. Nothing changes when the request is refused or fails.
        """
        if not self.spec.capabilities.weighted_combination:
            raise TypeError(
                f"{self.spec.peft_type} adapters cannot be combined with add_weighted_adapter (the method does not "
                "declare weighted_combination)."
            )
        check_weighted_request(self.peft_config, adapters, weights, adapter_name)
        owners = self._modules_to_save_owners(adapters)
        config = self._weighted_adapter_config(list(adapters), combination_type, options)
        self.inject_adapter(adapter_name, config)
        try:
            with torch.no_grad():
                for layer in self.adapter_layers():
                    if adapter_name in layer.adapter_names:
                        layer.combine_adapters(
                            adapter_name, list(adapters), list(weights), combination_type, **options
                        )
                for wrapper, owner in owners:
                    wrapper.modules_to_save[adapter_name].load_state_dict(
                        wrapper.modules_to_save[owner].state_dict()
                    )
        except BaseException:
            self.delete_adapter(adapter_name)
            raise

    def _modules_to_save_owners(self, adapters: list[str]) -> list[tuple[ModulesToSaveWrapper, str]]:
        """The source adapter whose trained copy each ``modules_to_save`` module inherits (at most one)."""
        owners = []
        for key, wrapper in self.model.named_modules():
            if not isinstance(wrapper, ModulesToSaveWrapper):
                continue
            holders = [a for a in adapters if a in wrapper.modules_to_save]
            if len(holders) > 1:
                raise ValueError(
                    f"Adapters {holders} each have their own trained copy of {key!r} (modules_to_save), which "
                    "cannot be combined; combine adapters of which at most one has a copy of each module."
                )
            if holders:
                owners.append((wrapper, holders[0]))
        return owners

    def _check_combination(self, adapters: list[str], combination_type: str, options: dict[str, Any]) -> None:
        """Refuse a combination this method cannot make, before anything changes.

        The default knows the registry's strategies, applied tensor by tensor; a method with
        combination types of its own (LoRA's ``cat`` and ``*_svd``) overrides this.
        """
        get_registry().combination_strategy(combination_type)

    def _weighted_adapter_config(
        self, adapters: list[str], combination_type: str, options: dict[str, Any]
    ) -> PeftConfig:
        """The combined adapter's config: the first source's, on exactly the modules any source adapts.

        Naming the modules one by one reproduces the sources' targets whatever their selection
        rules were (regexes, exclusions, layer filters). Methods with other per-module choices
        (ranks, ...) extend this.
        """
        self._check_combination(adapters, combination_type, options)
        keys = sorted(
            key
            for key, layer in self.named_adapter_layers()
            if any(a in layer.adapter_names for a in adapters)
        )
        saved = sorted(
            {m for a in adapters for m in (getattr(self.peft_config[a], "modules_to_save", None) or [])}
        )
        config = self.peft_config[adapters[0]]
        changes = {
            "target_modules": keys,
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "modules_to_save": saved or None,
        }
        return config.copy(**{k: v for k, v in changes.items() if hasattr(config, k)})

    @classmethod
    def plain_adapter_from_mutated_init(
        cls, config: PeftConfig, initial: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]
    ) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
        """An adapter equal to ``trained`` on the original base, for inits that changed the base.

        ``initial`` and ``trained`` are checkpoint state dicts of the adapter right after its
        init and after training. Used by ``save_pretrained(path_initial_model_for_weight_conversion=)``
        and ``peft-core convert``; methods without base-mutating inits do not override it.
        """
        raise TypeError(
            f"{config.peft_type} has no initialisation that changes the base weights; nothing to convert."
        )

    def _config_for_live_tensors(self, config: PeftConfig, adapter_name: str) -> PeftConfig:
        """The config that describes ``adapter_name``'s tensors as they are after a hot-swap or padding.

        Methods whose tensors can be rank-padded (LoRA) rewrite rank and scale fields here.
        """
        return config

    # ------------------------------------------------------------------ serialization
    def adapter_state_items(self, adapter_name: str) -> Iterator[tuple[str, str, torch.Tensor]]:
        """``(model_suffix, checkpoint_suffix, tensor)`` of ``adapter_name``'s model-level tensors.

        Most methods keep every tensor in their layers (:meth:`AdapterLayer.adapter_state_items`);
        a method with tensors shared across layers (VeRA's projections) yields them here, with
        suffixes relative to this module, and the core saves and loads them with the layers' ones.
        """
        return iter(())

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


# Children of these names hold no targets: a wrapper's copies and original, an adapter layer's base.
_NEVER_TARGETED = frozenset({"modules_to_save", "original_module", "base_layer"})


def _adapter_tensors(layer: AdapterLayer, adapter_name: str) -> list[torch.Tensor]:
    """The tensors ``layer`` keeps for ``adapter_name`` in its ``adapter_layer_names`` containers."""
    tensors: list[torch.Tensor] = []
    modules = layer._modules
    for attr in layer.adapter_layer_names:
        container = modules[attr] if attr in modules else getattr(layer, attr, None)
        if container is None or adapter_name not in container:
            continue
        item = container[adapter_name]
        if isinstance(item, torch.Tensor):
            tensors.append(item)
        elif not item._modules:  # a leaf module: its own tensors, without a generator walk
            tensors.extend(p for p in item._parameters.values() if p is not None)
        else:
            tensors.extend(item.parameters())
    return tensors


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Hold Python's cyclic garbage collector off while adapter layers are created.

    Injection creates tens of thousands of objects that all survive, and the collections they
    trigger walk the whole heap, the model included, to free nothing: with the collector on,
    wrapping 2000 modules took twice as long. Left as it was when already off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _set_training(module: nn.Module, mode: bool) -> None:
    """``module.train(mode)``, without an ``nn.Module.__setattr__`` call per submodule.

    New layers come in training mode and a model in eval mode turns each one's factor modules
    off: thousands of modules. A module overriding ``train`` gets its own ``train`` called.
    """
    stack = [module]
    while stack:
        current = stack.pop()
        if type(current).train is not nn.Module.train:
            current.train(mode)
            continue
        current.__dict__["training"] = mode
        stack.extend(child for child in current._modules.values() if child is not None)


def _has_prefix_in(key: str, keys: set[str]) -> bool:
    """Whether ``key`` or one of its dotted ancestors is in ``keys``."""
    if not keys:
        return False
    parts = key.split(".")
    return any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1))


def _check_adapter_name(adapter_name: str) -> None:
    """Refuse names that cannot be keys of the per-adapter ``nn.ModuleDict``/``nn.ParameterDict``."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"Adapter names must be non-empty strings without dots, got {adapter_name!r}.")
    if hasattr(nn.ModuleDict(), adapter_name) or hasattr(nn.ParameterDict(), adapter_name):
        raise ValueError(
            f"The adapter name {adapter_name!r} is also the name of a torch.nn.Module attribute or method, so the "
            "per-adapter containers cannot hold it; choose another name."
        )


def layer_method(layer: AdapterLayer) -> str | None:
    """The ``peft_type`` that created ``layer`` (recorded at creation), else guessed from its prefix."""
    if layer.peft_type is not None:
        return layer.peft_type
    registry = get_registry()
    for peft_type, spec in registry.methods.items():
        prefix = spec.prefix
        if prefix and any(attr.startswith(prefix) for attr in layer.adapter_layer_names):
            return peft_type
    return None


def _has_filters(config: PeftConfig) -> bool:
    return bool(
        getattr(config, "exclude_modules", None) or getattr(config, "layers_to_transform", None) is not None
    )
