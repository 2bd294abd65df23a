"""Mixed-adapter batches: one adapter per sample in a single forward or ``generate`` call.

The model code of transformers knows nothing of adapters, so the per-sample adapter names cannot
travel down as an argument. While :func:`batch_adapter_names` is active, a forward pre-hook on
every adapter layer and ``modules_to_save`` wrapper adds ``adapter_names=`` to the call; each
layer then routes the samples itself. Layers of methods that declare ``mixed_batch`` accept it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from peft_core.layer import AdapterLayer
from peft_core.modules_to_save import ModulesToSaveWrapper

__all__ = ["BASE_ADAPTER", "batch_adapter_names", "check_batch_adapter_names"]

BASE_ADAPTER = "__base__"
"""The name that selects no adapter (the base model alone) for a sample."""


def check_batch_adapter_names(
    adapter_names: Sequence[str], configs: dict[str, Any], method_of: dict[str, Any]
) -> list[str]:
    """Validate ``adapter_names`` before any forward runs; return them as a list.

    ``configs`` maps adapter names to configs; ``method_of`` maps adapter names to their method
    spec, whose capabilities say whether per-sample routing is supported.
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(
            f"adapter_names must be a list with one adapter name per sample, got {type(adapter_names).__name__}."
        )
    names = list(adapter_names)
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in configs})
    if unknown:
        raise ValueError(
            f"adapter_names has unknown adapter(s) {unknown}; available: {list(configs)}, or {BASE_ADAPTER!r} "
            "for the base model."
        )
    refused = sorted({spec.peft_type for spec in method_of.values() if not spec.capabilities.mixed_batch})
    if refused:
        raise TypeError(
            f"{', '.join(refused)} does not support mixed-adapter batches (adapter_names=...); run one forward per "
            "adapter with set_adapter() instead."
        )
    return names


def _batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


@contextlib.contextmanager
def batch_adapter_names(
    model: nn.Module, adapter_names: list[str], *, expandable: bool = False
) -> Iterator[None]:
    """Route sample ``i`` of every call inside the block through adapter ``adapter_names[i]``.

    With ``expandable`` (``generate``), a layer that sees ``k`` times as many samples gets each
    name repeated ``k`` times in a row, which is how beam search and ``num_return_sequences``
    expand a batch; an encoder still sees the original batch.
    """
    count = len(adapter_names)

    def add_names(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        size = _batch_size(args, kwargs)
        names = adapter_names
        if expandable and size is not None and size != count and count and size % count == 0:
            names = [n for n in adapter_names for _ in range(size // count)]
        if size is not None and size != len(names):
            raise ValueError(
                f"adapter_names has {count} entries but a batch of {size} samples reached {type(module).__name__}; "
                "pass one adapter name per sample."
            )
        return args, {**kwargs, "adapter_names": names}

    handles = [
        module.register_forward_pre_hook(add_names, with_kwargs=True)
        for module in model.modules()
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
