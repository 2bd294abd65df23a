"""The hooks peft-core calls when it loads peft-bnb (entry point ``bnb`` in group ``peft_core``)."""

from __future__ import annotations

from peft_core.hookspecs import hookimpl
from peft_core.registry import Registry

from peft_bnb.backend import BNB_4BIT, BNB_8BIT

__all__ = ["BACKENDS", "peft_register_quantization_backends"]

BACKENDS = (BNB_4BIT, BNB_8BIT)


@hookimpl
def peft_register_quantization_backends(registry: Registry) -> None:
    for backend in BACKENDS:
        registry.register_quantization_backend(backend)
