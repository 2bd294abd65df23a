"""``AdaLoraConfig``: every field of the reference library's AdaLoRA config, with its name and default.

The reference's ``AdaLoraConfig`` extends its ``LoraConfig``, so an ``adapter_config.json`` it
writes carries all of LoRA's fields too. They are all here, so files move between the two
libraries unchanged. AdaLoRA uses only some of them; for the rest:

* options the reference refuses for AdaLoRA (``use_dora``, LoftQ) raise :class:`ConfigError`;
* options the reference accepts but ignores for AdaLoRA (``use_rslora``, ``alpha_pattern``,
  ``lora_bias``, special ``init_lora_weights`` strings) are kept, with a warning that they have
  no effect, so that a file written by the reference still loads;
* LoRA features that AdaLoRA never had (Megatron, EVA, trainable tokens, ...) raise
  :class:`ConfigError` when set to anything but their default.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

from attrs import define, field
from peft_core.config import PeftConfig
from peft_core.errors import ConfigError

__all__ = ["AdaLoraConfig", "rank_pattern_key"]

_BIAS_VALUES = ("none", "all", "lora_only")
_LORA_DEFAULT_R = 8


def rank_pattern_key(module_key: str) -> str:
    """The ``rank_pattern`` key of the AdaLoRA layer at ``module_key`` (e.g. ``"q_proj.lora_E"``)."""
    return f"{module_key}.lora_E"


def _module_names(value: Any) -> list[str] | str | None:
    """``target_modules``/``exclude_modules``: a regex string, a list of names, or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f"Expected a list of module names, a regex string or None, got {value!r}.")


def _layer_indices(value: Any) -> list[int] | int | None:
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ConfigError(f"layers_to_transform must be an int, a list of ints or None, got {value!r}.")


def _optional_names(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple, set, frozenset)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise ConfigError(
        f"Expected a list of module names or None, got {value!r} (wrap a single name in a list)."
    )


def _alpha_pattern(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"alpha_pattern must be a dict (it has no effect on AdaLoRA), got {value!r}.")
    return dict(value)


def _mask(key: str, value: Any) -> list[bool]:
    if hasattr(value, "tolist") and hasattr(value, "view"):  # a torch tensor, as the allocator keeps it
        value = value.reshape(-1).tolist()
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)) for v in value
    ):
        raise ConfigError(
            f"rank_pattern[{key!r}] must be a list of booleans (which singular triplets of the layer are kept), "
            f"got {value!r}. AdaLoRA writes rank_pattern itself (update_and_allocate); for fixed per-module "
            "ranks use LoRA's rank_pattern instead."
        )
    return [bool(v) for v in value]


def _rank_pattern(value: Any) -> dict[str, list[bool]] | None:
    """``{"<module>.lora_E": [kept?, ...]}``; the reference's file format, None when not allocated yet."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(
            f"rank_pattern must be None or a dict mapping '<module name>.lora_E' to a list of booleans, got {value!r}."
        )
    result = {}
    for key, mask in value.items():
        if not isinstance(key, str) or ".lora_E." not in f".{key}.":
            raise ConfigError(
                f"rank_pattern key {key!r} is not of the form '<module name>.lora_E'; AdaLoRA's rank_pattern "
                "names each layer's singular values (as written by update_and_allocate)."
            )
        result[key] = _mask(key, mask)
    return result


def _runtime_config(value: Any) -> dict[str, Any]:
    if value is None:
        return {"ephemeral_gpu_offload": False}
    if isinstance(value, dict):
        return {"ephemeral_gpu_offload": False, **value}
    # an object of the reference library's LoraRuntimeConfig class
    return {"ephemeral_gpu_offload": bool(getattr(value, "ephemeral_gpu_offload", False))}


def _sub_config(value: Any) -> Any:
    """Sub-configs are kept as plain dicts so that they round-trip to JSON."""
    if value is None or isinstance(value, dict):
        return value
    if hasattr(value, "__dataclass_fields__"):  # an object of the reference library's class
        import dataclasses

        return dataclasses.asdict(value)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@define(kw_only=True)
class AdaLoraConfig(PeftConfig):
    """Configuration of an AdaLoRA adapter (the reference library's ``AdaLoraConfig``, field for field).

    Each targeted layer learns ``P`` (``lora_B``), ``Λ`` (``lora_E``) and ``Q`` (``lora_A``) of
    rank ``init_r`` and computes ``base(x) + lora_alpha / ranknum * x Qᵀ Λ Pᵀ``. During training,
    :meth:`~peft_adalora.model.AdaLoraModel.update_and_allocate` prunes singular values of low
    importance, lowering the total rank along a cubic schedule from ``init_r`` per layer (until
    step ``tinit``) to ``target_r`` per layer on average (from step ``total_step - tfinal`` on);
    the final choice is written to ``rank_pattern``.

    >>> from peft_adalora import AdaLoraConfig
    >>> AdaLoraConfig(init_r=12, target_r=4, total_step=1000, target_modules=["q_proj", "v_proj"]).peft_type
    'ADALORA'
    """

    PEFT_TYPE: ClassVar[str] = "ADALORA"

    # --- the LoRA fields AdaLoRA uses
    r: int = _LORA_DEFAULT_R
    """Not used by AdaLoRA (the reference warns when it is set); the rank is ``init_r``."""
    target_modules: list[str] | str | None = field(default=None, converter=_module_names)
    """Module names (exact or dotted suffix), a regex for the full name, or ``"all-linear"``;
    None picks the reference's AdaLoRA defaults for the model type."""
    exclude_modules: list[str] | str | None = field(default=None, converter=_module_names)
    lora_alpha: int = 8
    """Scale of the update: ``lora_alpha / ranknum`` (``1 / ranknum`` would be used if it were 0 or less)."""
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    """The base layer stores its weight as (fan_in, fan_out), like transformers' ``Conv1D``;
    corrected per layer (with a warning) when it disagrees with the layer type."""
    bias: str = "none"
    """Which base-layer biases train and are saved: ``"none"``, ``"all"`` or ``"lora_only"``."""
    use_rslora: bool = False
    """No effect on AdaLoRA (accepted for file compatibility, with a warning)."""
    modules_to_save: list[str] | None = field(default=None, converter=_optional_names)
    init_lora_weights: bool | str = True
    """True: ``lora_E`` zeros and ``lora_A``/``lora_B`` ~ N(0, 0.02²) (identity). False: all three
    standard normal (not an identity; for tests)."""
    layers_to_transform: list[int] | int | None = field(default=None, converter=_layer_indices)
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, list[bool]] | None = field(default=None, converter=_rank_pattern)
    """Which singular triplets each layer keeps, ``{"<module>.lora_E": [bool, ...]}``; written by
    the rank allocator. A config that has one builds each listed layer with ``sum(mask)`` triplets."""
    alpha_pattern: dict = field(factory=dict, converter=_alpha_pattern)
    """No effect on AdaLoRA (accepted for file compatibility, with a warning)."""
    use_dora: bool = False
    """Refused: AdaLoRA does not support DoRA."""
    lora_bias: bool = False
    """No effect on AdaLoRA (accepted for file compatibility, with a warning)."""

    # --- LoRA features AdaLoRA does not have; a non-default value is refused
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loftq_config: dict = field(factory=dict, converter=_sub_config)
    eva_config: dict | None = field(default=None, converter=_sub_config)
    corda_config: dict | None = field(default=None, converter=_sub_config)
    lora_ga_config: dict | None = field(default=None, converter=_sub_config)
    velora_config: dict | None = field(default=None, converter=_sub_config)
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: dict | None = field(default=None, converter=_sub_config)
    layer_replication: list[list[int]] | None = None
    runtime_config: dict[str, Any] = field(factory=lambda: _runtime_config(None), converter=_runtime_config)
    """Runtime-only settings; like the reference library, never written to ``adapter_config.json``."""
    target_parameters: list[str] | None = None
    use_bdlora: dict | None = field(default=None, converter=_sub_config)
    arrow_config: dict | None = field(default=None, converter=_sub_config)
    kasa_config: dict | None = field(default=None, converter=_sub_config)
    ensure_weight_tying: bool = False

    # --- AdaLoRA's own fields
    target_r: int = 8
    """The average rank per layer at the end of the budget schedule."""
    init_r: int = 12
    """The rank every layer starts with."""
    tinit: int = 0
    """Warm-up steps before ranks are pruned."""
    tfinal: int = 0
    """Final fine-tuning steps with the allocated ranks fixed."""
    deltaT: int = 1
    """Prune every ``deltaT`` steps during the budget schedule."""
    beta1: float = 0.85
    """EMA coefficient of the sensitivity ``|w * grad|``."""
    beta2: float = 0.85
    """EMA coefficient of the sensitivity's uncertainty."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality penalty ``mean ||PᵀP - I||_F, ||QQᵀ - I||_F`` added to the loss."""
    total_step: int | None = None
    """The number of training steps; required (the budget schedule depends on it)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._check_lora_values()
        self._check_schedule()
        self._check_lora_combinations()
        self._refuse_unsupported()
        self._warn_ignored()

    # ------------------------------------------------------------------ checks
    def _check_lora_values(self) -> None:
        if not 0.0 <= float(self.lora_dropout) <= 1.0:
            raise ConfigError(f"lora_dropout must be a probability in [0, 1], got {self.lora_dropout!r}.")
        if self.bias not in _BIAS_VALUES:
            raise ConfigError(f"bias must be one of {list(_BIAS_VALUES)}, got bias={self.bias!r}.")
        if not isinstance(self.init_lora_weights, (bool, str)):
            raise ConfigError(
                f"init_lora_weights must be True (identity init) or False (random), got {self.init_lora_weights!r}."
            )
        if self.use_dora:
            raise ConfigError("AdaLoRA does not support DoRA; set use_dora=False (or use LoRA for DoRA).")
        if self.init_lora_weights == "loftq":
            raise ConfigError(
                "AdaLoRA does not support LoftQ (init_lora_weights='loftq'); use init_lora_weights=True, or LoRA for "
                "LoftQ."
            )
        if self.loftq_config:
            # As in the reference: a LoftQ config without the LoftQ init is dropped, with a warning.
            warnings.warn(
                "loftq_config is set but ignored: AdaLoRA does not support LoftQ.", UserWarning, stacklevel=4
            )
            self.loftq_config = {}

    def _check_schedule(self) -> None:
        for name in ("init_r", "deltaT"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {name}={value!r}.")
        for name in ("target_r", "tinit", "tfinal"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {name}={value!r}.")
        if not _is_int(self.r) or self.r <= 0:
            raise ConfigError(
                f"r must be a positive integer, got r={self.r!r} (AdaLoRA uses init_r instead)."
            )
        if self.total_step is None or not _is_int(self.total_step) or self.total_step <= 0:
            raise ConfigError(
                f"AdaLoRA needs total_step, the number of training steps (a positive integer), got "
                f"total_step={self.total_step!r}; the rank budget schedule is laid out over it."
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < 1.0:
                raise ConfigError(
                    f"{name} must be strictly between 0 and 1 (an EMA coefficient), got {value!r}."
                )
        if not isinstance(self.orth_reg_weight, (int, float)) or self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}.")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"The schedule tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leaves no steps "
                "for the rank budget to shrink (it needs tinit < total_step - tfinal). Decrease tinit or tfinal, or "
                "increase total_step."
            )

    def _check_lora_combinations(self) -> None:
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(
                "layers_to_transform cannot be used when target_modules is a regex string; put the layer "
                "indices into the regex, or pass target_modules as a list of names."
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError(
                "layers_pattern cannot be used when target_modules is a regex string; pass target_modules "
                "as a list of names, or drop layers_pattern."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(
                f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (the layer indices to adapt)."
            )
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ConfigError(
                "lora_bias=True is only accepted with init_lora_weights=True or False, got "
                f"init_lora_weights={self.init_lora_weights!r}."
            )

    def _refuse_unsupported(self) -> None:
        # (option, is set, what it is): LoRA features that AdaLoRA does not have.
        unsupported = [
            ("megatron_config", self.megatron_config is not None, "Megatron parallel layers"),
            ("megatron_core", self.megatron_core not in (None, "megatron.core"), "Megatron parallel layers"),
            ("trainable_token_indices", self.trainable_token_indices is not None, "trainable tokens"),
            ("eva_config", self.eva_config is not None, "EVA initialisation"),
            ("corda_config", self.corda_config is not None, "CorDA initialisation"),
            ("lora_ga_config", self.lora_ga_config is not None, "LoRA-GA initialisation"),
            ("velora_config", self.velora_config is not None, "VeLoRA"),
            ("alora_invocation_tokens", self.alora_invocation_tokens is not None, "activated LoRA (aLoRA)"),
            ("use_qalora", bool(self.use_qalora), "QALoRA"),
            ("qalora_group_size", self.qalora_group_size != 16, "QALoRA"),
            ("monteclora_config", self.monteclora_config is not None, "MonteCLoRA"),
            ("layer_replication", self.layer_replication is not None, "layer replication"),
            (
                "runtime_config",
                bool(self.runtime_config.get("ephemeral_gpu_offload")),
                "ephemeral GPU offload",
            ),
            ("target_parameters", self.target_parameters is not None, "targeting nn.Parameters"),
            ("use_bdlora", self.use_bdlora is not None, "block-diagonal LoRA"),
            ("arrow_config", self.arrow_config is not None, "Arrow routing"),
            ("kasa_config", self.kasa_config is not None, "KaSA"),
            ("ensure_weight_tying", bool(self.ensure_weight_tying), "tied adapters"),
        ]
        for option, is_set, feature in unsupported:
            if is_set:
                raise ConfigError(
                    f"{option}={getattr(self, option)!r} ({feature}) is a LoRA feature that AdaLoRA does not support. "
                    f"Leave {option} at its default, or use LoRA."
                )

    def _warn_ignored(self) -> None:
        if self.r != _LORA_DEFAULT_R:
            warnings.warn(
                f"r={self.r} is not used by AdaLoRA and is ignored; set init_r (the initial rank) instead.",
                UserWarning,
                stacklevel=4,
            )
        ignored = [
            ("use_rslora", bool(self.use_rslora)),
            ("alpha_pattern", bool(self.alpha_pattern)),
            ("lora_bias", bool(self.lora_bias)),
            ("init_lora_weights", isinstance(self.init_lora_weights, str)),
        ]
        for option, is_set in ignored:
            if is_set:
                detail = (
                    "; any true value gives AdaLoRA's own init (lora_E zeros)"
                    if option == "init_lora_weights"
                    else ""
                )
                warnings.warn(
                    f"{option}={getattr(self, option)!r} has no effect on AdaLoRA (the reference library ignores it "
                    f"too){detail}.",
                    UserWarning,
                    stacklevel=4,
                )

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` dict; like the reference, runtime settings are left out."""
        data = super().to_dict()
        data.pop("runtime_config", None)
        return data
