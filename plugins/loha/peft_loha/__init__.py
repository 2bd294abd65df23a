"""peft-loha: LoHa (low-rank Hadamard product) as a peft-core plugin, file-compatible with peft.

>>> from peft_loha import LoHaConfig
>>> LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]).to_dict()["peft_type"]
'LOHA'
"""

from __future__ import annotations

from peft_loha.config import LoHaConfig

__version__ = "0.1.0"

__all__ = ["LoHaConfig", "__version__"]
