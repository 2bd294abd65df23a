"""The hooks peft-core calls when it loads peft-lora (entry point ``lora`` in group ``peft_core``).

One layer factory per base-layer type, each returning None for modules it does not handle, so
another plugin can add LoRA support for a new layer type (a quantized linear, a custom layer)
with a factory of higher priority, without touching this package.
"""

from __future__ import annotations

import warnings

from peft_core.default_targets import LORA_STYLE_DEFAULT_TARGETS
from peft_core.hookspecs import hookimpl
from peft_core.layer import AdapterLayer
from peft_core.quantization import is_adaptable_linear
from peft_core.registry import Capabilities, LayerContext, MethodSpec, Registry
from torch import nn

from peft_lora.config import LoraConfig
from peft_lora.layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer, is_transformers_conv1d
from peft_lora.model import LoraModel

__all__ = [
    "PEFT_TYPE",
    "conv1d_factory",
    "conv2d_factory",
    "conv3d_factory",
    "embedding_factory",
    "linear_factory",
    "peft_register_layer_factories",
    "peft_register_methods",
    "transformers_conv1d_factory",
]

PEFT_TYPE = "LORA"


def _base_of(target: nn.Module) -> nn.Module:
    """The innermost module: another method's adapter layer is wrapped as a whole (stacking)."""
    return target.get_base_layer() if isinstance(target, AdapterLayer) else target


def linear_factory(
    target: nn.Module, adapter_name: str, config: LoraConfig, context: LayerContext
) -> LoraLayer | None:
    """LoRA for ``nn.Linear`` (with a plain floating-point weight)."""
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
    target: nn.Module, adapter_name: str, config: LoraConfig, context: LayerContext
) -> LoraLayer | None:
    """LoRA for transformers' ``Conv1D`` (GPT-2 style), whose weight is stored (in, out)."""
    base = _base_of(target)
    if not is_transformers_conv1d(base):
        return None
    if not config.fan_in_fan_out:
        warnings.warn(
            f"fan_in_fan_out=False, but {context.key!r} is a transformers Conv1D, which stores (in, out); using "
            "fan_in_fan_out=True for it.",
            UserWarning,
            stacklevel=3,
        )
    return Linear(target, adapter_name, config, key=context.key, fan_in_fan_out=True)


def embedding_factory(
    target: nn.Module, adapter_name: str, config: LoraConfig, context: LayerContext
) -> LoraLayer | None:
    """LoRA for ``nn.Embedding``."""
    if not isinstance(_base_of(target), nn.Embedding):
        return None
    return Embedding(target, adapter_name, config, key=context.key)


def _conv_factory(conv_type: type[nn.Module], layer_type: type[LoraLayer]):
    def factory(
        target: nn.Module, adapter_name: str, config: LoraConfig, context: LayerContext
    ) -> LoraLayer | None:
        if not isinstance(_base_of(target), conv_type):
            return None
        return layer_type(target, adapter_name, config, key=context.key)

    factory.__name__ = f"{conv_type.__name__.lower()}_factory"
    factory.__doc__ = f"LoRA for ``nn.{conv_type.__name__}``."
    return factory


conv1d_factory = _conv_factory(nn.Conv1d, Conv1d)
conv2d_factory = _conv_factory(nn.Conv2d, Conv2d)
conv3d_factory = _conv_factory(nn.Conv3d, Conv3d)


@hookimpl
def peft_register_methods(registry: Registry) -> None:
    registry.register_method(
        MethodSpec(
            peft_type=PEFT_TYPE,
            config_cls=LoraConfig,
            model_cls=LoraModel,
            prefix="lora_",
            capabilities=Capabilities(
                mergeable=True,
                quantized_bases=True,
                mixable=True,
                identity_init=True,
                weighted_combination=True,
                mixed_batch=True,
            ),
            default_target_modules=LORA_STYLE_DEFAULT_TARGETS,
        )
    )


@hookimpl
def peft_register_layer_factories(registry: Registry) -> None:
    for factory in (
        linear_factory,
        embedding_factory,
        conv1d_factory,
        conv2d_factory,
        conv3d_factory,
        transformers_conv1d_factory,
    ):
        registry.register_layer_factory(PEFT_TYPE, factory, priority=0)
