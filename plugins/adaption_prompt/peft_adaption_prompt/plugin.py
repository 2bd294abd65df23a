"""The hooks peft-core calls when it loads peft-adaption-prompt (entry point ``adaption_prompt``)."""

from __future__ import annotations

from peft_core.hookspecs import hookimpl
from peft_core.layer import AdapterLayer
from peft_core.registry import Capabilities, LayerContext, MethodSpec, Registry
from torch import nn

from peft_adaption_prompt.config import AdaptionPromptConfig
from peft_adaption_prompt.layer import AdaptedAttention, is_supported_attention
from peft_adaption_prompt.model import AdaptionPromptModel

__all__ = [
    "CAPABILITIES",
    "PEFT_TYPE",
    "attention_factory",
    "peft_register_layer_factories",
    "peft_register_methods",
]

PEFT_TYPE = "ADAPTION_PROMPT"

CAPABILITIES = Capabilities(
    mergeable=False,
    prompt_learning=False,
    mixable=False,
    identity_init=True,
    mixed_batch=False,
    weighted_combination=False,
    quantized_bases=False,
)
"""Nothing to merge (the prompts add an attention, not a weight change); one method per model; a
fresh adapter is the identity (zero gates). The layers wrap whole attention modules, not linear layers."""


def attention_factory(
    target: nn.Module, adapter_name: str, config: AdaptionPromptConfig, context: LayerContext
) -> AdaptedAttention | None:
    """An adapted attention for a Llama-style attention module (Llama, Mistral, Qwen2, ...)."""
    if isinstance(target, AdapterLayer) or not is_supported_attention(target):
        return None
    layer = AdaptedAttention(target)
    layer.update_layer(adapter_name, config, key=context.key)
    return layer


@hookimpl
def peft_register_methods(registry: Registry) -> None:
    registry.register_method(
        MethodSpec(
            peft_type=PEFT_TYPE,
            config_cls=AdaptionPromptConfig,
            model_cls=AdaptionPromptModel,
            prefix="adaption_",
            capabilities=CAPABILITIES,
        )
    )


@hookimpl
def peft_register_layer_factories(registry: Registry) -> None:
    registry.register_layer_factory(PEFT_TYPE, attention_factory, priority=0)
