"""peft-boft: BOFT (butterfly orthogonal fine-tuning) as a peft-core plugin.

>>> from peft_boft import BOFTConfig
>>> BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj"]).to_dict()["peft_type"]
'BOFT'
"""

from __future__ import annotations

from peft_boft.config import BOFTConfig

__version__ = "0.1.0"

__all__ = ["BOFTConfig", "__version__"]
