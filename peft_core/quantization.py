"""Quantized base layers, for every method and every quantization library.

A :class:`QuantizationBackend` (contributed by a plugin through the
``peft_register_quantization_backends`` hook) tells the core three things about one kind of
quantized layer: how to recognise it, how to read its weight dequantized, and how to write a
weight back (re-quantizing), or that it cannot. Method layers never talk to a backend:

* a layer that adds to or rescales the base output calls ``base_layer(x)`` as always, so the
  quantized kernel runs unchanged;
* a layer that merges through its base weight merges into a float view of it:
  :meth:`~peft_core.layer.AdapterLayer.merge` wraps every merge in :func:`writable_float_weight`,
  which swaps in the dequantized weight, lets the method's own ``merge_one`` edit it, and
  re-quantizes the result;
* a layer that needs the weight itself in forward (DoRA's norm) reads :func:`dequantized_weight`.

So a new backend (HQQ, torchao, GPTQ, ...) works with every method whose plugin declares the
``quantized_bases`` capability, and a new method works on every backend, with no code for the pair.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from attrs import frozen
from torch import nn

from peft_core.errors import MergeError

__all__ = [
    "QuantizationBackend",
    "backend_for",
    "dequantized_weight",
    "is_adaptable_linear",
    "is_plain_float",
    "quantized_library",
    "weight_shape",
    "writable_float_weight",
]


@frozen(kw_only=True)
class QuantizationBackend:
    """How the core handles one kind of quantized base layer."""

    name: str
    """Shown in messages, e.g. ``"bitsandbytes 4-bit"``."""
    handles: Callable[[nn.Module], bool]
    """Whether a module is a layer of this backend."""
    dequantize: Callable[[nn.Module], torch.Tensor]
    """The layer's weight as a float ``(out, in)`` tensor (a new tensor: callers may edit it)."""
    requantize: Callable[[nn.Module, torch.Tensor], None] | None = None
    """Store a float ``(out, in)`` weight into the layer, quantized; None when the format cannot be
    re-quantized, which makes merging into such layers an error."""
    quantize_linear: Callable[[nn.Linear], nn.Module] | None = None
    """A quantized copy of a float ``nn.Linear``; the conformance kit builds quantized models with it."""
    weight_error_bound: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    """``bound(layer, weight)``: an elementwise bound on ``|dequantize(requantize(weight)) - weight|`` with
    ``layer``'s quantization settings. The conformance kit holds merges to it."""
    prepare: Callable[[nn.Module], None] | None = None
    """Called on a layer of this backend before an adapter layer wraps it: put it in the state adapters
    need (bitsandbytes 4-bit keeps its trainable layout). The conformance kit applies it to the bases
    it compares against, too."""
    merge_is_lossy: bool = True
    """Re-quantizing rounds the merged weight, so merged outputs differ from unmerged ones."""
    plugin: str = ""
    """Distribution that registered the backend; filled in by the registry."""

    @property
    def can_merge(self) -> bool:
        return self.requantize is not None


# Libraries whose layers subclass nn.Linear but hold packed weights, and the plugin that adapts
# them, so that a model quantized by one of them names what to install.
_KNOWN_LIBRARIES = {
    "bitsandbytes": "peft-bnb",
    "hqq": "a plugin registering an HQQ quantization backend",
    "torchao": "a plugin registering a torchao quantization backend",
    "auto_gptq": "a plugin registering a GPTQ quantization backend",
    "gptqmodel": "a plugin registering a GPTQ quantization backend",
    "awq": "a plugin registering an AWQ quantization backend",
    "optimum": "a plugin registering a quantization backend for optimum's layers",
}


def _registry():
    # Imported here: the registry is built from the plugins, which import this module.
    from peft_core.plugins import get_registry

    return get_registry()


def backend_for(module: nn.Module) -> QuantizationBackend | None:
    """The registered backend that handles ``module``, if any."""
    return _registry().quantization_backend_for(module)


def quantized_library(module: nn.Module) -> str | None:
    """The top-level package of ``module``'s class when it looks quantized, else None.

    A module is taken as quantized when its class comes from a known quantization library, or
    when it is an ``nn.Linear`` whose weight is not floating point.
    """
    library = type(module).__module__.split(".")[0]
    if library in _KNOWN_LIBRARIES:
        return library
    weight = getattr(module, "weight", None)
    if (
        isinstance(module, nn.Linear)
        and isinstance(weight, torch.Tensor)
        and not weight.dtype.is_floating_point
    ):
        return library
    return None


def install_hint(library: str) -> str:
    """What to install so that layers of ``library`` can be adapted."""
    return _KNOWN_LIBRARIES.get(library, "a plugin registering a quantization backend for it")


def is_plain_float(module: nn.Module) -> bool:
    """Whether ``module`` keeps an ordinary floating-point ``weight`` parameter (not a quantized one)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or not weight.dtype.is_floating_point:
        return False
    return type(module).__module__.split(".")[0] not in _KNOWN_LIBRARIES


def is_adaptable_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` with a float weight, or a quantized linear that a registered backend handles.

    Layer factories of methods that declare the ``quantized_bases`` capability accept exactly
    these; the core has already refused quantized layers for methods that do not declare it.
    """
    if not isinstance(module, nn.Linear):
        return False
    return is_plain_float(module) or backend_for(module) is not None


def weight_shape(module: nn.Module) -> torch.Size:
    """The logical ``(out, in)`` shape of a linear's weight (packed quantized storage has another)."""
    if isinstance(module, nn.Linear) and not is_plain_float(module):
        return torch.Size((module.out_features, module.in_features))
    return module.weight.shape


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight in floating point: the parameter itself, or its backend's dequantization."""
    backend = backend_for(module)
    if backend is None:
        return module.weight
    return backend.dequantize(module)


@contextmanager
def writable_float_weight(module: nn.Module, *, what: str = "merge") -> Iterator[None]:
    """Inside the block, ``module.weight`` is a float parameter holding the dequantized weight.

    On a clean exit the (possibly edited) weight is re-quantized into the layer; if the block
    raises, the quantized weight is put back untouched. For a plain module this does nothing.
    """
    backend = backend_for(module)
    if backend is None:
        yield
        return
    if not backend.can_merge:
        raise MergeError(
            f"Cannot {what} into a {backend.name} layer ({type(module).__name__}): its backend "
            f"({backend.plugin or 'unknown plugin'}) cannot re-quantize a weight. Keep the adapter unmerged."
        )
    if backend.merge_is_lossy:
        warnings.warn(
            f"{'Merging' if what == 'merge' else 'Unmerging'} into {backend.name} layers re-quantizes their weights, so the merged model's outputs "
            "differ from the unmerged adapter's by the quantization error (and unmerging does not restore "
            "the original weights exactly). Keep the adapter unmerged where exactness matters.",
            UserWarning,
            stacklevel=4,
        )
    quantized = module._parameters["weight"]
    view = nn.Parameter(backend.dequantize(module).detach().clone(), requires_grad=False)
    module._parameters["weight"] = view
    try:
        yield
    except BaseException:
        module._parameters["weight"] = quantized
        raise
    module._parameters["weight"] = quantized
    backend.requantize(module, view.data)
