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

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from peft_core.config import PeftConfig
    from peft_core.registry import CombinationStrategy

__all__ = [
    "BUILTIN_STRATEGIES",
    "check_weighted_request",
    "dare_linear",
    "dare_ties",
    "linear",
    "magnitude_prune",
    "ties",
]


def _weighted(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The tensors stacked on a new first dimension, each multiplied by its weight."""
    stacked = torch.stack(tensors)
    scale = torch.tensor([float(w) for w in weights], device=stacked.device)
    return stacked * scale.view(-1, *[1] * (stacked.dim() - 1))


def _checked_density(density: float | None, combination: str) -> float:
    if density is None:
        raise TypeError(
            f"the {combination!r} combination needs density= (the fraction of values to keep, 0..1)."
        )
    if density < 0:
        raise ValueError(f"density must be between 0 and 1, got {density!r}.")
    if density >= 1:
        warnings.warn(
            f"density={density} keeps every value: {combination!r} prunes nothing.", UserWarning, stacklevel=3
        )
    return float(density)


def _keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density * numel)`` largest-magnitude entries zeroed."""
    if density >= 1:
        return tensor
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=int(density * flat.numel())).indices] = 1
    return tensor * mask.view(tensor.shape)


def _keep_random(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the kept ones by ``1 / density``.

    The draw (one ``torch.bernoulli`` over the whole tensor, from the global generator) is the
    reference library's, so the same seed drops the same entries in both.
    """
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def _sign_consensus(tensors: list[torch.Tensor], weights: list[float], method: str) -> torch.Tensor:
    """TIES: per entry, the weighted sum of the sources agreeing with the majority sign, over their count."""
    if method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}.")
    stacked = torch.stack(tensors)
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    agree = signs == torch.where(votes >= 0, 1, -1)
    return (_weighted(tensors, weights) * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


def linear(deltas: list[torch.Tensor], weights: list[float], **options: Any) -> torch.Tensor:
    """Task arithmetic: ``sum_i weights[i] * deltas[i]``."""
    if options:
        raise TypeError(f"the 'linear' combination takes no options, got {sorted(options)}.")
    return _weighted(deltas, weights).sum(dim=0)


def magnitude_prune(
    deltas: list[torch.Tensor], weights: list[float], *, density: float | None = None
) -> torch.Tensor:
    """Keep each source's largest-magnitude ``density`` share of entries, then sum with the weights."""
    density = _checked_density(density, "magnitude_prune")
    return _weighted([_keep_largest(d, density) for d in deltas], weights).sum(dim=0)


def ties(
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """TIES merging (Yadav et al. 2023): trim by magnitude, elect a sign per entry, average the agreeing."""
    density = _checked_density(density, "ties")
    return _sign_consensus([_keep_largest(d, density) for d in deltas], weights, majority_sign_method)


def dare_linear(
    deltas: list[torch.Tensor], weights: list[float], *, density: float | None = None
) -> torch.Tensor:
    """DARE (Yu et al. 2023): drop entries at random, rescale the rest, sum with the weights."""
    density = _checked_density(density, "dare_linear")
    return _weighted([_keep_random(d, density) for d in deltas], weights).sum(dim=0)


def dare_ties(
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """DARE's random drop followed by TIES' sign election."""
    density = _checked_density(density, "dare_ties")
    return _sign_consensus([_keep_random(d, density) for d in deltas], weights, majority_sign_method)


BUILTIN_STRATEGIES: dict[str, CombinationStrategy] = {
    "linear": linear,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
}
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
