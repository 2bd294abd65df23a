"""peft-lora: LoRA (with DoRA, rsLoRA, PiSSA/OLoRA/EVA/CorDA/LoftQ init and lora_bias) as a peft-core plugin.

>>> from peft_lora import LoraConfig
>>> LoraConfig(r=8, target_modules=["q_proj", "v_proj"]).to_dict()["peft_type"]
'LORA'
"""

from __future__ import annotations

from peft_lora.config import LoraConfig
from peft_lora.corda import preprocess_corda
from peft_lora.eva import get_eva_state_dict, initialize_lora_eva_weights
from peft_lora.init_configs import CordaConfig, EvaConfig, LoftQConfig
from peft_lora.loftq import replace_lora_weights_loftq

__version__ = "0.1.0"

__all__ = [
    "CordaConfig",
    "EvaConfig",
    "LoftQConfig",
    "LoraConfig",
    "__version__",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "preprocess_corda",
    "replace_lora_weights_loftq",
]
