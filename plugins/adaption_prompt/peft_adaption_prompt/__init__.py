"""peft-adaption-prompt: LLaMA-Adapter's zero-init gated prompts in the top attention layers, as a peft-core plugin.

>>> from peft_adaption_prompt import AdaptionPromptConfig
>>> AdaptionPromptConfig(adapter_len=4, adapter_layers=1).to_dict()["peft_type"]
'ADAPTION_PROMPT'
"""

from __future__ import annotations

from peft_adaption_prompt.config import AdaptionPromptConfig

__version__ = "0.1.0"

__all__ = ["AdaptionPromptConfig", "__version__"]
