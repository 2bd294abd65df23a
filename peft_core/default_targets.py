"""Default target modules per transformers ``model_type``, for configs without ``target_modules``.

The reference library keeps one such table for LoRA and uses it for LoHa, LoKr, OFT, BOFT and
HRA as well; methods that follow it register :data:`LORA_STYLE_DEFAULT_TARGETS` as their
``MethodSpec.default_target_modules``, so a config without ``target_modules`` adapts the same
modules in both libraries. A value is a tuple of module names (matched as dotted-name suffixes)
or a regex over full module names.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["LORA_STYLE_DEFAULT_TARGETS"]

_QV_PROJ = ("q_proj", "v_proj")
_QUERY_VALUE = ("query", "value")
_QKV_FUSED = ("query_key_value",)

_NAMES: dict[str, tuple[str, ...]] = {
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": _QV_PROJ,
    "gpt2": ("c_attn",),
    "bloom": _QKV_FUSED,
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "opt": _QV_PROJ,
    "gptj": _QV_PROJ,
    "gpt_neox": _QKV_FUSED,
    "gpt_neo": _QV_PROJ,
    "bert": _QUERY_VALUE,
    "roberta": _QUERY_VALUE,
    "xlm-roberta": _QUERY_VALUE,
    "electra": _QUERY_VALUE,
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "layoutlm": _QUERY_VALUE,
    "llama": _QV_PROJ,
    "llama4": _QV_PROJ,
    "chatglm": _QKV_FUSED,
    "gpt_bigcode": ("c_attn",),
    "mpt": ("Wqkv",),
    "RefinedWebModel": _QKV_FUSED,
    "RefinedWeb": _QKV_FUSED,
    "falcon": _QKV_FUSED,
    "btlm": ("c_proj", "c_attn"),
    "codegen": ("qkv_proj",),
    "mistral": _QV_PROJ,
    "mixtral": _QV_PROJ,
    "stablelm": _QV_PROJ,
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "gemma": _QV_PROJ,
    "gemma2": _QV_PROJ,
    "gemma3_text": _QV_PROJ,
    "qwen2": _QV_PROJ,
    "qwen3": _QV_PROJ,
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}

_REGEXES: dict[str, str] = {
    # multimodal: only the language model's attention, not the vision tower's
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
}

LORA_STYLE_DEFAULT_TARGETS: Mapping[str, tuple[str, ...] | str] = {**_NAMES, **_REGEXES}
"""The reference's LoRA defaults: names per model type, and a regex where names cannot say it
(a multimodal model's language tower only)."""
