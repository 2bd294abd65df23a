"""The rank allocator: which singular triplets of an AdaLoRA adapter survive, step by step.

It follows the AdaLoRA paper (Zhang et al., 2023) and reproduces the reference library's
arithmetic, so the same training run prunes the same triplets in both libraries:

* sensitivity of every entry ``w`` of ``P``, ``Λ``, ``Q``: ``I = |w * grad|``, smoothed as
  ``Ī ← β₁ Ī + (1 - β₁) I`` and its uncertainty ``Ū ← β₂ Ū + (1 - β₂) |I - Ī|``; an entry's
  score is ``Ī * Ū``;
* a triplet's score: its singular value's score plus the mean score of its row of ``Q`` and of its
  column of ``P``;
* the budget (total kept triplets): ``init_r`` per layer up to step ``tinit``, then a cubic
  decrease to ``target_r`` per layer at step ``total_step - tfinal``; every ``deltaT`` steps in
  between, the triplets scoring at or below the ``(initial budget - budget)``-th smallest score
  get their singular value zeroed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from peft_core.errors import ConfigError
from torch import nn

from peft_adalora.config import AdaLoraConfig, rank_pattern_key
from peft_adalora.layer import AdaLoraLayer, pattern_mask

__all__ = ["RankAllocator"]

_FACTORS = ("lora_A", "lora_B", "lora_E")


class RankAllocator:
    """Tracks sensitivities of ``adapter_name``'s triplets in ``model`` and prunes them to the budget.

    ``model`` is the base model holding the AdaLoRA layers. The adapter model owns one allocator
    for its trainable adapter; see :meth:`peft_adalora.model.AdaLoraModel.update_and_allocate`.
    """

    def __init__(self, model: nn.Module, peft_config: AdaLoraConfig, adapter_name: str) -> None:
        self.peft_config = peft_config
        self.adapter_name = adapter_name
        self.beta1 = peft_config.beta1
        self.beta2 = peft_config.beta2
        self.reset_ipt()
        self._set_budget_scheduler(model)

    # ------------------------------------------------------------------ bookkeeping
    def _layers(self, model: nn.Module) -> Iterator[tuple[str, AdaLoraLayer]]:
        for key, module in model.named_modules():
            if isinstance(module, AdaLoraLayer) and self.adapter_name in module.lora_A:
                yield key, module

    def reset_ipt(self) -> None:
        """Forget the sensitivities (done after the final allocation)."""
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def _set_budget_scheduler(self, model: nn.Module) -> None:
        layers = list(self._layers(model))
        self.init_bgt = sum(layer.lora_A[self.adapter_name].shape[0] for _, layer in layers)
        self.name_set = sorted(key for key, _ in layers)
        self.target_bgt = self.peft_config.target_r * len(self.name_set)

    def set_total_step(self, total_step: int) -> None:
        """Change the number of training steps the schedule is laid out over."""
        config = self.peft_config
        if not isinstance(total_step, int) or total_step <= 0 or config.tinit >= total_step - config.tfinal:
            raise ConfigError(
                f"total_step={total_step!r} must be a positive integer above tinit + tfinal "
                f"({config.tinit} + {config.tfinal})."
            )
        config.total_step = total_step

    # ------------------------------------------------------------------ the schedule
    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, whether to prune at this step)``."""
        tinit, tfinal, total_step = (
            self.peft_config.tinit,
            self.peft_config.tfinal,
            self.peft_config.total_step,
        )
        if step <= tinit:
            return self.init_bgt, False
        if step > total_step - tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % self.peft_config.deltaT == 0

    # ------------------------------------------------------------------ sensitivities
    def update_ipt(self, model: nn.Module) -> None:
        """Fold the current gradients into the smoothed sensitivities and uncertainties."""
        entries = [
            (f"{key}.{attr}", getattr(layer, attr)[self.adapter_name])
            for key, layer in self._layers(model)
            for attr in _FACTORS
        ]
        if entries and all(p.grad is None for _, p in entries):
            raise RuntimeError(
                f"update_and_allocate found no gradients on AdaLoRA adapter {self.adapter_name!r}: call it after "
                "loss.backward() and before optimizer.zero_grad()."
            )
        with torch.no_grad():
            for name, param in entries:
                if name not in self.ipt:
                    self.ipt[name] = torch.zeros_like(param)
                    self.exp_avg_ipt[name] = torch.zeros_like(param)
                    self.exp_avg_unc[name] = torch.zeros_like(param)
                # A factor that took no part in the loss has no sensitivity this step.
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                self.ipt[name] = (param * grad).abs().detach()
                self.exp_avg_ipt[name] = (
                    self.beta1 * self.exp_avg_ipt[name] + (1 - self.beta1) * self.ipt[name]
                )
                self.exp_avg_unc[name] = (
                    self.beta2 * self.exp_avg_unc[name]
                    + (1 - self.beta2) * (self.ipt[name] - self.exp_avg_ipt[name]).abs()
                )

    def _element_score(self, name: str) -> torch.Tensor:
        if name not in self.exp_avg_ipt:
            raise RuntimeError(
                f"No sensitivity was recorded for {name!r}; call update_and_allocate(step) at every training step "
                "from the first one, so that ranks can be allocated."
            )
        return self.exp_avg_ipt[name] * self.exp_avg_unc[name]

    @staticmethod
    def _combine_ipt(ipt_E: torch.Tensor, ipt_AB: torch.Tensor) -> torch.Tensor:
        ipt_AB = ipt_AB.sum(dim=1, keepdim=False)
        return ipt_E.view(-1) + ipt_AB.view(-1)

    def triplet_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Each layer's triplet scores, ``{module key: (r, 1) tensor}``."""
        scores = {}
        for key, _layer in self._layers(model):
            ipt_A = torch.mean(self._element_score(f"{key}.lora_A"), dim=1, keepdim=True)
            ipt_B = torch.mean(self._element_score(f"{key}.lora_B"), dim=0, keepdim=False).view(-1, 1)
            ipt_E = self._element_score(f"{key}.lora_E")
            scores[key] = self._combine_ipt(ipt_E, torch.cat([ipt_A, ipt_B], dim=1)).view(-1, 1)
        return scores

    # ------------------------------------------------------------------ pruning
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero the singular values of the lowest-scoring triplets so that at most ``budget`` remain.

        Returns the rank pattern ``{"<module>.lora_E": [kept?, ...]}``. Ties at the threshold are
        all pruned, as in the reference. A budget at or above the adapter's size prunes nothing
        (the reference fails there, e.g. when ``target_r >= init_r``).
        """
        scores = self.triplet_scores(model)
        all_scores = torch.cat([s.view(-1) for s in scores.values()]) if scores else torch.zeros(0)
        to_prune = min(self.init_bgt - budget, all_scores.numel())
        rank_pattern = {}
        with torch.no_grad():
            threshold = torch.kthvalue(all_scores, k=to_prune)[0].item() if to_prune > 0 else None
            for key, layer in self._layers(model):
                if threshold is None:
                    pruned = torch.zeros_like(scores[key], dtype=torch.bool)
                else:
                    pruned = scores[key] <= threshold
                layer.lora_E[self.adapter_name].masked_fill_(pruned, 0.0)
                rank_pattern[rank_pattern_key(key)] = (~pruned).view(-1).tolist()
        return rank_pattern

    def update_and_allocate(
        self, model: nn.Module, global_step: int, force_mask: bool = False
    ) -> tuple[int, dict[str, list[bool]] | None]:
        """One step of the schedule: ``(budget, rank pattern if this step pruned, else None)``."""
        config = self.peft_config
        if global_step < config.total_step - config.tfinal:
            self.update_ipt(model)
        budget, mask_ind = self.budget_schedule(global_step)
        rank_pattern = self.mask_to_budget(model, budget) if (mask_ind or force_mask) else None
        return budget, rank_pattern

    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict[str, Any]) -> None:
        """Zero the singular values that ``rank_pattern`` prunes (used in the final fine-tuning phase)."""
        with torch.no_grad():
            for key, layer in self._layers(model):
                mask = pattern_mask(rank_pattern, key, self.adapter_name)
                param = layer.lora_E[self.adapter_name]
                if mask is None or len(mask) != param.shape[0]:
                    raise ConfigError(
                        f"rank_pattern has no mask of length {param.shape[0]} for {rank_pattern_key(key)!r}; it was "
                        "made for another model or adapter. Re-run the allocation, or set rank_pattern=None."
                    )
                keep = torch.tensor(mask, dtype=torch.bool, device=param.device).unsqueeze(-1)
                param.masked_fill_(~keep, 0.0)
