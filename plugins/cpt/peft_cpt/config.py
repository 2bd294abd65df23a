"""``CPTConfig``: every field of the reference library's CPT config, with its name and default."""

from __future__ import annotations

from typing import ClassVar

from attrs import define
from peft_core.errors import ConfigError
from peft_core.prompt_learning import PromptLearningConfig

__all__ = ["CPTConfig"]


@define(kw_only=True)
class CPTConfig(PromptLearningConfig):
    """Configuration of a CPT adapter (the reference library's ``CPTConfig``, field for field).

    The prompt is the embeddings of ``cpt_token_ids`` (an in-context example: templates, inputs,
    outputs) plus learned deltas kept within an epsilon ball per token type. Token types
    (``cpt_tokens_type_mask``, per token: ``4k+1`` input template, ``4k+2`` input, ``4k+3``
    output template, ``4k+4`` output of example ``k``) decide which deltas train, how far they may
    move, and which positions count in the loss. Causal LMs only.

    >>> from peft_cpt import CPTConfig
    >>> CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[5, 6]).cpt_mask
    [1, 1]
    """

    PEFT_TYPE: ClassVar[str] = "CPT"

    cpt_token_ids: list[int] | None = None
    """Token ids of the prompt (None: ``[0]``); ``num_virtual_tokens`` is their count."""
    cpt_mask: list[int] | None = None
    cpt_tokens_type_mask: list[int] | None = None
    """Type of each prompt token (None: all 1, input templates)."""
    opt_weighted_loss_type: str | None = "none"
    """``"none"``, or ``"decay"``: earlier examples' outputs weigh ``opt_loss_decay_factor`` times less."""
    opt_loss_decay_factor: float | None = 1.0
    opt_projection_epsilon: float | None = 0.1
    """Radius (scaled by sqrt(token_dim / 2048)) of the deltas of input tokens."""
    opt_projection_format_epsilon: float | None = 0.1
    """Radius of the deltas of template tokens."""
    tokenizer_name_or_path: str | None = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.task_type != "CAUSAL_LM":
            raise ConfigError(f"CPTConfig only supports task_type='CAUSAL_LM', got {self.task_type!r}.")
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]
        self.num_virtual_tokens = len(self.cpt_token_ids)
        self.num_transformer_submodules = 1
        if self.cpt_mask is None:
            self.cpt_mask = [1] * self.num_virtual_tokens
        if self.cpt_tokens_type_mask is None:
            self.cpt_tokens_type_mask = [1] * self.num_virtual_tokens
        if not len(self.cpt_mask) == len(self.cpt_tokens_type_mask) == self.num_virtual_tokens:
            raise ConfigError(
                f"cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length, got "
                f"{self.num_virtual_tokens}, {len(self.cpt_mask)} and {len(self.cpt_tokens_type_mask)}."
            )
        if self.opt_weighted_loss_type not in ("none", "decay"):
            raise ConfigError(
                f"opt_weighted_loss_type must be 'none' or 'decay', got {self.opt_weighted_loss_type!r}."
            )
