"""Building a new adapter from several existing ones (``add_weighted_adapter``).

The orchestration is method-agnostic: check the request, build the combined adapter's config,
inject it, then let every layer fill its tensors from the sources with a combination strategy
looked up in the registry by ``combination_type``. A method whose combined tensors are not a
tensor-by-tensor combination of its sources' (LoRA's SVD re-factorisation, say) overrides
:meth:`peft_core.layer.AdapterLayer.combine_adapters` in its layer.

The core registers the strategies defined here under the ``peft-core`` name; plugins add more
through the ``peft_register_combination_strategies`` hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from peft_core.config import PeftConfig
    from peft_core.registry import CombinationStrategy

__all__ = ["BUILTIN_STRATEGIES", "check_weighted_request", "linear"]


def linear(deltas: list[torch.Tensor], weights: list[float], **options: Any) -> torch.Tensor:
    """The weighted sum ``sum_i weights[i] * deltas[i]`` (the reference's ``linear`` for (IA)³)."""
    if options:
        raise TypeError(f"the 'linear' combination takes no options, got {sorted(options)}.")
    combined = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights, strict=True):
        combined.add_(delta.to(combined.dtype), alpha=float(weight))
    return combined


BUILTIN_STRATEGIES: dict[str, CombinationStrategy] = {"linear": linear}
"""Strategies every core provides, whatever plugins are installed."""


def check_weighted_request(
    peft_config: dict[str, PeftConfig], adapters: Sequence[str], weights: Sequence[float], adapter_name: str
) -> None:
    """Refuse an ``add_weighted_adapter`` call that cannot be carried out, before anything changes."""
    if adapter_name in peft_config:
        # The reference library silently returns here, leaving the user with the old adapter.
        raise ValueError(
            f"An adapter named {adapter_name!r} already exists; delete it first or choose another name for the "
            "combined adapter."
        )
    if not adapters:
        raise ValueError("add_weighted_adapter needs at least one source adapter.")
    unknown = [a for a in adapters if a not in peft_config]
    if unknown:
        raise ValueError(f"Unknown adapter(s) {unknown}; available: {list(peft_config)}.")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"Source adapters must be distinct, got {list(adapters)}.")
    if len(weights) != len(adapters):
        raise ValueError(
            f"Got {len(weights)} weight(s) for {len(adapters)} adapter(s); pass one weight per source adapter."
        )
