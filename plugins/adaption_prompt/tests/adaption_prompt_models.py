"""Tiny Llama / Mistral / Qwen2 causal LMs (built from configs, no downloads) and padded batches."""

from __future__ import annotations

import torch
from peft_core.testing.models import ModelCase
from torch import nn

VOCAB = 48
PAD = 0
FAMILIES = ("llama", "mistral", "qwen2")


def tiny_lm(
    family: str = "llama",
    *,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    layers: int = 3,
    seed: int | None = 0,
) -> nn.Module:
    """A causal LM of ``family`` with grouped-query attention in eval mode (``seed=None``: the current RNG)."""
    import transformers

    names = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    }
    config_name, model_name = names[family]
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden + hidden // 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    if seed is None:
        return getattr(transformers, model_name)(config).eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return getattr(transformers, model_name)(config).eval()


def padded_batch(seed: int = 0, lengths: tuple[int, ...] = (6, 3)) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, padded on the left with ``PAD``."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(2, VOCAB, (length,), generator=generator)
        mask[row, width - length :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def lm_case(
    family: str, hidden: int, heads: int, kv_heads: int, layers: int, lengths: tuple[int, ...]
) -> ModelCase:
    """A kit model case: ``family`` with the given sizes, fed a left-padded batch of ``lengths``."""
    return ModelCase(
        name=f"{family}_h{hidden}_heads{heads}_kv{kv_heads}_layers{layers}_len{'-'.join(map(str, lengths))}",
        layer_kind="llama",
        builder=lambda: tiny_lm(
            family, hidden=hidden, heads=heads, kv_heads=kv_heads, layers=layers, seed=None
        ),
        input_maker=lambda g: padded_batch(int(torch.randint(0, 2**16, (1,), generator=g)), lengths),
        target_modules=("self_attn",),
    )


def layers_of(case: ModelCase) -> int:
    """The number of decoder layers of a case built by :func:`lm_case`."""
    return int(case.name.split("_layers")[1].split("_")[0])


def open_gates(model: nn.Module, adapter_name: str, seed: int) -> None:
    """Give ``adapter_name``'s gates seeded non-zero values, as training would (a fresh gate is 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(f"adaption_gate.{adapter_name}"):
                value = 0.5 + torch.rand(param.shape, generator=generator)
                sign = 1.0 if torch.rand(1, generator=generator).item() < 0.5 else -1.0
                param.copy_(sign * value.to(param))
