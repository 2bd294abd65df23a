"""``prepare_model_for_kbit_training``: make a quantized (or half-precision) base ready for adapter training."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

__all__ = ["prepare_model_for_kbit_training"]

# Backends whose packed weights must keep their dtype (upcasting would corrupt or unpack them).
_KEEP_DTYPE_METHODS = {"gptq", "aqlm", "eetq", "torchao", "hqq"}


def _quantization_method(model: nn.Module) -> str | None:
    if getattr(model, "hqq_quantized", False):
        return "hqq"
    method = getattr(model, "quantization_method", None)
    return str(getattr(method, "value", method)).lower() if method is not None else None


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Freeze the base, upcast its fp16/bf16 parameters to float32, and set up gradient checkpointing.

    Upcasting (norms, embeddings, the output head: everything not packed) keeps training stable;
    4-bit packed weights and backends that store integers keep their dtype. For quantized models,
    checkpointing is enabled with ``gradient_checkpointing_kwargs`` (e.g. ``{"use_reentrant":
    False}``); with the reentrant variant the inputs are made to require grad, since the frozen
    embedding would otherwise cut the adapters off the graph. Call it before ``get_peft_model``.
    """
    method = _quantization_method(model)
    quantized = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))
    quantized = quantized or method in _KEEP_DTYPE_METHODS
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad_(False)
    if method not in _KEEP_DTYPE_METHODS:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if quantized and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(
                    lambda _m, _i, out: out.requires_grad_(True)
                )
        # transformers 5 renamed the method (the old name warns); older versions lack the kwargs.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        elif (
            "gradient_checkpointing_kwargs"
            in inspect.signature(model.gradient_checkpointing_enable).parameters
        ):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable()
    return model
