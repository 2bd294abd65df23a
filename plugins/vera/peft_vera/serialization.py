"""Saving and loading VeRA's model-level tensors under the reference library's keys.

VeRA's shared projections belong to the adapter model, not to a layer, and the reference
library stores them under ``base_model.vera_A`` / ``base_model.vera_B``. peft-core 0.1 builds
adapter state dicts only from layers (``AdapterLayer.adapter_state_items``) and
``modules_to_save`` wrappers, so it has no place for them.

Until the core enumerates model-level tensors itself, :func:`install_model_level_state_items`
extends the core's one enumeration of adapter tensors (``peft_core.state_dict._adapter_entries``,
which both ``get_peft_model_state_dict`` and ``set_peft_model_state_dict`` use, so saving and
loading stay symmetric) with the entries of every :class:`~peft_vera.model.VeraModel` in the
tree. It is idempotent, touches nothing for other methods, and does nothing once
``peft_core.tuner.AdapterModel`` defines ``adapter_state_items`` (the core hook this stands in for).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = ["core_enumerates_model_level_tensors", "install_model_level_state_items", "model_level_entries"]

_MARK = "_peft_vera_model_level_entries"

Entries = Iterator[tuple[str, str, torch.Tensor]]


def core_enumerates_model_level_tensors() -> bool:
    """Whether this peft-core asks adapter models for their own tensors (then nothing is installed)."""
    from peft_core.tuner import AdapterModel

    return callable(getattr(AdapterModel, "adapter_state_items", None))


def model_level_entries(model: nn.Module, adapter_name: str) -> Entries:
    """``(model_key, checkpoint_key, tensor)`` of the VeRA adapter models inside ``model``."""
    from peft_vera.model import VeraModel

    for path, module in model.named_modules():
        if isinstance(module, VeraModel):
            prefix = f"{path}." if path else ""
            for model_suffix, ckpt_suffix, tensor in module.adapter_state_items(adapter_name):
                yield prefix + model_suffix, prefix + ckpt_suffix, tensor


def install_model_level_state_items() -> None:
    """Make the core's adapter-tensor enumeration include VeRA's model-level tensors (idempotent)."""
    if core_enumerates_model_level_tensors():
        return
    from peft_core import state_dict

    original: Callable[[nn.Module, str], Entries] = state_dict._adapter_entries
    if getattr(original, _MARK, False):
        return

    def _adapter_entries(model: nn.Module, adapter_name: str) -> Entries:
        yield from original(model, adapter_name)
        yield from model_level_entries(model, adapter_name)

    setattr(_adapter_entries, _MARK, True)
    _adapter_entries.__doc__ = original.__doc__
    state_dict._adapter_entries = _adapter_entries
