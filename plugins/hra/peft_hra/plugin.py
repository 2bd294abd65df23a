"""The hooks peft-core calls when it loads peft-hra (entry point ``hra`` in group ``peft_core``).

One layer factory per base-layer type, each returning None for modules it does not handle, so
another plugin can add HRA support for a new layer type with a factory of higher priority,
without touching this package.
"""

from __future__ import annotations

from peft_core.default_targets import LORA_STYLE_DEFAULT_TARGETS
from peft_core.hookspecs import hookimpl
from peft_core.quantization import is_plain_float
from peft_core.registry import Capabilities, LayerContext, MethodSpec, Registry
from torch import nn

from peft_hra.config import HRAConfig
from peft_hra.layer import Conv2d, HRALayer, Linear
from peft_hra.model import HRAModel

__all__ = [
    "PEFT_TYPE",
    "conv2d_factory",
    "linear_factory",
    "peft_register_layer_factories",
    "peft_register_methods",
]

PEFT_TYPE = "HRA"


def linear_factory(
    target: nn.Module, adapter_name: str, config: HRAConfig, context: LayerContext
) -> HRALayer | None:
    """HRA for ``nn.Linear`` (with a plain floating-point weight)."""
    if not isinstance(target, nn.Linear) or not is_plain_float(target):
        return None
    return Linear(target, adapter_name, config, key=context.key)


def conv2d_factory(
    target: nn.Module, adapter_name: str, config: HRAConfig, context: LayerContext
) -> HRALayer | None:
    """HRA for ``nn.Conv2d`` (any kernel, stride, padding, dilation and groups)."""
    if not isinstance(target, nn.Conv2d) or not is_plain_float(target):
        return None
    return Conv2d(target, adapter_name, config, key=context.key)


@hookimpl
def peft_register_methods(registry: Registry) -> None:
    registry.register_method(
        MethodSpec(
            peft_type=PEFT_TYPE,
            config_cls=HRAConfig,
            model_cls=HRAModel,
            prefix="hra_",
            capabilities=Capabilities(mergeable=True, mixable=False, identity_init=True),
            default_target_modules=LORA_STYLE_DEFAULT_TARGETS,
        )
    )


@hookimpl
def peft_register_layer_factories(registry: Registry) -> None:
    for factory in (linear_factory, conv2d_factory):
        registry.register_layer_factory(PEFT_TYPE, factory, priority=0)
