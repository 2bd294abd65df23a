"""Temporarily rescaling adapters: ``rescale_adapter_scale`` (WiSE-FT style interpolation)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from peft_core.layer import AdapterLayer

__all__ = ["rescale_adapter_scale"]


@contextlib.contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: float) -> Iterator[None]:
    """Multiply every adapter's scale by ``multiplier`` inside the block; restore it exactly after.

    For an adapter whose effect is linear in its scale (LoRA), a multiplier in [0, 1]
    interpolates between the base model and the fine-tuned one. Works for every method whose
    layers have a scale (:attr:`AdapterLayer.adapter_scaling`). Merged adapters are refused:
    their scale is baked into the base weights, so rescaling them would silently do nothing.

    >>> with rescale_adapter_scale(peft_model, 0.5):  # doctest: +SKIP
    ...     logits = peft_model(**inputs).logits
    """
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
        raise TypeError(f"multiplier must be a float or an int, got {type(multiplier).__name__}.")
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    scaled = [(layer, layer.adapter_scaling) for layer in layers if layer.adapter_scaling is not None]
    if not scaled:
        kinds = sorted({type(layer).__name__ for layer in layers}) or ["none"]
        raise ValueError(
            f"rescale_adapter_scale needs adapter layers that have a scale; this model's adapter layers are {kinds}. "
            "Methods such as IA3, OFT or BOFT have no scale to rescale."
        )
    merged = sorted({name for layer in layers for name in layer.merged_adapters})
    if merged:
        raise ValueError(
            f"Adapters {merged} are merged into the base weights, so their scale cannot change; call "
            "unmerge_adapter() before rescale_adapter_scale."
        )
    saved: list[tuple[dict[str, Any], dict[str, Any]]] = []
    try:
        for _layer, scaling in scaled:
            saved.append((scaling, dict(scaling)))
            for name in list(scaling):
                scaling[name] = scaling[name] * multiplier
        yield
    finally:
        for scaling, original in saved:
            scaling.clear()
            scaling.update(original)
