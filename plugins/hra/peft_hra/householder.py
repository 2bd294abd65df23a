"""The arithmetic of a chain of Householder reflections, kept apart from the layers that use it.

An adapter holds ``r`` vectors as the columns of ``u`` (shape ``(d, r)``). The chain is the
orthogonal ``d x d`` matrix ``R = H_1 @ H_2 @ ... @ H_r`` with ``H_i = I - 2 v_i v_i^T`` and
``v_i = u_i / |u_i|``. It is never formed: in its compact form ``R = I - V T V^T`` (``V`` the
unit vectors, ``T`` a small ``r x r`` triangle) it is applied to the rows of a tensor in ``O(r * d)``
per row, so adapting a weight of ``n`` rows costs ``O(r * n * d)`` instead of the
``O(r * d^2 + n * d^2)`` of building ``R``.

With Gram-Schmidt (``apply_GS``) the vectors are first made orthonormal (``Q``), the reflections
then commute and the chain is the single symmetric, self-inverse ``R = I - 2 Q Q^T``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

__all__ = [
    "apply_chain",
    "chain_factor",
    "compute_dtype",
    "gram_schmidt",
    "initial_vectors",
    "unit_vectors",
]


def compute_dtype(vectors: torch.Tensor) -> torch.dtype:
    """The dtype the chain is evaluated in: the vectors' own, but at least float32."""
    return vectors.dtype if vectors.dtype in (torch.float32, torch.float64) else torch.float32


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``u``'s, in order (modified Gram-Schmidt, as the reference does).

    Column ``i`` is ``u_i`` minus its components along the earlier results, normalised. A column
    that depends linearly on earlier ones has no such direction: its result is rounding noise or
    NaN (0/0), as in the reference, which is why layers refuse to *start* that way (the identity
    init's equal pairs, or more vectors than dimensions).
    """
    basis: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        column = u[:, i]
        for previous in basis:
            column = column - torch.dot(previous, column) * previous
        basis.append(column / column.norm())
    return torch.stack(basis, dim=1)


def unit_vectors(u: torch.Tensor, apply_GS: bool) -> torch.Tensor:
    """The reflection directions of ``u``: its columns normalised, or orthonormalised with GS."""
    return gram_schmidt(u) if apply_GS else u / u.norm(dim=0)


def chain_factor(directions: torch.Tensor) -> torch.Tensor:
    """The ``r x r`` upper-triangular ``T`` with ``H_1 @ ... @ H_r = I - V T V^T`` (``V = directions``).

    The compact "WY" form of a product of reflections: ``T`` has 2 on its diagonal, and column ``k``
    above it is ``-2 T[:k, :k] V[:, :k]^T v_k``. Built without in-place writes, so it is differentiable.
    """
    gram = directions.T @ directions
    factor = directions.new_full((1, 1), 2.0)
    for k in range(1, directions.shape[1]):
        column = -2 * factor @ gram[:k, k : k + 1]
        top = torch.cat([factor, column], dim=1)
        bottom = torch.cat([directions.new_zeros(1, k), directions.new_full((1, 1), 2.0)], dim=1)
        factor = torch.cat([top, bottom], dim=0)
    return factor


def apply_chain(rows: torch.Tensor, vectors: torch.Tensor, *, apply_GS: bool, inverse: bool) -> torch.Tensor:
    """``rows @ R`` (``inverse=False``) or ``rows @ R^T = rows @ R^-1`` (``inverse=True``).

    ``rows`` has the reflection dimension ``d`` last (any leading shape); ``vectors`` is the raw
    ``(d, r)`` parameter. Transforming a layer's *input* ``x`` by ``x @ R^T`` is the same as
    using the weight ``W @ R``, since ``(W @ R) @ x^T = W @ (x @ R^T)^T``. Two skinny matrix
    products (``O(rows * d * r)``) do the work, whatever ``r``.
    """
    directions = unit_vectors(vectors, apply_GS)
    if apply_GS:
        # I - 2 Q Q^T is symmetric and its own inverse.
        return rows - 2 * (rows @ directions) @ directions.T
    factor = chain_factor(directions)
    return rows - ((rows @ directions) @ (factor.T if inverse else factor)) @ directions.T


def initial_vectors(dim: int, r: int, *, init_weights: bool) -> torch.Tensor:
    """The ``(dim, r)`` starting vectors, drawn exactly as the reference draws them.

    ``init_weights=True`` with an even ``r``: ``r / 2`` Kaiming-uniform vectors, each repeated
    twice in a row, so every reflection is undone by the next and the chain is the identity.
    Otherwise (``init_weights=False``, or an odd ``r``, which has no such pairing and warns) all
    ``r`` vectors are Kaiming-uniform. Same seed, same draws, same vectors as the reference.
    """
    if init_weights and r % 2 == 0:
        half = torch.zeros(dim, r // 2)
        nn.init.kaiming_uniform_(half, a=math.sqrt(5))
        return torch.repeat_interleave(half, 2, dim=1)
    if init_weights:
        warnings.warn(
            f"HRA's identity init pairs equal reflection vectors, which needs an even r; with r={r} the vectors "
            "are drawn at random instead, so the adapter changes the model's output from the start. Use an even r "
            "(e.g. r=8) to start from the base model.",
            UserWarning,
            stacklevel=4,
        )
    vectors = torch.empty(dim, r)
    nn.init.kaiming_uniform_(vectors, a=math.sqrt(5))
    return vectors
