"""PiSSA / OLoRA / CorDA adapters to plain LoRA: the form that loads on the untouched base.

Those inits move part of the base weight into the adapter (``W = W_res + B0 A0``) and train from
there, so the trained adapter only makes sense on the residual base. The change training made is
``B A - B0 A0 = [B | -B0] [A ; A0]``: a LoRA of twice the rank, with the scale kept by doubling
alpha (``sqrt(2)`` under rsLoRA, where the scale is ``alpha / sqrt(r)``).
"""

from __future__ import annotations

import math

import torch
from peft_core.errors import ConfigError

from peft_lora.config import LoraConfig

__all__ = ["plain_lora_from_mutated_init"]


def plain_lora_from_mutated_init(
    config: LoraConfig, initial: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The plain-LoRA config and tensors equal to ``trained`` minus ``initial``, on the original base."""
    if config.use_dora:
        raise ConfigError(
            "A DoRA adapter cannot be converted: its magnitude does not split into a difference."
        )
    missing = sorted(
        k for k in trained if ("lora_A" in k or "lora_B" in k or "lora_embedding" in k) and k not in initial
    )
    if missing:
        raise ConfigError(
            f"The initial adapter lacks {len(missing)} tensor(s) of the trained one, e.g. {missing[:3]}; pass the "
            "adapter saved right after initialisation, before training."
        )
    tensors = {}
    for key, value in trained.items():
        start = initial.get(key)
        if ".lora_A." in key or key.endswith(".lora_embedding_A"):
            tensors[key] = torch.cat([value, start.to(value.dtype)], dim=0)
        elif ".lora_B." in key and key.endswith(".bias"):
            tensors[key] = value - start.to(value.dtype)
        elif ".lora_B." in key or key.endswith(".lora_embedding_B"):
            tensors[key] = torch.cat([value, -start.to(value.dtype)], dim=1)
        else:
            tensors[key] = value  # modules_to_save copies, biases: the trained values
    factor = math.sqrt(2) if config.use_rslora else 2
    converted = config.copy(
        init_lora_weights=True,
        r=2 * config.r,
        lora_alpha=config.lora_alpha * factor,
        rank_pattern={k: 2 * v for k, v in (config.rank_pattern or {}).items()},
        alpha_pattern={k: v * factor for k, v in (config.alpha_pattern or {}).items()},
    )
    return converted, tensors
