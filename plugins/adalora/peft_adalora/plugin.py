"""The hooks peft-core calls when it loads peft-adalora (entry point ``adalora`` in group ``peft_core``).

One layer factory per base-layer type, each returning None for modules it does not handle, so
another plugin can add AdaLoRA support for a new layer type (a quantized linear, a custom layer)
with a factory of higher priority, without touching this package.
"""

from __future__ import annotations

import warnings

from peft_core.hookspecs import hookimpl
from peft_core.layer import AdapterLayer
from peft_core.quantization import is_adaptable_linear
from peft_core.registry import Capabilities, LayerContext, MethodSpec, Registry
from torch import nn

from peft_adalora.config import AdaLoraConfig
from peft_adalora.default_targets import DEFAULT_TARGET_MODULES, DEFAULT_TARGET_REGEXES
from peft_adalora.layer import AdaLoraLayer, SVDConv2d, SVDLinear, is_transformers_conv1d
from peft_adalora.model import AdaLoraModel

__all__ = [
    "PEFT_TYPE",
    "conv2d_factory",
    "linear_factory",
    "peft_register_layer_factories",
    "peft_register_methods",
    "transformers_conv1d_factory",
]

PEFT_TYPE = "ADALORA"


def _base_of(target: nn.Module) -> nn.Module:
    """The innermost module: another method's adapter layer is wrapped as a whole (stacking)."""
    return target.get_base_layer() if isinstance(target, AdapterLayer) else target


def linear_factory(
    target: nn.Module, adapter_name: str, config: AdaLoraConfig, context: LayerContext
) -> AdaLoraLayer | None:
    """AdaLoRA for ``nn.Linear`` (with a plain floating-point weight)."""
    base = _base_of(target)
    if not is_adaptable_linear(base):
        return None
    if config.fan_in_fan_out:
        warnings.warn(
            f"fan_in_fan_out=True, but {context.key!r} is an nn.Linear, which stores (out, in); using "
            "fan_in_fan_out=False for it.",
            UserWarning,
            stacklevel=3,
        )
    return SVDLinear(target, adapter_name, config, key=context.key, fan_in_fan_out=False)


def transformers_conv1d_factory(
    target: nn.Module, adapter_name: str, config: AdaLoraConfig, context: LayerContext
) -> AdaLoraLayer | None:
    """AdaLoRA for transformers' ``Conv1D`` (GPT-2 style), whose weight is stored (in, out)."""
    if not is_transformers_conv1d(_base_of(target)):
        return None
    if not config.fan_in_fan_out:
        warnings.warn(
            f"fan_in_fan_out=False, but {context.key!r} is a transformers Conv1D, which stores (in, out); using "
            "fan_in_fan_out=True for it.",
            UserWarning,
            stacklevel=3,
        )
    return SVDLinear(target, adapter_name, config, key=context.key, fan_in_fan_out=True)


def conv2d_factory(
    target: nn.Module, adapter_name: str, config: AdaLoraConfig, context: LayerContext
) -> AdaLoraLayer | None:
    """AdaLoRA for ``nn.Conv2d`` (not grouped)."""
    if not isinstance(_base_of(target), nn.Conv2d):
        return None
    return SVDConv2d(target, adapter_name, config, key=context.key)


@hookimpl
def peft_register_methods(registry: Registry) -> None:
    registry.register_method(
        MethodSpec(
            peft_type=PEFT_TYPE,
            config_cls=AdaLoraConfig,
            model_cls=AdaLoraModel,
            prefix="lora_",
            # Not mixable: its rank allocator and orthogonality loss live in AdaLoraModel's forward and
            # update_and_allocate, which a mixed model does not run.
            capabilities=Capabilities(
                mergeable=True, quantized_bases=True, mixable=False, identity_init=True
            ),
            default_target_modules={**DEFAULT_TARGET_MODULES, **DEFAULT_TARGET_REGEXES},
        )
    )


@hookimpl
def peft_register_layer_factories(registry: Registry) -> None:
    for factory in (linear_factory, transformers_conv1d_factory, conv2d_factory):
        registry.register_layer_factory(PEFT_TYPE, factory, priority=0)
