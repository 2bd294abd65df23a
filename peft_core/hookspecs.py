"""Hook specifications: the whole contract between peft-core and a method plugin.

A plugin is a module (named by an entry point in the ``peft_core`` group) holding functions
decorated with :data:`hookimpl`. Every hook receives the typed :class:`~peft_core.registry.Registry`
and registers into it, so the core dispatches by method name through the registry rather than
broadcasting a call to every plugin (the tox 4 pattern). None of these hooks is ``firstresult``;
their return values are ignored.

The four families of the product map onto four hooks:

========================================  ==============================================
family                                    hook
========================================  ==============================================
config / method registration              :func:`peft_register_methods`
layer creation                            :func:`peft_register_layer_factories`
merge (combination strategies)            :func:`peft_register_combination_strategies`
serialization (state-dict key conversion) :func:`peft_register_state_dict_converters`
========================================  ==============================================

A fifth hook, :func:`peft_register_quantization_backends`, is not a method family: it teaches
every method a kind of quantized base layer at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from peft_core.registry import Registry

PROJECT_NAME = "peft_core"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = [
    "hookimpl",
    "hookspec",
    "peft_register_combination_strategies",
    "peft_register_layer_factories",
    "peft_register_methods",
    "peft_register_quantization_backends",
    "peft_register_state_dict_converters",
]


@hookspec
def peft_register_methods(registry: Registry) -> None:
    """Register the PEFT method(s) this plugin provides.

    Call ``registry.register_method(MethodSpec(...))`` once per method. The spec names the
    ``peft_type`` written to ``adapter_config.json``, the attrs config class, the adapter-model
    class that injects and manages the method's layers, the parameter prefix of its layers and
    its :class:`~peft_core.registry.Capabilities` (mergeable, prompt learning, mixable, ...).

    :param registry: the registry to register into.
    :returns: nothing; a second registration of a ``peft_type`` already owned by another
        plugin is refused with a warning naming both (an error in strict mode).
    """


@hookspec
def peft_register_layer_factories(registry: Registry) -> None:
    """Register factories that wrap a base module in a method's adapter layer.

    Call ``registry.register_layer_factory(peft_type, factory, priority=...)``. A factory is
    ``factory(target, adapter_name, config, context) -> AdapterLayer | None``; it returns
    ``None`` for a base module it does not handle. For one method, factories are tried from the
    highest priority down, so a plugin can teach an existing method a new base-layer type (a
    quantized linear, a custom layer of a user's model) by registering a factory above the
    method's own, without touching the method's plugin.

    :param registry: the registry to register into.
    :returns: nothing.
    """


@hookspec
def peft_register_combination_strategies(registry: Registry) -> None:
    """Register strategies that combine several adapters into one (``add_weighted_adapter``).

    Call ``registry.register_combination_strategy(name, strategy)``. A strategy is a callable
    ``strategy(deltas, weights, **options) -> Tensor`` taking the per-adapter delta tensors of
    one layer and their weights, and returning the combined delta. Merging an adapter into
    base weights is part of each layer's own contract (``AdapterLayer.merge``); this hook is for
    the pluggable *combination* step only.

    :param registry: the registry to register into.
    :returns: nothing; re-registering an existing strategy name is refused with a warning.
    """


@hookspec
def peft_register_state_dict_converters(registry: Registry) -> None:
    """Register converters that turn foreign checkpoint layouts into peft's key format.

    Call ``registry.register_state_dict_converter(name, converter)``. A converter is
    ``converter(state_dict, config) -> dict | None``; it returns a converted state dict when it
    recognises the layout (e.g. another trainer's LoRA key names), else ``None``. The core owns
    the file format itself; converters run on load, before keys are matched to the model.

    :param registry: the registry to register into.
    :returns: nothing.
    """


@hookspec
def peft_register_quantization_backends(registry: Registry) -> None:
    """Register backends for quantized base layers (bitsandbytes, HQQ, GPTQ, ...).

    Call ``registry.register_quantization_backend(QuantizationBackend(...))``. A backend says how
    to recognise its layers, dequantize their weight and re-quantize a merged one (see
    :class:`~peft_core.quantization.QuantizationBackend`). Every method that declares the
    ``quantized_bases`` capability then adapts, trains, saves and merges on those layers, with
    no code for the pair.

    :param registry: the registry to register into.
    :returns: nothing; a second backend of the same name from another plugin is refused with a warning.
    """
