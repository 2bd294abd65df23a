"""Hot-swapping: replace an adapter's weights in place, so a compiled model keeps its graphs.

Every check runs before the first write: an adapter that does not fit (other targets, shapes
that cannot be padded, options that change the forward) is refused with the model unchanged.

A method opts into the swaps beyond "same config, same shapes" through its layers:

* ``AdapterLayer.hotswap_fixed_fields`` - config fields that must be equal (the rest, e.g. a
  scale, the layer re-derives through ``hotswap_update``); None means every field;
* ``AdapterLayer.hotswap_update(adapter_name, config, key)`` - re-derive the adapter's scale;
* ``AdapterLayer.rank_padded_attributes`` - tensors whose zero-padded rank leaves the output
  unchanged (LoRA's A and B), so a lower-rank adapter fits into them, and a module the new
  adapter does not target can be zeroed;
* ``AdapterLayer.pad_rank(adapter_name, rank)`` - zero-pad the adapter's tensors to ``rank``;
* ``AdapterModel._config_for_live_tensors(config, adapter_name)`` - the config describing the
  tensors as they now are (padded ranks, the same scales), so saving still round-trips.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from peft_core.config import PeftConfig
from peft_core.layer import AdapterLayer
from peft_core.state_dict import _checkpoint_to_model_keys

__all__ = ["hotswap_adapter", "hotswap_adapter_from_state_dict", "prepare_model_for_compiled_hotswap"]

# Fields that say where an adapter came from or how it is used, never how its layers compute.
_BOOKKEEPING = {
    "inference_mode",
    "base_model_name_or_path",
    "revision",
    "peft_version",
    "task_type",
    "auto_mapping",
    "init_lora_weights",
    "init_weights",
    "init_ia3_weights",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "r",
    "lora_alpha",
    "alpha",
    "rank_pattern",
    "alpha_pattern",
}


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | os.PathLike[str],
    adapter_name: str,
    torch_device: str | torch.device | None = None,
    **kwargs: Any,
) -> None:
    """Replace adapter ``adapter_name`` of ``model`` by the adapter stored at ``model_name_or_path``.

    The new adapter may differ in scale (alpha) and, after
    :func:`prepare_model_for_compiled_hotswap`, in rank; it must target the same modules (or
    fewer, for methods whose unused tensors can be zeroed). Nothing changes when it is refused.
    """
    from peft_core.hub import split_hub_kwargs
    from peft_core.peft_model import _read_adapter_weights

    subfolder = kwargs.pop("subfolder", None)
    allow_pickle = kwargs.pop("allow_pickle", False)
    hub_kwargs, _ = split_hub_kwargs(kwargs)
    config = PeftConfig.from_pretrained(model_name_or_path, subfolder=subfolder, **hub_kwargs)
    state_dict = _read_adapter_weights(model_name_or_path, subfolder, allow_pickle, hub_kwargs)
    if torch_device is not None:
        state_dict = {k: v.to(torch_device) for k, v in state_dict.items()}
    hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config)


def _peft_model(model: nn.Module) -> nn.Module:
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if not hasattr(inner, "peft_config") or not hasattr(inner, "base_model"):
        raise TypeError(
            f"Hot-swapping needs a PeftModel (or its torch.compile wrapper), got {type(model).__name__}."
        )
    return inner


def _layer_at(model: nn.Module, model_key: str) -> tuple[str, AdapterLayer, str]:
    """The adapter layer a model key belongs to, its module path, and the key's attribute."""
    parts = model_key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = model.get_submodule(".".join(parts[:i])) if i else model
        if isinstance(module, AdapterLayer):
            return ".".join(parts[:i]), module, parts[i]
    raise KeyError(model_key)


def hotswap_adapter_from_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str, config: PeftConfig
) -> None:
    """Swap in checkpoint tensors (keys as saved, ``base_model.model.`` prefix) as ``adapter_name``."""
    peft_model = _peft_model(model)
    if adapter_name not in peft_model.peft_config:
        raise ValueError(
            f"Cannot hot-swap {adapter_name!r}: no such adapter; available: {list(peft_model.peft_config)}."
        )
    old_config = peft_model.peft_config[adapter_name]
    if config.peft_type != old_config.peft_type:
        raise ValueError(
            f"Cannot hot-swap a {config.peft_type} adapter into {adapter_name!r}, a {old_config.peft_type} adapter."
        )
    layers = [
        m for m in peft_model.modules() if isinstance(m, AdapterLayer) and adapter_name in m.adapter_names
    ]
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise ValueError(
            f"Cannot hot-swap {adapter_name!r} while it is merged into the base weights; call unmerge_adapter() first."
        )
    _check_fixed_fields(layers, old_config, config)

    mapping = _checkpoint_to_model_keys(peft_model, adapter_name)
    unexpected = [k for k in state_dict if k not in mapping]
    if unexpected:
        raise ValueError(
            f"Cannot hot-swap {adapter_name!r}: the new adapter has tensors the current one lacks (it targets other "
            f"modules or has other options), e.g. {unexpected[:3]}. Load it with load_adapter() instead."
        )
    # One entry per live tensor (a bare injected model lists each under two key forms).
    keys_of: dict[int, list[str]] = {}
    entry_of: dict[int, tuple[str, torch.Tensor]] = {}
    for ckpt_key, (model_key, live, _writer) in mapping.items():
        keys_of.setdefault(id(live), []).append(ckpt_key)
        entry_of[id(live)] = (model_key, live)
    plan: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (live tensor, new value; None = zero it)
    swapped: dict[int, tuple[AdapterLayer, str]] = {}
    for ident, (model_key, live) in entry_of.items():
        path, layer, attr = _layer_at(peft_model, model_key)
        swapped[id(layer)] = (layer, path)
        ckpt_key = next((k for k in keys_of[ident] if k in state_dict), None)
        if ckpt_key is None:
            if attr not in layer.rank_padded_attributes:
                raise ValueError(
                    f"Cannot hot-swap {adapter_name!r}: the new adapter lacks {keys_of[ident][-1]!r}, and a missing "
                    f"{type(layer).__name__} tensor cannot be neutralised; its targets must match the current adapter's."
                )
            plan.append((live, None))
            continue
        value = state_dict[ckpt_key]
        if tuple(value.shape) != tuple(live.shape) and not _fits_padded(layer, attr, live, value):
            raise ValueError(
                f"Cannot hot-swap {adapter_name!r}: {ckpt_key!r} has shape {tuple(value.shape)}, the model's "
                f"{model_key!r} has {tuple(live.shape)}. "
                + (
                    "Call prepare_model_for_compiled_hotswap(model, target_rank=...) with the largest rank first."
                    if attr in layer.rank_padded_attributes
                    else "This method swaps only tensors of equal shapes."
                )
            )
        plan.append((live, value))
    with torch.no_grad():
        for live, value in plan:
            if value is None:
                live.zero_()
            elif tuple(value.shape) == tuple(live.shape):
                live.copy_(value.to(device=live.device, dtype=live.dtype))
            else:
                live.zero_()
                live[tuple(slice(0, n) for n in value.shape)].copy_(
                    value.to(device=live.device, dtype=live.dtype)
                )
        for layer, path in swapped.values():
            layer.hotswap_update(adapter_name, config, path.removeprefix("base_model.model."))
    new_config = config.copy(inference_mode=old_config.inference_mode)
    adapter_model = _adapter_model_of(peft_model, adapter_name)
    peft_model.peft_config[adapter_name] = adapter_model._config_for_live_tensors(new_config, adapter_name)


def _check_fixed_fields(layers: list[AdapterLayer], old: PeftConfig, new: PeftConfig) -> None:
    old_fields, new_fields = old.to_dict(), new.to_dict()
    fixed: set[str] = set()
    for layer in layers:
        fields = layer.hotswap_fixed_fields
        fixed |= set(old_fields) - _BOOKKEEPING if fields is None else set(fields)
        if type(layer).hotswap_update is AdapterLayer.hotswap_update:
            # A method that cannot re-derive its scale needs equal hyper-parameters too.
            fixed |= {"r", "lora_alpha", "alpha", "rank_pattern", "alpha_pattern"} & set(old_fields)
    differing = sorted(k for k in fixed if old_fields.get(k) != new_fields.get(k))
    if differing:
        details = ", ".join(f"{k}: {old_fields.get(k)!r} -> {new_fields.get(k)!r}" for k in differing)
        raise ValueError(
            f"Cannot hot-swap: the new adapter changes options that shape the layers' computation ({details}). "
            "Load it as another adapter with load_adapter() instead."
        )


def _fits_padded(layer: AdapterLayer, attr: str, live: torch.Tensor, value: torch.Tensor) -> bool:
    if attr not in layer.rank_padded_attributes or live.dim() != value.dim():
        return False
    if getattr(layer.get_base_layer(), "groups", 1) != 1:
        return False  # a grouped convolution splits the rank across groups; padding at the end breaks that
    smaller = [i for i, (a, b) in enumerate(zip(live.shape, value.shape)) if a != b]
    return len(smaller) == 1 and value.shape[smaller[0]] < live.shape[smaller[0]]


def _adapter_model_of(peft_model: nn.Module, adapter_name: str) -> Any:
    base = peft_model.base_model
    tuners = getattr(base, "tuners", None)  # a mixed model holds one adapter model per method
    if tuners is not None:
        return tuners[peft_model.peft_config[adapter_name].peft_type]
    return base


def prepare_model_for_compiled_hotswap(
    model: nn.Module, *, target_rank: int | None = None, config: Any = None, check_compiled: str = "error"
) -> None:
    """Make later hot-swaps recompile-free: pad every adapter to ``target_rank``, make scales tensors.

    Call it before ``torch.compile``, with ``target_rank`` the largest rank that will be swapped
    in. Padding is exact (zero rows and columns add nothing), and the adapters' configs are
    rewritten to describe the padded tensors with the same scales, so saving still round-trips.
    ``config`` is accepted for the reference library's signature; the model's own configs are
    the ones updated.
    """
    if check_compiled not in {"error", "warn", "ignore"}:
        raise ValueError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}.")
    if hasattr(model, "_orig_mod"):
        message = (
            "prepare_model_for_compiled_hotswap must run before torch.compile: the model is already compiled."
        )
        if check_compiled == "error":
            raise ValueError(message)
        if check_compiled == "warn":
            import warnings

            warnings.warn(message, UserWarning, stacklevel=2)
    peft_model = _peft_model(model)
    layers = [m for m in peft_model.modules() if isinstance(m, AdapterLayer)]
    if not layers:
        raise ValueError("The model has no adapter layers to prepare.")
    for adapter_name in list(peft_model.peft_config):
        holding = [layer for layer in layers if adapter_name in layer.adapter_names]
        if target_rank is not None:
            for layer in holding:
                if layer.rank_padded_attributes:  # methods without a rank (IA3) have nothing to pad
                    layer.pad_rank(adapter_name, target_rank)
            adapter_model = _adapter_model_of(peft_model, adapter_name)
            peft_model.peft_config[adapter_name] = adapter_model._config_for_live_tensors(
                peft_model.peft_config[adapter_name], adapter_name
            )
        for layer in holding:
            scaling = layer.adapter_scaling
            if (
                scaling is not None
                and adapter_name in scaling
                and not isinstance(scaling[adapter_name], torch.Tensor)
            ):
                device = next((p.device for p in layer.parameters()), torch.device("cpu"))
                scaling[adapter_name] = torch.tensor(float(scaling[adapter_name]), device=device)
