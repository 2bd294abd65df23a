"""``PromptTuningConfig``: every field of the reference library's prompt-tuning config, with its name and default."""

from __future__ import annotations

import enum
from typing import Any, ClassVar

from attrs import define, field
from peft_core.errors import ConfigError
from peft_core.prompt_learning import PromptLearningConfig

__all__ = ["PromptTuningConfig", "PromptTuningInit"]


class PromptTuningInit(str, enum.Enum):
    """How the prompt table starts: from a text's token embeddings, from random vocabulary rows, or random."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"

    def __str__(self) -> str:
        return self.value


def _init(value: Any) -> PromptTuningInit:
    try:
        return PromptTuningInit(getattr(value, "value", value))
    except ValueError:
        raise ConfigError(
            f"prompt_tuning_init={value!r} is not one of {[i.value for i in PromptTuningInit]}."
        ) from None


@define(kw_only=True)
class PromptTuningConfig(PromptLearningConfig):
    """Configuration of a prompt-tuning adapter (the reference library's ``PromptTuningConfig``, field for field).

    The adapter learns ``num_virtual_tokens`` embeddings (per transformer submodule) that are
    prepended to the input embeddings; only they train.

    >>> from peft_prompt_tuning import PromptTuningConfig
    >>> PromptTuningConfig(num_virtual_tokens=4).prompt_tuning_init.value
    'RANDOM'
    """

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: PromptTuningInit = field(default=PromptTuningInit.RANDOM, converter=_init)
    """RANDOM (standard-normal rows), SAMPLE_VOCAB (rows of randomly drawn vocabulary tokens), or TEXT
    (the embeddings of ``prompt_tuning_init_text``, cycled or cut to the table's length)."""
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    """A local tokenizer directory (or Hub id) for TEXT init, read with ``transformers.AutoTokenizer``."""
    tokenizer_kwargs: dict | None = None
    """Extra ``AutoTokenizer.from_pretrained`` arguments, TEXT init only (``trust_remote_code`` is dropped)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        text = self.prompt_tuning_init == PromptTuningInit.TEXT
        if text and not self.tokenizer_name_or_path:
            raise ConfigError(
                f"prompt_tuning_init='TEXT' needs tokenizer_name_or_path, got {self.tokenizer_name_or_path!r}."
            )
        if text and self.prompt_tuning_init_text is None:
            raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text, got None.")
        if self.tokenizer_kwargs and not text:
            raise ConfigError("tokenizer_kwargs only apply with prompt_tuning_init='TEXT'.")
