"""peft-multitask-prompt-tuning: a shared prompt modulated by low-rank per-task factors, as a peft-core plugin.

>>> from peft_multitask_prompt_tuning import MultitaskPromptTuningConfig
>>> MultitaskPromptTuningConfig(num_virtual_tokens=8, num_tasks=3).to_dict()["peft_type"]
'MULTITASK_PROMPT_TUNING'
"""

from __future__ import annotations

from peft_multitask_prompt_tuning.config import MultitaskPromptTuningConfig, MultitaskPromptTuningInit

__version__ = "0.1.0"

__all__ = ["MultitaskPromptTuningConfig", "MultitaskPromptTuningInit", "__version__"]
