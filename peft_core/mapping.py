"""Entry points that build adapter models: ``get_peft_model`` and ``inject_adapter_in_model``."""

from __future__ import annotations

from torch import nn

from peft_core.config import PeftConfig
from peft_core.peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel
from peft_core.plugins import get_registry
from peft_core.prompt_learning import check_not_mixed

__all__ = ["get_peft_config", "get_peft_model", "inject_adapter_in_model"]


def get_peft_config(config_dict: dict) -> PeftConfig:
    """The config object of the method that ``config_dict["peft_type"]`` names (its plugin must be installed)."""
    return PeftConfig.from_dict(config_dict)


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config``.

    With ``mixed=True`` the result is a :class:`~peft_core.PeftMixedModel`, which takes adapters
    of every method whose plugin declares itself mixable.

    The task class follows ``peft_config.task_type`` (e.g. ``CAUSAL_LM`` gives a
    :class:`~peft_core.PeftModelForCausalLM` with ``generate``); without one, a plain
    :class:`~peft_core.PeftModel`.

    >>> from peft_core import LoraConfig, get_peft_model  # doctest: +SKIP
    >>> peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
    """
    if revision is not None:
        peft_config = peft_config.copy(revision=revision)
    if mixed:
        from peft_core.mixed_model import PeftMixedModel

        return PeftMixedModel(model, peft_config, adapter_name)
    check_not_mixed(model, peft_config)
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type or "", PeftModel)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)


def inject_adapter_in_model(
    peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default", low_cpu_mem_usage: bool = False
) -> nn.Module:
    """Add adapter layers to ``model`` in place and return it, without a ``PeftModel`` wrapper.

    The configs are attached as ``model.peft_config`` so that
    :func:`~peft_core.get_peft_model_state_dict` works on the result.
    """
    spec = get_registry().method(peft_config.peft_type or "")
    if spec.capabilities.prompt_learning:
        raise TypeError(
            f"{spec.peft_type} is a prompt-learning method: it changes the model's inputs, not its layers, so there "
            "is nothing to inject. Use get_peft_model() instead."
        )
    adapter_model = spec.model_cls(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    model.peft_config = adapter_model.peft_config
    return adapter_model.model
