"""One pruned module walk for the model-wide loops: ``named_modules`` without the parts they skip.

An adapted model's modules are mostly adapter factors, and every model-wide loop (finding
targets, adapter layers, state-dict entries) would visit and reject each of them. These loops
instead say which children of a module to enter, and the walk never sees the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from torch import nn

__all__ = ["walk", "through_base_layer"]

ChildrenOf = Callable[[nn.Module], Mapping[str, nn.Module | None]]


def walk(root: nn.Module, children_of: ChildrenOf) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` in ``root.named_modules()`` order, entering only ``children_of(module)``.

    A module reached twice (shared or tied) is yielded once, under its first name, as
    ``named_modules`` does.
    """
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        head = f"{name}." if name else ""
        stack.extend(
            (head + key, child) for key, child in reversed(children_of(module).items()) if child is not None
        )


def through_base_layer(module: nn.Module) -> Mapping[str, nn.Module | None]:
    """The children of a wrapping layer worth entering: its ``base_layer`` (a stacked layer may sit there)."""
    base = module._modules.get("base_layer")
    return {"base_layer": base} if base is not None else {}
