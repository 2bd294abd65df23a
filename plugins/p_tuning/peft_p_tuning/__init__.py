"""peft-p-tuning: prompt embeddings produced by a small MLP or LSTM encoder, as a peft-core plugin.

>>> from peft_p_tuning import PromptEncoderConfig
>>> PromptEncoderConfig(num_virtual_tokens=8).to_dict()["peft_type"]
'P_TUNING'
"""

from __future__ import annotations

from peft_p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType

__version__ = "0.1.0"

__all__ = ["PromptEncoderConfig", "PromptEncoderReparameterizationType", "__version__"]
