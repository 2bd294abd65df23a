"""The hooks peft-core calls when it loads peft-loha (entry point ``loha`` in group ``peft_core``).

One layer factory per base-layer type, each returning None for modules it does not handle, so
another plugin can add LoHa for a new layer type with a factory of higher priority.
"""

from __future__ import annotations

from peft_core.default_targets import LORA_STYLE_DEFAULT_TARGETS
from peft_core.delta_layer import CONV1D, CONV2D, LINEAR, layer_kind
from peft_core.hookspecs import hookimpl
from peft_core.layer import AdapterLayer
from peft_core.registry import Capabilities, LayerContext, LayerFactory, MethodSpec, Registry
from torch import nn

from peft_loha.config import LoHaConfig
from peft_loha.layer import LAYER_TYPES, LoHaLayer
from peft_loha.model import LoHaModel

__all__ = [
    "PEFT_TYPE",
    "conv1d_factory",
    "conv2d_factory",
    "linear_factory",
    "peft_register_layer_factories",
    "peft_register_methods",
]

PEFT_TYPE = "LOHA"


def _factory(kind: str, base_name: str) -> LayerFactory:
    layer_type = LAYER_TYPES[kind]

    def factory(
        target: nn.Module, adapter_name: str, config: LoHaConfig, context: LayerContext
    ) -> LoHaLayer | None:
        # Another method's adapter layer is wrapped as a whole (stacking); its base decides.
        base = target.get_base_layer() if isinstance(target, AdapterLayer) else target
        if layer_kind(base) != kind:
            return None
        return layer_type(target, adapter_name, config, key=context.key)

    factory.__name__ = f"{kind}_factory"
    factory.__qualname__ = factory.__name__
    factory.__doc__ = f"LoHa for ``{base_name}`` (with a floating-point weight)."
    return factory


linear_factory = _factory(LINEAR, "nn.Linear")
conv1d_factory = _factory(CONV1D, "nn.Conv1d")
conv2d_factory = _factory(CONV2D, "nn.Conv2d")


@hookimpl
def peft_register_methods(registry: Registry) -> None:
    registry.register_method(
        MethodSpec(
            peft_type=PEFT_TYPE,
            config_cls=LoHaConfig,
            model_cls=LoHaModel,
            prefix="hada_",
            capabilities=Capabilities(mergeable=True, quantized_bases=True, mixable=True, identity_init=True),
            default_target_modules=LORA_STYLE_DEFAULT_TARGETS,
        )
    )


@hookimpl
def peft_register_layer_factories(registry: Registry) -> None:
    for factory in (linear_factory, conv1d_factory, conv2d_factory):
        registry.register_layer_factory(PEFT_TYPE, factory, priority=0)
