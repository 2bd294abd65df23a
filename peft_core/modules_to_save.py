"""Full trainable copies of whole modules (``modules_to_save``), one per adapter."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["ModulesToSaveWrapper"]


class ModulesToSaveWrapper(nn.Module):
    """Runs the active adapter's copy of ``original_module``, or the original when none applies.

    Attribute names (``original_module``, ``modules_to_save``) match the reference library, so
    model state-dict keys, and thus checkpoint keys, are the same.
    """

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter: str | None = None
        self._disable_adapters = False
        self.update(adapter_name)
        self.original_module.requires_grad_(False)

    def update(self, adapter_name: str) -> None:
        """Add a fresh trainable copy of the original module for ``adapter_name``."""
        if adapter_name not in self.modules_to_save:
            replica = copy.deepcopy(self.original_module)
            replica.requires_grad_(True)
            self.modules_to_save[adapter_name] = replica

    @property
    def active_adapter(self) -> str | None:
        return self._active_adapter

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Activate the copy of whichever of ``adapter_names`` has one (at most one may)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        owners = [n for n in names if n in self.modules_to_save]
        if len(owners) > 1:
            raise ValueError(
                f"Adapters {owners} each have their own trained copy of this module (modules_to_save), and only "
                "one copy can run at a time. Activate at most one of them together with other adapters."
            )
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name in owners)
        self._active_adapter = owners[0] if owners else None

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self._active_adapter == adapter_name:
            self._active_adapter = None

    @property
    def active_module(self) -> nn.Module:
        if self._disable_adapters or self._active_adapter is None:
            return self.original_module
        return self.modules_to_save[self._active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None or self._disable_adapters:
            return self.active_module(*args, **kwargs)
        return self._mixed_batch_forward(args, kwargs, adapter_names)

    def _mixed_batch_forward(self, args: tuple, kwargs: dict, adapter_names: list[str]) -> Any:
        """Each sample runs through its adapter's copy (the original for adapters without one)."""
        x, rest = args[0], args[1:]
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(adapter_names):
            groups.setdefault(name if name in self.modules_to_save else "", []).append(index)
        result: torch.Tensor | None = None
        for name, indices in groups.items():
            module = self.modules_to_save[name] if name else self.original_module
            output = module(x[indices], *rest, **kwargs)
            if result is None:
                result = output.new_empty((len(adapter_names), *output.shape[1:]))
            result[indices] = output
        return result

    @property
    def weight(self) -> torch.Tensor:
        return self.active_module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.active_module, "bias", None)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Callers (e.g. transformers' embedding helpers) may read attributes of the wrapped module.
            if name in {"original_module", "modules_to_save"}:
                raise
            return getattr(self.original_module, name)
