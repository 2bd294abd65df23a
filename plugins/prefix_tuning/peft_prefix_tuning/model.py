"""The prefix encoder, and the adapter model that turns its output into a ``transformers`` cache."""

from __future__ import annotations

from typing import Any

import torch
from peft_core.errors import ConfigError
from peft_core.prompt_learning import PrefixCacheModel, fill_model_dimensions
from peft_core.tuner import model_config_dict
from torch import nn

from peft_prefix_tuning.config import PrefixTuningConfig

__all__ = ["PrefixEncoder", "PrefixTuningModel"]


class PrefixEncoder(nn.Module):
    """Maps prefix positions ``(batch, n)`` to flattened keys and values ``(batch, n, layers * 2 * token_dim)``.

    Without a projection (and for any adapter in inference mode, which a checkpoint fills with
    the materialised prefix) ``embedding`` holds the prefix itself; with one, ``transform`` (an
    MLP) computes it from an ``embedding`` of width ``token_dim``.
    """

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        width = config.num_layers * 2 * config.token_dim
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        zero = config.init_weights == "zero"
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width),
            )
            if zero:
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if zero:
                nn.init.zeros_(self.embedding.weight)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(prefix)
        return self.transform(embedded) if self.prefix_projection else embedded


class PrefixTuningModel(PrefixCacheModel):
    """Prefix tuning: the materialised prefix is saved as ``prompt_embeddings`` (inference-only reload)."""

    def create_prompt_encoder(self, config: PrefixTuningConfig, word_embeddings: nn.Module) -> nn.Module:
        if any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules()):
            raise ConfigError(
                "Prefix tuning feeds its prefix as the attention cache, which gradient checkpointing does not keep; "
                "disable gradient checkpointing (model.gradient_checkpointing_disable())."
            )
        return PrefixEncoder(config)

    def prepare_config(self, config: PrefixTuningConfig) -> PrefixTuningConfig:
        config = fill_model_dimensions(config, self.model)
        model_config = model_config_dict(self.model)
        if isinstance(model_config.get("text_config"), dict):
            model_config = model_config["text_config"]
        kv_heads = model_config.get("num_key_value_heads")
        if kv_heads is not None:
            # Grouped-query attention caches num_key_value_heads heads, so the prefix has their width.
            head_dim = model_config.get("head_dim") or config.token_dim // config.num_attention_heads
            config = config.copy(token_dim=head_dim * kv_heads, num_attention_heads=kv_heads)
        if config.encoder_hidden_size is None:
            config = config.copy(encoder_hidden_size=config.token_dim)
        return config

    def prompt_cache(self, batch_size: int) -> Any:
        from transformers import DynamicCache, EncoderDecoderCache

        name = self.active_adapters[0]
        config = self.peft_config[name]
        table = self.prompt_table(name)  # (num_virtual_tokens, layers * 2 * token_dim)
        dtype = getattr(self.model, "dtype", None)
        if isinstance(dtype, torch.dtype):
            table = table.to(dtype)
        heads = config.num_attention_heads
        kv = table.view(config.num_virtual_tokens, config.num_layers * 2, heads, config.token_dim // heads)
        kv = kv.unsqueeze(0).expand(batch_size, -1, -1, -1, -1)
        # -> (layers * 2, batch, heads, num_virtual_tokens, head_dim): keys and values of each layer
        kv = kv.permute(2, 0, 3, 1, 4)
        count = config.num_layers
        if config.num_transformer_submodules == 2:
            # Encoder-decoder: the prefix goes to the decoder's self-attention; cross-attention is
            # recomputed from the encoder output (its cache starts empty). The reference lays the
            # table out so that decoder layer i reads the table's layer 2i mod num_layers; files
            # written by either library only give the same outputs with the same layout.
            sources = [(2 * i) % count for i in range(count)]
            layers = [(kv[2 * j], kv[2 * j + 1]) for j in sources]
            return EncoderDecoderCache(DynamicCache(layers), DynamicCache())
        return DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(count)])
