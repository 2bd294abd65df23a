"""``AdaptionPromptConfig``: the reference library's adaption-prompt config, field for field."""

from __future__ import annotations

from typing import Any, ClassVar

from attrs import define, field
from peft_core.config import PeftConfig
from peft_core.errors import ConfigError

__all__ = ["AdaptionPromptConfig"]


def _attention_name(value: Any) -> str | None:
    """One module name (the last dotted part of every attention module's path), or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str):
        return value[0]  # a one-name list means the same thing; the file keeps a plain string
    raise ConfigError(
        f"target_modules must be the name of the attention submodules (a string such as 'self_attn'), got "
        f"{value!r}. Adaption prompts always go into the top adapter_layers modules of that name."
    )


def _optional_positive(name: str) -> Any:
    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")

    return check


@define(kw_only=True)
class AdaptionPromptConfig(PeftConfig):
    """Configuration of an adaption-prompt adapter (LLaMA-Adapter, Zhang et al. 2023).

    The top ``adapter_layers`` attention modules named ``target_modules`` each learn
    ``adapter_len`` prompt vectors and a gate. Every query also attends to the prompt (its keys and
    values are the attention's own projections of it, in a softmax of their own); the result,
    scaled by the gate, is added to the attention's output. The gates start at zero, so a fresh
    adapter leaves the model's output unchanged.

    ``adapter_len`` and ``adapter_layers`` have no default (as in the reference library) and must
    be set before the config is used; ``target_modules`` is filled in from the model type
    (``"self_attn"`` for Llama, Mistral and Qwen2 models) when left as None.

    >>> from peft_adaption_prompt import AdaptionPromptConfig
    >>> config = AdaptionPromptConfig(adapter_len=10, adapter_layers=2, task_type="CAUSAL_LM")
    >>> config.to_dict()["peft_type"], config.target_modules
    ('ADAPTION_PROMPT', None)
    """

    PEFT_TYPE: ClassVar[str] = "ADAPTION_PROMPT"

    target_modules: str | None = field(default=None, converter=_attention_name)
    """Name of the attention submodules to add prompts to (``"self_attn"``); None: the model type's."""
    adapter_len: int | None = field(default=None, validator=_optional_positive("adapter_len"))
    """Number of prompt vectors per adapted attention module."""
    adapter_layers: int | None = field(default=None, validator=_optional_positive("adapter_layers"))
    """Number of attention modules to adapt, counted from the top (the last ones) of the model."""

    def check_complete(self) -> None:
        """Raise unless every field a model needs is set (the reference leaves them None by default)."""
        missing = [name for name in ("adapter_len", "adapter_layers") if getattr(self, name) is None]
        if missing:
            raise ConfigError(
                f"AdaptionPromptConfig needs {' and '.join(missing)} (positive integers), got None; e.g. "
                "AdaptionPromptConfig(adapter_len=10, adapter_layers=2)."
            )
