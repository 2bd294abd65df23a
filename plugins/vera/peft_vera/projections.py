"""VeRA's shared random projections: how they are drawn, and the container that holds them.

The projections are drawn exactly as the reference library draws them: a CPU ``torch.Generator``
seeded with ``projection_prng_key``, then ``A`` of shape ``(r, largest in_features)`` and ``B`` of
shape ``(largest out_features, r)``, in that order, each Kaiming-uniform (gain ``sqrt(2)``,
fan-in = the second dimension). An adapter saved without its projections
(``save_projection=False``) therefore gets the very same matrices back in either library.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["BufferDict", "generate_projections", "kaiming_uniform"]


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A float tensor of ``shape`` drawn from U(-b, b), ``b = sqrt(3) * sqrt(2) / sqrt(shape[1])``."""
    tensor = torch.empty(shape)
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def generate_projections(
    r: int, in_features: int, out_features: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vera_A, vera_B)`` of shapes ``(r, in_features)`` and ``(out_features, r)`` for ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vera_A = kaiming_uniform((r, in_features), generator)
    vera_B = kaiming_uniform((out_features, r), generator)
    return vera_A, vera_B


class BufferDict(nn.Module):
    """Tensors by adapter name, kept as buffers so they follow ``.to()`` and ``state_dict``.

    Buffers are registered persistent or not (``save_projection``), so ``model.state_dict()``
    lists the projections exactly when the reference library's does, under the same names
    (``<path>.vera_A.<adapter>``). The same instance is registered on the adapter model and on
    every VeRA layer, as in the reference.
    """

    def __init__(self, *, persistent: bool = True) -> None:
        super().__init__()
        self._persistent = persistent

    @property
    def persistent(self) -> bool:
        return self._persistent

    def set_persistent(self, persistent: bool) -> None:
        """Change whether the entries belong to ``state_dict`` (applies to existing entries too)."""
        self._persistent = persistent
        for name in self._buffers:
            if persistent:
                self._non_persistent_buffers_set.discard(name)
            else:
                self._non_persistent_buffers_set.add(name)

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self.register_buffer(name, tensor, persistent=self._persistent)

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._buffers[name]
        assert tensor is not None
        return tensor

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]
        self._non_persistent_buffers_set.discard(name)

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._buffers))

    def keys(self) -> list[str]:
        return list(self._buffers)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: {tuple(t.shape)}" for name, t in self._buffers.items() if t is not None)
