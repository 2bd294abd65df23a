"""Public, composable hypothesis strategies for writing method tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from peft_core.testing.models import ModelCase, standard_model_cases

__all__ = ["dtypes", "model_cases", "ranks", "seeds"]


def dtypes() -> st.SearchStrategy[torch.dtype]:
    return st.sampled_from([torch.float32, torch.bfloat16])


def ranks(max_rank: int = 4) -> st.SearchStrategy[int]:
    return st.integers(min_value=1, max_value=max_rank)


def seeds() -> st.SearchStrategy[int]:
    return st.integers(min_value=0, max_value=2**16)


def model_cases(*layer_kinds: str) -> st.SearchStrategy[ModelCase]:
    cases = [c for c in standard_model_cases() if not layer_kinds or c.layer_kind in layer_kinds]
    return st.sampled_from(cases)
