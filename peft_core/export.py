"""Whole-directory operations behind ``peft-core merge`` and ``peft-core convert``."""

from __future__ import annotations

import os
import shutil
from typing import Any

from peft_core.config import PeftConfig
from peft_core.hub import SAFETENSORS_WEIGHTS_NAME
from peft_core.io import atomic_directory, save_weights
from peft_core.plugins import get_registry

__all__ = ["convert_mutated_init_adapter", "merge_adapter_into_base"]

_TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def merge_adapter_into_base(
    base: str | None, adapter: str, out: str, *, progressbar: bool = False, **load_kwargs: Any
) -> dict[str, Any]:
    """Load ``base`` (default: the one the adapter names) with ``adapter``, merge, save a plain model to ``out``.

    The result is an ordinary transformers model directory (plus the adapter's tokenizer, if it
    has one); the write is atomic.
    """
    from peft_core.auto import AutoPeftModel
    from peft_core.peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    config = PeftConfig.from_pretrained(adapter)
    if base is not None:
        config = config.copy(base_model_name_or_path=base)
    auto = _auto_class_for(config, MODEL_TYPE_TO_PEFT_MODEL_MAPPING) or AutoPeftModel
    model = auto.from_pretrained(adapter, config=config, **load_kwargs)
    merged = model.merge_and_unload(progressbar=progressbar)
    with atomic_directory(out) as staging:
        merged.save_pretrained(staging)
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return {
        "base": config.base_model_name_or_path,
        "adapter": adapter,
        "method": config.peft_type,
        "out": out,
        "model_class": type(merged).__name__,
        "parameters": sum(p.numel() for p in merged.parameters()),
    }


def _auto_class_for(config: PeftConfig, mapping: dict[str, Any]) -> Any:
    import peft_core.auto as auto

    if config.task_type is None:
        return None
    peft_cls = mapping.get(str(config.task_type))
    for name in auto.__all__:
        candidate = getattr(auto, name)
        if (
            isinstance(candidate, type)
            and getattr(candidate, "_peft_class", None) is peft_cls
            and name != "AutoPeftModel"
        ):
            return candidate
    return None


def convert_mutated_init_adapter(initial: str, trained: str, out: str) -> dict[str, Any]:
    """Turn an adapter trained from a base-mutating init (PiSSA, OLoRA, CorDA) into a plain one.

    ``initial`` is the adapter as saved right after its init, ``trained`` after training; the
    adapter written to ``out`` gives the trained model on the original, unmodified base.
    """
    from peft_core.peft_model import _read_adapter_weights

    config = PeftConfig.from_pretrained(trained)
    initial_config = PeftConfig.from_pretrained(initial)
    if initial_config.peft_type != config.peft_type:
        raise ValueError(
            f"The initial adapter is {initial_config.peft_type}, the trained one {config.peft_type}; pass the same "
            "adapter before and after training."
        )
    method = get_registry().method(config.peft_type or "").model_cls
    converted, tensors = method.plain_adapter_from_mutated_init(
        config,
        _read_adapter_weights(initial, None, False, {}),
        _read_adapter_weights(trained, None, False, {}),
    )
    with atomic_directory(out) as staging:
        save_weights(tensors, os.path.join(staging, SAFETENSORS_WEIGHTS_NAME), safe_serialization=True)
        converted.copy(inference_mode=True).save_pretrained(staging)
        for name in _TOKENIZER_FILES:
            if os.path.isfile(os.path.join(trained, name)):
                shutil.copy2(os.path.join(trained, name), os.path.join(staging, name))
    return {
        "method": config.peft_type,
        "r": getattr(converted, "r", None),
        "tensors": len(tensors),
        "out": out,
    }
