"""``BOFTModel``: the core's adapter model, with BOFT's default targets."""

from __future__ import annotations

from typing import Any

from peft_core.config import PeftConfig
from peft_core.tuner import AdapterModel

from peft_boft.default_targets import DEFAULT_TARGET_REGEXES

__all__ = ["BOFTModel"]


class BOFTModel(AdapterModel):
    """Injects BOFT layers; see :class:`peft_core.tuner.AdapterModel` for the API.

    BOFT-specific rules: some model types' default targets are a regex, which the registry's
    per-model-type name lists cannot express.
    """

    def _prepare_adapter_config(self, config: PeftConfig, model_config: dict[str, Any]) -> PeftConfig:
        if getattr(config, "target_modules", None) is None:
            regex = DEFAULT_TARGET_REGEXES.get(model_config.get("model_type") or "")
            if regex is not None:
                return config.copy(target_modules=regex)
        return super()._prepare_adapter_config(config, model_config)
