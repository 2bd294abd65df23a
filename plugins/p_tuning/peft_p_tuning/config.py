"""``PromptEncoderConfig``: every field of the reference library's P-tuning config, with its name and default."""

from __future__ import annotations

import enum
from typing import Any, ClassVar

from attrs import define, field
from peft_core.errors import ConfigError
from peft_core.prompt_learning import PromptLearningConfig

__all__ = ["PromptEncoderConfig", "PromptEncoderReparameterizationType"]


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network that turns the virtual-token table into prompt embeddings."""

    MLP = "MLP"
    LSTM = "LSTM"

    def __str__(self) -> str:
        return self.value


def _kind(value: Any) -> PromptEncoderReparameterizationType:
    try:
        return PromptEncoderReparameterizationType(getattr(value, "value", value))
    except ValueError:
        raise ConfigError(
            f"encoder_reparameterization_type={value!r} is not one of "
            f"{[k.value for k in PromptEncoderReparameterizationType]}."
        ) from None


@define(kw_only=True)
class PromptEncoderConfig(PromptLearningConfig):
    """Configuration of a P-tuning adapter (the reference library's ``PromptEncoderConfig``, field for field).

    A table of ``num_virtual_tokens`` embeddings goes through an encoder (a 3-layer MLP, or a
    bidirectional LSTM with an MLP on top) whose output is prepended to the input embeddings.

    >>> from peft_p_tuning import PromptEncoderConfig
    >>> PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="LSTM").encoder_num_layers
    2
    """

    PEFT_TYPE: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: PromptEncoderReparameterizationType = field(
        default=PromptEncoderReparameterizationType.MLP, converter=_kind
    )
    encoder_hidden_size: int | None = None
    """Hidden width of the encoder; None uses ``token_dim``."""
    encoder_num_layers: int = 2
    """LSTM layers (the MLP always has three linear layers, as in the reference)."""
    encoder_dropout: float = 0.0
    """Dropout between LSTM layers."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError(
                f"encoder_hidden_size must be positive or None, got {self.encoder_hidden_size!r}."
            )
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}.")
