"""The block-diagonal orthogonal matrix of one OFT adapter, from its packed skew-symmetric parameters.

The parameter layout is the reference library's, so checkpoints move both ways: one module per
adapter whose ``weight`` has shape ``(stored_blocks, b * (b - 1) / 2)``, each row the strictly
upper triangle (row-major, as ``torch.triu_indices``) of a ``b x b`` skew-symmetric matrix ``Q``.
``stored_blocks`` is the number of diagonal blocks ``r``, or 1 with ``block_share``.

Each block becomes a rotation by the Cayley transform:

* exact (``use_cayley_neumann=False``): ``R = (I - Q)(I + Q)^-1``, orthogonal;
* Neumann (the default): ``R = I + 2Q + 2Q^2 + ... + 2Q^(m-1) + Q^m`` with ``m = max(n - 1, 3)``
  for ``n = num_cayley_neumann_terms > 2`` (``I + 2Q`` for ``n = 2``, ``I`` for ``n <= 1``): a
  truncation of ``(I + Q)(I - Q)^-1``, orthogonal only approximately. These are the reference's
  coefficients (including its ``n = 3``, which equals ``n = 4``), so outputs agree.

With ``coft`` (constrained OFT), each ``Q`` is first scaled into the Frobenius ball of radius
``eps / sqrt(stored_blocks)``. As in the reference, a training forward stores the projection in the
parameters (projected gradient descent); unlike it, evaluation and merging never write them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["OFTRotation", "adjust_to_divisor", "split_dimension"]


def adjust_to_divisor(dim: int, value: int) -> int:
    """The divisor of ``dim`` nearest to ``value`` (ties go down), as the reference picks it.

    Used for a block size or block count that does not divide a layer's input size. Values of at
    least ``dim`` give ``dim``.
    """
    if value >= dim:
        return dim
    higher = value
    while higher <= dim and dim % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and dim % lower != 0:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def split_dimension(dim: int, r: int, block_size: int) -> tuple[int, int, str | None]:
    """``(r, block_size, warning)`` for a layer whose rotated dimension is ``dim``.

    Exactly one of ``r`` / ``block_size`` is non-zero (the config checks it); the other follows, and
    a value that does not divide ``dim`` is moved to the nearest divisor (``warning`` says so).
    """
    if r == 0:
        message = None
        if dim % block_size != 0 or block_size > dim:
            adjusted = adjust_to_divisor(dim, block_size)
            message = f"oft_block_size={block_size} does not divide {dim}; using oft_block_size={adjusted}."
            block_size = adjusted
        return dim // block_size, block_size, message
    message = None
    if dim % r != 0 or r > dim:
        adjusted = adjust_to_divisor(dim, r)
        message = f"r={r} does not divide {dim}; using r={adjusted}."
        r = adjusted
    return r, dim // r, message


class OFTRotation(nn.Module):
    """One adapter's parameters and the rotation blocks they define.

    ``weight`` is the trainable tensor (saved as ``oft_R.weight``); :meth:`blocks` returns the
    ``n_blocks`` rotation blocks ``(n_blocks, b, b)`` that act on consecutive slices of size ``b``
    of the rotated dimension.
    """

    def __init__(
        self,
        *,
        n_blocks: int,
        block_size: int,
        block_share: bool,
        coft: bool,
        eps: float,
        use_cayley_neumann: bool,
        num_cayley_neumann_terms: int,
    ) -> None:
        super().__init__()
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.block_share = block_share
        self.coft = coft
        self.eps = eps
        self.use_cayley_neumann = use_cayley_neumann
        self.num_cayley_neumann_terms = num_cayley_neumann_terms
        stored = 1 if block_share else n_blocks
        self.weight = nn.Parameter(torch.empty(stored, block_size * (block_size - 1) // 2))
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"n_blocks={self.n_blocks}, block_size={self.block_size}, block_share={self.block_share}, "
            f"coft={self.coft}, cayley_neumann={self.use_cayley_neumann}"
        )

    # ------------------------------------------------------------------ pieces
    def skew(self, packed: torch.Tensor) -> torch.Tensor:
        """``(n, b, b)`` skew-symmetric matrices from their packed upper triangles ``(n, b(b-1)/2)``."""
        b = self.block_size
        upper = packed.new_zeros(packed.shape[0], b, b)
        upper[:, self.rows, self.cols] = packed
        return upper - upper.transpose(-2, -1)

    def project(self, packed: torch.Tensor) -> torch.Tensor:
        """COFT: each block whose skew matrix has Frobenius norm above ``eps / sqrt(stored blocks)``
        scaled onto that radius (packed in, packed out).

        Norms within a relative 1e-5 of the radius count as inside, so projecting twice changes
        nothing (a projected block's norm lands on the radius only up to rounding).
        """
        skew = self.skew(packed)
        radius = self.eps / math.sqrt(skew.shape[0])
        norm = torch.linalg.matrix_norm(skew, keepdim=True)
        inside = norm <= radius * (1 + 1e-5)
        scale = torch.where(inside, torch.ones_like(norm), radius / norm.clamp_min(radius))
        return (skew * scale)[:, self.rows, self.cols]

    def effective_weight(self, *, write: bool = False) -> torch.Tensor:
        """The packed parameters the rotation is built from: ``weight``, COFT-projected if enabled.

        As in the reference, the projection is not differentiated through: gradients reach
        ``weight`` as if it were the projected tensor. ``write=True`` (training) also stores the
        projection in ``weight``, which makes training projected gradient descent, the reference's
        COFT; otherwise (evaluation, merging) the parameters are left untouched.
        """
        weight = self.weight
        if not self.coft:
            return weight
        with torch.no_grad():
            projected = self.project(weight)
            if torch.equal(projected, weight):
                return weight
            if write:
                weight.copy_(projected)
                return weight
        return weight + (projected - weight).detach()

    def _cayley(self, skew: torch.Tensor) -> torch.Tensor:
        n, b, _ = skew.shape
        eye = torch.eye(b, device=skew.device, dtype=skew.dtype).expand(n, b, b)
        if not self.use_cayley_neumann:
            # X (I + Q) = I - Q
            return torch.linalg.solve(eye + skew, eye - skew, left=False)
        terms = self.num_cayley_neumann_terms
        result = eye.clone()
        if terms <= 1:
            return result
        result = result + 2.0 * skew
        if terms == 2:
            return result
        last = max(terms - 1, 3)
        power = skew
        for exponent in range(2, last + 1):
            power = torch.bmm(power, skew)
            result = result + (2.0 if exponent < last else 1.0) * power
        return result

    # ------------------------------------------------------------------ the rotation
    def blocks(self, *, dropout: float = 0.0, write: bool = False) -> torch.Tensor:
        """The ``(n_blocks, b, b)`` rotation blocks, in the parameters' dtype.

        ``dropout`` (training only, given by the caller) replaces ``int(dropout * n_blocks)`` randomly
        chosen blocks by the identity: OFT's multiplicative dropout. ``write``: see
        :meth:`effective_weight`.
        """
        weight = self.weight
        packed = self.effective_weight(write=write)
        work = packed if packed.dtype in (torch.float32, torch.float64) else packed.float()
        skew = self.skew(work)
        rotation = self._cayley(skew)
        if self.block_share:
            rotation = rotation.expand(self.n_blocks, -1, -1)
        dropped = int(dropout * self.n_blocks)
        if dropped > 0:
            mask = torch.zeros(self.n_blocks, device=rotation.device, dtype=torch.bool)
            mask[torch.randperm(self.n_blocks, device=rotation.device)[:dropped]] = True
            eye = torch.eye(self.block_size, device=rotation.device, dtype=rotation.dtype)
            rotation = torch.where(mask[:, None, None], eye, rotation)
        return rotation.to(weight.dtype)

    def inverse_blocks(self) -> torch.Tensor:
        """The inverses of :meth:`blocks` (no dropout), to undo a merge.

        The exact Cayley transform is orthogonal, so its inverse is the transpose; the Neumann
        series is orthogonal only approximately, so its blocks are inverted (in float64).
        """
        rotation = self.blocks()
        if not self.use_cayley_neumann:
            return rotation.transpose(-2, -1)
        return torch.linalg.inv(rotation.double()).to(rotation.dtype)
