"""TOY's hooks: peft-core loads this module through the ``peft_core`` entry point ``toy``."""

from __future__ import annotations

from torch import nn

from peft_core.hookspecs import hookimpl
from peft_core.quantization import backend_for
from peft_core.registry import Capabilities, LayerContext, MethodSpec, Registry
from peft_core.tuner import AdapterModel
from peft_toy.config import ToyConfig
from peft_toy.layer import ToyLayer


@hookimpl
def peft_register_methods(registry: Registry) -> None:
    registry.register_method(
        MethodSpec(
            peft_type="TOY",
            config_cls=ToyConfig,
            model_cls=AdapterModel,
            prefix="toy_",
            capabilities=Capabilities(mergeable=True, identity_init=True, quantized_bases=True),
        )
    )


def linear_factory(
    target: nn.Module, adapter_name: str, config: ToyConfig, context: LayerContext
) -> ToyLayer | None:
    # plain linears, and quantized ones that a registered backend handles
    if type(target) is not nn.Linear and backend_for(target) is None:
        return None
    layer = ToyLayer(target)
    layer.update_layer(adapter_name, config, key=context.key)
    return layer


@hookimpl
def peft_register_layer_factories(registry: Registry) -> None:
    registry.register_layer_factory("TOY", linear_factory)
