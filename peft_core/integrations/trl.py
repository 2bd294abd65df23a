"""TRL's ``SFTTrainer`` and ``DPOTrainer`` for peft-core models, without the reference ``peft`` installed.

TRL takes its adapter path (fused LM head on the wrapped base model, the reference model as the
policy with its adapter disabled, gradient-checkpointing input grads) only for models that
``accelerate.utils.is_peft_model`` recognises, which is ``isinstance(model, peft.PeftModel)``.
A peft-core model passed to TRL's own trainers therefore fails in the fused LM head
(``AttributeError: ... last_hidden_state``, TRL calls ``model.base_model`` as the backbone). Change
the import instead::

    from peft_core.integrations.trl import DPOTrainer, SFTTrainer  # was: from trl import ...

Importing this module teaches TRL's SFT and DPO trainer modules to recognise peft-core models:
their module-level ``is_peft_model`` and ``use_adapter`` get a peft-core branch, and the peft
names they look up exist even when ``peft`` is not installed. Other models (the reference
library's included) take TRL's code unchanged. The trainers here also checkpoint only the
adapters, in the reference format (see :mod:`peft_core.integrations.transformers`), and accept a
peft-core ``peft_config`` to wrap the model themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import trl
from accelerate.utils import extract_model_from_parallel
from accelerate.utils import is_peft_model as _accelerate_is_peft_model
from trl.trainer import base_trainer as _trl_base_trainer
from trl.trainer import dpo_trainer as _trl_dpo_trainer
from trl.trainer import sft_trainer as _trl_sft_trainer
from trl.trainer import utils as _trl_utils

from peft_core.config import PeftConfig
from peft_core.integrations.transformers import PeftTrainerMixin
from peft_core.layer import AdapterLayer
from peft_core.mapping import get_peft_model
from peft_core.peft_model import PeftModel

__all__ = ["DPOTrainer", "SFTTrainer", "is_adapter_model", "use_adapter"]

_trl_use_adapter = _trl_utils.use_adapter


def is_adapter_model(model: Any) -> bool:
    """Whether TRL should treat ``model`` (possibly wrapped by DDP/FSDP/DeepSpeed) as an adapter model."""
    return isinstance(extract_model_from_parallel(model), PeftModel) or _accelerate_is_peft_model(model)


@contextlib.contextmanager
def use_adapter(model: Any, adapter_name: str | None) -> Iterator[None]:
    """TRL's ``use_adapter`` (``None``: all adapters disabled), for peft-core models without ``peft`` installed."""
    if not isinstance(model, PeftModel):
        with _trl_use_adapter(model, adapter_name):
            yield
        return
    if adapter_name is None:
        with model.disable_adapter():
            yield
        return
    previous = model.active_adapters
    model.set_adapter(adapter_name)
    try:
        yield
    finally:
        model.set_adapter(previous)


def _teach_trl() -> None:
    """Give TRL's SFT/DPO trainer modules a peft-core branch where they test for adapter models (idempotent)."""
    for module in (_trl_base_trainer, _trl_sft_trainer, _trl_dpo_trainer):
        if hasattr(module, "is_peft_model"):
            module.is_peft_model = is_adapter_model
    _trl_dpo_trainer.use_adapter = use_adapter
    for module in (_trl_sft_trainer, _trl_dpo_trainer):
        # "Is there an adapter on the LM head?": TRL asks peft's layer class; ask ours too. Without
        # peft the name is undefined in TRL's module, and a NameError would stop every adapter model.
        theirs = module.__dict__.get("BaseTunerLayer", ())
        theirs = theirs if isinstance(theirs, tuple) else (theirs,)
        if AdapterLayer not in theirs:
            module.BaseTunerLayer = (*theirs, AdapterLayer)
    # DPO checks a pre-wrapped model's config against peft's LoraConfig for a peft<0.20 workaround;
    # with peft absent no config is one (an empty tuple matches nothing).
    _trl_dpo_trainer.__dict__.setdefault("LoraConfig", ())


_teach_trl()


def _wrap_with_peft_core(model: Any, peft_config: Any, seed: int | None) -> tuple[Any, Any, bool]:
    """Apply a peft-core ``peft_config`` here (TRL only accepts peft's); return (model, peft_config, wrapped)."""
    if not isinstance(peft_config, PeftConfig):
        return model, peft_config, False
    if isinstance(model, str):
        raise TypeError(
            f"A peft-core peft_config needs an instantiated model, got the model id {model!r}: load it first "
            "(e.g. AutoModelForCausalLM.from_pretrained(...)) and pass the model."
        )
    if is_adapter_model(model):
        raise ValueError(
            "You passed a PeftModel together with a peft_config. Pass the base model with the peft_config, or the "
            "PeftModel alone."
        )
    if seed is not None:  # as TRL does: the adapter's random init follows the run's seed
        from transformers import set_seed

        set_seed(seed)
    return get_peft_model(model, peft_config), None, True


class _TrlAdapterCheckpoints(PeftTrainerMixin):
    """PeftTrainerMixin for TRL trainers, which name their dataset columns themselves."""

    def _set_signature_columns_if_needed(self) -> None:
        # Skip PeftTrainerMixin's columns (read off the base model's forward): TRL's trainers keep
        # their own prepared columns (prompt_ids, chosen_ids, ...), whatever the model.
        return super(PeftTrainerMixin, self)._set_signature_columns_if_needed()  # type: ignore[misc]


class SFTTrainer(_TrlAdapterCheckpoints, trl.SFTTrainer):
    """``trl.SFTTrainer`` that trains peft-core models through TRL's adapter path and checkpoints only the adapters.

    ``peft_config`` may be a peft-core config (e.g. ``peft_lora.LoraConfig``) with a base model.
    """

    def __init__(
        self, model: Any, args: Any = None, *rest: Any, peft_config: Any = None, **kwargs: Any
    ) -> None:
        seed = getattr(args, "seed", None)
        model, peft_config, _ = _wrap_with_peft_core(model, peft_config, seed)
        super().__init__(model, args, *rest, peft_config=peft_config, **kwargs)


class DPOTrainer(_TrlAdapterCheckpoints, trl.DPOTrainer):
    """``trl.DPOTrainer`` for peft-core models: the reference model is the policy itself, no copy of the base.

    As in TRL with peft: for a model wrapped from ``peft_config`` the reference is the base model
    (adapters disabled); for a model passed already wrapped, TRL adds a frozen copy of its
    ``default`` adapter named ``ref`` and uses that (checkpoints then hold it in ``ref/``).
    """

    def __init__(
        self,
        model: Any,
        ref_model: Any = None,
        args: Any = None,
        *rest: Any,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        seed = getattr(args, "seed", None)
        model, peft_config, wrapped = _wrap_with_peft_core(model, peft_config, seed)
        super().__init__(model, ref_model, args, *rest, peft_config=peft_config, **kwargs)
        if wrapped and ref_model is None and "ref" in model.peft_config:
            # TRL saw a pre-wrapped model and copied the fresh adapter to "ref"; with its own
            # peft_config it uses the base model instead, and so do we.
            model.delete_adapter("ref")
