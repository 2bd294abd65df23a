"""``LoraModel``: the core's adapter model with LoRA's few method-specific rules."""

from __future__ import annotations

import warnings

from peft_core.config import PeftConfig
from peft_core.errors import ConfigError
from peft_core.tuner import AdapterModel

__all__ = ["LoraModel"]

_BASE_MUTATING_INITS = ("olora",)


def _mutates_base(config: PeftConfig) -> bool:
    init = getattr(config, "init_lora_weights", True)
    return isinstance(init, str) and (init.startswith("pissa") or init in _BASE_MUTATING_INITS)


class LoraModel(AdapterModel):
    """Injects LoRA layers; see :class:`peft_core.tuner.AdapterModel` for the API.

    LoRA-specific behaviour: at most one adapter training biases, and random inits skipped when loading a checkpoint (PiSSA/OLoRA run again,
    as in the reference, since the adapter only fits the residual base they produce).
    """

    def _validate_new_adapter(self, config: PeftConfig) -> None:
        with_bias = [name for name, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"]
        if with_bias and getattr(config, "bias", "none") != "none":
            raise ConfigError(
                f"Adapter {with_bias[0]!r} already trains biases (bias={self.peft_config[with_bias[0]].bias!r}); "
                f"only one LoRA adapter per model may use bias other than 'none'. Set bias='none' for the new one."
            )
        configs = [*self.peft_config.values(), config]
        if len(configs) > 1 and any(_mutates_base(c) for c in configs):
            warnings.warn(
                "A PiSSA/OLoRA adapter replaces the base weights by a residual, so other adapters on this model see "
                "modified base weights. Convert the PiSSA/OLoRA adapter to a plain LoRA adapter, or keep it alone.",
                UserWarning,
                stacklevel=4,
            )

    def _config_for_loading(self, config: PeftConfig) -> PeftConfig:
        # The checkpoint overwrites the factors, so a random init is wasted work. PiSSA/OLoRA are
        # different: their init also turns the base weight into the residual the adapter was trained
        # on, so an adapter saved with that init is only right on the original base if the init runs
        # again (as the reference library does). Convert such adapters with
        # path_initial_model_for_weight_conversion to share them as plain LoRA.
        init = getattr(config, "init_lora_weights", True)
        if init is True or str(init).lower().startswith(("pissa", "olora")):
            return config
        return config.copy(init_lora_weights=True)
