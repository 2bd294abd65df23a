"""Public, composable hypothesis strategies for testing PEFT methods.

Each function returns a strategy, so method tests combine them freely::

    from hypothesis import given
    from peft_core.testing import strategies as pst

    @given(case=pst.model_cases("linear"), dtype=pst.dtypes(), r=pst.ranks(4))
    def test_something(case, dtype, r): ...

:func:`model_cases` generates the sizes of the standard tiny models too, so one strategy
covers models, input shapes and layer kinds.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from peft_core.testing.models import (
    LAYER_KINDS,
    ModelCase,
    conv_case,
    embedding_case,
    gpt2_conv1d_case,
    llama_case,
    mlp_case,
)

__all__ = [
    "DTYPES",
    "batch_shapes",
    "dtypes",
    "features",
    "model_cases",
    "ranks",
    "seeds",
    "shapes",
]

DTYPES = (torch.float32, torch.bfloat16)
"""The dtypes the kit checks; tolerances per dtype are in :func:`peft_core.testing.tolerance`."""


def dtypes(choices: tuple[torch.dtype, ...] = DTYPES) -> st.SearchStrategy[torch.dtype]:
    """A dtype among ``choices`` (float32 shrinks first)."""
    return st.sampled_from(choices)


def ranks(max_rank: int = 4, min_rank: int = 1) -> st.SearchStrategy[int]:
    """An adapter rank in ``[min_rank, max_rank]``."""
    return st.integers(min_value=min_rank, max_value=max_rank)


def seeds() -> st.SearchStrategy[int]:
    """A seed for ``torch.manual_seed`` or a ``torch.Generator``."""
    return st.integers(min_value=0, max_value=2**16)


def features(min_size: int = 2, max_size: int = 12) -> st.SearchStrategy[int]:
    """A feature (or channel) count of a tiny layer."""
    return st.integers(min_value=min_size, max_value=max_size)


def batch_shapes(max_dims: int = 2, max_size: int = 3) -> st.SearchStrategy[tuple[int, ...]]:
    """Leading (batch) dimensions of an input: one or more sizes, each at least 1."""
    return st.lists(st.integers(min_value=1, max_value=max_size), min_size=1, max_size=max_dims).map(tuple)


def shapes(min_dims: int = 1, max_dims: int = 3, max_side: int = 6) -> st.SearchStrategy[tuple[int, ...]]:
    """A tensor shape with ``min_dims`` to ``max_dims`` dimensions, each between 1 and ``max_side``."""
    side = st.integers(min_value=1, max_value=max_side)
    return st.lists(side, min_size=min_dims, max_size=max_dims).map(tuple)


def _mlp() -> st.SearchStrategy[ModelCase]:
    return st.builds(
        mlp_case,
        d_in=features(),
        hidden=features(),
        d_out=features(1, 4),
        batch=batch_shapes(),
        bias=st.booleans(),
    )


def _embedding() -> st.SearchStrategy[ModelCase]:
    return st.builds(
        embedding_case,
        vocab=st.integers(3, 24),
        dim=features(),
        d_out=features(1, 4),
        batch=batch_shapes().map(lambda b: (*b, 4)),
    )


def _conv(dims: int) -> st.SearchStrategy[ModelCase]:
    size = st.integers(2, 4) if dims == 3 else st.integers(3, 6)
    return st.builds(
        conv_case,
        dims=st.just(dims),
        c_in=features(1, 4),
        c_mid=features(2, 6),
        kernel=st.sampled_from([1, 3]),
        size=size,
        batch=st.integers(1, 2),
        bias=st.booleans(),
    )


def _gpt2() -> st.SearchStrategy[ModelCase]:
    return st.builds(
        gpt2_conv1d_case, d_in=features(), hidden=features(), d_out=features(1, 4), batch=batch_shapes()
    )


def _llama() -> st.SearchStrategy[ModelCase]:
    return st.builds(
        llama_case,
        hidden=st.sampled_from([8, 16]),
        layers=st.integers(1, 2),
        heads=st.sampled_from([1, 2]),
        kv_heads=st.just(1),
        batch=st.integers(1, 2),
        seq=st.integers(1, 6),
    )


_KIND_STRATEGIES = {
    "linear": _mlp,
    "embedding": _embedding,
    "conv1d": lambda: _conv(1),
    "conv2d": lambda: _conv(2),
    "conv3d": lambda: _conv(3),
    "transformers_conv1d": _gpt2,
    "llama": _llama,
}


def model_cases(*layer_kinds: str) -> st.SearchStrategy[ModelCase]:
    """Standard tiny models of the given layer kinds (all kinds if none), with generated sizes."""
    unknown = [k for k in layer_kinds if k not in _KIND_STRATEGIES]
    if unknown:
        raise ValueError(f"Unknown layer kind(s) {unknown}; the standard cases cover {list(LAYER_KINDS)}.")
    return st.one_of(*(_KIND_STRATEGIES[k]() for k in (layer_kinds or LAYER_KINDS)))
