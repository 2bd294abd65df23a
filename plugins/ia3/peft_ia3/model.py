"""``IA3Model``: the core's adapter model with (IA)³'s one method-specific rule (feedforward defaults)."""

from __future__ import annotations

import re
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

    def _weighted_adapter_config(
        self, adapters: list[str], combination_type: str, options: dict[str, Any]
    ) -> PeftConfig:
        """Also keep, module by module, whether the sources scale its input or its output.

        The feedforward modules are written as an exact-name regex: the reference's list entries
        match name *endings*, under which ``0.fc`` would also select ``10.fc``.
        """
        config = super()._weighted_adapter_config(adapters, combination_type, options)
        feedforward = []
        for key, layer in self.named_adapter_layers():
            kinds = {layer.is_feedforward[a] for a in adapters if a in layer.is_feedforward}
            if len(kinds) > 1:
                raise ValueError(
                    f"The adapters {adapters} disagree on whether {key!r} is a feedforward module (input vs output "
                    "scaling), so their vectors cannot be combined; combine adapters with the same "
                    "feedforward_modules."
                )
            if kinds == {True}:
                feedforward.append(key)
        return config.copy(feedforward_modules="|".join(map(re.escape, feedforward)) if feedforward else [])
