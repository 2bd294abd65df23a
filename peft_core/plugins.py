"""Plugin discovery and loading.

Entry points in the ``peft_core`` group are loaded one at a time: a plugin that fails to import,
or that declares a ``peft-core`` range this core does not satisfy, is skipped with a warning and
recorded as failed, so it never breaks the core or the other plugins (pluggy's own
``load_setuptools_entrypoints`` stops at the first failure, which is why it is not used).

Environment knobs (read when the registry is first built, or on :func:`reload_plugins`):

==================================  =========================================================
variable                            effect
==================================  =========================================================
``PEFT_CORE_DISABLE_PLUGINS``       comma-separated entry-point or distribution names to skip
``PEFT_CORE_PLUGINS``               allow-list: load only these entry points / distributions
``PEFT_CORE_DISABLE_PLUGIN_AUTOLOAD`` ``1`` loads no entry points; register modules yourself
                                    with :func:`register_plugin`
``PEFT_CORE_STRICT``                ``1`` turns load failures and name conflicts into errors
==================================  =========================================================
"""

from __future__ import annotations

import os
import threading
import traceback
import warnings
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy
from attrs import define, field
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import Version

from peft_core import hookspecs
from peft_core.errors import PluginLoadError
from peft_core.registry import Registry

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "PluginManager",
    "get_plugin_manager",
    "get_registry",
    "register_plugin",
    "reload_plugins",
]

ENTRY_POINT_GROUP = "peft_core"
CORE_DISTRIBUTION = "peft-core"


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@define
class PluginInfo:
    """One plugin as ``peft-core plugins`` reports it."""

    name: str
    distribution: str
    version: str
    module: str
    status: str  # "loaded", "failed", "disabled"
    reason: str = ""
    methods: list[str] = field(factory=list)
    contributions: dict[str, list[str]] = field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "status": self.status,
            "reason": self.reason,
            "methods": self.methods,
            "contributions": self.contributions,
        }


class PluginManager:
    """A typed facade over ``pluggy.PluginManager`` holding the registry the hooks fill."""

    def __init__(self, *, strict: bool | None = None) -> None:
        self.strict = _env_flag("PEFT_CORE_STRICT") if strict is None else strict
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self.registry = Registry(strict=self.strict)
        self.plugins: list[PluginInfo] = []

    # ------------------------------------------------------------------ loading
    def load_entry_points(self) -> None:
        if _env_flag("PEFT_CORE_DISABLE_PLUGIN_AUTOLOAD"):
            return
        disabled = _env_list("PEFT_CORE_DISABLE_PLUGINS") or set()
        allowed = _env_list("PEFT_CORE_PLUGINS")
        seen: set[tuple[str, str]] = set()
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist_name = ep.dist.name if ep.dist is not None else "<unknown>"
            version = ep.dist.version if ep.dist is not None else "?"
            if (ep.name, ep.value) in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add((ep.name, ep.value))
            names = {ep.name, dist_name}
            info = PluginInfo(ep.name, dist_name, version, ep.value, "loaded")
            if names & disabled:
                info.status, info.reason = "disabled", "listed in PEFT_CORE_DISABLE_PLUGINS"
            elif allowed is not None and not names & allowed:
                info.status, info.reason = "disabled", "not listed in PEFT_CORE_PLUGINS"
            else:
                reason = _incompatible_core_range(ep.dist)
                if reason:
                    self._fail(info, reason)
                else:
                    try:
                        module = ep.load()
                    except Exception as exc:  # a broken plugin must never break the host
                        self._fail(info, f"{type(exc).__name__}: {exc}", exc)
                    else:
                        self._register(module, info)
            self.plugins.append(info)

    def register_plugin(self, module: ModuleType | object, *, name: str | None = None) -> PluginInfo:
        """Register a plugin object directly (tests, notebooks, autoload disabled)."""
        plugin_name = name or getattr(module, "__name__", type(module).__name__)
        info = PluginInfo(plugin_name, plugin_name, "", plugin_name, "loaded")
        self._register(module, info)
        self.plugins.append(info)
        return info

    def _register(self, module: object, info: PluginInfo) -> None:
        self.registry.current_plugin = info.distribution
        try:
            self._pm.register(module, name=info.name)
            # A misspelled @hookimpl would otherwise never be called and never complain.
            self._pm.check_pending()
            others = [p for p in self._pm.get_plugins() if p is not module]
            for hook_name in (
                "peft_register_methods",
                "peft_register_layer_factories",
                "peft_register_combination_strategies",
                "peft_register_state_dict_converters",
                "peft_register_quantization_backends",
            ):
                # Call only this plugin's implementation, so a later plugin never re-runs an earlier one.
                self._pm.subset_hook_caller(hook_name, remove_plugins=others)(registry=self.registry)
        except Exception as exc:
            if self._pm.is_registered(module):
                self._pm.unregister(module)
            self._fail(info, f"{type(exc).__name__} while registering: {exc}", exc)
        finally:
            self.registry.current_plugin = "<unknown>"
        contributions = self.registry.contributions(info.distribution)
        info.methods = contributions["methods"]
        info.contributions = contributions

    def _fail(self, info: PluginInfo, reason: str, exc: BaseException | None = None) -> None:
        info.status, info.reason = "failed", reason
        origin = f"{info.distribution} {info.version}".strip()
        message = f"peft-core plugin {info.name!r} ({origin}) was skipped: {reason}"
        if self.strict:
            raise PluginLoadError(message) from exc
        if exc is not None and _env_flag("PEFT_CORE_DEBUG_PLUGINS"):
            message += "\n" + "".join(traceback.format_exception(exc))
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ queries
    @property
    def failed(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.status == "failed"]

    def hook_names(self) -> list[str]:
        return sorted(name for name in dir(self._pm.hook) if name.startswith("peft_"))


def _incompatible_core_range(dist: metadata.Distribution | None) -> str:
    """Why ``dist`` cannot run on this core, or ``""`` when its declared range fits."""
    if dist is None:
        return ""
    try:
        core_version = Version(metadata.version(CORE_DISTRIBUTION))
    except metadata.PackageNotFoundError:
        return ""
    for raw in dist.requires or []:
        try:
            req = Requirement(raw)
        except InvalidRequirement:
            continue
        if req.name.replace("_", "-").lower() != CORE_DISTRIBUTION or req.marker is not None:
            continue
        if req.specifier and not req.specifier.contains(core_version, prereleases=True):
            return f"requires peft-core{req.specifier}, but peft-core {core_version} is installed"
    return ""


_lock = threading.Lock()
_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, built (and entry points loaded) on first use."""
    global _manager
    if _manager is None:
        with _lock:
            if _manager is None:
                manager = PluginManager()
                manager.load_entry_points()
                _manager = manager
    return _manager


def get_registry() -> Registry:
    return get_plugin_manager().registry


def register_plugin(module: ModuleType | object, *, name: str | None = None) -> PluginInfo:
    """Register a plugin module or object in the process-wide manager."""
    return get_plugin_manager().register_plugin(module, name=name)


def reload_plugins(*, strict: bool | None = None) -> PluginManager:
    """Rebuild the manager from the environment (after changing the knobs, or in tests)."""
    global _manager
    with _lock:
        manager = PluginManager(strict=strict)
        manager.load_entry_points()
        _manager = manager
    return manager
