"""peft-prefix-tuning: learned key/value prefixes fed to every attention layer, as a peft-core plugin.

>>> from peft_prefix_tuning import PrefixTuningConfig
>>> PrefixTuningConfig(num_virtual_tokens=8, prefix_projection=True).to_dict()["peft_type"]
'PREFIX_TUNING'
"""

from __future__ import annotations

from peft_prefix_tuning.config import PrefixTuningConfig

__version__ = "0.1.0"

__all__ = ["PrefixTuningConfig", "__version__"]
