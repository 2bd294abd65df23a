"""Exceptions with messages that say what was wrong and how to fix it."""

from __future__ import annotations

__all__ = [
    "AdapterLoadError",
    "CheckpointShapeError",
    "ConfigError",
    "CorruptCheckpointError",
    "MergeError",
    "PeftCoreError",
    "PluginConflictError",
    "PluginLoadError",
    "TargetModulesError",
    "UnknownMethodError",
]


class PeftCoreError(Exception):
    """Base class of every error peft-core raises on purpose."""


class UnknownMethodError(PeftCoreError, ValueError):
    """A ``peft_type`` that no installed plugin provides."""

    def __init__(self, peft_type: str, installed: list[str]) -> None:
        from peft_core.registry import plugin_hint

        self.peft_type = peft_type
        self.plugin = plugin_hint(peft_type)
        have = ", ".join(installed) if installed else "none"
        super().__init__(
            f"No installed plugin provides the PEFT method {peft_type!r}. Install it with "
            f"`pip install {self.plugin}` (installed methods: {have}; run `peft-core plugins` for details)."
        )


class PluginLoadError(PeftCoreError, RuntimeError):
    """A plugin failed to load while strict mode was on."""


class PluginConflictError(PeftCoreError, RuntimeError):
    """Two plugins claimed the same name while strict mode was on."""


class ConfigError(PeftCoreError, ValueError):
    """An adapter config that cannot be used as given."""


class TargetModulesError(PeftCoreError, ValueError):
    """``target_modules`` (or a related option) matched nothing usable in the model."""


class MergeError(PeftCoreError, ValueError):
    """An adapter cannot be merged into these base weights (e.g. a quantized layer that cannot be re-quantized)."""


class AdapterLoadError(PeftCoreError, RuntimeError):
    """An adapter checkpoint could not be loaded; the model is left as it was."""


class CheckpointShapeError(AdapterLoadError, ValueError):
    """A checkpoint tensor does not fit the model parameter it is loaded into."""


class CorruptCheckpointError(AdapterLoadError, ValueError):
    """A weights file that is truncated, corrupt or not in the expected format."""
