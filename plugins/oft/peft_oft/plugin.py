"""The hooks peft-core calls when it loads peft-oft (entry point ``oft`` in group ``peft_core``).

One layer factory per base-layer type, each returning None for modules it does not handle, so
another plugin can add OFT support for a new layer type (a quantized linear, a custom layer) with
a factory of higher priority, without touching this package.
"""

from __future__ import annotations

import warnings

from peft_core.default_targets import LORA_STYLE_DEFAULT_TARGETS
from peft_core.hookspecs import hookimpl
from peft_core.layer import AdapterLayer
from peft_core.quantization import is_plain_float
from peft_core.registry import Capabilities, LayerContext, MethodSpec, Registry
from torch import nn

from peft_oft.config import OFTConfig
from peft_oft.layer import Conv2d, Embedding, Linear, OFTLayer
from peft_oft.model import OFTModel

__all__ = [
    "PEFT_TYPE",
    "conv2d_factory",
    "embedding_factory",
    "linear_factory",
    "peft_register_layer_factories",
    "peft_register_methods",
]

PEFT_TYPE = "OFT"


def _base_of(target: nn.Module) -> nn.Module:
    """The innermost module: another method's adapter layer is wrapped as a whole (stacking)."""
    return target.get_base_layer() if isinstance(target, AdapterLayer) else target


def _warn_fan_in_fan_out(config: OFTConfig, context: LayerContext, kind: str) -> None:
    if config.fan_in_fan_out:
        warnings.warn(
            f"fan_in_fan_out=True, but {context.key!r} is an {kind}, which stores its weight (out, in); using "
            "fan_in_fan_out=False for it.",
            UserWarning,
            stacklevel=4,
        )


def linear_factory(
    target: nn.Module, adapter_name: str, config: OFTConfig, context: LayerContext
) -> OFTLayer | None:
    """OFT for ``nn.Linear`` (with a plain floating-point weight)."""
    base = _base_of(target)
    if not isinstance(base, nn.Linear) or not is_plain_float(base):
        return None
    _warn_fan_in_fan_out(config, context, "nn.Linear")
    return Linear(target, adapter_name, config, key=context.key)


def conv2d_factory(
    target: nn.Module, adapter_name: str, config: OFTConfig, context: LayerContext
) -> OFTLayer | None:
    """OFT for ``nn.Conv2d`` (ungrouped)."""
    base = _base_of(target)
    if not isinstance(base, nn.Conv2d) or not is_plain_float(base):
        return None
    _warn_fan_in_fan_out(config, context, "nn.Conv2d")
    return Conv2d(target, adapter_name, config, key=context.key)


def embedding_factory(
    target: nn.Module, adapter_name: str, config: OFTConfig, context: LayerContext
) -> OFTLayer | None:
    """OFT for ``nn.Embedding``: the embedding vectors are rotated."""
    base = _base_of(target)
    if not isinstance(base, nn.Embedding) or not is_plain_float(base):
        return None
    return Embedding(target, adapter_name, config, key=context.key)


@hookimpl
def peft_register_methods(registry: Registry) -> None:
    registry.register_method(
        MethodSpec(
            peft_type=PEFT_TYPE,
            config_cls=OFTConfig,
            model_cls=OFTModel,
            prefix="oft_",
            capabilities=Capabilities(mergeable=True, mixable=True, identity_init=True),
            default_target_modules=LORA_STYLE_DEFAULT_TARGETS,
        )
    )


@hookimpl
def peft_register_layer_factories(registry: Registry) -> None:
    for factory in (linear_factory, conv2d_factory, embedding_factory):
        registry.register_layer_factory(PEFT_TYPE, factory, priority=0)
