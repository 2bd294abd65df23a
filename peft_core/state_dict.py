"""Adapter state dicts: model keys <-> checkpoint keys, built structurally from the layers.

Checkpoint keys are model keys without the adapter name (``q.lora_A.default.weight`` ->
``q.lora_A.weight``) and with each ``modules_to_save`` copy stored under the wrapped module's own
name (``classifier.modules_to_save.default.weight`` -> ``classifier.weight``), exactly as the
reference library writes them. Both directions come from one enumeration of the model's adapter
tensors (layers, ``modules_to_save`` copies, and model-level tensors of the adapter models), so
saving and loading cannot drift apart.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import nn

from peft_core.errors import CheckpointShapeError
from peft_core.layer import AdapterLayer
from peft_core.modules_to_save import ModulesToSaveWrapper
from peft_core.tuner import AdapterModel
from peft_core.walk import through_base_layer, walk

__all__ = ["LoadResult", "get_peft_model_state_dict", "set_peft_model_state_dict"]

PEFT_PREFIX = "base_model.model."


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def _configs(model: nn.Module) -> dict[str, Any]:
    configs = getattr(model, "peft_config", None)
    if configs is None:
        base = getattr(model, "base_model", None)
        configs = getattr(base, "peft_config", None)
    return configs or {}


Writer = Callable[[torch.Tensor], None]


def _copy_into(tensor: torch.Tensor) -> Writer:
    return lambda value: tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))


def _adapter_entries(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, str, torch.Tensor, Writer]]:
    """``(model_key, checkpoint_key, tensor, writer)`` for every tensor that belongs to ``adapter_name``.

    ``tensor`` is what is saved; ``writer(value)`` loads a checkpoint value in its place.
    """
    # An adapter model that names its own checkpoint keys (prompt learning: ``prompt_embeddings``)
    # owns the whole enumeration; it is the model itself or a PeftModel's ``base_model``.
    for path, owner in (("", model), ("base_model.", model._modules.get("base_model"))):
        entries = getattr(type(owner), "adapter_state_entries", None)
        if entries is not None:
            for model_key, ckpt_key, tensor, writer in entries(owner, adapter_name):
                yield path + model_key, ckpt_key, tensor, writer
            return
    for path, module in _named_modules_outside_factors(model):
        prefix = f"{path}." if path else ""
        if isinstance(module, AdapterLayer):
            # A layer stacked under another method's (mixed models) saves under the module's own
            # name, as it would alone: ``q.base_layer.hada_w1_a`` -> ``q.hada_w1_a``.
            ckpt_path = ".".join(p for p in path.split(".") if p != "base_layer")
            ckpt_prefix = f"{ckpt_path}." if ckpt_path else ""
            for model_suffix, ckpt_suffix, tensor in module.adapter_state_items(adapter_name):
                writer = functools.partial(module.load_adapter_tensor, model_suffix, tensor)
                yield prefix + model_suffix, ckpt_prefix + ckpt_suffix, tensor, writer
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            copy = module.modules_to_save[adapter_name]
            for rest, tensor in copy.state_dict(keep_vars=True).items():
                yield (
                    f"{prefix}modules_to_save.{adapter_name}.{rest}",
                    prefix + rest,
                    tensor,
                    _copy_into(tensor),
                )
        elif isinstance(module, AdapterModel):
            for model_suffix, ckpt_suffix, tensor in module.adapter_state_items(adapter_name):
                yield prefix + model_suffix, prefix + ckpt_suffix, tensor, _copy_into(tensor)


def _named_modules_outside_factors(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()``, entering adapter layers only through ``base_layer``.

    The rest of a layer's modules are its factors, most of an adapted model's modules, and
    what they hold is enumerated by the layer's own ``adapter_state_items``.
    """
    return walk(model, lambda m: through_base_layer(m) if isinstance(m, AdapterLayer) else m._modules)


def _bias_entries(model: nn.Module, config: Any) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``(model_key, checkpoint_key, tensor)`` of the biases the config's ``bias`` option trains (and so saves)."""
    bias = getattr(config, "bias", "none")
    if bias in (None, "none"):
        return
    inside_adapters = {
        id(sub)
        for layer in model.modules()
        if isinstance(layer, AdapterLayer)
        for attr in layer.adapter_layer_names
        if isinstance(getattr(layer, attr, None), nn.Module)
        for sub in getattr(layer, attr).modules()
    }
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if bias == "all":
            parts = path.split(".")
            # modules_to_save copies are saved as such.
            if id(module) in inside_adapters or "modules_to_save" in parts:
                continue
            tensor = module._parameters.get("bias")
            if isinstance(tensor, torch.Tensor):
                # A module that another adapter's modules_to_save wrapped later keeps its plain key.
                plain = ".".join(p for p in parts if p != "original_module")
                yield f"{prefix}bias", f"{plain}.bias" if plain else "bias", tensor
        elif isinstance(module, AdapterLayer):
            base = module.get_base_layer()
            tensor = getattr(base, "bias", None)
            if isinstance(tensor, torch.Tensor):
                key = f"{prefix}{_inner_path(module)}bias"
                yield key, key, tensor


def _inner_path(layer: AdapterLayer) -> str:
    path = ""
    module: nn.Module = layer
    while hasattr(module, "base_layer"):
        path += "base_layer."
        module = module.base_layer
    return path


def get_peft_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_name`` under checkpoint keys (adapter name removed).

    ``model`` is a :class:`~peft_core.PeftModel` (keys start with ``base_model.model.``) or a
    model with adapters injected by :func:`~peft_core.inject_adapter_in_model` (no prefix). When
    ``state_dict`` is given (e.g. a gathered FSDP state dict), values are taken from it by model key.
    """
    config = _configs(model).get(adapter_name)
    result: dict[str, torch.Tensor] = {}
    for model_key, ckpt_key, tensor, _ in _adapter_entries(model, adapter_name):
        result[ckpt_key] = (
            state_dict[model_key] if state_dict is not None and model_key in state_dict else tensor
        )
    if config is not None:
        for model_key, ckpt_key, tensor in _bias_entries(model, config):
            if (
                ckpt_key in result
            ):  # the adapter's own modules_to_save copy of that module, not the idle original
                continue
            result[ckpt_key] = (
                state_dict[model_key] if state_dict is not None and model_key in state_dict else tensor
            )
    return {k: v.detach() for k, v in result.items()}


def _checkpoint_to_model_keys(
    model: nn.Module, adapter_name: str
) -> dict[str, tuple[str, torch.Tensor, Writer]]:
    mapping: dict[str, tuple[str, torch.Tensor, Writer]] = {}
    config = _configs(model).get(adapter_name)
    entries = list(_adapter_entries(model, adapter_name))
    if config is not None:
        entries += [(m, c, t, _copy_into(t)) for m, c, t in _bias_entries(model, config)]
    for model_key, ckpt_key, tensor, writer in entries:
        # First come, first kept: an adapter's own tensors win over a bias entry with the same key.
        mapping.setdefault(ckpt_key, (model_key, tensor, writer))
        # A checkpoint always carries the PeftModel prefix; a bare injected model does not.
        if not ckpt_key.startswith(PEFT_PREFIX):
            mapping.setdefault(PEFT_PREFIX + ckpt_key, (model_key, tensor, writer))
    return mapping


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
) -> LoadResult:
    """Copy checkpoint tensors into ``adapter_name``'s parameters.

    Every shape is checked before anything is written, so a mismatch raises
    :class:`~peft_core.errors.CheckpointShapeError` (naming the key and both shapes) and leaves
    the model as it was. With ``ignore_mismatched_sizes`` mismatched keys are skipped instead.
    """
    mapping = _checkpoint_to_model_keys(model, adapter_name)
    plan: list[tuple[Writer, torch.Tensor]] = []
    unexpected: list[str] = []
    loaded_model_keys: set[str] = set()
    for key, value in peft_model_state_dict.items():
        target = mapping.get(key)
        if target is None:
            unexpected.append(key)
            continue
        model_key, tensor, writer = target
        if tuple(tensor.shape) != tuple(value.shape):
            if ignore_mismatched_sizes:
                unexpected.append(key)
                continue
            raise CheckpointShapeError(
                f"Checkpoint tensor {key!r} has shape {tuple(value.shape)}, but the model parameter {model_key!r} "
                f"has shape {tuple(tensor.shape)}. The adapter was trained with different settings (rank, "
                "target modules or base model) than the config describes; check adapter_config.json."
            )
        plan.append((writer, value))
        loaded_model_keys.add(model_key)
    with torch.no_grad():
        for writer, value in plan:
            writer(value)
    missing = sorted({model_key for model_key, _, _ in mapping.values()} - loaded_model_keys)
    return LoadResult(missing_keys=missing, unexpected_keys=unexpected)
