"""peft-prompt-tuning: learned soft-prompt embeddings prepended to the input, as a peft-core plugin.

>>> from peft_prompt_tuning import PromptTuningConfig
>>> PromptTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM").to_dict()["peft_type"]
'PROMPT_TUNING'
"""

from __future__ import annotations

from peft_prompt_tuning.config import PromptTuningConfig, PromptTuningInit

__version__ = "0.1.0"

__all__ = ["PromptTuningConfig", "PromptTuningInit", "__version__"]
