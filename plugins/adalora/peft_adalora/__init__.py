"""peft-adalora: AdaLoRA (SVD-form LoRA with adaptive rank allocation) as a peft-core plugin.

>>> from peft_adalora import AdaLoraConfig
>>> AdaLoraConfig(init_r=12, target_r=4, total_step=100, target_modules=["q_proj"]).to_dict()["peft_type"]
'ADALORA'
"""

from __future__ import annotations

from peft_adalora.config import AdaLoraConfig

__version__ = "0.1.0"

__all__ = ["AdaLoraConfig", "__version__"]
