"""What an adapter directory holds, read from its files alone (no model, no plugin needed)."""

from __future__ import annotations

import json
import os
from typing import Any

from peft_core.hub import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, resolve_file

__all__ = ["inspect_adapter"]

MANIFEST_NAME = "peft_mixed_model.json"


def _tensor_shapes(path: str) -> dict[str, list[int]]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}  # header only, no data read
    return {}  # a pickle is not opened just to be inspected


def _ranks(shapes: dict[str, list[int]]) -> dict[str, int]:
    """Per-module rank of low-rank factor pairs (``*_A``/``lora_A``-style tensors), where recognisable."""
    ranks = {}
    for key, shape in shapes.items():
        for marker in (".lora_A.", ".lora_embedding_A"):
            if marker in key and shape:
                ranks[key.split(marker)[0].removeprefix("base_model.model.")] = shape[0]
    return ranks


def _one(path_or_id: str, subfolder: str | None, hub_kwargs: dict[str, Any]) -> dict[str, Any]:
    from peft_core.plugins import get_registry
    from peft_core.registry import plugin_hint

    config_path = resolve_file(path_or_id, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    weights = resolve_file(
        path_or_id, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, missing_ok=True, **hub_kwargs
    )
    weights = weights or resolve_file(
        path_or_id, WEIGHTS_NAME, subfolder=subfolder, missing_ok=True, **hub_kwargs
    )
    shapes = _tensor_shapes(weights) if weights else {}
    peft_type = str(config.get("peft_type") or "")
    registry = get_registry()
    installed = bool(peft_type) and registry.has_method(peft_type)
    ranks = _ranks(shapes)
    return {
        "subfolder": subfolder,
        "method": peft_type,
        "plugin": registry.method(peft_type).plugin if installed else plugin_hint(peft_type),
        "plugin_installed": installed,
        "task_type": config.get("task_type"),
        "base_model": config.get("base_model_name_or_path"),
        "target_modules": config.get("target_modules"),
        "r": config.get("r"),
        "ranks": ranks or None,
        "modules_to_save": config.get("modules_to_save"),
        "tensors": len(shapes),
        "parameters": sum(_numel(s) for s in shapes.values()),
        "weights_file": os.path.basename(weights) if weights else None,
        "file_size_bytes": os.path.getsize(weights) if weights else None,
    }


def _numel(shape: list[int]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def inspect_adapter(path_or_id: str | os.PathLike[str], **hub_kwargs: Any) -> dict[str, Any]:
    """Describe the adapter(s) at ``path_or_id``: one per folder holding an ``adapter_config.json``.

    A directory saved with several adapters (non-default ones in subfolders) or a mixed model
    (with its manifest) lists each adapter.
    """
    path_or_id = os.fspath(path_or_id)
    adapters = []
    manifest = None
    if os.path.isdir(path_or_id):
        manifest_path = os.path.join(path_or_id, MANIFEST_NAME)
        if os.path.isfile(manifest_path):
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
        folders = [None] if os.path.isfile(os.path.join(path_or_id, CONFIG_NAME)) else []
        folders += sorted(
            d for d in os.listdir(path_or_id) if os.path.isfile(os.path.join(path_or_id, d, CONFIG_NAME))
        )
        if not folders:
            raise FileNotFoundError(
                f"No {CONFIG_NAME} in {path_or_id!r} or its subfolders; is it an adapter directory?"
            )
        adapters = [_one(path_or_id, folder, hub_kwargs) for folder in folders]
    else:
        adapters = [_one(path_or_id, hub_kwargs.pop("subfolder", None), hub_kwargs)]
    return {
        "path": path_or_id,
        "mixed_model": manifest is not None,
        "stacking_order": manifest.get("stacking_order") if manifest else None,
        "adapters": adapters,
    }
