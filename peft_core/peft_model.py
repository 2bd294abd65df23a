"""``PeftModel`` and its task classes: the user-facing wrapper, with the reference library's API."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from peft_core.config import PeftConfig, TaskType
from peft_core.errors import AdapterLoadError
from peft_core.hub import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, resolve_file, split_hub_kwargs
from peft_core.io import atomic_directory, atomic_write_text, load_weights, save_weights
from peft_core.mixed_batch import batch_adapter_names, check_batch_adapter_names
from peft_core.plugins import get_registry
from peft_core.prompt_learning import PromptLearningModel, check_not_mixed
from peft_core.state_dict import get_peft_model_state_dict, set_peft_model_state_dict

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
]


def _base_model_name(model: nn.Module) -> str | None:
    name = model.__dict__.get("name_or_path")
    if name is None:
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return str(name) if name else None


def _uses_checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on in ``model``.

    Its ``is_activation_checkpointing`` asks every module, through ``hasattr``'s slow path on
    ``nn.Module``; the flag is an instance attribute where it is on, so reading ``__dict__`` is
    the same answer for a fraction of the time (and asked before the adapters add modules).
    """
    return any(module.__dict__.get("gradient_checkpointing") for module in model.modules())


def _to_eval(model: nn.Module) -> None:
    """``model.eval()``, skipped when every module is in eval mode already.

    A loaded base usually is, new adapter layers follow it, and ``eval()`` costs an
    ``nn.Module.__setattr__`` per module: a tenth of loading an adapter.
    """
    if any(module.training for module in model.modules()):
        model.eval()


class PeftModel(nn.Module):
    """A base model with adapters of one method, managed under peft's names.

    ``base_model`` is the method's adapter model, whose ``model`` is the wrapped base, so
    parameter names (``base_model.model.<path>...``) and checkpoint keys match the reference
    library's.
    """

    # modules added to ``modules_to_save`` by a task class (e.g. a classification head)
    task_modules_to_save: tuple[str, ...] = ()

    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        *,
        _loading: bool = False,
    ) -> None:
        super().__init__()
        spec = get_registry().method(peft_config.peft_type or "")
        peft_config = self._with_task_modules(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config = peft_config.copy(base_model_name_or_path=_base_model_name(model))
        checkpointing = _uses_checkpointing(model)
        self.base_model = spec.model_cls(
            model,
            peft_config,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            loading=_loading,
        )
        # The wrappers are in the base's mode, as the adapter layers are.
        self.training = self.base_model.training = model.training
        if checkpointing and hasattr(model, "enable_input_require_grads"):
            # With a frozen embedding, checkpointed blocks would see inputs that need no grad and
            # drop the adapters' gradients.
            model.enable_input_require_grads()

    def _with_task_modules(self, config: PeftConfig) -> PeftConfig:
        if not self.task_modules_to_save or not hasattr(config, "modules_to_save"):
            return config
        existing = list(config.modules_to_save or [])
        extra = [m for m in self.task_modules_to_save if m not in existing]
        return config.copy(modules_to_save=existing + extra) if extra else config

    # ------------------------------------------------------------------ forwarding
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapters[0]]

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the adapted model; ``adapter_names=[...]`` picks one adapter per sample.

        ``"__base__"`` in ``adapter_names`` runs that sample through the base model alone.
        """
        if self._prompt_strategy is not None:  # input-side methods route the task themselves
            _refuse_adapter_names(self, kwargs)
            return self._prompt_strategy.prompt_forward(_task_of(self), args, kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        with self._batch_adapters(adapter_names):
            return self.base_model(*args, **kwargs)

    @property
    def _prompt_strategy(self) -> PromptLearningModel | None:
        """The adapter model when the method is prompt learning (it then drives forward and generate)."""
        base = self._modules.get("base_model")
        return base if isinstance(base, PromptLearningModel) else None

    def _batch_adapters(
        self, adapter_names: list[str] | None, *, expandable: bool = False
    ) -> contextlib.AbstractContextManager[None]:
        if adapter_names is None:
            return contextlib.nullcontext()
        names = check_batch_adapter_names(
            adapter_names, self.peft_config, {n: self._method_spec(n) for n in self.peft_config}
        )
        return batch_adapter_names(self.base_model, names, expandable=expandable)

    def _method_spec(self, adapter_name: str) -> Any:
        return get_registry().method(self.peft_config[adapter_name].peft_type or "")

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generate with the adapted model (base models that generate); ``adapter_names=[...]`` as in forward."""
        if self._prompt_strategy is not None:
            _refuse_adapter_names(self, kwargs)
            return self._prompt_strategy.prompt_generate(_task_of(self), args, kwargs)
        return self._generate(*args, **kwargs)

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        with self._batch_adapters(adapter_names, expandable=True):
            return self.get_base_model().generate(*args, **kwargs)

    # ------------------------------------------------------------------ adapters
    def add_adapter(
        self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False
    ) -> None:
        """Add a new, inactive adapter; activate it with :meth:`set_adapter`."""
        check_not_mixed(self, peft_config)
        peft_config = self._with_task_modules(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config = peft_config.copy(base_model_name_or_path=_base_model_name(self.get_base_model()))
        self.base_model.add_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter, or several at once (their effects add up)."""
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block; adapters are untouched afterwards."""
        with self.base_model.disable_adapter():
            yield

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        return self.base_model.merge_and_unload(
            progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str | None = None,
        **options: Any,
    ) -> None:
        """Add ``adapter_name`` as a weighted combination of ``adapters`` (inactive until set_adapter).

        ``combination_type`` names a registered combination strategy (``peft-core plugins`` lists
        them) or a type of the method's own (LoRA's ``cat``, ``svd``); None takes the method's
        default (``svd`` for LoRA, as in the reference). An existing ``adapter_name`` is an error
        rather than a silent no-op.
        """
        if combination_type is not None:
            options["combination_type"] = combination_type
        self.base_model.add_weighted_adapter(adapters, weights, adapter_name, **options)

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = total = 0
        for param in self.parameters():
            count = param.numel()
            if count == 0 and hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3 keeps a placeholder
                count = param.ds_numel
            if param.__class__.__name__ == "Params4bit":  # packed two 4-bit values per byte
                count *= 2
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write each selected adapter in the reference format (non-default ones in subfolders).

        The write is atomic: files appear only once everything was written. With
        ``path_initial_model_for_weight_conversion`` (the adapter as saved right after a PiSSA /
        OLoRA / CorDA init, before training), the adapter is written as the plain adapter that
        gives the same model on the original, unmodified base.
        """
        initial_path = kwargs.pop("path_initial_model_for_weight_conversion", None)
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a directory.")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(
                f"Cannot save unknown adapter(s) {unknown}; available: {list(self.peft_config)}."
            )
        if not is_main_process:
            return
        weights_name = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
        with atomic_directory(save_directory) as staging:
            for name in names:
                out = staging if name == "default" else os.path.join(staging, name)
                os.makedirs(out, exist_ok=True)
                # A gathered full state dict (FSDP, DeepSpeed) supplies the values when given.
                if kwargs.get("state_dict") is None:
                    _refuse_placeholders(self, name)
                state_dict = get_peft_model_state_dict(self, kwargs.get("state_dict"), adapter_name=name)
                config = self._config_to_save(name)
                if initial_path is not None:
                    config, state_dict = self._converted_for_original_base(
                        name, config, state_dict, initial_path
                    )
                save_weights(
                    state_dict, os.path.join(out, weights_name), safe_serialization=safe_serialization
                )
                config.save_pretrained(out)
            if not os.path.exists(os.path.join(save_directory, "README.md")):
                atomic_write_text(os.path.join(staging, "README.md"), self._model_card())

    def _converted_for_original_base(
        self, adapter_name: str, config: PeftConfig, state_dict: dict[str, torch.Tensor], initial_path: Any
    ) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
        initial_path = os.fspath(initial_path)
        subfolder = adapter_name if os.path.isdir(os.path.join(initial_path, adapter_name)) else None
        initial = _read_adapter_weights(initial_path, subfolder, False, {})
        method = get_registry().method(config.peft_type or "").model_cls
        converted, tensors = method.plain_adapter_from_mutated_init(config, initial, state_dict)
        return converted.copy(inference_mode=True), tensors

    def _config_to_save(self, adapter_name: str) -> PeftConfig:
        config = self.peft_config[adapter_name]
        changes: dict[str, Any] = {"inference_mode": True}
        if config.base_model_name_or_path is None:
            changes["base_model_name_or_path"] = _base_model_name(self.get_base_model())
        if config.task_type is None:
            base_cls = type(self.get_base_model())
            changes["auto_mapping"] = {
                "base_model_class": base_cls.__name__,
                "parent_library": base_cls.__module__,
            }
        return config.copy(**changes)

    def _model_card(self) -> str:
        config = self.active_peft_config
        base = config.base_model_name_or_path or _base_model_name(self.get_base_model())
        lines = ["---", "library_name: peft"]
        if base:
            lines.append(f"base_model: {base}")
        lines += ["tags:", f"- {str(config.peft_type).lower()}", "- peft-core", "---", ""]
        lines.append(f"# {config.peft_type} adapter")
        lines.append("")
        lines.append(
            "Saved by peft-core in the Hugging Face peft format (adapter_config.json + adapter_model.safetensors); "
            "it loads with either library."
        )
        return "\n".join(lines) + "\n"

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload adapter",
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        selected_adapters: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Save the adapter(s) to a temporary directory and upload them with ``huggingface_hub``."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, selected_adapters=selected_adapters, **kwargs)
            return api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision
            )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter stored at ``model_id`` (a directory or a Hub repo id).

        If anything fails (missing plugin, corrupt file, shapes that do not fit), ``model`` is
        returned to its original state before the error propagates.
        """
        subfolder = kwargs.pop("subfolder", None)
        allow_pickle = kwargs.pop("allow_pickle", False)
        hub_kwargs, rest = split_hub_kwargs(kwargs)
        if rest:
            warnings.warn(
                f"Ignoring unknown from_pretrained arguments {sorted(rest)}.", UserWarning, stacklevel=2
            )
        local = os.path.join(os.fspath(model_id), subfolder or "")
        if (
            config is None
            and os.path.isfile(os.path.join(local, "peft_mixed_model.json"))
            and not os.path.isfile(os.path.join(local, CONFIG_NAME))
        ):
            raise ValueError(
                f"{os.fspath(model_id)!r} holds a mixed-method model (peft_mixed_model.json); load it with "
                "PeftMixedModel.from_pretrained, or load one of its adapters with subfolder=<adapter name>."
            )
        if config is None:
            config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, **hub_kwargs)
        config = config.copy(inference_mode=not is_trainable)
        # Read the weights before touching the model, so a bad file changes nothing.
        state_dict = _read_adapter_weights(model_id, subfolder, allow_pickle, hub_kwargs)

        task_cls = cls
        if cls is PeftModel and config.task_type is not None:
            task_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[config.task_type]
        peft_model = task_cls(
            model, config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, _loading=True
        )
        try:
            peft_model._load_state_dict_checked(state_dict, adapter_name)
        except BaseException:
            peft_model.base_model.unload()
            raise
        if not is_trainable:
            _to_eval(peft_model)
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | torch.device | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Load another adapter from ``model_id`` under ``adapter_name`` (inactive until set_adapter)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another adapter_name.")
        subfolder = kwargs.pop("subfolder", None)
        allow_pickle = kwargs.pop("allow_pickle", False)
        hub_kwargs, _ = split_hub_kwargs(kwargs)
        config = PeftConfig.from_pretrained(model_id, subfolder=subfolder, **hub_kwargs)
        config = self._with_task_modules(config.copy(inference_mode=not is_trainable))
        state_dict = _read_adapter_weights(model_id, subfolder, allow_pickle, hub_kwargs)
        self.base_model.add_adapter(adapter_name, config, loading=True)
        try:
            result = self._load_state_dict_checked(state_dict, adapter_name)
        except BaseException:
            self.base_model._remove_adapter_everywhere(adapter_name)
            self.base_model.peft_config.pop(adapter_name, None)
            raise
        if torch_device is not None:
            self.to(torch_device)
        if not is_trainable:
            self.eval()
        return result

    def _load_state_dict_checked(self, state_dict: dict[str, torch.Tensor], adapter_name: str) -> Any:
        config = self.peft_config[adapter_name]
        for _name, converter in get_registry().state_dict_converters():
            converted = converter(state_dict, config)
            if converted is not None:
                state_dict = converted
                break
        result = set_peft_model_state_dict(self, state_dict, adapter_name=adapter_name)
        if result.unexpected_keys and not any(k for k in state_dict if k not in result.unexpected_keys):
            raise AdapterLoadError(
                f"None of the {len(state_dict)} checkpoint tensors matches the model (e.g. "
                f"{result.unexpected_keys[:3]}); the adapter was saved from a different base model or method."
            )
        missing = [k for k in result.missing_keys if f".{adapter_name}" in k]
        if missing:
            warnings.warn(
                f"Adapter {adapter_name!r}: the checkpoint lacks {len(missing)} tensor(s) the model expects, e.g. "
                f"{missing[:3]}; those keep their initial values.",
                UserWarning,
                stacklevel=3,
            )
        if result.unexpected_keys:
            warnings.warn(
                f"Adapter {adapter_name!r}: {len(result.unexpected_keys)} checkpoint tensor(s) match no model "
                f"parameter and were ignored, e.g. {result.unexpected_keys[:3]}.",
                UserWarning,
                stacklevel=3,
            )
        return result


def _refuse_placeholders(model: nn.Module, adapter_name: str) -> None:
    """Refuse to write the empty stand-ins that DeepSpeed ZeRO-3 leaves in a process's parameters.

    Saving them writes an adapter that loads as zeros; the reference library has shipped such files.
    """
    # A legitimately empty tensor (an AdaLoRA layer pruned to rank 0) carries no ds_numel.
    empty = [
        key
        for key, param in model.named_parameters()
        if f".{adapter_name}." in f".{key}." and param.numel() == 0 and getattr(param, "ds_numel", 0) > 0
    ]
    if empty:
        raise ValueError(
            f"Adapter {adapter_name!r} has {len(empty)} empty tensor(s) (e.g. {empty[:2]}): the parameters are sharded "
            "and this process holds placeholders. Save from the full state dict, e.g. "
            "save_pretrained(path, state_dict=accelerator.get_state_dict(model)), or gather the parameters first."
        )
    # FSDP2 (fully_shard) leaves each process a DTensor holding only its shard.
    sharded = [
        key
        for key, param in model.named_parameters()
        if f".{adapter_name}." in f".{key}."
        and any(placement.is_shard() for placement in getattr(param, "placements", ()))
    ]
    if sharded:
        raise ValueError(
            f"Adapter {adapter_name!r} has {len(sharded)} sharded tensor(s) (e.g. {sharded[:2]}): under FSDP each "
            "process holds a shard. Gather the full state dict on every process and save it from one, e.g. "
            "save_pretrained(path, state_dict=torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True, cpu_offload=True)), is_main_process=rank == 0)."
        )


def _read_adapter_weights(
    model_id: str | os.PathLike[str], subfolder: str | None, allow_pickle: bool, hub_kwargs: dict[str, Any]
) -> dict[str, torch.Tensor]:
    path = resolve_file(
        model_id, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, missing_ok=True, **hub_kwargs
    )
    if path is None:
        path = resolve_file(model_id, WEIGHTS_NAME, subfolder=subfolder, missing_ok=True, **hub_kwargs)
    if path is None:
        where = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
        raise FileNotFoundError(
            f"No {SAFETENSORS_WEIGHTS_NAME} (or {WEIGHTS_NAME}) found in {where!r} next to {CONFIG_NAME}."
        )
    return load_weights(path, allow_pickle=allow_pickle)


class PeftModelForCausalLM(PeftModel):
    """For decoder-only language models; ``generate`` runs the adapted model."""

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generate with the adapted model; ``adapter_names=[...]`` picks one adapter per sample."""
        if self._prompt_strategy is not None:
            _refuse_adapter_names(self, kwargs)
            return self._prompt_strategy.prompt_generate(_task_of(self), args, kwargs)
        return self._generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    """For encoder-decoder language models; ``generate`` runs the adapted model."""

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generate with the adapted model; ``adapter_names=[...]`` picks one adapter per sample."""
        if self._prompt_strategy is not None:
            _refuse_adapter_names(self, kwargs)
            return self._prompt_strategy.prompt_generate(_task_of(self), args, kwargs)
        return self._generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        return self.get_base_model().prepare_inputs_for_generation(*args, **kwargs)


class PeftModelForSequenceClassification(PeftModel):
    """The classification head (``classifier``/``score``) is fully trained and saved with the adapter."""

    task_modules_to_save = ("classifier", "score")


class PeftModelForTokenClassification(PeftModel):
    task_modules_to_save = ("classifier", "score")


class PeftModelForQuestionAnswering(PeftModel):
    task_modules_to_save = ("qa_outputs",)


class PeftModelForFeatureExtraction(PeftModel):
    """For encoders used as feature extractors."""


def _task_of(model: PeftModel) -> str | None:
    """The task a prompt-learning adapter serves: that of the task class (None for a plain PeftModel)."""
    for task, cls in MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items():
        if isinstance(model, cls):
            return task
    return None


def _refuse_adapter_names(model: PeftModel, kwargs: dict[str, Any]) -> None:
    if kwargs.pop("adapter_names", None) is not None:
        raise TypeError(
            f"{model.base_model.spec.peft_type} does not support mixed-adapter batches (adapter_names=...): its "
            "prompt is shared by the whole batch. Run one call per adapter with set_adapter() instead."
        )


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}
