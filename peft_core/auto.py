"""``AutoPeftModel*``: load the base model an adapter names, then the adapter, in one call.

transformers is imported only when one of these classes is used, so the core keeps working
without it.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, ClassVar

from peft_core.config import PeftConfig
from peft_core.errors import ConfigError
from peft_core.hub import resolve_file, split_hub_kwargs
from peft_core.peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

__all__ = [
    "DEFAULT_IMPORT_ALLOWLIST",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
]

DEFAULT_IMPORT_ALLOWLIST = ("transformers", "diffusers")
"""Libraries an adapter's ``auto_mapping`` may name for its base class (importing runs their code)."""

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


class _AutoPeftModel:
    _auto_class: ClassVar[str | None] = None  # the transformers auto class that loads the base
    _peft_class: ClassVar[type[PeftModel]] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(
            f"{type(self).__name__} is not instantiated; call {type(self).__name__}.from_pretrained(path)."
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | tuple[str, ...] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base model named by the adapter's ``base_model_name_or_path``, then the adapter.

        ``kwargs`` go to the base model's ``from_pretrained`` (``torch_dtype``, ``device_map``, ...)
        and to the adapter's. A tokenizer saved next to the adapter is loaded (growing the
        embeddings if it has more tokens) and attached as ``model.tokenizer``.
        """
        hub_kwargs, _ = split_hub_kwargs(dict(kwargs))
        adapter_config = config or PeftConfig.from_pretrained(
            pretrained_model_name_or_path, revision=revision, **hub_kwargs
        )
        base_path = adapter_config.base_model_name_or_path
        if not base_path:
            raise ConfigError(
                f"The adapter at {os.fspath(pretrained_model_name_or_path)!r} does not name its base model "
                "(base_model_name_or_path is empty); load the base yourself and use PeftModel.from_pretrained."
            )
        target = cls._base_class(adapter_config, import_allowlist or DEFAULT_IMPORT_ALLOWLIST)
        base_kwargs = {
            k: v for k, v in kwargs.items() if k not in ("subfolder", "allow_pickle", "low_cpu_mem_usage")
        }
        if adapter_config.revision:
            base_kwargs.setdefault("revision", adapter_config.revision)
        base = target.from_pretrained(base_path, **base_kwargs)
        tokenizer = _load_tokenizer(pretrained_model_name_or_path, revision, hub_kwargs, kwargs)
        if tokenizer is not None and hasattr(base, "get_input_embeddings"):
            if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
                base.resize_token_embeddings(len(tokenizer))
        adapter_kwargs = {
            k: v for k, v in kwargs.items() if k in ("subfolder", "allow_pickle", "low_cpu_mem_usage")
        }
        model = cls._peft_class.from_pretrained(
            base,
            pretrained_model_name_or_path,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            config=config,
            **({"revision": revision} if revision else {}),
            **hub_kwargs,
            **adapter_kwargs,
        )
        model.tokenizer = tokenizer
        return model

    @classmethod
    def _base_class(cls, config: PeftConfig, allowlist: list[str] | tuple[str, ...]) -> Any:
        task_type = config.task_type
        if task_type is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(str(task_type))
            if cls._auto_class is None:
                raise ConfigError(
                    f"The adapter's task_type is {task_type!r}; use the AutoPeftModel class for that task "
                    f"(AutoPeftModelFor{expected.__name__.removeprefix('PeftModelFor') if expected else '...'})."
                )
            if expected is not None and expected is not cls._peft_class:
                raise ConfigError(
                    f"The adapter's task_type {task_type!r} needs {expected.__name__}, but {cls.__name__} builds a "
                    f"{cls._peft_class.__name__}; use the AutoPeftModel class for that task."
                )
        if cls._auto_class is not None:
            return getattr(importlib.import_module("transformers"), cls._auto_class)
        mapping = config.auto_mapping or {}
        library, class_name = mapping.get("parent_library"), mapping.get("base_model_class")
        if not library or not class_name:
            raise ConfigError(
                "The adapter config has neither task_type nor auto_mapping, so the base model's class is unknown; use "
                "a task-specific AutoPeftModelFor... class, or load the base yourself."
            )
        if library.split(".")[0] not in allowlist:
            raise ConfigError(
                f"The adapter's auto_mapping wants to import {library!r}, which is not in the import allowlist "
                f"{list(allowlist)}. If that library is safe, pass import_allowlist=[..., {library.split('.')[0]!r}]."
            )
        return getattr(importlib.import_module(library), class_name)


def _load_tokenizer(
    path: str | os.PathLike[str], revision: str | None, hub_kwargs: dict[str, Any], kwargs: dict[str, Any]
) -> Any:
    options = {**hub_kwargs, **({"revision": revision} if revision else {})}
    found = resolve_file(path, TOKENIZER_CONFIG_NAME, missing_ok=True, **options)
    if found is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        os.path.dirname(found), trust_remote_code=kwargs.get("trust_remote_code", False)
    )


class AutoPeftModel(_AutoPeftModel):
    """For adapters without a task type; the base class comes from the config's ``auto_mapping``."""


class AutoPeftModelForCausalLM(_AutoPeftModel):
    _auto_class = "AutoModelForCausalLM"
    _peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    _auto_class = "AutoModelForSeq2SeqLM"
    _peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    _auto_class = "AutoModelForSequenceClassification"
    _peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    _auto_class = "AutoModelForTokenClassification"
    _peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_AutoPeftModel):
    _auto_class = "AutoModelForQuestionAnswering"
    _peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    _auto_class = "AutoModel"
    _peft_class = PeftModelForFeatureExtraction
