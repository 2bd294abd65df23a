"""``IA3Model``: the core's adapter model with (IA)³'s one method-specific rule (feedforward defaults)."""

from __future__ import annotations

from typing import Any

from peft_core.config import PeftConfig
from peft_core.errors import ConfigError
from peft_core.tuner import AdapterModel

from peft_ia3.default_targets import DEFAULT_FEEDFORWARD_MODULES

__all__ = ["IA3Model"]


class IA3Model(AdapterModel):
    """Injects (IA)³ layers; see :class:`peft_core.tuner.AdapterModel` for the API.

    Besides ``target_modules``, an unset ``feedforward_modules`` is filled in from the reference
    library's defaults for the model type, and is an error for other models, as in the reference
    (pass ``feedforward_modules=[]`` when no target is a feedforward layer).
    """

    def _prepare_adapter_config(self, config: PeftConfig, model_config: dict[str, Any]) -> PeftConfig:
        config = super()._prepare_adapter_config(config, model_config)
        if getattr(config, "feedforward_modules", None) is not None:
            return config
        model_type = model_config.get("model_type")
        defaults = DEFAULT_FEEDFORWARD_MODULES.get(model_type or "")
        if defaults is None:
            raise ConfigError(
                f"feedforward_modules is not set and IA3 has no default feedforward modules for model_type "
                f"{model_type!r}. Pass feedforward_modules (a list of target names whose input is scaled, or a regex); "
                "pass feedforward_modules=[] if none of the targets is a feedforward layer."
            )
        config = config.copy()
        # Assigned after construction, like the reference, which does not re-check the subset rule for defaults
        # (targets given by the user need not include the model type's default feedforward modules).
        config.feedforward_modules = list(defaults)
        return config
