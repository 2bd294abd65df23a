"""``AdaptionPromptModel``: the core's adapter model, targeting the top attention modules."""

from __future__ import annotations

from typing import Any

from peft_core.errors import ConfigError, TargetModulesError
from peft_core.layer import AdapterLayer
from peft_core.modules_to_save import ModulesToSaveWrapper
from peft_core.tuner import AdapterModel

from peft_adaption_prompt.config import AdaptionPromptConfig

__all__ = ["DEFAULT_TARGET_MODULES", "AdaptionPromptModel"]

DEFAULT_TARGET_MODULES: dict[str, str] = {"llama": "self_attn", "mistral": "self_attn", "qwen2": "self_attn"}
"""The attention submodule name per transformers ``model_type`` (Llama-style attentions only)."""

_WRAPPER_PARTS = {"modules_to_save", "original_module", "base_layer"}


class AdaptionPromptModel(AdapterModel):
    """Injects :class:`~peft_adaption_prompt.layer.AdaptedAttention` layers; see :class:`peft_core.tuner.AdapterModel`.

    Two rules differ from name matching: ``target_modules`` is one name, matched as the last part of
    a module's dotted path (``model.layers.3.self_attn`` for ``"self_attn"``), and of the matching
    modules only the last ``adapter_layers`` (in module order, i.e. the top of the decoder) are
    adapted, as in the reference library.
    """

    def _prepare_adapter_config(
        self, config: AdaptionPromptConfig, model_config: dict[str, Any]
    ) -> AdaptionPromptConfig:
        config.check_complete()
        if config.target_modules is not None:
            return config
        model_type = model_config.get("model_type")
        default = DEFAULT_TARGET_MODULES.get(model_type or "")
        if default is None:
            raise ConfigError(
                f"target_modules is not set and peft-adaption-prompt has no default attention module for model_type "
                f"{model_type!r} (it knows {sorted(DEFAULT_TARGET_MODULES)}). Pass target_modules, the name of the "
                "model's Llama-style attention submodules (e.g. 'self_attn')."
            )
        return config.copy(target_modules=default)

    def _target_keys(self, config: AdaptionPromptConfig) -> list[str]:
        name = config.target_modules
        matches = []
        inside: list[str] = []  # adapter layers of any method: their insides are never targets
        for key, module in self.model.named_modules():
            if not key or any(key.startswith(path + ".") for path in inside):
                continue
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                inside.append(key)
            if _WRAPPER_PARTS.intersection(key.split(".")):
                continue
            if key.endswith("." + name):
                matches.append(key)
        if len(matches) < config.adapter_layers:
            raise TargetModulesError(
                f"adapter_layers={config.adapter_layers} asks for more attention modules than the model has: "
                f"{len(matches)} module(s) named {name!r}"
                + (f" ({matches[0]!r} ... {matches[-1]!r})" if matches else "")
                + ". Lower adapter_layers, or set target_modules to the name of the attention submodules."
            )
        return matches[-config.adapter_layers :]
