"""``HRAModel``: the core's adapter model with HRA's two method-specific rules."""

from __future__ import annotations

from typing import Any

from peft_core.config import PeftConfig
from peft_core.tuner import AdapterModel

from peft_hra.default_targets import DEFAULT_TARGET_REGEXES

__all__ = ["HRAModel"]


class HRAModel(AdapterModel):
    """Injects HRA layers; see :class:`peft_core.tuner.AdapterModel` for the API.

    HRA-specific behaviour: regex default targets for some model types (as the reference), no
    init when loading a checkpoint, whose vectors replace the drawn ones anyway (so loading never
    warns about an odd ``r``).
    """

    def _prepare_adapter_config(self, config: PeftConfig, model_config: dict[str, Any]) -> PeftConfig:
        if getattr(config, "target_modules", None) is None:
            regex = DEFAULT_TARGET_REGEXES.get(model_config.get("model_type") or "")
            if regex is not None:
                return config.copy(target_modules=regex)
        return super()._prepare_adapter_config(config, model_config)

    def _config_for_loading(self, config: PeftConfig) -> PeftConfig:
        return config.copy(init_weights=False)
