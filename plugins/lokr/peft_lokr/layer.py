"""LoKr layers for ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

The update is a Kronecker product of two factors, ``delta W = alpha / r * kron(W1, W2)``, with
``out = a * b`` and ``in = c * d`` split by :func:`factorization`, ``W1`` (a, c) and ``W2``
(b, d[, *kernel]). Parameter names and shapes are the reference library's, so state dicts and
checkpoints match key for key:

* ``W1``: ``lokr_w1`` (a, c), or ``lokr_w1_a`` (a, r) @ ``lokr_w1_b`` (r, c) with
  ``decompose_both`` when ``r < max(a, c) / 2``;
* ``W2``: ``lokr_w2`` (b, d[, *kernel]) when ``r >= max(b, d) / 2``; otherwise
  ``lokr_w2_a`` (b, r) @ ``lokr_w2_b`` (r, d * prod(kernel)), or, with ``use_effective_conv2d``
  on a kernel larger than 1, a core ``lokr_t2`` (r, r, *kernel) with mode factors
  ``lokr_w2_a`` (r, b) and ``lokr_w2_b`` (r, d) (a Conv1d kernel is stored as (k, 1)).

The identity init zeroes ``W1`` (``"lycoris"``: ``W2``); draws happen in the reference's order,
so the same seed gives the same factors in both libraries.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft_core.delta_layer import CONV1D, CONV2D, LINEAR, DeltaWeightLayer
from peft_core.errors import ConfigError
from peft_core.quantization import weight_shape
from peft_core.targeting import pattern_value
from torch import nn

from peft_lokr.config import LoKrConfig

__all__ = [
    "LAYER_TYPES",
    "Conv1d",
    "Conv2d",
    "Linear",
    "LoKrLayer",
    "factorization",
    "kronecker_delta",
    "tucker_factor",
]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into two factors whose product is ``dimension``.

    ``factor > 0`` that divides ``dimension`` gives ``(factor, dimension // factor)`` as is (not
    sorted). Otherwise the divisors of ``dimension`` are walked upwards, keeping the pair
    ``(m, dimension // m)`` until ``m`` reaches the square root or exceeds ``factor`` (no limit
    for -1), and the pair is returned smaller first.

    >>> factorization(256), factorization(128), factorization(127), factorization(128, 4)
    ((16, 16), (8, 16), (1, 127), (4, 32))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    candidate = 2
    while m < n:
        while dimension % candidate:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
        candidate += 1
    return (m, n) if m <= n else (n, m)


def tucker_factor(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """``core`` (r, r, kh, kw) contracted with ``out_factor`` (r, b) on its first mode and
    ``in_factor`` (r, d) on its second: a (b, d, kh, kw) kernel.

    The result is copied to canonical strides: with r = 1 einsum can return a tensor that counts
    as contiguous but has odd strides on size-1 dims, which ``torch.kron`` rejects (the reference
    library fails there, on Conv1d with ``use_effective_conv2d`` and r = 1).
    """
    kernel = torch.einsum("abhw,ao,bi->oihw", core, out_factor, in_factor)
    return kernel.clone(memory_format=torch.contiguous_format)


def kronecker_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * kron(W1, W2)``, with ``W1`` broadcast over a 4-d ``W2``'s kernel dimensions.

    A 3-d ``W2`` (a full Conv1d factor) is not broadcast: ``torch.kron`` then pads ``W1`` to
    (1, a, c), which lays the product out differently from the Conv2d case. The reference library
    does exactly this, and adapters trained with it depend on that layout, so it is kept.
    """
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()) * scale


class LoKrLayer(DeltaWeightLayer):
    """LoKr on one base layer; the subclasses only name the base-layer type."""

    adapter_layer_names = (
        "lokr_w1",
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2",
        "lokr_w2_a",
        "lokr_w2_b",
        "lokr_t2",
    )

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: LoKrConfig, *, key: str = ""
    ) -> None:
        super().__init__(base_layer)
        self.lokr_w1 = nn.ParameterDict()
        self.lokr_w1_a = nn.ParameterDict()
        self.lokr_w1_b = nn.ParameterDict()
        self.lokr_w2 = nn.ParameterDict()
        self.lokr_w2_a = nn.ParameterDict()
        self.lokr_w2_b = nn.ParameterDict()
        self.lokr_t2 = nn.ParameterDict()
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, config, key=key)

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, config: LoKrConfig, *, key: str = "", **kwargs: Any) -> None:
        """Add ``adapter_name``; ``key`` (the module's name) selects ``rank_pattern``/``alpha_pattern``."""
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.alpha)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ConfigError(f"The rank for module {key!r} must be a positive integer, got r={r!r}.")
        self._set_hyper_parameters(adapter_name, r, alpha, config)
        self.rank_dropout_scale[adapter_name] = config.rank_dropout_scale

        out_l, out_k = factorization(self.out_features, config.decompose_factor)
        in_m, in_n = factorization(self._in_per_group(), config.decompose_factor)
        full_w1 = not (config.decompose_both and r < max(out_l, in_m) / 2)
        full_w2 = not (r < max(out_k, in_n) / 2)
        # A kernel of size 1 has nothing to factor: the flattened form is the same map, cheaper.
        effective = (
            config.use_effective_conv2d and self.kind != LINEAR and any(k != 1 for k in self._kernel_size())
        )
        self._create_factors(adapter_name, r, (out_l, in_m), (out_k, in_n), full_w1, full_w2, effective)
        self._init_factors(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _create_factors(
        self,
        adapter_name: str,
        r: int,
        w1_shape: tuple[int, int],
        w2_shape: tuple[int, int],
        full_w1: bool,
        full_w2: bool,
        effective: bool,
    ) -> None:
        (a, c), (b, d), kernel = w1_shape, w2_shape, self._kernel_size()
        if full_w1:
            self.lokr_w1[adapter_name] = nn.Parameter(torch.empty(a, c))
        else:
            self.lokr_w1_a[adapter_name] = nn.Parameter(torch.empty(a, r))
            self.lokr_w1_b[adapter_name] = nn.Parameter(torch.empty(r, c))
        if full_w2:
            self.lokr_w2[adapter_name] = nn.Parameter(torch.empty(b, d, *kernel))
        elif effective:
            core_shape = (r, r, *kernel) if self.kind == CONV2D else (r, r, kernel[0], 1)
            self.lokr_t2[adapter_name] = nn.Parameter(torch.empty(core_shape))
            self.lokr_w2_a[adapter_name] = nn.Parameter(torch.empty(r, b))
            self.lokr_w2_b[adapter_name] = nn.Parameter(torch.empty(r, d))
        else:
            self.lokr_w2_a[adapter_name] = nn.Parameter(torch.empty(b, r))
            self.lokr_w2_b[adapter_name] = nn.Parameter(torch.empty(r, d * math.prod(kernel)))

    @torch.no_grad()
    def _init_factors(self, adapter_name: str, init: bool | str) -> None:
        def kaiming(param: torch.Tensor) -> None:
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))

        # Which single factor starts at zero (making the Kronecker product zero), if any.
        zero_w1, zero_w2 = init is True, init == "lycoris"
        if adapter_name in self.lokr_w1:
            (nn.init.zeros_ if zero_w1 else kaiming)(self.lokr_w1[adapter_name])
        else:
            (nn.init.zeros_ if zero_w1 else kaiming)(self.lokr_w1_a[adapter_name])
            kaiming(self.lokr_w1_b[adapter_name])
        if adapter_name in self.lokr_w2:
            (nn.init.zeros_ if zero_w2 else kaiming)(self.lokr_w2[adapter_name])
        elif zero_w2:
            # the reference's order for this init: the zero factor first
            nn.init.zeros_(self.lokr_w2_b[adapter_name])
            kaiming(self.lokr_w2_a[adapter_name])
        else:
            kaiming(self.lokr_w2_a[adapter_name])
            kaiming(self.lokr_w2_b[adapter_name])
        if adapter_name in self.lokr_t2:
            kaiming(self.lokr_t2[adapter_name])

    # ------------------------------------------------------------------ the delta
    def _w1(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w1:
            return self.lokr_w1[adapter_name]
        return self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]

    def _w2(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w2:
            return self.lokr_w2[adapter_name]
        if adapter_name in self.lokr_t2:
            return tucker_factor(
                self.lokr_t2[adapter_name], self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name]
            )
        return self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]

    def get_delta_weight(self, adapter_name: str, *, apply_rank_dropout: bool = False) -> torch.Tensor:
        weight = kronecker_delta(self._w1(adapter_name), self._w2(adapter_name), self.scaling[adapter_name])
        weight = weight.reshape(weight_shape(self.get_base_layer()))
        if apply_rank_dropout:
            # float32 mask, one rounding into the delta's dtype (the reference's in-place ``*=``)
            weight = (weight * self._rank_dropout_mask(adapter_name, weight)).to(weight.dtype)
        return weight

    def _rank_dropout_mask(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """Keep each output row with probability ``1 - rank_dropout`` (rescaled with ``rank_dropout_scale``).

        The draw (``torch.rand(out)`` on the CPU generator, a float32 mask) is the reference
        library's, so seeded runs drop the same rows. If every row is dropped the mask stays zero
        (the reference divides by zero there).
        """
        keep = (torch.rand(weight.size(0)) > self.rank_dropout[adapter_name]).float()
        if self.rank_dropout_scale[adapter_name]:
            kept = keep.mean()
            if kept > 0:
                keep = keep / kept
        return keep.view(-1, *[1] * (weight.dim() - 1)).to(weight.device)

    def __repr__(self) -> str:
        return "lokr." + super().__repr__()


class Linear(LoKrLayer):
    """LoKr on ``nn.Linear``: the delta is applied with ``F.linear``."""


class Conv1d(LoKrLayer):
    """LoKr on ``nn.Conv1d``: the delta is a kernel applied with the base convolution's settings."""


class Conv2d(LoKrLayer):
    """LoKr on ``nn.Conv2d``: the delta is a kernel applied with the base convolution's settings."""


LAYER_TYPES = {LINEAR: Linear, CONV1D: Conv1d, CONV2D: Conv2d}
"""The LoKr layer class for each base-layer kind."""
