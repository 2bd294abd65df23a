"""``LoraModel``: the core's adapter model with LoRA's few method-specific rules."""

from __future__ import annotations

import math
import warnings
from typing import Any

from peft_core.config import PeftConfig
from peft_core.errors import ConfigError
from peft_core.targeting import pattern_value
from peft_core.tuner import AdapterModel

from peft_lora.combination import CAT, FACTORS, SVD, parse_combination, split_options

__all__ = ["LoraModel"]

_BASE_MUTATING_INITS = ("olora", "corda", "loftq")


def _mutates_base(config: PeftConfig) -> bool:
    init = getattr(config, "init_lora_weights", True)
    return isinstance(init, str) and (init.startswith("pissa") or init in _BASE_MUTATING_INITS)


class LoraModel(AdapterModel):
    """Injects LoRA layers; see :class:`peft_core.tuner.AdapterModel` for the API.

    LoRA-specific behaviour: at most one adapter training biases, and random inits skipped when loading a checkpoint (PiSSA/OLoRA run again,
    as in the reference, since the adapter only fits the residual base they produce).
    """

    def _validate_new_adapter(self, config: PeftConfig) -> None:
        with_bias = [name for name, c in self.peft_config.items() if getattr(c, "bias", "none") != "none"]
        if with_bias and getattr(config, "bias", "none") != "none":
            raise ConfigError(
                f"Adapter {with_bias[0]!r} already trains biases (bias={self.peft_config[with_bias[0]].bias!r}); "
                f"only one LoRA adapter per model may use bias other than 'none'. Set bias='none' for the new one."
            )
        configs = [*self.peft_config.values(), config]
        if len(configs) > 1 and any(_mutates_base(c) for c in configs):
            warnings.warn(
                "A PiSSA/OLoRA/CorDA/LoftQ adapter replaces the base weights (by a residual, or its quantized part), so "
                "other adapters on this model see modified base weights. Convert the adapter to a plain LoRA adapter, "
                "or keep it alone.",
                UserWarning,
                stacklevel=4,
            )

    def _config_for_loading(self, config: PeftConfig) -> PeftConfig:
        # The checkpoint overwrites the factors, so a random init is wasted work. PiSSA/OLoRA are
        # different: their init also turns the base weight into the residual the adapter was trained
        # on, so an adapter saved with that init is only right on the original base if the init runs
        # again (as the reference library does). Convert such adapters with
        # path_initial_model_for_weight_conversion to share them as plain LoRA. LoftQ runs again too
        # (it is deterministic, and idempotent on a base that already holds its quantized weight).
        # CorDA and EVA cannot: they need sample data. A CorDA adapter loads onto the base it is
        # given, so give it the residual base, or convert it to plain LoRA.
        init = getattr(config, "init_lora_weights", True)
        if init is True or str(init).lower().startswith(("pissa", "olora", "loftq")):
            return config
        # (without the sub-configs of the init that is skipped, which would only warn)
        return config.copy(init_lora_weights=True, eva_config=None, corda_config=None)

    # ------------------------------------------------------------------ add_weighted_adapter
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        **options: Any,
    ) -> None:
        """Add ``adapter_name`` combining ``adapters``; the types are in :mod:`peft_lora.combination`.

        ``svd`` is the default, as in the reference. A single source is copied with its weight
        folded in, whatever the type (as in the reference, which ignores the type there).
        """
        if len(adapters) == 1:
            combination_type, options = "linear", {}
        super().add_weighted_adapter(adapters, weights, adapter_name, combination_type, **options)

    @classmethod
    def plain_adapter_from_mutated_init(
        cls, config: PeftConfig, initial: dict[str, Any], trained: dict[str, Any]
    ) -> tuple[PeftConfig, dict[str, Any]]:
        from peft_lora.conversion import plain_lora_from_mutated_init

        return plain_lora_from_mutated_init(config, initial, trained)  # type: ignore[arg-type]

    def _config_for_live_tensors(self, config: PeftConfig, adapter_name: str) -> PeftConfig:
        """Describe padded tensors: rank = their rank, alphas chosen so every module keeps its scale."""
        layers = {key: layer for key, layer in self.named_adapter_layers() if layer.has_adapter(adapter_name)}
        live = {key: layer.live_rank(adapter_name) for key, layer in layers.items()}
        if all(rank == pattern_value(config.rank_pattern, key, config.r) for key, rank in live.items()):
            return config
        ranks = set(live.values())
        if len(ranks) != 1:
            raise ValueError(
                f"Adapter {adapter_name!r} has tensors of ranks {sorted(ranks)} that its config does not describe; pad "
                "them to one rank with prepare_model_for_compiled_hotswap(model, target_rank=...)."
            )
        rank = ranks.pop()
        factor = math.sqrt(rank) if config.use_rslora else rank
        alphas = {key: float(layer.scaling[adapter_name]) * factor for key, layer in layers.items()}
        common = max(set(alphas.values()), key=list(alphas.values()).count)
        return config.copy(
            r=rank,
            lora_alpha=common,
            rank_pattern={},
            alpha_pattern={key: alpha for key, alpha in alphas.items() if alpha != common},
        )

    def _source_ranks(self, adapters: list[str]) -> dict[str, list[int]]:
        """Each source adapter's ranks, over the layers that hold it."""
        ranks: dict[str, list[int]] = {a: [] for a in adapters}
        for layer in self.adapter_layers():
            for name in adapters:
                if name in layer.r:
                    ranks[name].append(layer.r[name])
        return ranks

    def _check_combination(self, adapters: list[str], combination_type: str, options: dict[str, Any]) -> None:
        kind, _ = parse_combination(combination_type)
        split_options(kind, options)
        for name in adapters:
            config = self.peft_config[name]
            if config.use_dora or config.lora_bias:
                option = "use_dora" if config.use_dora else "lora_bias"
                raise ValueError(
                    f"Adapter {name!r} has {option}=True, which add_weighted_adapter cannot combine (its extra "
                    "tensors have no weighted sum); merge it into the base instead, or combine plain LoRA adapters."
                )
        if kind == FACTORS:
            distinct = sorted({r for ranks in self._source_ranks(adapters).values() for r in ranks})
            if len(distinct) > 1:
                raise ValueError(
                    f"combination_type={combination_type!r} combines the factors themselves, so every source adapter "
                    f"needs the same rank on every layer, got ranks {distinct}. Use 'cat' or 'svd' (or "
                    f"'{combination_type}_svd') for adapters of different ranks."
                )

    def _weighted_adapter_config(
        self, adapters: list[str], combination_type: str, options: dict[str, Any]
    ) -> PeftConfig:
        kind, _ = parse_combination(combination_type)
        config = super()._weighted_adapter_config(adapters, combination_type, options)
        largest = [max(ranks, default=0) for ranks in self._source_ranks(adapters).values()]
        if kind == CAT:
            rank = sum(largest)
        elif kind == SVD:
            rank = options.get("svd_rank") or max(largest)
        else:
            rank = max(largest)
        # Scaling 1: the sources' scalings are folded into the combined factors. The default init
        # (never PiSSA/OLoRA, which would rewrite the base weights) is overwritten anyway.
        return config.copy(
            r=rank,
            lora_alpha=rank,
            use_rslora=False,
            rank_pattern={},
            alpha_pattern={},
            init_lora_weights=True,
        )
