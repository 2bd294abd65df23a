"""The hook peft-core calls when it loads peft-multitask-prompt-tuning (entry point ``multitask_prompt_tuning`` in group ``peft_core``)."""

from __future__ import annotations

from peft_core.hookspecs import hookimpl
from peft_core.registry import Capabilities, MethodSpec, Registry

from peft_multitask_prompt_tuning.config import MultitaskPromptTuningConfig
from peft_multitask_prompt_tuning.model import MultitaskPromptTuningModel

__all__ = ["CAPABILITIES", "PEFT_TYPE", "peft_register_methods"]

PEFT_TYPE = "MULTITASK_PROMPT_TUNING"

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
            config_cls=MultitaskPromptTuningConfig,
            model_cls=MultitaskPromptTuningModel,
            prefix="prompt_encoder.",
            capabilities=CAPABILITIES,
        )
    )
