"""Input-side (prompt-learning) methods: the strategy ``PeftModel``'s task classes call.

Layer-wrapping methods change modules inside the base model; prompt-learning methods leave the
base untouched and change what it is fed: learned *virtual tokens* prepended to the input
embeddings (prompt tuning, P-tuning) or a learned key/value *prefix cache* (prefix tuning). The
task logic around that (attention-mask padding, labels of virtual positions, generation) is the
same for every such method, so it lives here, once; a plugin only says how its prompts are made.

A plugin's :class:`~peft_core.registry.MethodSpec` names, as ``model_cls``, a subclass of

* :class:`VirtualTokenModel`: implement :meth:`PromptLearningModel.create_prompt_encoder`; its
  module maps virtual-token indices ``(batch, n)`` to embeddings ``(batch, n, token_dim)``;
* :class:`PrefixCacheModel`: implement ``create_prompt_encoder`` and :meth:`PrefixCacheModel.prompt_cache`.

and declares ``Capabilities(prompt_learning=True, mergeable=False, mixable=False)``. The core
then routes ``forward``/``generate`` of every task class through the model class, and saves each
adapter as ``prompt_embeddings`` (plus ``modules_to_save`` copies) in the reference's key format.
No core change is needed for a new input-side method.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from attrs import define, field
from torch import nn

from peft_core.config import PeftConfig, TaskType
from peft_core.errors import ConfigError
from peft_core.layer import AdapterLayer
from peft_core.modules_to_save import ModulesToSaveWrapper
from peft_core.plugins import get_registry
from peft_core.tuner import AdapterModel, _check_adapter_name, model_config_dict

__all__ = [
    "PROMPT_EMBEDDINGS_KEY",
    "PrefixCacheModel",
    "PromptLearningConfig",
    "PromptLearningModel",
    "VirtualTokenModel",
    "check_not_mixed",
    "fill_model_dimensions",
    "find_word_embeddings",
]

PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"
"""The checkpoint key of a prompt-learning adapter's (materialised) prompt table, as the reference writes it."""

StateEntry = tuple[str, str, torch.Tensor, Callable[[torch.Tensor], None]]


def _positive_or_none(name: str) -> Callable[[Any, Any, Any], None]:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer or None, got {value!r}.")

    return check


def _optional_names(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return list(value)


@define(kw_only=True)
class PromptLearningConfig(PeftConfig):
    """Fields every prompt-learning config shares (the reference's names and defaults).

    ``token_dim``, ``num_layers``, ``num_attention_heads`` and ``num_transformer_submodules`` may
    stay None: they are read from the base model's config when the adapter is created, and the
    filled-in values are what ``adapter_config.json`` records (as the reference does).
    """

    IS_PROMPT_LEARNING: ClassVar[bool] = True

    num_virtual_tokens: int | None = field(default=None, validator=_positive_or_none("num_virtual_tokens"))
    token_dim: int | None = field(default=None, validator=_positive_or_none("token_dim"))
    num_transformer_submodules: int | None = field(
        default=None, validator=_positive_or_none("num_transformer_submodules")
    )
    num_attention_heads: int | None = field(default=None, validator=_positive_or_none("num_attention_heads"))
    num_layers: int | None = field(default=None, validator=_positive_or_none("num_layers"))
    modules_to_save: list[str] | None = field(default=None, converter=_optional_names)


# ---------------------------------------------------------------------- model inspection
def _first_key(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def fill_model_dimensions(config: PromptLearningConfig, model: nn.Module) -> PromptLearningConfig:
    """``config`` with the dimensions it leaves None read from ``model``'s config (the reference's rules)."""
    model_config = model_config_dict(model)
    if isinstance(model_config.get("text_config"), dict):  # vision-language models: the language part
        model_config = model_config["text_config"]
    changes: dict[str, Any] = {}
    if config.num_layers is None:
        layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        layers = layers or _first_key(model_config, ("num_hidden_layers", "num_layers", "n_layer"))
        if layers is None:
            raise ConfigError("Cannot read the number of layers from the model's config; set num_layers.")
        changes["num_layers"] = int(layers)
    if config.token_dim is None:
        dim = _first_key(model_config, ("hidden_size", "n_embd", "d_model"))
        if dim is None:
            raise ConfigError("Cannot read the hidden size from the model's config; set token_dim.")
        changes["token_dim"] = int(dim)
    if config.num_attention_heads is None:
        heads = _first_key(
            model_config, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
        )
        if heads is None:
            raise ConfigError(
                "Cannot read the number of attention heads from the model's config; set num_attention_heads."
            )
        changes["num_attention_heads"] = int(heads)
    if config.num_transformer_submodules is None:
        changes["num_transformer_submodules"] = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM.value else 1
    return config.copy(**changes) if changes else config


def find_word_embeddings(model: nn.Module) -> nn.Module:
    """The base model's token embedding module (the one whose rows virtual tokens live among)."""
    with contextlib.suppress(AttributeError):
        return model.get_submodule("embeddings.word_embeddings")
    getter = getattr(type(model), "get_input_embeddings", None)
    if getter is not None:
        with contextlib.suppress(NotImplementedError, AttributeError):
            found = model.get_input_embeddings()
            if isinstance(found, nn.Module):
                return found
    vocab = model_config_dict(model).get("vocab_size")
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings == vocab:
            return module
    raise ConfigError(
        f"Cannot find the word embeddings of {type(model).__name__}: it has no get_input_embeddings() and no "
        "nn.Embedding with vocab_size rows. Prompt-learning methods need a model that embeds token ids."
    )


def check_not_mixed(model: nn.Module, config: PeftConfig) -> None:
    """Refuse to put a prompt-learning adapter and a layer adapter on one model.

    Prompt-learning methods declare ``mixable=False``: their adapter model owns the whole input
    path (embeddings, attention masks, the cache and generation), which another method's adapter
    model wrapping the same base would bypass or see shifted by the virtual tokens.
    """
    spec = get_registry().method(config.peft_type or "")
    prompt_models, layer_types = [], set()
    for module in model.modules():
        if isinstance(module, PromptLearningModel):
            prompt_models.append(module)
        elif isinstance(module, AdapterLayer):
            layer_types.add(type(module).__name__)
    if spec.capabilities.prompt_learning:
        layered = sorted(layer_types)
        # More adapters of the same method are that method's model's business (one active at a time).
        prompt_models = [m for m in prompt_models if m.spec.peft_type != spec.peft_type]
        if layered or prompt_models:
            held = ", ".join(layered) or "a prompt-learning adapter model"
            raise ConfigError(
                f"Cannot add a {spec.peft_type} adapter to a model that already holds other adapters ({held}): "
                f"{spec.peft_type} is a prompt-learning method (mixable=False), which owns the model's inputs and "
                "cannot be combined with another method on one model. Use a fresh base model, or unload() the "
                "other adapters first."
            )
    elif prompt_models:
        method = prompt_models[0].spec.peft_type
        raise ConfigError(
            f"Cannot add a {spec.peft_type} adapter to a model holding a {method} adapter: {method} is a "
            "prompt-learning method (mixable=False), which owns the model's inputs and cannot be combined with "
            "another method on one model. Use a fresh base model."
        )


# ---------------------------------------------------------------------- the strategy
class PromptLearningModel(AdapterModel):
    """The base of every input-side method's ``model_cls``: prompt modules per adapter, and the task routing.

    ``model`` is the untouched base model; ``prompt_encoder[adapter]`` is the module a plugin
    builds in :meth:`create_prompt_encoder`. One adapter is active at a time. The task classes call
    :meth:`prompt_forward` and :meth:`prompt_generate`; a subclass defines how the prompt reaches
    the model (:class:`VirtualTokenModel`, :class:`PrefixCacheModel`).
    """

    loads_trainable: ClassVar[bool] = False
    """Whether ``from_pretrained(..., is_trainable=True)`` may resume training. The file holds the
    materialised prompt table only (no encoder weights), so by default, as in the reference, a
    loaded prompt-learning adapter is for inference."""

    _prompts_disabled: bool = False
    """Set inside ``disable_adapter()``: forward and generate then run the base model alone."""

    # ------------------------------------------------------------------ to implement
    def create_prompt_encoder(self, config: PromptLearningConfig, word_embeddings: nn.Module) -> nn.Module:
        """Build the prompt module of one adapter from its (dimension-filled) config.

        The module must have an ``embedding`` (``nn.Embedding``) whose weight holds the prompt table in
        inference mode: that is where a loaded ``prompt_embeddings`` tensor goes.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement create_prompt_encoder(config, word_embeddings)"
        )

    def prepare_config(self, config: PromptLearningConfig) -> PromptLearningConfig:
        """The config to store: dimensions filled in from the model (override to adjust, e.g. for GQA)."""
        config = fill_model_dimensions(config, self.model)
        if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
            config = config.copy(encoder_hidden_size=config.token_dim)
        return config

    def prompt_rows(self, config: PromptLearningConfig) -> int:
        """How many rows of the prompt table are saved (all virtual tokens of every submodule)."""
        return config.num_virtual_tokens * config.num_transformer_submodules

    def prompt_table(self, adapter_name: str) -> torch.Tensor:
        """The adapter's prompt table ``(rows, width)``, computed by its encoder (materialised).

        In inference mode the table is the encoder's ``embedding.weight`` itself (what loading wrote).
        """
        config = self.peft_config[adapter_name]
        encoder = self.prompt_encoder[adapter_name]
        if config.inference_mode:
            return encoder.embedding.weight
        rows = self.prompt_rows(config)
        indices = torch.arange(rows, device=encoder.embedding.weight.device).unsqueeze(0)
        return encoder(indices)[0]

    # ------------------------------------------------------------------ adapters
    @property
    def active_config(self) -> PromptLearningConfig:
        return self.peft_config[self.active_adapters[0]]  # type: ignore[return-value]

    def inject_adapter(self, adapter_name: str, config: PeftConfig, *, loading: bool = False) -> None:
        """Add ``adapter_name``: build its prompt module and its ``modules_to_save`` copies; freeze the base."""
        if adapter_name in self.peft_config:
            raise ValueError(
                f"An adapter named {adapter_name!r} already exists; delete it or pick another name."
            )
        _check_adapter_name(adapter_name)
        spec = get_registry().method(config.peft_type or "")
        if spec.peft_type != self.spec.peft_type:
            raise ConfigError(
                f"Cannot add a {spec.peft_type} adapter to a model holding {self.spec.peft_type} adapters: "
                f"{self.spec.peft_type} is a prompt-learning method (mixable=False), which owns the model's inputs "
                "and cannot be combined with another method on one model."
            )
        if not isinstance(config, PromptLearningConfig):
            raise ConfigError(f"{type(config).__name__} is not a PromptLearningConfig.")
        if loading and not config.inference_mode and not self.loads_trainable:
            raise ConfigError(
                f"A saved {spec.peft_type} adapter holds only its materialised prompt table, not the encoder that "
                "made it, so it cannot be loaded for further training (is_trainable=True), as in the reference "
                "library. Load it with is_trainable=False, or create a new adapter to train."
            )
        check_not_mixed(self.model, config)
        if config.num_virtual_tokens is None:
            raise ConfigError(f"{type(config).__name__}.num_virtual_tokens must be set (a positive integer).")
        config = self.prepare_config(config)
        embeddings = find_word_embeddings(self.model)
        encoder = self.create_prompt_encoder(config, embeddings)
        weight = getattr(embeddings, "weight", None)
        if isinstance(weight, torch.Tensor):
            encoder = encoder.to(weight.device)
        if "prompt_encoder" not in self._modules:  # the first adapter, from AdapterModel.__init__
            self.prompt_encoder = nn.ModuleDict()
        self.peft_config[adapter_name] = config
        try:
            self.prompt_encoder[adapter_name] = encoder
            self._add_modules_to_save(adapter_name, config)
        except BaseException:
            self._remove_adapter_everywhere(adapter_name)
            del self.peft_config[adapter_name]
            raise
        if config.inference_mode:  # loaded for inference: nothing of it trains
            encoder.requires_grad_(False)
        encoder.train(self.model.training)
        self.set_adapter(self.active_adapters)
        self._mark_only_adapters_as_trainable()

    def _remove_adapter_everywhere(self, adapter_name: str) -> None:
        super()._remove_adapter_everywhere(adapter_name)
        if "prompt_encoder" in self._modules:
            self.prompt_encoder.pop(adapter_name, None)

    def _mark_only_adapters_as_trainable(self) -> None:
        # Prompt modules keep their own choice (CPT freezes part of its module); the base is frozen.
        self.model.requires_grad_(False)
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.set_adapter(self.active_adapters)
                for name, copy in module.modules_to_save.items():
                    if self.peft_config[name].inference_mode or name not in self.active_adapters:
                        copy.requires_grad_(False)

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) != 1:
            raise ValueError(
                f"{self.spec.peft_type} runs one adapter at a time (its prompt replaces the input); got {names}."
            )
        super().set_adapter(names)
        if self.peft_config:
            self._mark_only_adapters_as_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; available: {list(self.peft_config)}.")
        del self.prompt_encoder[adapter_name]
        del self.peft_config[adapter_name]
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.delete_adapter(adapter_name)
        remaining = [n for n in self.active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.active_adapters = remaining
        if remaining:
            self.set_adapter(remaining)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone: no prompt, and the original ``modules_to_save`` modules."""
        was = self._prompts_disabled
        self._prompts_disabled = True
        try:
            with super().disable_adapter():
                yield
        finally:
            self._prompts_disabled = was

    def _set_adapter_layers(self, enabled: bool) -> None:
        super()._set_adapter_layers(enabled)
        self._prompts_disabled = not enabled

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{self.spec.peft_type} adapters cannot be combined with add_weighted_adapter.")

    # ------------------------------------------------------------------ serialization
    def adapter_state_entries(self, adapter_name: str) -> Iterator[StateEntry]:
        """``(model_key, checkpoint_key, tensor, writer)`` of one adapter, in the reference's key format.

        Model keys are relative to this module; checkpoint keys are final: ``prompt_embeddings``
        (the materialised table) and ``base_model.<module path>.<tensor>`` for ``modules_to_save``
        copies (the reference keeps a prompt-learning base model directly at ``base_model``).
        """
        encoder = self.prompt_encoder[adapter_name]

        def write(value: torch.Tensor, encoder: nn.Module = encoder) -> None:
            weight = encoder.embedding.weight
            if tuple(weight.shape) != tuple(value.shape):
                raise ConfigError(
                    f"The saved prompt table has shape {tuple(value.shape)}, but adapter {adapter_name!r} keeps an "
                    f"embedding of shape {tuple(weight.shape)}: a materialised prompt loads only into an adapter in "
                    "inference mode (from_pretrained(..., is_trainable=False))."
                )
            weight.copy_(value.to(device=weight.device, dtype=weight.dtype))

        with torch.no_grad():
            table = self.prompt_table(adapter_name)
        yield f"prompt_encoder.{adapter_name}.embedding.weight", PROMPT_EMBEDDINGS_KEY, table, write
        for path, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                copy = module.modules_to_save[adapter_name]
                for rest, tensor in copy.state_dict(keep_vars=True).items():
                    yield (
                        f"model.{path}.modules_to_save.{adapter_name}.{rest}",
                        f"base_model.{path}.{rest}",
                        tensor,
                        _copy_into(tensor),
                    )

    # ------------------------------------------------------------------ routing (called by the task classes)
    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Positional arguments as the base model's forward names them."""
        if not args:
            return dict(kwargs)
        names = [
            p.name
            for p in inspect.signature(self.model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(args) > len(names):
            raise TypeError(f"Too many positional arguments for {type(self.model).__name__}.forward.")
        return {**dict(zip(names, args)), **kwargs}

    def prompt_forward(self, task: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The adapted forward of ``task`` (a :class:`~peft_core.TaskType` value, or None for plain ``PeftModel``)."""
        kwargs = self._bind(args, kwargs)
        if self._prompts_disabled:
            kwargs.pop("task_ids", None)
            return self.model(**kwargs)
        return self.task_forward(task, kwargs)

    def prompt_generate(self, task: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``generate`` of the base model with the prompt in place."""
        base = self.model
        if self._prompts_disabled:
            kwargs = dict(kwargs)
            kwargs.pop("task_ids", None)
            return base.generate(*args, **kwargs)
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
            if len(args) > 1:
                raise TypeError("generate takes the inputs as keyword arguments (besides input_ids).")
        return self.task_generate(task, dict(kwargs))

    def task_forward(self, task: str | None, kwargs: dict[str, Any]) -> Any:
        """The adapted forward of ``task`` with the base model's keyword arguments (prompt enabled).

        The strategies implement it; a method with task behaviour of its own (e.g. a loss of its
        own for causal LMs) overrides it and defers to ``super()`` for the rest.
        """
        raise NotImplementedError

    def task_generate(self, task: str | None, kwargs: dict[str, Any]) -> Any:
        """``generate`` of ``task`` with the prompt in place (keyword arguments only)."""
        raise NotImplementedError

    # helpers shared by the subclasses
    def _batch_size(
        self, kwargs: dict[str, Any], ids_key: str = "input_ids", embeds_key: str = "inputs_embeds"
    ) -> int:
        for key in (ids_key, embeds_key):
            value = kwargs.get(key)
            if value is not None:
                return int(value.shape[0])
        raise ValueError(f"{self.spec.peft_type} needs {ids_key} or {embeds_key} to build the prompt.")

    def _pad_mask(self, mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.dim() != 2:
            raise ValueError(
                f"{self.spec.peft_type} extends 2-D attention masks (batch, length) by its virtual tokens; got a "
                f"{mask.dim()}-D mask. Pass the 2-D padding mask."
            )
        ones = torch.ones(batch, self.active_config.num_virtual_tokens, dtype=mask.dtype, device=mask.device)
        return torch.cat((ones, mask), dim=1)

    def _patched_generation(
        self, prepare: Callable[..., dict[str, Any]]
    ) -> contextlib.AbstractContextManager[None]:
        """Install ``prepare`` as the base model's ``prepare_inputs_for_generation`` for one ``generate`` call."""
        base = self.model

        @contextlib.contextmanager
        def patch() -> Iterator[None]:
            had_own = "prepare_inputs_for_generation" in base.__dict__
            previous = base.__dict__.get("prepare_inputs_for_generation")
            base.prepare_inputs_for_generation = prepare
            try:
                yield
            finally:
                if had_own:
                    base.prepare_inputs_for_generation = previous
                else:
                    del base.prepare_inputs_for_generation

        return patch()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.prompt_forward(None, args, kwargs)


def _copy_into(tensor: torch.Tensor) -> Callable[[torch.Tensor], None]:
    return lambda value: tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))


def _drop(kwargs: dict[str, Any], key: str, method: str) -> None:
    if kwargs.get(key) is not None:
        warnings.warn(
            f"{method} ignores {key}: the virtual tokens shift every position, so the given ones no longer apply.",
            UserWarning,
            stacklevel=4,
        )
    kwargs.pop(key, None)


_TOKEN_TYPE_TASKS = {
    TaskType.SEQ_CLS.value,
    TaskType.TOKEN_CLS.value,
    TaskType.QUESTION_ANS.value,
}
"""Tasks whose token_type_ids are kept (extended by zeros for the virtual tokens), as in the reference."""


class VirtualTokenModel(PromptLearningModel):
    """Methods that prepend learned embeddings (virtual tokens) to the input embeddings.

    Causal LMs get ``-100`` labels on the virtual positions (no loss there) and their logits
    cover them too (``num_virtual_tokens`` extra positions first), as in the reference;
    encoder-decoder models get the prompt on the encoder side.
    """

    def virtual_tokens(self, batch_size: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt embeddings ``(batch_size, rows, token_dim)`` of the active adapter."""
        name = self.active_adapters[0]
        config = self.peft_config[name]
        encoder = self.prompt_encoder[name]
        if config.inference_mode:
            prompts = encoder.embedding.weight.unsqueeze(0)
        else:
            rows = self.prompt_rows(config)
            prompts = encoder(torch.arange(rows, device=encoder.embedding.weight.device).unsqueeze(0))
        return prompts.expand(batch_size, -1, -1)

    def _embed(self, kwargs: dict[str, Any]) -> tuple[torch.Tensor, int]:
        input_ids = kwargs.pop("input_ids", None)
        inputs_embeds = kwargs.pop("inputs_embeds", None)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError(f"{self.spec.peft_type} needs input_ids or inputs_embeds.")
            inputs_embeds = find_word_embeddings(self.model)(input_ids)
        return inputs_embeds, int(inputs_embeds.shape[0])

    def _with_prompt(self, inputs_embeds: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        nvt = self.active_config.num_virtual_tokens
        prompts = self.virtual_tokens(inputs_embeds.shape[0], task_ids)[:, :nvt]
        return torch.cat((prompts.to(inputs_embeds.dtype), inputs_embeds), dim=1)

    def task_forward(self, task: str | None, kwargs: dict[str, Any]) -> Any:
        method = self.spec.peft_type
        task_ids = kwargs.pop("task_ids", None)
        nvt = self.active_config.num_virtual_tokens
        inputs_embeds, batch = self._embed(kwargs)
        kwargs["attention_mask"] = self._pad_mask(kwargs.get("attention_mask"), batch)
        _drop(kwargs, "position_ids", method)
        if task == TaskType.SEQ_2_SEQ_LM.value:
            _drop(kwargs, "token_type_ids", method)
            return self.model(inputs_embeds=self._with_prompt(inputs_embeds, task_ids), **kwargs)
        if task in _TOKEN_TYPE_TASKS:
            token_types = kwargs.get("token_type_ids")
            if token_types is not None:
                zeros = torch.zeros(batch, nvt, dtype=token_types.dtype, device=token_types.device)
                kwargs["token_type_ids"] = torch.cat((zeros, token_types), dim=1)
        else:
            _drop(kwargs, "token_type_ids", method)
        labels = kwargs.get("labels")
        if labels is not None and task in (TaskType.CAUSAL_LM.value, TaskType.TOKEN_CLS.value):
            ignored = torch.full((batch, nvt), -100, dtype=labels.dtype, device=labels.device)
            kwargs["labels"] = torch.cat((ignored, labels), dim=1)
        return self.model(inputs_embeds=self._with_prompt(inputs_embeds, task_ids), **kwargs)

    def task_generate(self, task: str | None, kwargs: dict[str, Any]) -> Any:
        method = self.spec.peft_type
        task_ids = kwargs.pop("task_ids", None)
        if task == TaskType.SEQ_2_SEQ_LM.value or getattr(
            getattr(self.model, "config", None), "is_encoder_decoder", False
        ):
            kwargs.pop("encoder_outputs", None)
            _drop(kwargs, "position_ids", method)
            _drop(kwargs, "token_type_ids", method)
            inputs_embeds, batch = self._embed(kwargs)
            kwargs["inputs_embeds"] = self._with_prompt(inputs_embeds, task_ids)
            if kwargs.get("attention_mask") is not None:
                kwargs["attention_mask"] = self._pad_mask(kwargs["attention_mask"], batch)
            return self.model.generate(**kwargs)
        if kwargs.get("input_ids") is None:
            raise ValueError(f"{method} generates from input_ids (the prompt is added to their embeddings).")
        base_prepare = type(self.model).prepare_inputs_for_generation.__get__(self.model)
        embed = find_word_embeddings(self.model)

        def prepare(input_ids: torch.Tensor, *args: Any, **model_kwargs: Any) -> dict[str, Any]:
            inputs = base_prepare(input_ids, *args, **model_kwargs)
            cache = inputs.get("past_key_values")
            filled = cache is not None and _cache_length(cache) > 0
            ids = inputs.get("input_ids")
            if filled and ids is not None and _cache_length(cache) >= ids.shape[1]:
                inputs["input_ids"] = ids = ids[:, -1:]
            if inputs.get("attention_mask") is not None:
                inputs["attention_mask"] = self._pad_mask(inputs["attention_mask"], input_ids.shape[0])
            # generate() made these for the real tokens only; the model recomputes them past the prompt
            for key in ("position_ids", "token_type_ids", "cache_position"):
                inputs.pop(key, None)
            if not filled:  # prefill: the virtual tokens enter with the prompt
                if ids is None:
                    ids = input_ids
                inputs["inputs_embeds"] = self._with_prompt(embed(ids), task_ids)
                inputs["input_ids"] = None
            return inputs

        with self._patched_generation(prepare):
            return self.model.generate(**kwargs)


def _cache_length(cache: Any) -> int:
    if isinstance(cache, (tuple, list)):
        return int(cache[0][0].shape[-2]) if cache else 0
    return int(cache.get_seq_length())


class PrefixCacheModel(PromptLearningModel):
    """Methods that feed learned keys and values to every attention layer as a prefix cache.

    The inputs keep their length (logits cover the real tokens only); the attention mask gains
    ``num_virtual_tokens`` leading ones and explicit ``position_ids`` are shifted past the prefix.
    """

    def prompt_rows(self, config: PromptLearningConfig) -> int:
        return config.num_virtual_tokens

    def prompt_cache(self, batch_size: int) -> Any:
        """The active adapter's prefix as a ``transformers`` cache object for a batch of ``batch_size``."""
        raise NotImplementedError(f"{type(self).__name__} must implement prompt_cache(batch_size)")

    def _shift_positions(self, kwargs: dict[str, Any]) -> None:
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + self.active_config.num_virtual_tokens

    def task_forward(self, task: str | None, kwargs: dict[str, Any]) -> Any:
        method = self.spec.peft_type
        kwargs.pop("task_ids", None)
        if task == TaskType.SEQ_2_SEQ_LM.value:
            batch = self._batch_size(kwargs)
            kwargs["decoder_attention_mask"] = self._pad_mask(kwargs.get("decoder_attention_mask"), batch)
            _drop(kwargs, "token_type_ids", method)
            self._shift_positions(kwargs)
            kwargs["past_key_values"] = self.prompt_cache(batch)
            return self.model(**kwargs)
        batch = self._batch_size(kwargs)
        kwargs["attention_mask"] = self._pad_mask(kwargs.get("attention_mask"), batch)
        self._shift_positions(kwargs)
        if task in (TaskType.CAUSAL_LM.value, TaskType.FEATURE_EXTRACTION.value, None):
            _drop(kwargs, "token_type_ids", method)
        kwargs["past_key_values"] = self.prompt_cache(batch)
        if "past_key_values" in inspect.signature(self.model.forward).parameters:
            return self.model(**kwargs)
        if task in _HEADS:
            # Task heads without a cache argument (BERT's): run their backbone with the prefix, then the head.
            return self._forward_through_backbone(task, kwargs)
        raise NotImplementedError(
            f"{type(self.model).__name__}.forward takes no past_key_values, so {method} cannot feed it a prefix."
        )

    def _forward_through_backbone(self, task: str, kwargs: dict[str, Any]) -> Any:
        from transformers import PreTrainedModel
        from transformers.modeling_outputs import (
            QuestionAnsweringModelOutput,
            SequenceClassifierOutput,
            TokenClassifierOutput,
        )

        model = self.model
        backbone = next((m for _, m in model.named_children() if isinstance(m, PreTrainedModel)), None)
        head_name = next((n for n, _ in model.named_children() if n in _HEADS[task]), None)
        if backbone is None or head_name is None:
            raise NotImplementedError(
                f"{type(model).__name__} takes no past_key_values and has no backbone + {_HEADS[task]} head to run "
                f"{self.spec.peft_type} through."
            )
        labels = kwargs.pop("labels", None)
        start, end = kwargs.pop("start_positions", None), kwargs.pop("end_positions", None)
        kwargs.pop("return_dict", None)
        outputs = backbone(**kwargs)
        dropout = model._modules.get("dropout")
        if task == TaskType.SEQ_CLS.value:
            hidden = outputs[1] if len(outputs) > 1 else outputs[0]
        else:
            hidden = outputs[0]
        hidden = dropout(hidden) if dropout is not None else hidden
        logits = model.get_submodule(head_name)(hidden)
        extra = {
            "hidden_states": getattr(outputs, "hidden_states", None),
            "attentions": getattr(outputs, "attentions", None),
        }
        if task == TaskType.QUESTION_ANS.value:
            start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
            loss = None
            if start is not None and end is not None:
                ignored = start_logits.size(1)
                start, end = start.clamp(0, ignored), end.clamp(0, ignored)
                ce = nn.CrossEntropyLoss(ignore_index=ignored)
                loss = (ce(start_logits, start) + ce(end_logits, end)) / 2
            return QuestionAnsweringModelOutput(
                loss=loss, start_logits=start_logits, end_logits=end_logits, **extra
            )
        num_labels = logits.shape[-1]
        if task == TaskType.TOKEN_CLS.value:
            loss = (
                None
                if labels is None
                else nn.functional.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
            )
            return TokenClassifierOutput(loss=loss, logits=logits, **extra)
        return SequenceClassifierOutput(
            loss=_classification_loss(model, logits, labels), logits=logits, **extra
        )

    def task_generate(self, task: str | None, kwargs: dict[str, Any]) -> Any:
        method = self.spec.peft_type
        kwargs.pop("task_ids", None)
        encoder_decoder = getattr(getattr(self.model, "config", None), "is_encoder_decoder", False)
        base_prepare = type(self.model).prepare_inputs_for_generation.__get__(self.model)
        nvt = self.active_config.num_virtual_tokens

        def prepare(input_ids: torch.Tensor, *args: Any, **model_kwargs: Any) -> dict[str, Any]:
            inputs = base_prepare(input_ids, *args, **model_kwargs)
            cache = inputs.get("past_key_values")
            prefill = cache is None or _cache_length(cache) == 0
            if encoder_decoder:
                if prefill:
                    inputs["past_key_values"] = self.prompt_cache(input_ids.shape[0])
                return inputs
            ids = inputs.get("input_ids")
            if not prefill and ids is not None and _cache_length(cache) >= ids.shape[1] + nvt:
                inputs["input_ids"] = ids[:, -1:]
            if inputs.get("attention_mask") is not None:
                inputs["attention_mask"] = self._pad_mask(inputs["attention_mask"], input_ids.shape[0])
            self._shift_positions(inputs)
            _drop(inputs, "token_type_ids", method)
            if prefill:
                inputs["past_key_values"] = self.prompt_cache(input_ids.shape[0])
            return inputs

        with self._patched_generation(prepare):
            return self.model.generate(**kwargs)


_HEADS = {
    TaskType.SEQ_CLS.value: ("classifier", "score"),
    TaskType.TOKEN_CLS.value: ("classifier", "score"),
    TaskType.QUESTION_ANS.value: ("qa_outputs",),
}


def _classification_loss(
    model: nn.Module, logits: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor | None:
    """The loss transformers' sequence classifiers compute, by the model config's ``problem_type``."""
    if labels is None:
        return None
    config = model.config
    num_labels = logits.shape[-1]
    if config.problem_type is None:
        integral = labels.dtype in (torch.long, torch.int)
        config.problem_type = (
            "regression"
            if num_labels == 1
            else "single_label_classification"
            if integral
            else "multi_label_classification"
        )
    if config.problem_type == "regression":
        if num_labels == 1:
            return nn.functional.mse_loss(logits.squeeze(), labels.squeeze())
        return nn.functional.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def total_virtual_tokens(config: PromptLearningConfig) -> int:
    """``num_virtual_tokens`` times the number of transformer submodules the prompt serves."""
    return config.num_virtual_tokens * (config.num_transformer_submodules or 1)


def repeat_to(ids: list[int], length: int) -> list[int]:
    """``ids`` cut or cycled to exactly ``length`` entries (text inits of prompt tables)."""
    if not ids:
        raise ConfigError("The init text tokenizes to no tokens; give a non-empty text.")
    return (ids * math.ceil(length / len(ids)))[:length]
