"""peft-lokr: LoKr (low-rank Kronecker product) as a peft-core plugin, file-compatible with peft.

>>> from peft_lokr import LoKrConfig
>>> LoKrConfig(r=4, target_modules=["q_proj", "v_proj"]).to_dict()["peft_type"]
'LOKR'
"""

from __future__ import annotations

from peft_lokr.config import LoKrConfig

__version__ = "0.1.0"

__all__ = ["LoKrConfig", "__version__"]
