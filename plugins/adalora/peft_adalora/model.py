"""``AdaLoraModel``: the core's adapter model, plus AdaLoRA's rank allocation and regulariser.

What AdaLoRA adds to :class:`peft_core.tuner.AdapterModel`, as in the reference library:

* at most one adapter trains (all others must have ``inference_mode=True``); it owns a
  :class:`~peft_adalora.allocator.RankAllocator`;
* :meth:`AdaLoraModel.update_and_allocate` runs the allocator once per training step and keeps
  the config's ``rank_pattern`` up to date, so saving writes the pruned shapes;
* ``forward`` adds ``orth_reg_weight`` times the orthogonality penalty of the trainable adapter's
  ``P`` and ``Q`` to ``outputs.loss`` whenever the model returns a loss;
* a config with a ``rank_pattern`` (a saved, pruned adapter) builds its layers with the pruned
  ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from peft_core.config import PeftConfig
from peft_core.errors import ConfigError
from peft_core.tuner import AdapterModel

from peft_adalora.allocator import RankAllocator
from peft_adalora.config import AdaLoraConfig, rank_pattern_key
from peft_adalora.layer import AdaLoraLayer, pattern_mask

__all__ = ["AdaLoraModel"]


class AdaLoraModel(AdapterModel):
    """Injects AdaLoRA layers and allocates their ranks; see :class:`peft_core.tuner.AdapterModel`.

    Training loop (``model`` a ``PeftModel``)::

        for step, batch in enumerate(batches):
            loss = model(**batch).loss          # includes the orthogonality penalty
            loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
    """

    trainable_adapter_name: str | None = None
    """The one adapter that trains (None when every adapter is in inference mode)."""
    rankallocator: RankAllocator | None = None
    """The trainable adapter's rank allocator."""

    # ------------------------------------------------------------------ config
    def _validate_new_adapter(self, config: PeftConfig) -> None:
        trainable = [name for name, c in self.peft_config.items() if not c.inference_mode]
        if trainable and not config.inference_mode:
            raise ConfigError(
                f"AdaLoRA trains only one adapter at a time, and {trainable[0]!r} is trainable. Add this one with "
                "inference_mode=True (or load it with is_trainable=False), or delete the other first."
            )
        with_bias = [name for name, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"]
        if with_bias and getattr(config, "bias", "none") != "none":
            raise ConfigError(
                f"Adapter {with_bias[0]!r} already trains biases (bias={self.peft_config[with_bias[0]].bias!r}); "
                "only one AdaLoRA adapter per model may use bias other than 'none'. Set bias='none' for the new one."
            )

    # ------------------------------------------------------------------ injection
    def inject_adapter(self, adapter_name: str, config: PeftConfig, *, loading: bool = False) -> None:
        super().inject_adapter(adapter_name, config, loading=loading)
        try:
            config = self.peft_config[adapter_name]
            self._check_rank_pattern_targets(adapter_name, config)
            if not config.inference_mode:
                self.trainable_adapter_name = adapter_name
                self.rankallocator = RankAllocator(self.model, config, adapter_name)
        except BaseException:
            self._remove_adapter_everywhere(adapter_name)
            self.peft_config.pop(adapter_name, None)
            raise

    def _adalora_layers(self, adapter_name: str) -> list[tuple[str, AdaLoraLayer]]:
        return [
            (key, layer)
            for key, layer in self.named_adapter_layers()
            if isinstance(layer, AdaLoraLayer) and adapter_name in layer.lora_A
        ]

    def _check_rank_pattern_targets(self, adapter_name: str, config: AdaLoraConfig) -> None:
        if not config.rank_pattern:
            return
        known = {rank_pattern_key(key) for key, _ in self._adalora_layers(adapter_name)}
        suffix = f".{adapter_name}"
        unknown = sorted(
            k for k in config.rank_pattern if (k[: -len(suffix)] if k.endswith(suffix) else k) not in known
        )
        if unknown:
            raise ConfigError(
                f"rank_pattern names {unknown[:5]}, which are not AdaLoRA layers of adapter {adapter_name!r} "
                f"(its layers: {sorted(known)[:5]}...). The adapter was saved from another model or with other "
                "target_modules."
            )

    # ------------------------------------------------------------------ adapters
    def _forget_trainable(self, adapter_name: str) -> None:
        if adapter_name == self.trainable_adapter_name:
            self.trainable_adapter_name = None
            self.rankallocator = None

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._forget_trainable(adapter_name)

    def _remove_adapter_everywhere(self, adapter_name: str) -> None:
        super()._remove_adapter_everywhere(adapter_name)
        self._forget_trainable(adapter_name)

    # ------------------------------------------------------------------ rank allocation
    def update_and_allocate(self, global_step: int) -> None:
        """Update the sensitivities and prune ranks for training step ``global_step``.

        Call it at every step, after ``loss.backward()`` and before ``optimizer.zero_grad()``.
        Before ``total_step - tfinal`` it updates the sensitivities (and prunes every ``deltaT``
        steps past ``tinit``); at ``total_step - tfinal`` it makes the final allocation, stored in
        the config's ``rank_pattern``; after that it keeps the pruned singular values at zero.
        """
        name = self.trainable_adapter_name
        if name is None or self.rankallocator is None:
            raise ConfigError(
                "There is no trainable AdaLoRA adapter to allocate ranks for (every adapter has inference_mode=True). "
                "Create it with get_peft_model, or load it with PeftModel.from_pretrained(..., is_trainable=True)."
            )
        config = self.peft_config[name]
        allocator = self.rankallocator
        allocator.peft_config = config
        final_step = config.total_step - config.tfinal
        if global_step < final_step:
            _, rank_pattern = allocator.update_and_allocate(self.model, global_step)
            if rank_pattern:
                self._set_rank_pattern(name, rank_pattern)
        elif global_step == final_step:
            _, rank_pattern = allocator.update_and_allocate(self.model, global_step, force_mask=True)
            self._set_rank_pattern(name, rank_pattern)
            allocator.reset_ipt()
        else:
            if not config.rank_pattern:
                raise ConfigError(
                    f"Step {global_step} is in the final fine-tuning phase, but no ranks were allocated: "
                    f"update_and_allocate must also run at step total_step - tfinal = {final_step}."
                )
            allocator.mask_using_rank_pattern(self.model, config.rank_pattern)

    def _set_rank_pattern(self, adapter_name: str, rank_pattern: dict[str, list[bool]] | None) -> None:
        config = self.peft_config[adapter_name]
        config.rank_pattern = rank_pattern
        for key, layer in self._adalora_layers(adapter_name):
            layer.set_rank_mask(adapter_name, pattern_mask(rank_pattern, key, adapter_name))

    # ------------------------------------------------------------------ forward
    def orthogonal_penalty(self, adapter_name: str | None = None) -> torch.Tensor | float:
        """Mean over the adapter's factors of ``||QQᵀ - I||_F`` (``lora_A``) and ``||PᵀP - I||_F`` (``lora_B``).

        ``adapter_name`` defaults to the trainable adapter; 0.0 when it has no factors.
        """
        name = adapter_name or self.trainable_adapter_name
        penalty: torch.Tensor | float = 0.0
        count = 0
        for _key, layer in self._adalora_layers(name or ""):
            for attr in ("lora_A", "lora_B"):
                param = getattr(layer, attr)[name]
                cov = param @ param.T if attr == "lora_A" else param.T @ param
                identity = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
                penalty = penalty + torch.linalg.vector_norm(cov - identity, 2)
                count += 1
        return penalty / count if count else 0.0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        name = self.trainable_adapter_name
        if isinstance(loss, torch.Tensor) and name is not None:
            weight = self.peft_config[name].orth_reg_weight
            outputs.loss = loss + weight * self.orthogonal_penalty(name)
        return outputs
