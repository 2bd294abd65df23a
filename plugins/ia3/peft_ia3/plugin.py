"""The hooks peft-core calls when it loads peft-ia3 (entry point ``ia3`` in group ``peft_core``).

One layer factory per base-layer type, each returning None for modules it does not handle, so
another plugin can add (IA)³ support for a new layer type (a quantized linear, a custom layer)
with a factory of higher priority, without touching this package.
"""

from __future__ import annotations

import warnings

from peft_core.hookspecs import hookimpl
from peft_core.layer import AdapterLayer
from peft_core.quantization import is_adaptable_linear
from peft_core.registry import Capabilities, LayerContext, MethodSpec, Registry
from torch import nn

from peft_ia3.config import IA3Config
from peft_ia3.default_targets import DEFAULT_TARGET_MODULES
from peft_ia3.layer import Conv2d, Conv3d, IA3Layer, Linear, is_transformers_conv1d
from peft_ia3.model import IA3Model

__all__ = [
    "PEFT_TYPE",
    "conv2d_factory",
    "conv3d_factory",
    "linear_factory",
    "peft_register_layer_factories",
    "peft_register_methods",
    "transformers_conv1d_factory",
]

PEFT_TYPE = "IA3"


def _base_of(target: nn.Module) -> nn.Module:
    """The innermost module: another method's adapter layer is wrapped as a whole (stacking)."""
    return target.get_base_layer() if isinstance(target, AdapterLayer) else target


def linear_factory(
    target: nn.Module, adapter_name: str, config: IA3Config, context: LayerContext
) -> IA3Layer | None:
    """(IA)³ for ``nn.Linear`` (with a plain floating-point weight)."""
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
    return Linear(target, adapter_name, config, key=context.key, fan_in_fan_out=False)


def transformers_conv1d_factory(
    target: nn.Module, adapter_name: str, config: IA3Config, context: LayerContext
) -> IA3Layer | None:
    """(IA)³ for transformers' ``Conv1D`` (GPT-2 style), whose weight is stored (in, out)."""
    if not is_transformers_conv1d(_base_of(target)):
        return None
    if not config.fan_in_fan_out:
        warnings.warn(
            f"fan_in_fan_out=False, but {context.key!r} is a transformers Conv1D, which stores (in, out); using "
            "fan_in_fan_out=True for it.",
            UserWarning,
            stacklevel=3,
        )
    return Linear(target, adapter_name, config, key=context.key, fan_in_fan_out=True)


def conv2d_factory(
    target: nn.Module, adapter_name: str, config: IA3Config, context: LayerContext
) -> IA3Layer | None:
    """(IA)³ for ``nn.Conv2d``."""
    if not isinstance(_base_of(target), nn.Conv2d):
        return None
    return Conv2d(target, adapter_name, config, key=context.key)


def conv3d_factory(
    target: nn.Module, adapter_name: str, config: IA3Config, context: LayerContext
) -> IA3Layer | None:
    """(IA)³ for ``nn.Conv3d``."""
    if not isinstance(_base_of(target), nn.Conv3d):
        return None
    return Conv3d(target, adapter_name, config, key=context.key)


@hookimpl
def peft_register_methods(registry: Registry) -> None:
    registry.register_method(
        MethodSpec(
            peft_type=PEFT_TYPE,
            config_cls=IA3Config,
            model_cls=IA3Model,
            prefix="ia3_",
            capabilities=Capabilities(
                mergeable=True,
                quantized_bases=True,
                mixable=True,
                identity_init=True,
                weighted_combination=True,
            ),
            default_target_modules=DEFAULT_TARGET_MODULES,
        )
    )


@hookimpl
def peft_register_layer_factories(registry: Registry) -> None:
    for factory in (linear_factory, transformers_conv1d_factory, conv2d_factory, conv3d_factory):
        registry.register_layer_factory(PEFT_TYPE, factory, priority=0)
