"""The hook peft-core calls when it loads peft-cpt (entry point ``cpt`` in group ``peft_core``)."""

from __future__ import annotations

from peft_core.hookspecs import hookimpl
from peft_core.registry import Capabilities, MethodSpec, Registry

from peft_cpt.config import CPTConfig
from peft_cpt.model import CPTModel

__all__ = ["CAPABILITIES", "PEFT_TYPE", "peft_register_methods"]

PEFT_TYPE = "CPT"

CAPABILITIES = Capabilities(
    prompt_learning=True, mergeable=False, mixable=False, identity_init=False, quantized_bases=True
)
"""Prompt learning: nothing to merge, one method per model, and any init changes the output
(the prompt is new input). The base stays untouched, so quantized bases work as they are."""


@hookimpl
def peft_register_methods(registry: Registry) -> None:
    registry.register_method(
        MethodSpec(
            peft_type=PEFT_TYPE,
            config_cls=CPTConfig,
            model_cls=CPTModel,
            prefix="prompt_encoder.",
            capabilities=CAPABILITIES,
        )
    )
