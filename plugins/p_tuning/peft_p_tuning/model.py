"""The P-tuning prompt encoder, and the adapter model that prepends its output to the inputs."""

from __future__ import annotations

import warnings

import torch
from peft_core.prompt_learning import VirtualTokenModel, total_virtual_tokens
from torch import nn

from peft_p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType

__all__ = ["PromptEncoder", "PromptEncoderModel"]

_MLP_LAYERS = 2  # the reference's default encoder_num_layers; its MLP has a fixed depth regardless


class PromptEncoder(nn.Module):
    """``embedding`` (one row per virtual token) followed by ``mlp_head`` (and ``lstm_head`` for LSTM).

    In inference mode only ``embedding`` exists: a saved adapter holds the encoder's output
    (the materialised prompt), which then is the table itself.
    """

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(total_virtual_tokens(config), dim)
        if config.inference_mode:
            return
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim)
            )
        else:
            if config.encoder_num_layers != _MLP_LAYERS:
                warnings.warn(
                    f"encoder_num_layers={config.encoder_num_layers} is ignored by the MLP encoder, which always has "
                    "three linear layers (as in the reference).",
                    UserWarning,
                    stacklevel=4,
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, dim),
            )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if "mlp_head" not in self._modules:  # inference mode: the table is the prompt
            return embeds
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            embeds = self.lstm_head(embeds)[0]
        return self.mlp_head(embeds)


class PromptEncoderModel(VirtualTokenModel):
    """P-tuning: saving materialises the encoder's output as ``prompt_embeddings`` (the reference's
    format), so a saved adapter loads for inference only."""

    def create_prompt_encoder(self, config: PromptEncoderConfig, word_embeddings: nn.Module) -> nn.Module:
        return PromptEncoder(config)
