"""``HRAModel``: the core's adapter model with HRA's one method-specific rule."""

from __future__ import annotations

from peft_core.config import PeftConfig
from peft_core.tuner import AdapterModel

__all__ = ["HRAModel"]


class HRAModel(AdapterModel):
    """Injects HRA layers; see :class:`peft_core.tuner.AdapterModel` for the API.

    HRA-specific behaviour: no init when loading a checkpoint, whose vectors replace the drawn ones
    anyway (so loading never warns about an odd ``r``).
    """

    def _config_for_loading(self, config: PeftConfig) -> PeftConfig:
        return config.copy(init_weights=False)
