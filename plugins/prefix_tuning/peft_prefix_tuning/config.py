"""``PrefixTuningConfig``: every field of the reference library's prefix-tuning config, with its name and default."""

from __future__ import annotations

from typing import ClassVar

from attrs import define
from peft_core.errors import ConfigError
from peft_core.prompt_learning import PromptLearningConfig

__all__ = ["PrefixTuningConfig"]


@define(kw_only=True)
class PrefixTuningConfig(PromptLearningConfig):
    """Configuration of a prefix-tuning adapter (the reference library's ``PrefixTuningConfig``, field for field).

    Every attention layer sees ``num_virtual_tokens`` extra learned keys and values in front of
    the real ones (the prefix is fed as the attention cache). With ``prefix_projection`` the
    prefix is computed by a two-layer MLP from a smaller table, which trains more stably.

    For grouped-query attention models the prefix has the key/value heads' width: ``token_dim``
    and ``num_attention_heads`` are set to ``head_dim * num_key_value_heads`` and
    ``num_key_value_heads`` when the adapter is created (as in the reference).

    >>> from peft_prefix_tuning import PrefixTuningConfig
    >>> PrefixTuningConfig(num_virtual_tokens=4).prefix_projection
    False
    """

    PEFT_TYPE: ClassVar[str] = "PREFIX_TUNING"

    init_weights: str | None = None
    """None: random normal prefixes (or a random MLP); ``"zero"``: zero prefixes (zero keys and
    values; with a projection, a zero last layer)."""
    encoder_hidden_size: int | None = None
    """Hidden width of the projection MLP; None uses ``token_dim``."""
    prefix_projection: bool = False
    """Compute the prefix with an MLP from a ``(num_virtual_tokens, token_dim)`` table."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights must be None or 'zero', got {self.init_weights!r}.")
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"prefix_projection must be True or False, got {self.prefix_projection!r}.")
