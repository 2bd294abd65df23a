"""peft-core: parameter-efficient fine-tuning with methods as plugins.

Method configs come from installed plugins: ``from peft_core import LoraConfig`` works when
``peft-lora`` is installed and otherwise raises an ImportError naming the package to install.
"""

from __future__ import annotations

from typing import Any

from peft_core.auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from peft_core.config import PeftConfig, TaskType
from peft_core.errors import (
    AdapterLoadError,
    CheckpointShapeError,
    ConfigError,
    CorruptCheckpointError,
    MergeError,
    PeftCoreError,
    TargetModulesError,
    UnknownMethodError,
)
from peft_core.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from peft_core.kbit import prepare_model_for_kbit_training
from peft_core.mapping import get_peft_config, get_peft_model, inject_adapter_in_model
from peft_core.mixed_model import PeftMixedModel
from peft_core.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from peft_core.scaling import rescale_adapter_scale
from peft_core.state_dict import get_peft_model_state_dict, set_peft_model_state_dict

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "CheckpointShapeError",
    "ConfigError",
    "CorruptCheckpointError",
    "MergeError",
    "PeftConfig",
    "PeftCoreError",
    "PeftMixedModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "TargetModulesError",
    "TaskType",
    "UnknownMethodError",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "inject_adapter_in_model",
    "prepare_model_for_compiled_hotswap",
    "prepare_model_for_kbit_training",
    "rescale_adapter_scale",
    "set_peft_model_state_dict",
]

# Config classes of the reference library's methods -> their peft_type, for install hints.
_PLUGIN_CONFIGS = {
    "LoraConfig": "LORA",
    "AdaLoraConfig": "ADALORA",
    "IA3Config": "IA3",
    "LoHaConfig": "LOHA",
    "LoKrConfig": "LOKR",
    "OFTConfig": "OFT",
    "BOFTConfig": "BOFT",
    "VeraConfig": "VERA",
    "HRAConfig": "HRA",
    "PromptTuningConfig": "PROMPT_TUNING",
    "PrefixTuningConfig": "PREFIX_TUNING",
    "PromptEncoderConfig": "P_TUNING",
    "MultitaskPromptTuningConfig": "MULTITASK_PROMPT_TUNING",
    "AdaptionPromptConfig": "ADAPTION_PROMPT",
    "CPTConfig": "CPT",
}


# Other public names of the reference library that a plugin provides -> their peft_type, for install hints.
_PLUGIN_NAMES = {
    "EvaConfig": "LORA",
    "CordaConfig": "LORA",
    "LoftQConfig": "LORA",
    "get_eva_state_dict": "LORA",
    "initialize_lora_eva_weights": "LORA",
    "preprocess_corda": "LORA",
}

_MISSING = object()


def _plugin_export(registry: Any, name: str) -> Any:
    """``name`` from the ``__all__`` of an installed plugin's package (e.g. ``peft_lora.EvaConfig``)."""
    import importlib

    for spec in registry.methods.values():
        package = importlib.import_module(spec.config_cls.__module__.partition(".")[0])
        if name in getattr(package, "__all__", ()):
            return getattr(package, name)
    return _MISSING


def __getattr__(name: str) -> Any:
    """Resolve plugin names (``LoraConfig``, ``EvaConfig``, ...) through the registry on first use."""
    if not name.startswith("_"):
        from peft_core.plugins import get_registry
        from peft_core.registry import plugin_hint

        registry = get_registry()
        found = registry.config_class_by_name(name) if name.endswith("Config") else None
        if found is not None:
            return found
        exported = _plugin_export(registry, name)
        if exported is not _MISSING:
            return exported
        peft_type = _PLUGIN_CONFIGS.get(name) or _PLUGIN_NAMES.get(name)
        if peft_type is not None:
            raise ImportError(
                f"{name} is provided by the {plugin_hint(peft_type)} plugin, which is not installed (or failed to "
                f"load: see `peft-core plugins`). Install it with `pip install {plugin_hint(peft_type)}`."
            )
    raise AttributeError(f"module 'peft_core' has no attribute {name!r}")
