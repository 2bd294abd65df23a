"""``LoKrModel``: the core's adapter model under the name the reference library exports."""

from __future__ import annotations

from peft_core.tuner import AdapterModel

__all__ = ["LoKrModel"]


class LoKrModel(AdapterModel):
    """Injects LoKr layers; see :class:`peft_core.tuner.AdapterModel` for the API.

    LoKr needs no rule of its own at the model level: its layers, factories and default targets
    (the registry's ``default_target_modules``) say everything method-specific.
    """
