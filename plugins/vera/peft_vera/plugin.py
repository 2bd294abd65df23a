"""The hooks peft-core calls when it loads peft-vera (entry point ``vera`` in group ``peft_core``).

One layer factory per base-layer type, each returning None for modules it does not handle, so
another plugin can add VeRA support for a new layer type (a quantized linear, a custom layer)
with a factory of higher priority, without touching this package. Such a factory must return a
:class:`peft_vera.layer.VeraLayer`, which the VeRA adapter model gives the shared projections.
"""

from __future__ import annotations

import warnings

from peft_core.hookspecs import hookimpl
from peft_core.layer import AdapterLayer
from peft_core.quantization import is_adaptable_linear
from peft_core.registry import Capabilities, LayerContext, MethodSpec, Registry
from torch import nn

from peft_vera.config import VeraConfig
from peft_vera.default_targets import DEFAULT_TARGET_MODULES, DEFAULT_TARGET_REGEXES
from peft_vera.layer import Linear, VeraLayer, is_transformers_conv1d
from peft_vera.model import VeraModel

__all__ = [
    "PEFT_TYPE",
    "linear_factory",
    "peft_register_layer_factories",
    "peft_register_methods",
    "transformers_conv1d_factory",
]

PEFT_TYPE = "VERA"


def _base_of(target: nn.Module) -> nn.Module:
    """The innermost module: another method's adapter layer is wrapped as a whole (stacking)."""
    return target.get_base_layer() if isinstance(target, AdapterLayer) else target


def linear_factory(
    target: nn.Module, adapter_name: str, config: VeraConfig, context: LayerContext
) -> VeraLayer | None:
    """VeRA for ``nn.Linear`` (with a plain floating-point weight)."""
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
    target: nn.Module, adapter_name: str, config: VeraConfig, context: LayerContext
) -> VeraLayer | None:
    """VeRA for transformers' ``Conv1D`` (GPT-2 style), whose weight is stored (in, out)."""
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


@hookimpl
def peft_register_methods(registry: Registry) -> None:
    registry.register_method(
        MethodSpec(
            peft_type=PEFT_TYPE,
            config_cls=VeraConfig,
            model_cls=VeraModel,
            # "vera_" rather than the reference's "vera_lambda_": the core spells the layer-bias option
            # f"{prefix}only", and VeRA's is "vera_only". Only parameters are matched against it, so the
            # frozen projection buffers (vera_A, vera_B) never train either way.
            prefix="vera_",
            capabilities=Capabilities(mergeable=True, quantized_bases=True, identity_init=True),
            default_target_modules={**DEFAULT_TARGET_MODULES, **DEFAULT_TARGET_REGEXES},
        )
    )


@hookimpl
def peft_register_layer_factories(registry: Registry) -> None:
    for factory in (linear_factory, transformers_conv1d_factory):
        registry.register_layer_factory(PEFT_TYPE, factory, priority=0)
