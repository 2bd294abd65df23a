"""The hooks peft-core calls when it loads peft-hra (entry point ``hra`` in group ``peft_core``).

One layer factory per base-layer type, each returning None for modules it does not handle, so
another plugin can add HRA support for a new layer type with a factory of higher priority,
without touching this package.
"""

from __future__ import annotations

from peft_core.default_targets import LORA_STYLE_DEFAULT_TARGETS
from peft_core.hookspecs import hookimpl
from peft_core.layer import AdapterLayer
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


def _plain_float_weight(module: nn.Module) -> bool:
    """Whether ``module`` is itself a base layer with an ordinary floating-point weight.

    Another method's adapter layer is not wrapped (HRA is not mixable: a rotation of the whole
    weight does not commute with other methods' merges). Quantized layers (bitsandbytes, ...)
    subclass ``nn.Linear`` but keep packed integer weights; their support belongs to a quantization
    backend's factory registered at a higher priority.
    """
    if isinstance(module, AdapterLayer):
        return False
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or not weight.dtype.is_floating_point:
        return False
    return not type(module).__module__.startswith("bitsandbytes")


def linear_factory(
    target: nn.Module, adapter_name: str, config: HRAConfig, context: LayerContext
) -> HRALayer | None:
    """HRA for ``nn.Linear`` (with a plain floating-point weight)."""
    if not isinstance(target, nn.Linear) or not _plain_float_weight(target):
        return None
    return Linear(target, adapter_name, config, key=context.key)


def conv2d_factory(
    target: nn.Module, adapter_name: str, config: HRAConfig, context: LayerContext
) -> HRALayer | None:
    """HRA for ``nn.Conv2d`` (any kernel, stride, padding, dilation and groups)."""
    if not isinstance(target, nn.Conv2d) or not _plain_float_weight(target):
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
