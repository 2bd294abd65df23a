"""peft-hra: HRA (Householder reflection adaptation) as a peft-core plugin.

>>> from peft_hra import HRAConfig
>>> HRAConfig(r=8, target_modules=["q_proj", "v_proj"]).to_dict()["peft_type"]
'HRA'
"""

from __future__ import annotations

from peft_hra.config import HRAConfig

__version__ = "0.1.0"

__all__ = ["HRAConfig", "__version__"]
