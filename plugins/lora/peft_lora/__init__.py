"""peft-lora: LoRA (with DoRA, rsLoRA, PiSSA/OLoRA init and lora_bias) as a peft-core plugin.

>>> from peft_lora import LoraConfig
>>> LoraConfig(r=8, target_modules=["q_proj", "v_proj"]).to_dict()["peft_type"]
'LORA'
"""

from __future__ import annotations

from peft_lora.config import LoraConfig

__version__ = "0.1.0"

__all__ = ["LoraConfig", "__version__"]
