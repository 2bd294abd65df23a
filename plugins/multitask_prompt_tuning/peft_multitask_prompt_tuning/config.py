"""``MultitaskPromptTuningConfig``: every field of the reference library's config, with its name and default."""

from __future__ import annotations

import enum
from typing import Any, ClassVar

from attrs import define, field
from peft_core.errors import ConfigError
from peft_core.prompt_learning import PromptLearningConfig

__all__ = ["MultitaskPromptTuningConfig", "MultitaskPromptTuningInit"]


class MultitaskPromptTuningInit(str, enum.Enum):
    """How the shared prompt and the task factors start."""

    TEXT = "TEXT"
    RANDOM = "RANDOM"
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"

    def __str__(self) -> str:
        return self.value


SOURCE_INITS = (
    MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS,
    MultitaskPromptTuningInit.EXACT_SOURCE_TASK,
    MultitaskPromptTuningInit.ONLY_SOURCE_SHARED,
)
"""Inits that read a source adapter (``prompt_tuning_init_state_dict_path``)."""


def _init(value: Any) -> MultitaskPromptTuningInit:
    try:
        return MultitaskPromptTuningInit(getattr(value, "value", value))
    except ValueError:
        raise ConfigError(
            f"prompt_tuning_init={value!r} is not one of {[i.value for i in MultitaskPromptTuningInit]}."
        ) from None


def _positive(name: str):
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")

    return check


@define(kw_only=True)
class MultitaskPromptTuningConfig(PromptLearningConfig):
    """Configuration of a multitask prompt-tuning adapter (the reference's ``MultitaskPromptTuningConfig``).

    The prompt of task ``t`` is the shared table times (elementwise) the rank-``num_ranks``
    product ``prefix_task_cols[t] @ prefix_task_rows[t]``; ``forward`` and ``generate`` take
    ``task_ids`` (one task id per sample).

    >>> from peft_multitask_prompt_tuning import MultitaskPromptTuningConfig
    >>> MultitaskPromptTuningConfig(num_virtual_tokens=4).num_ranks
    1
    """

    PEFT_TYPE: ClassVar[str] = "MULTITASK_PROMPT_TUNING"

    prompt_tuning_init: MultitaskPromptTuningInit = field(
        default=MultitaskPromptTuningInit.RANDOM, converter=_init
    )
    """RANDOM; TEXT (the shared table from a text's embeddings); or from a source adapter:
    AVERAGE_SOURCE_TASKS (task factors averaged over its tasks), EXACT_SOURCE_TASK (those of
    ``prompt_tuning_init_task``), ONLY_SOURCE_SHARED (its shared table only)."""
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    prompt_tuning_init_state_dict_path: str | None = None
    """A source adapter's ``adapter_model.safetensors`` (pickled files are refused: they can run code)."""
    prompt_tuning_init_task: int | None = 0
    num_ranks: int | None = field(default=1, validator=_positive("num_ranks"))
    num_tasks: int | None = field(default=1, validator=_positive("num_tasks"))

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        text = self.prompt_tuning_init == MultitaskPromptTuningInit.TEXT
        if text and not self.tokenizer_name_or_path:
            raise ConfigError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path.")
        if text and self.prompt_tuning_init_text is None:
            raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text.")
        if self.tokenizer_kwargs and not text:
            raise ConfigError("tokenizer_kwargs only apply with prompt_tuning_init='TEXT'.")
