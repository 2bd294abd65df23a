"""The hook peft-core calls when it loads peft-prefix-tuning (entry point ``prefix_tuning`` in group ``peft_core``)."""

from __future__ import annotations

from peft_core.hookspecs import hookimpl
from peft_core.registry import Capabilities, MethodSpec, Registry

from peft_prefix_tuning.config import PrefixTuningConfig
from peft_prefix_tuning.model import PrefixTuningModel

__all__ = ["CAPABILITIES", "PEFT_TYPE", "peft_register_methods"]

PEFT_TYPE = "PREFIX_TUNING"

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
            config_cls=PrefixTuningConfig,
            model_cls=PrefixTuningModel,
            prefix="prompt_encoder.",
            capabilities=CAPABILITIES,
        )
    )
