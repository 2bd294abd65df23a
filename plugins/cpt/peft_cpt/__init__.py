"""peft-cpt: context-aware prompt tuning (CPT), as a peft-core plugin.

>>> from peft_cpt import CPTConfig
>>> CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[5, 6, 7]).num_virtual_tokens
3
"""

from __future__ import annotations

from peft_cpt.config import CPTConfig

__version__ = "0.1.0"

__all__ = ["CPTConfig", "__version__"]
