"""Which modules of a base model an adapter config targets (the reference library's semantics).

* ``target_modules`` as a list: a module matches when its dotted name equals an entry or ends
  with ``"." + entry``; as a string: the whole name must match it as a regular expression;
  ``"all-linear"``: every linear layer except the model's output layer.
* ``exclude_modules`` takes the same two forms and wins over ``target_modules``.
* ``layers_to_transform`` (+ ``layers_pattern``) restricts list matches to given layer indices.
* ``rank_pattern``/``alpha_pattern`` keys are regexes matched against the end of a name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from torch import nn

from peft_core.walk import walk

__all__ = [
    "ALL_LINEAR",
    "expand_all_linear",
    "is_excluded",
    "linear_layer_types",
    "match_target",
    "pattern_key",
    "pattern_value",
    "unmatched_entries",
]

ALL_LINEAR = "all-linear"
T = TypeVar("T")


def _layer_index_ok(config: Any, key: str) -> bool:
    indexes = getattr(config, "layers_to_transform", None)
    if indexes is None or (isinstance(indexes, (list, tuple)) and len(indexes) == 0):
        return True
    patterns = getattr(config, "layers_pattern", None)
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def _matches_list(entries: Iterable[str], key: str) -> bool:
    return any(key == entry or key.endswith("." + entry) for entry in entries)


def is_excluded(config: Any, key: str) -> bool:
    """Whether ``key`` is excluded by ``exclude_modules`` or claimed by ``modules_to_save``."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return True
        elif _matches_list(exclude, key):
            return True
    to_save = getattr(config, "modules_to_save", None)
    return bool(to_save) and any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in to_save)


def match_target(config: Any, key: str) -> bool:
    """Whether the module named ``key`` is a target of ``config``."""
    targets = getattr(config, "target_modules", None)
    if targets is None or is_excluded(config, key):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:  # an exact name is taken as meant, whatever layers_to_transform says
        return True
    return _matches_list(targets, key) and _layer_index_ok(config, key)


def unmatched_entries(targets: Sequence[str], keys: Iterable[str]) -> list[str]:
    """Entries of a ``target_modules`` list that name no module in ``keys``."""
    keys = list(keys)
    return [entry for entry in targets if not any(_matches_list([entry], k) for k in keys)]


def linear_layer_types() -> tuple[type, ...]:
    """Linear layer classes that ``"all-linear"`` covers (transformers' Conv1D when importable)."""
    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional
        pass
    else:
        types.append(Conv1D)
    return tuple(types)


def expand_all_linear(model: nn.Module, extra_linear_types: Sequence[type] = ()) -> list[str]:
    """The module-name suffixes that ``"all-linear"`` stands for in ``model``.

    The output layer (``get_output_embeddings()``, else a top-level ``lm_head``) is left out, as
    the reference library does, since adapting it rarely helps and it is often tied.
    """
    linear_types = linear_layer_types() + tuple(extra_linear_types)
    output_layer = None
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            output_layer = getter()
        except (NotImplementedError, AttributeError):
            output_layer = None
    names: set[str] = set()
    output_name: str | None = None
    for name, module in walk(model, _outside_wrappers):
        base = module
        while (inner := base._modules.get("base_layer")) is not None:  # stacked layers (mixed models)
            base = inner
        if module is output_layer and output_name is None:
            output_name = name.rpartition(".")[2]
        if (
            name
            and isinstance(base, linear_types)
            and module is not output_layer
            and base is not output_layer
            and not (output_layer is None and name == "lm_head")
        ):
            names.add(name.rpartition(".")[2])
    if output_layer is not None and output_name is None:  # inside a wrapper the walk skipped
        for name, module in model.named_modules():
            if module is output_layer:
                output_name = name.split(".")[-1]
    if output_name is not None:
        names.discard(output_name)
    return sorted(names)


def _outside_wrappers(module: nn.Module) -> Mapping[str, nn.Module | None]:
    """Children to search for targets: none inside adapter layers and modules_to_save wrappers."""
    children = module._modules
    return {} if "base_layer" in children or "original_module" in children else children


def pattern_key(patterns: Iterable[str], key: str) -> str | None:
    """The first pattern (a regex) that matches the end of ``key`` at a name boundary."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None


def pattern_value(patterns: Mapping[str, T] | None, key: str, default: T) -> T:
    """``patterns[k]`` for the first ``k`` matching ``key`` (see :func:`pattern_key`), else ``default``."""
    if not patterns:
        return default
    found = pattern_key(patterns.keys(), key)
    return default if found is None else patterns[found]
