"""The butterfly orthogonal transform of BOFT, in pure PyTorch and without dense permutation matrices.

An adapter with ``F = boft_n_butterfly_factor`` factors holds ``boft_R`` of shape
``(F, D, H, H)`` (``D`` blocks of size ``H``, ``D * H == n``, the rotated dimension). Its rotation is

    ``Rot = M[F-1] @ ... @ M[1] @ M[0]``,  ``M[i] = P[i] @ blockdiag(Q[i, 0], ..., Q[i, D-1]) @ P[i].T``

where ``Q = cayley(boft_R)`` are orthogonal blocks and ``P[i]`` is the butterfly permutation
matrix of factor ``i`` (``P[i][j, perm_i[j]] = 1``; ``P[0]`` is the identity). This is the
reference library's matrix, element for element. The reference builds ``P`` as dense ``n x n``
buffers and multiplies dense ``n x n`` matrices; here a permutation is an index vector (a
gather) and a block-diagonal product is a batched ``H x H`` product, so applying the rotation to
``T`` rows costs ``O(T * n * H * F)`` time and ``O(n)`` extra memory instead of
``O(n**2 * (n + T))`` and ``O(F * n**2)``.

Row-vector convention: :func:`rotate` computes ``x @ Rot`` (what a linear layer's input sees)
and ``x @ Rot.T`` (what the rows of a weight see when it is merged).
"""

from __future__ import annotations

import functools

import torch
from peft_core.errors import ConfigError
from torch import nn

__all__ = [
    "MultiplicativeDropout",
    "butterfly_permutation",
    "cayley",
    "compute_dtype",
    "dense_rotation",
    "permutations",
    "resolve_blocks",
    "rotate",
]


# ---------------------------------------------------------------------- geometry
def _valid_block_sizes(n: int, extra: int) -> list[int]:
    """Block sizes that work for dimension ``n`` with ``extra = boft_n_butterfly_factor - 1``."""
    sizes = []
    for size in range(1, n + 1):
        if n % size:
            continue
        num = n // size
        if extra and (size % 2 or num % 2 or num % (2**extra)):
            continue
        sizes.append(size)
    return sizes


def resolve_blocks(
    n: int, block_size: int, block_num: int, n_butterfly_factor: int, *, where: str
) -> tuple[int, int]:
    """``(block_size, block_num)`` for a rotated dimension ``n``, with the reference's validity rules.

    Exactly one of ``block_size``/``block_num`` is non-zero (the config guarantees it); the other
    is derived so that ``block_size * block_num == n``. With more than one butterfly factor,
    ``block_num`` must be a multiple of ``2 ** (n_butterfly_factor - 1)`` and both must be even,
    since each further factor pairs up halves of neighbouring blocks. ``where`` names the layer
    (and how ``n`` comes about) in the error.
    """
    extra = n_butterfly_factor - 1
    hint = (
        f"Block sizes that work for it with boft_n_butterfly_factor={n_butterfly_factor}: "
        f"{_valid_block_sizes(n, extra) or 'none'} (or pick boft_block_num = {n} / block size), or exclude the "
        "layer with exclude_modules."
    )
    if extra:
        hint += (
            " (An adapter saved by peft without its CUDA extension was trained with one butterfly factor whatever "
            "its config says: set boft_n_butterfly_factor to 1 in its adapter_config.json to load it.)"
        )
    if block_size == 0:
        if n % block_num:
            raise ConfigError(
                f"{where}: its dimension {n} is not divisible by boft_block_num={block_num}. {hint}"
            )
        if extra and block_num % (2**extra):
            raise ConfigError(
                f"{where}: boft_block_num={block_num} must be a multiple of 2 ** (boft_n_butterfly_factor - 1) = "
                f"{2**extra} for boft_n_butterfly_factor={n_butterfly_factor}. {hint}"
            )
        block_size = n // block_num
    else:
        if n % block_size:
            raise ConfigError(
                f"{where}: its dimension {n} is not divisible by boft_block_size={block_size}. {hint}"
            )
        if extra and n % (block_size * 2**extra):
            raise ConfigError(
                f"{where}: with boft_n_butterfly_factor={n_butterfly_factor}, its dimension {n} must be a multiple of "
                f"boft_block_size * 2 ** (boft_n_butterfly_factor - 1) = {block_size * 2**extra}. {hint}"
            )
        block_num = n // block_size
    if extra and (block_num % 2 or block_size % 2):
        raise ConfigError(
            f"{where}: with boft_n_butterfly_factor={n_butterfly_factor} > 1, the block size ({block_size}) and the "
            f"number of blocks ({block_num}) must both be even. {hint}"
        )
    return block_size, block_num


def butterfly_permutation(n: int, groups: int, half: int) -> torch.Tensor:
    """Index form of one butterfly permutation of ``0 .. n-1``.

    ``n`` is cut into ``groups`` equal groups; each group is cut into runs of ``half`` indices,
    and its runs are reordered: the even-numbered runs first, then the odd-numbered ones.
    """
    group = n // groups
    runs = torch.arange(group).view(group // half, half)
    order = torch.cat([runs[0::2], runs[1::2]]).flatten()
    return (torch.arange(0, n, group)[:, None] + order[None, :]).flatten()


@functools.lru_cache(maxsize=512)
def _cached_permutations(
    n: int, block_num: int, block_size: int, factors: int, device: str
) -> tuple[tuple[torch.Tensor | None, torch.Tensor | None], ...]:
    # Factor 0's permutation leaves every index in place, so it is skipped (None).
    pairs: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [(None, None)]
    for i in range(1, factors):
        perm = butterfly_permutation(n, block_num // 2**i, block_size // 2)
        pairs.append((perm.to(device), torch.argsort(perm).to(device)))
    return tuple(pairs)


def permutations(
    n: int, block_num: int, block_size: int, factors: int, device: torch.device | str = "cpu"
) -> tuple[tuple[torch.Tensor | None, torch.Tensor | None], ...]:
    """``(perm_i, inverse of perm_i)`` per factor ``i`` (``(None, None)`` for the identity), on ``device``.

    Cached per geometry and device: a model's layers of one size share them.
    """
    return _cached_permutations(n, block_num, block_size, factors, str(device))


# ---------------------------------------------------------------------- the orthogonal blocks
def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the rotation is computed in: at least float32 (``linalg.solve`` needs it)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def cayley(boft_R: torch.Tensor) -> torch.Tensor:
    """Orthogonal blocks ``Q = (I - S) @ inv(I + S)`` of the skew-symmetric parts ``S`` of ``boft_R``.

    ``boft_R`` is ``(..., H, H)``; the result has the same shape, in :func:`compute_dtype`.
    ``boft_R = 0`` gives exactly the identity.
    """
    data = boft_R.to(compute_dtype(boft_R))
    skew = 0.5 * (data - data.transpose(-1, -2))
    eye = torch.eye(data.shape[-1], device=data.device, dtype=data.dtype).expand_as(skew)
    # Q @ (I + S) = I - S, solved from the right (the reference's formulation, so results agree bit for bit).
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


class MultiplicativeDropout(nn.Module):
    """BOFT's dropout: in training, replace ``int(p * D)`` random blocks of one random factor by I.

    It draws from torch's global generator exactly as the reference does (the factor with
    ``randint``, the blocks with ``randperm``), so seeded training runs replay identically.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return blocks
        factors, num, size, _ = blocks.shape
        chosen = int(torch.randint(0, factors, (1,)).item())
        dropped = int(self.p * num)
        flags = torch.cat([torch.ones(dropped), torch.zeros(num - dropped)])[torch.randperm(num)]
        mask = torch.zeros(factors, num, dtype=torch.bool)
        mask[chosen] = flags.bool()
        eye = torch.eye(size, device=blocks.device, dtype=blocks.dtype)
        return torch.where(mask.to(blocks.device)[:, :, None, None], eye, blocks)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ---------------------------------------------------------------------- applying the rotation
def _block_product(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(blocks)`` for rows ``x`` of length ``D * H`` and ``blocks`` of shape (D, H, H)."""
    num, size, _ = blocks.shape
    split = x.reshape(*x.shape[:-1], num, size)
    return torch.einsum("...dh,dhk->...dk", split, blocks).reshape(x.shape)


def _compose(first: torch.Tensor | None, then: torch.Tensor | None) -> torch.Tensor | None:
    """One gather equal to gathering with ``first``, then with ``then``."""
    if first is None:
        return then
    if then is None:
        return first
    return first[then]


def rotate(x: torch.Tensor, blocks: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """``x @ Rot`` (or ``x @ Rot.T`` with ``transpose``) for rows ``x`` of length ``n``.

    ``blocks`` are the orthogonal blocks ``(F, D, H, H)`` of one adapter (from :func:`cayley`,
    after dropout); ``x`` must already be in their dtype. ``x @ M[i]`` is: gather with the inverse
    of ``perm_i``, multiply by the blocks, gather with ``perm_i``; consecutive gathers are fused.
    """
    factors, block_num, size, _ = blocks.shape
    perms = permutations(x.shape[-1], block_num, size, factors, x.device)
    # x @ Rot applies M[F-1] first; x @ Rot.T = x @ M[0].T @ ... applies M[0].T first.
    order = range(factors) if transpose else range(factors - 1, -1, -1)
    pending: torch.Tensor | None = None
    for i in order:
        perm, inverse = perms[i]
        index = _compose(pending, inverse)
        if index is not None:
            x = x.index_select(-1, index)
        factor_blocks = blocks[i].transpose(-1, -2) if transpose else blocks[i]
        x = _block_product(x, factor_blocks)
        pending = perm
    if pending is not None:
        x = x.index_select(-1, pending)
    return x


def dense_rotation(blocks: torch.Tensor) -> torch.Tensor:
    """The dense ``n x n`` matrix ``Rot`` (for inspection and tests; the layers never build it)."""
    n = blocks.shape[1] * blocks.shape[2]
    return rotate(torch.eye(n, device=blocks.device, dtype=blocks.dtype), blocks)
