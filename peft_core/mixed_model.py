"""Mixed-method models: adapters of several plugins on one base model, stacked where they overlap.

Each method keeps its own :class:`~peft_core.tuner.AdapterModel` (so its override points, its
layer factories and its checks apply unchanged); :class:`MixedAdapterModel` owns the base and
drives those per-method models for everything that spans methods: which adapters are active,
merge order, unloading. Whether a method may join is its plugin's ``mixable`` capability.

Stacking order is the order in which adapters were added: where two methods target one module,
the method added first sits innermost (next to the base layer), and each later one wraps it.
The order matters for methods that rescale or rotate (IA3, OFT); additive methods (LoRA, LoHa,
LoKr) commute. A saved mixed model records the order in a manifest, so loading rebuilds the
same stacks whatever order the files are read in.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from peft_core.config import PeftConfig
from peft_core.errors import ConfigError
from peft_core.hub import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, resolve_file, split_hub_kwargs
from peft_core.io import atomic_directory, atomic_write_text, save_weights
from peft_core.layer import AdapterLayer
from peft_core.modules_to_save import ModulesToSaveWrapper
from peft_core.peft_model import PeftModel, _base_model_name, _read_adapter_weights
from peft_core.plugins import get_registry
from peft_core.registry import MethodSpec
from peft_core.state_dict import get_peft_model_state_dict
from peft_core.tuner import AdapterModel, _check_adapter_name, _get_submodule

__all__ = ["MANIFEST_NAME", "MixedAdapterModel", "PeftMixedModel"]

MANIFEST_NAME = "peft_mixed_model.json"
"""The file next to the per-adapter subfolders of a saved mixed model: stacking order and active adapters."""
MANIFEST_FORMAT = "peft-core-mixed-model"


def _mixable_spec(config: PeftConfig) -> MethodSpec:
    spec = get_registry().method(config.peft_type or "")
    if not spec.capabilities.mixable:
        raise ConfigError(
            f"{spec.peft_type} cannot be part of a mixed-method model: its plugin ({spec.plugin or 'unknown'}) does "
            "not declare the 'mixable' capability. Use it alone with get_peft_model(..., mixed=False)."
        )
    return spec


class MixedAdapterModel(nn.Module):
    """The base model (``model``) with adapters of several methods, one adapter model per method."""

    def __init__(
        self,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str = "default",
        *,
        stacking_order: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        # Not submodules: each shares ``model``, which must appear once in the module tree.
        self._tuners: dict[str, AdapterModel] = {}
        self.stacking_order: list[str] = list(stacking_order or [])
        """Methods from innermost to outermost, the same on every module (the order they joined)."""
        self.active_adapters: list[str] = [adapter_name]
        self.add_adapter(adapter_name, config)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def active_adapter(self) -> str | list[str]:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    @property
    def tuners(self) -> dict[str, AdapterModel]:
        """The per-method adapter models, by ``peft_type``."""
        return dict(self._tuners)

    def _tuner_of(self, adapter_name: str) -> AdapterModel:
        return self._tuners[self.peft_config[adapter_name].peft_type or ""]

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, config: PeftConfig, *, loading: bool = False) -> None:
        """Add ``adapter_name``; on modules another method already adapts, its layer wraps theirs."""
        if adapter_name in self.peft_config:
            raise ValueError(
                f"An adapter named {adapter_name!r} already exists; delete it or pick another name."
            )
        _check_adapter_name(adapter_name)
        spec = _mixable_spec(config)
        order = (
            self.stacking_order
            if spec.peft_type in self.stacking_order
            else [*self.stacking_order, spec.peft_type]
        )
        was_disabled = any(
            m.disable_adapters
            for m in self.model.modules()
            if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))
        )
        # Layers of methods that stack above this one step aside while it injects, so its layer
        # lands at its place in the stacking order whatever was added before.
        peeled = self._peel_above(spec.peft_type, order)
        try:
            tuner = self._tuners.get(spec.peft_type)
            if tuner is None:
                tuner = spec.model_cls(self.model, config, adapter_name, loading=loading)
                self._tuners[spec.peft_type] = tuner
            else:
                tuner.inject_adapter(adapter_name, config, loading=loading)
        finally:
            self._restore_peeled(peeled)
        self.stacking_order = order
        self.peft_config[adapter_name] = tuner.peft_config[adapter_name]
        if was_disabled:  # a method joining a model whose adapters are disabled starts disabled too
            self._set_adapter_layers(False)
        # The method's model activated its own adapters only; restore the model-wide choice.
        self.set_adapter(self.active_adapters)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Activate one adapter or several, of any methods; their effects compose along each stack."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; available: {list(self.peft_config)}.")
        if any(layer.merged for layer in self._layers()):
            warnings.warn(
                "Adapters are merged; unmerging before switching adapters.", UserWarning, stacklevel=2
            )
            self.unmerge_adapter()
        for module in self.model.modules():
            if isinstance(module, AdapterLayer):
                module.set_adapter([n for n in names if n in module.adapter_names])
            elif isinstance(module, ModulesToSaveWrapper):
                module.set_adapter(names)
        self.active_adapters = names
        for tuner in self._tuners.values():
            tuner.active_adapters = [n for n in names if n in tuner.peft_config]
        frozen = [n for n in names if self.peft_config[n].inference_mode]
        if frozen:
            for key, param in self.model.named_parameters():
                if any(f".{n}." in f".{key}." for n in frozen):
                    param.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; available: {list(self.peft_config)}.")
        if any(adapter_name in layer.merged_adapters for layer in self._layers()):
            raise ValueError(
                f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it."
            )
        tuner = self._tuner_of(adapter_name)
        # Layers left without adapters are unwrapped, so the stacks of the others stay minimal.
        tuner._remove_adapter_everywhere(adapter_name)
        del tuner.peft_config[adapter_name]
        del self.peft_config[adapter_name]
        if not tuner.peft_config:
            del self._tuners[tuner.spec.peft_type]
            self.stacking_order.remove(tuner.spec.peft_type)
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.active_adapters = remaining
        self.set_adapter(remaining)

    # ------------------------------------------------------------------ layers and stacks
    def _layers(self) -> Iterator[AdapterLayer]:
        for module in self.model.modules():
            if isinstance(module, AdapterLayer):
                yield module

    def _stacks(self) -> list[tuple[str, list[AdapterLayer]]]:
        """Each adapted module's layers, innermost (next to the base layer) first."""
        stacks = []
        for key, module in self.model.named_modules():
            if not isinstance(module, AdapterLayer) or key.endswith(".base_layer"):
                continue
            chain: list[AdapterLayer] = []
            layer: nn.Module = module
            while isinstance(layer, AdapterLayer):
                chain.append(layer)
                layer = layer.base_layer
            stacks.append((key, chain[::-1]))
        return stacks

    def _peel_above(self, peft_type: str, order: list[str]) -> list[tuple[str, AdapterLayer, AdapterLayer]]:
        """Detach, on every module, the layers of methods after ``peft_type`` in ``order``.

        Returns ``(key, lowest detached, highest detached)`` per module, for :meth:`_restore_peeled`.
        """
        rank = {t: i for i, t in enumerate(order)}
        peeled = []
        for key, chain in self._stacks():
            above = [i for i, layer in enumerate(chain) if rank[layer.peft_type or ""] > rank[peft_type]]
            if not above:
                continue
            first = above[0]
            parent, _, name = _get_submodule(self.model, key)
            setattr(parent, name, chain[first].base_layer)
            peeled.append((key, chain[first], chain[-1]))
        return peeled

    def _restore_peeled(self, peeled: list[tuple[str, AdapterLayer, AdapterLayer]]) -> None:
        for key, lowest, highest in peeled:
            parent, current, name = _get_submodule(self.model, key)
            lowest.base_layer = current
            setattr(parent, name, highest)

    def _set_adapter_layers(self, enabled: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        if any(layer.merged for layer in self._layers()):
            warnings.warn(
                "Disabling adapters while they are merged has no effect on the merged weights; unmerge first.",
                UserWarning,
                stacklevel=2,
            )
        self._set_adapter_layers(False)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        states = {
            m: m.disable_adapters
            for m in self.model.modules()
            if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))
        }
        self.disable_adapter_layers()
        try:
            yield
        finally:
            for module, was_disabled in states.items():
                module.enable_adapters(not was_disabled)

    # ------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the base weights, innermost layer of each stack first.

        That order keeps the merged model equal to the stacked forward: a layer is merged only
        once everything below it that runs is merged. A request that would merge a layer above
        an unmerged, active one is refused before anything changes.
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; available: {list(self.peft_config)}.")
        for spec in {self._tuner_of(n).spec.peft_type: self._tuner_of(n).spec for n in names}.values():
            if not spec.capabilities.mergeable:
                raise TypeError(f"{spec.peft_type} adapters cannot be merged into the base weights.")
        stacks = self._stacks()
        for key, chain in stacks:
            pending = False  # an active adapter below stays unmerged
            for layer in chain:
                todo = [n for n in names if n in layer.adapter_names and n not in layer.merged_adapters]
                if todo and pending:
                    raise ValueError(
                        f"Cannot merge {todo} at {key!r}: an active adapter of a layer below it stays unmerged, and "
                        "merging the upper one first would change the output. Merge the lower adapters too."
                    )
                if any(n not in names and n not in layer.merged_adapters for n in layer.active_adapters):
                    pending = True
        snapshots: list[tuple[AdapterLayer, list[str], dict[str, torch.Tensor]]] = []
        try:
            for _key, chain in stacks:
                for layer in chain:
                    todo = [n for n in names if n in layer.adapter_names]
                    if not todo:
                        continue
                    if safe_merge:
                        base = layer.get_base_layer()
                        saved = {k: p.detach().clone() for k, p in base.named_parameters(recurse=False)}
                        snapshots.append((layer, list(layer.merged_adapters), saved))
                    layer.merge(safe_merge=safe_merge, adapter_names=todo)
        except Exception:
            with torch.no_grad():
                for layer, merged, saved in reversed(snapshots):
                    base = layer.get_base_layer()
                    for k, value in saved.items():
                        getattr(base, k).data.copy_(value)
                    layer.merged_adapters[:] = merged
            raise

    def unmerge_adapter(self) -> None:
        """Unmerge everything, outermost layer of each stack first (the reverse of merging)."""
        for _key, chain in self._stacks():
            for layer in reversed(chain):
                if layer.merged:
                    layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        return self._unwrap(merge=True)

    def unload(self) -> nn.Module:
        if any(layer.merged for layer in self._layers()):
            self.unmerge_adapter()
        return self._unwrap(merge=False)

    def _unwrap(self, *, merge: bool) -> nn.Module:
        for key, _chain in self._stacks():
            parent, module, name = _get_submodule(self.model, key)
            setattr(parent, name, module.get_base_layer())
        for key, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                try:
                    parent, module, name = _get_submodule(self.model, key)
                except AttributeError:
                    continue
                setattr(parent, name, module.active_module if merge else module.original_module)
        self._tuners.clear()
        return self.model

    # ------------------------------------------------------------------ serialization / forward
    def adapter_state_items(self, adapter_name: str) -> Iterator[tuple[str, str, torch.Tensor]]:
        return iter(())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class PeftMixedModel(PeftModel):
    """A base model with adapters of several methods (``get_peft_model(..., mixed=True)``).

    Unlike the reference library's mixed models, this one saves and loads: each adapter goes to
    its own subfolder in the ordinary per-adapter format (so each also loads alone, here or in
    the reference library), next to a small manifest of the stacking order.
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        *,
        stacking_order: list[str] | None = None,
        _loading: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        if peft_config.base_model_name_or_path is None:
            peft_config = peft_config.copy(base_model_name_or_path=_base_model_name(model))
        self.base_model = MixedAdapterModel(model, peft_config, adapter_name, stacking_order=stacking_order)

    @property
    def stacking_order(self) -> list[str]:
        """The methods (``peft_type``) from innermost to outermost; the same on every module."""
        return list(self.base_model.stacking_order)

    def add_adapter(
        self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False
    ) -> None:
        """Add a new, inactive adapter of any mixable method; activate it with :meth:`set_adapter`."""
        if peft_config.base_model_name_or_path is None:
            peft_config = peft_config.copy(base_model_name_or_path=_base_model_name(self.get_base_model()))
        self.base_model.add_adapter(adapter_name, peft_config)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "add_weighted_adapter combines adapters of one method; call it on a PeftModel holding that method's "
            "adapters (or combine before mixing)."
        )

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write every adapter to ``save_directory/<name>/`` and the stacking order to the manifest.

        The write is atomic, like :meth:`PeftModel.save_pretrained`.
        """
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(
                f"Cannot save unknown adapter(s) {unknown}; available: {list(self.peft_config)}."
            )
        if not is_main_process:
            return
        save_directory = os.fspath(save_directory)
        # Keep the model-wide stacking order, whatever order selected_adapters lists.
        ordered = [n for n in self.peft_config if n in names]
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": 1,
            "adapters": [
                {"name": n, "peft_type": self.peft_config[n].peft_type, "subfolder": n} for n in ordered
            ],
            "active_adapters": [n for n in self.active_adapters if n in ordered],
            "stacking_order": [
                t for t in self.stacking_order if any(self.peft_config[n].peft_type == t for n in ordered)
            ],
        }
        with atomic_directory(save_directory) as staging:
            for name in ordered:
                self._save_one(staging, name, safe_serialization)
            atomic_write_text(os.path.join(staging, MANIFEST_NAME), json.dumps(manifest, indent=2) + "\n")

    def _save_one(self, staging: str, name: str, safe_serialization: bool) -> None:
        """``name`` alone in the ordinary format ("default" too gets its own subfolder)."""
        out = os.path.join(staging, name)
        os.makedirs(out, exist_ok=True)
        weights_name = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
        state_dict = get_peft_model_state_dict(self, adapter_name=name)
        save_weights(state_dict, os.path.join(out, weights_name), safe_serialization=safe_serialization)
        self._config_to_save(name).save_pretrained(out)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        **kwargs: Any,
    ) -> PeftMixedModel:
        """Load a mixed model saved by :meth:`save_pretrained`, or one single-method adapter.

        A directory with a manifest rebuilds every adapter in its recorded stacking order
        (``adapter_name`` is then unused); otherwise ``model_id`` is one ordinary adapter, loaded
        as ``adapter_name``, to which more can be added. On failure ``model`` is left as it was.
        """
        manifest = _read_manifest(model_id, kwargs)
        if manifest is None:
            entries = [{"name": adapter_name, "subfolder": kwargs.pop("subfolder", None)}]
            active, order = [adapter_name], None
        else:
            entries, active, order = manifest
        # Every file is read before the model is touched, so a bad one changes nothing.
        loaded = [
            (
                entry["name"],
                *_read_adapter(
                    model_id,
                    entry.get("subfolder"),
                    config if manifest is None else None,
                    is_trainable,
                    kwargs,
                ),
            )
            for entry in entries
        ]
        mixed: PeftMixedModel | None = None
        try:
            for name, loaded_config, state_dict in loaded:
                if mixed is None:
                    mixed = cls(model, loaded_config, name, stacking_order=order, _loading=True)
                else:
                    mixed.base_model.add_adapter(name, loaded_config, loading=True)
                mixed._load_state_dict_checked(state_dict, name)
        except BaseException:
            if mixed is not None:
                mixed.base_model.unload()
            raise
        assert mixed is not None
        mixed.set_adapter(active)
        if not is_trainable:
            mixed.eval()
        return mixed

    def load_adapter(
        self, model_id: str | os.PathLike[str], adapter_name: str, is_trainable: bool = False, **kwargs: Any
    ) -> Any:
        """Add one ordinary adapter from ``model_id`` as ``adapter_name`` (inactive; stacked outermost)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another adapter_name.")
        subfolder = kwargs.pop("subfolder", None)
        config, state_dict = _read_adapter(model_id, subfolder, None, is_trainable, kwargs)
        self.base_model.add_adapter(adapter_name, config, loading=True)
        try:
            result = self._load_state_dict_checked(state_dict, adapter_name)
        except BaseException:
            self.base_model.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self.eval()
        return result


def _read_manifest(
    model_id: str | os.PathLike[str], kwargs: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str], list[str]] | None:
    hub_kwargs, _ = split_hub_kwargs(dict(kwargs))
    path = resolve_file(model_id, MANIFEST_NAME, missing_ok=True, **hub_kwargs)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("adapters"), list):
        raise ValueError(
            f"{path} is not a peft-core mixed-model manifest (format {manifest.get('format')!r})."
        )
    entries = manifest["adapters"]
    order = list(manifest.get("stacking_order") or dict.fromkeys(e["peft_type"] for e in entries))
    return entries, list(manifest.get("active_adapters") or []), order


def _read_adapter(
    model_id: str | os.PathLike[str],
    subfolder: str | None,
    config: PeftConfig | None,
    is_trainable: bool,
    kwargs: dict[str, Any],
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    allow_pickle = kwargs.get("allow_pickle", False)
    hub_kwargs, _ = split_hub_kwargs({k: v for k, v in kwargs.items() if k != "allow_pickle"})
    if config is None:
        config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, **hub_kwargs)
    config = config.copy(inference_mode=not is_trainable)
    return config, _read_adapter_weights(model_id, subfolder, allow_pickle, hub_kwargs)
