"""``add_weighted_adapter`` for LoRA: building one LoRA adapter from several.

The combination types are the reference library's, read as a small grammar over the registry's
strategies, so a strategy that another plugin registers works with LoRA too:

* ``"cat"``: the sources' factors side by side (rank = the sum of ranks). Exact: the combined
  delta is the weighted sum of the sources' deltas.
* ``"svd"`` and ``"<strategy>_svd"``: the strategy (``linear`` for plain ``svd``) applied to the
  sources' full deltas, then a truncated SVD back to rank ``svd_rank`` (default: the largest
  source rank). Exact when that rank is large enough.
* ``"<strategy>"`` (``linear``, ``ties``, ``dare_linear``, ...): the strategy applied to ``A``
  and to ``B`` separately, each weighted by ``sqrt(|weight * scaling|)`` (the sign on ``A``), as
  the reference does. Cheap, but only an approximation of combining the deltas, and the sources
  must share one rank.

The combined adapter has scaling 1 (``lora_alpha = r``, no rsLoRA), since the sources' scalings
are folded into its factors; the reference keeps ``use_rslora`` from the first source there,
which inflates the result by ``sqrt(r)``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from peft_core.plugins import get_registry

if TYPE_CHECKING:
    from peft_lora.layer import LoraLayer

__all__ = ["CAT", "FACTORS", "SVD", "SVD_OPTIONS", "combine_into", "parse_combination", "split_options"]

CAT, SVD, FACTORS = "cat", "svd", "factors"
SVD_OPTIONS = ("svd_rank", "svd_clamp", "svd_full_matrices", "svd_driver")


def parse_combination(combination_type: str) -> tuple[str, str | None]:
    """``(kind, strategy name)`` of a combination type; an unknown strategy lists the known ones."""
    if combination_type == CAT:
        return CAT, None
    if combination_type == SVD:
        kind, strategy = SVD, "linear"
    elif combination_type.endswith("_svd"):
        kind, strategy = SVD, combination_type.removesuffix("_svd")
    else:
        kind, strategy = FACTORS, combination_type
    try:
        get_registry().combination_strategy(strategy)
    except ValueError:
        known = sorted(get_registry().combination_strategies)
        raise ValueError(
            f"Unknown combination_type {combination_type!r} for LoRA; use 'cat', 'svd', one of {known}, or one of "
            "those followed by '_svd'."
        ) from None
    return kind, strategy


def split_options(kind: str, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The strategy's options and the SVD's (which only the SVD kinds take)."""
    svd = {k: v for k, v in options.items() if k in SVD_OPTIONS}
    if svd and kind != SVD:
        raise TypeError(f"{sorted(svd)} only apply to the SVD combination types ('svd', '<strategy>_svd').")
    strategy = {k: v for k, v in options.items() if k not in SVD_OPTIONS}
    if kind == CAT and strategy:
        raise TypeError(f"the 'cat' combination takes no options, got {sorted(strategy)}.")
    return strategy, svd


@torch.no_grad()
def combine_into(
    layer: LoraLayer,
    target: str,
    sources: list[tuple[str, float]],
    combination_type: str,
    options: dict[str, Any],
) -> None:
    """Write ``target``'s factors on ``layer`` from the weighted ``sources`` the layer holds."""
    kind, strategy_name = parse_combination(combination_type)
    strategy_options, svd_options = split_options(kind, options)
    if getattr(layer.get_base_layer(), "groups", 1) > 1:
        raise NotImplementedError(
            f"Combining LoRA adapters on a grouped convolution (groups={layer.get_base_layer().groups}) is not "
            "supported; leave that module out of the source adapters."
        )
    weight_A, weight_B = layer.factor_weights(target)
    weight_A.zero_()
    weight_B.zero_()
    if not sources:
        return
    if kind == CAT:
        As = [layer.factor_weights(s)[0] * (w * layer.scaling[s]) for s, w in sources]
        Bs = [layer.factor_weights(s)[1] for s, _ in sources]
        cat_A, cat_B = torch.cat(As, dim=0), torch.cat(Bs, dim=1)
        weight_A[: cat_A.shape[0]] = cat_A
        weight_B[:, : cat_B.shape[1]] = cat_B
        return
    strategy = get_registry().combination_strategy(strategy_name or "linear")
    if kind == FACTORS:
        scaled = [w * layer.scaling[s] for s, w in sources]
        # The sign goes on A only, or a negative weight would cancel itself out in B @ A.
        weights_A = [math.copysign(math.sqrt(abs(v)), v) for v in scaled]
        weights_B = [math.sqrt(abs(v)) for v in scaled]
        A = strategy([layer.factor_weights(s)[0] for s, _ in sources], weights_A, **strategy_options)
        B = strategy([layer.factor_weights(s)[1] for s, _ in sources], weights_B, **strategy_options)
        weight_A.copy_(A.to(weight_A.dtype))
        weight_B.copy_(B.to(weight_B.dtype))
        return
    deltas = [layer.get_delta_weight(s) for s, _ in sources]
    combined = strategy(deltas, [w for _, w in sources], **strategy_options)
    U, Vh = _truncated_svd(layer.delta_as_matrix(combined), weight_A.shape[0], **svd_options)
    k = U.shape[1]
    weight_B[:, :k] = U.reshape(weight_B[:, :k].shape).to(weight_B.dtype)
    weight_A[:k] = Vh.reshape(weight_A[:k].shape).to(weight_A.dtype)


def _truncated_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U S, Vh)`` truncated to ``rank`` (the combined adapter's; ``svd_rank`` already set it).

    With ``svd_clamp`` (a quantile in 0..1), both factors are clamped to +-that quantile of
    their entries, as the reference (after kohya's sd-scripts) does.
    """
    del svd_rank  # the combined adapter was built with it; here it is the factors' rank
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=svd_full_matrices, driver=svd_driver)
    k = min(rank, S.numel())
    U = U[:, :k] @ torch.diag(S[:k])
    Vh = Vh[:k, :]
    if svd_clamp is not None:
        bound = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), svd_clamp)
        U, Vh = U.clamp(-bound, bound), Vh.clamp(-bound, bound)
    return U, Vh
