"""transformers' ``Trainer`` for peft-core models: checkpoints hold only the adapters.

transformers recognises adapter models by ``isinstance(model, peft.PeftModel)``, so without
this a peft-core model would be checkpointed as a full state dict. Port a script by changing
one import::

    from peft_core.integrations.transformers import Trainer  # was: from transformers import Trainer

Checkpoints are then ordinary adapter directories (the reference format), and
``resume_from_checkpoint`` and ``load_best_model_at_end`` load the adapters back in place.
:class:`PeftTrainerMixin` does the same for another ``Trainer`` subclass::

    class MyTrainer(PeftTrainerMixin, MyCustomTrainer): ...

TRL's trainers need more than that (they recognise adapters by the reference's classes); use
:mod:`peft_core.integrations.trl` for them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers

from peft_core.peft_model import PeftModel, _read_adapter_weights

__all__ = ["PeftTrainerMixin", "Trainer", "load_adapters_in_place"]

TRAINING_ARGS_NAME = "training_args.bin"


def load_adapters_in_place(model: PeftModel, directory: str) -> None:
    """Overwrite every adapter of ``model`` with its tensors saved under ``directory`` (as save_pretrained writes)."""
    for name in model.peft_config:
        subfolder = None if name == "default" else name
        where = directory if subfolder is None else os.path.join(directory, subfolder)
        if not os.path.isdir(where):
            continue
        state_dict = _read_adapter_weights(directory, subfolder, False, {})
        model._load_state_dict_checked(state_dict, name)


class PeftTrainerMixin:
    """Saves and restores peft-core models as adapters in a ``transformers.Trainer`` (sub)class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self._peft_core_model()
        if model is not None:
            # The Trainer reads labels and accepted columns off the model class's forward; a
            # PeftModel forwards everything, so read them off the wrapped base model instead.
            from transformers.utils import can_return_loss, find_labels

            base_cls = type(model.get_base_model())
            if self.args.label_names is None:  # type: ignore[attr-defined]
                self.label_names = find_labels(base_cls)
            self.can_return_loss = can_return_loss(base_cls)

    def _set_signature_columns_if_needed(self) -> None:
        model = self._peft_core_model()
        if model is None or self._signature_columns is not None:  # type: ignore[attr-defined]
            return super()._set_signature_columns_if_needed()  # type: ignore[misc]
        import inspect

        columns = list(inspect.signature(model.get_base_model().forward).parameters)
        self._signature_columns = columns + list({"label", "label_ids", *self.label_names})
        return None

    def _peft_core_model(self) -> PeftModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)  # type: ignore[attr-defined]
        return model if isinstance(model, PeftModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._peft_core_model()
        if model is None:
            return super()._save(output_dir, state_dict)  # type: ignore[misc]
        args = self.args  # type: ignore[attr-defined]
        output_dir = output_dir if output_dir is not None else args.output_dir
        if not args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=args.should_save)
        processor = getattr(self, "processing_class", None)
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = model if model is not None else self._peft_core_model()
        if not isinstance(target, PeftModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        load_adapters_in_place(target, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        model = self._peft_core_model()
        if model is None:
            return super()._load_best_model()  # type: ignore[misc]
        load_adapters_in_place(model, self.state.best_model_checkpoint)  # type: ignore[attr-defined]
        return None


class Trainer(PeftTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that checkpoints peft-core models as adapters (any other model as usual)."""
