"""The prompt table of prompt tuning, and the adapter model that prepends it to the inputs."""

from __future__ import annotations

import torch
from peft_core.prompt_learning import VirtualTokenModel, repeat_to, total_virtual_tokens
from torch import nn

from peft_prompt_tuning.config import PromptTuningConfig, PromptTuningInit

__all__ = ["PromptEmbedding", "PromptTuningModel", "init_token_ids"]


def init_token_ids(config: PromptTuningConfig, word_embeddings: nn.Module, rows: int) -> torch.Tensor | None:
    """The vocabulary ids whose embeddings start the table (None: keep the random init)."""
    if config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB:
        return torch.randint(0, word_embeddings.num_embeddings, (rows,), dtype=torch.long)
    if config.prompt_tuning_init == PromptTuningInit.TEXT:
        from transformers import AutoTokenizer

        options = dict(config.tokenizer_kwargs or {})
        options.pop("trust_remote_code", None)  # never run a tokenizer's own code for an init
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **options)
        ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
        return torch.tensor(repeat_to(list(ids), rows), dtype=torch.long)
    return None


class PromptEmbedding(nn.Module):
    """``embedding`` holds one learned row per virtual token (of every transformer submodule)."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        rows = total_virtual_tokens(config)
        self.embedding = nn.Embedding(rows, config.token_dim)
        if config.inference_mode:  # a checkpoint overwrites the table; no tokenizer needed
            return
        ids = init_token_ids(config, word_embeddings, rows)
        if ids is not None:
            with torch.no_grad():
                rows_of_vocab = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone()
            self.embedding.weight = nn.Parameter(rows_of_vocab.to(torch.float32))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


class PromptTuningModel(VirtualTokenModel):
    """Prompt tuning: the prompt table is the trained parameter itself, so a saved adapter can resume training."""

    loads_trainable = True

    def create_prompt_encoder(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> nn.Module:
        return PromptEmbedding(config, word_embeddings)
