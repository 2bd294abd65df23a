"""Modules AdaLoRA adapts by default, per transformers ``model_type``, when ``target_modules`` is None.

These are the reference library's AdaLoRA defaults (its
``TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING``), so a config without ``target_modules``
adapts the same modules in both libraries. They differ from LoRA's for some model types (t5, bart,
opt, roberta, ... adapt more modules).
"""

from __future__ import annotations

__all__ = ["DEFAULT_TARGET_MODULES", "DEFAULT_TARGET_REGEXES"]

_QV_PROJ = ("q_proj", "v_proj")
_ATTENTION_AND_MLP = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "t5": ("q", "k", "v", "o", "wi", "wo"),
    "mt5": ("q", "k", "v", "o", "wi_0", "wi_1", "wo"),
    "bart": _ATTENTION_AND_MLP,
    "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
    "opt": _ATTENTION_AND_MLP,
    "gptj": _QV_PROJ,
    "gpt_neox": ("query_key_value",),
    "gpt_neo": _QV_PROJ,
    "llama": _QV_PROJ,
    "llama4": _QV_PROJ,
    "bert": ("query", "value"),
    "roberta": ("query", "key", "value", "dense"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
    "gpt_bigcode": ("c_attn",),
    "deberta": ("in_proj",),
    "gemma": _QV_PROJ,
    "gemma2": _QV_PROJ,
    "gemma3_text": _QV_PROJ,
    "qwen2": _QV_PROJ,
    "qwen3": _QV_PROJ,
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
"""Lists of module names (matched as dotted-name suffixes)."""

DEFAULT_TARGET_REGEXES: dict[str, str] = {
    # multimodal: only the language model's attention, not the vision tower's
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
}
"""Model types whose defaults are a regex over full module names."""
