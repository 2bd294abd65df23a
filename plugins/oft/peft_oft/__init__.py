"""peft-oft: OFT (orthogonal finetuning with block-diagonal Cayley rotations) as a peft-core plugin.

>>> from peft_oft import OFTConfig
>>> OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj"]).to_dict()["peft_type"]
'OFT'
"""

from __future__ import annotations

from peft_oft.config import OFTConfig

__version__ = "0.1.0"

__all__ = ["OFTConfig", "__version__"]
