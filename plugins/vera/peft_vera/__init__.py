"""peft-vera: VeRA (vector-based random matrix adaptation) as a peft-core plugin.

>>> from peft_vera import VeraConfig
>>> VeraConfig(r=64, target_modules=["q_proj", "v_proj"]).to_dict()["peft_type"]
'VERA'
"""

from __future__ import annotations

from peft_vera.config import VeraConfig

__version__ = "0.1.0"

__all__ = ["VeraConfig", "__version__"]
