"""peft-ia3: (IA)³, learned rescaling vectors, as a peft-core plugin.

>>> from peft_ia3 import IA3Config
>>> IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]).to_dict()["peft_type"]
'IA3'
"""

from __future__ import annotations

from peft_ia3.config import IA3Config

__version__ = "0.1.0"

__all__ = ["IA3Config", "__version__"]
