"""``LoraConfig``: every field of the reference library's LoRA config, with its name and default.

Keeping all fields, including those of features this plugin does not implement yet, lets
``adapter_config.json`` files move between the two libraries unchanged. A feature that is not
implemented is refused with a :class:`~peft_core.errors.ConfigError` as soon as it is asked for
(a non-default value), never silently ignored.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, ClassVar

import attrs
from attrs import define, field
from peft_core.config import PeftConfig
from peft_core.errors import ConfigError

from peft_lora.init_configs import normalised

__all__ = ["LoraConfig", "UNSUPPORTED_INITS"]

UNSUPPORTED_INITS = ("orthogonal", "mica", "lora_ga")
"""Values the reference library knows that this plugin does not implement yet."""

_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
_NAMED_INITS = ("gaussian", "pissa", "olora", "eva", "corda", "loftq")
_BIAS_VALUES = ("none", "all", "lora_only")


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


def _pattern_dict(value: Any) -> dict:
    # The reference writes ``{}`` by default but its type allows None; both mean "no pattern".
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"Expected a dict mapping module-name regexes to values, got {value!r}.")
    return dict(value)


def _optional_names(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple, set, frozenset)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise ConfigError(
        f"Expected a list of module names or None, got {value!r} (wrap a single name in a list)."
    )


def _runtime_config(value: Any) -> dict[str, Any]:
    if value is None:
        return {"ephemeral_gpu_offload": False}
    if isinstance(value, dict):
        return {"ephemeral_gpu_offload": False, **value}
    # an object of the reference library's LoraRuntimeConfig class
    return {"ephemeral_gpu_offload": bool(getattr(value, "ephemeral_gpu_offload", False))}


def _sub_config(value: Any) -> Any:
    """Sub-configs (eva_config, ...) are kept as plain dicts so that they round-trip to JSON."""
    if value is None or isinstance(value, dict):
        return value
    if hasattr(value, "__dataclass_fields__"):  # an object of the reference library's class
        import dataclasses

        return dataclasses.asdict(value)
    if attrs.has(type(value)):  # EvaConfig, CordaConfig, LoftQConfig of this package
        return attrs.asdict(value)
    return value


@define(kw_only=True)
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter (the reference library's ``LoraConfig``, field for field).

    The adapted layer computes ``base(x) + scaling * B(A(dropout(x)))`` with ``A`` of rank ``r``
    and ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).

    >>> from peft_lora import LoraConfig
    >>> LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).peft_type
    'LORA'
    """

    PEFT_TYPE: ClassVar[str] = "LORA"

    # --- what this plugin implements
    r: int = 8
    """Rank of the update ``B @ A``."""
    target_modules: list[str] | str | None = field(default=None, converter=_module_names)
    """Module names (exact or dotted suffix), a regex for the full name, or ``"all-linear"``;
    None picks the defaults for the model type."""
    exclude_modules: list[str] | str | None = field(default=None, converter=_module_names)
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    """The base layer stores its weight as (fan_in, fan_out), like transformers' ``Conv1D``;
    corrected per layer (with a warning) when it disagrees with the layer type."""
    bias: str = "none"
    """Which base-layer biases train and are saved: ``"none"``, ``"all"`` or ``"lora_only"``."""
    use_rslora: bool = False
    modules_to_save: list[str] | None = field(default=None, converter=_optional_names)
    init_lora_weights: bool | str = True
    """True: A Kaiming-uniform, B zeros (identity). False: random A and B (not an identity).
    ``"gaussian"``: A ~ N(0, 1/r), B zeros. ``"pissa"``/``"pissa_niter_<n>"``/``"olora"``:
    A and B from the SVD/QR of the base weight, which is replaced by the residual so the
    output is unchanged. ``"eva"``: A from the SVD of the layer inputs (run
    ``initialize_lora_eva_weights``). ``"corda"``: A and B from the covariance-weighted SVD of
    the base weight (run ``preprocess_corda`` first), the base keeps the residual. ``"loftq"``:
    the base weight becomes its quantized part and B A fits the quantization error."""
    layers_to_transform: list[int] | int | None = field(default=None, converter=_layer_indices)
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict = field(factory=dict, converter=_pattern_dict)
    """Per-module ranks: ``{regex matched against the end of the module name: r}``."""
    alpha_pattern: dict = field(factory=dict, converter=_pattern_dict)
    use_dora: bool = False
    """Weight-decomposed LoRA: a learned per-output magnitude times the normalised adapted weight."""
    lora_bias: bool = False
    """Give ``lora_B`` a bias (merged into the base bias)."""
    loftq_config: dict = field(factory=dict, converter=_sub_config)
    """:class:`~peft_lora.LoftQConfig` fields, for ``init_lora_weights="loftq"``."""
    eva_config: dict | None = field(default=None, converter=_sub_config)
    """:class:`~peft_lora.EvaConfig` fields, for ``init_lora_weights="eva"`` (defaults filled in)."""
    corda_config: dict | None = field(default=None, converter=_sub_config)
    """:class:`~peft_lora.CordaConfig` fields, for ``init_lora_weights="corda"`` (defaults filled in)."""

    # --- accepted for file compatibility; a non-default value is refused (not implemented yet)
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
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

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._normalise_init_configs()
        self._check_values()
        self._check_combinations()
        self._refuse_unsupported()

    # ------------------------------------------------------------------ checks
    def _check_values(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got r={self.r!r}.")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in pattern.items():
                if not isinstance(key, str):
                    raise ConfigError(f"{name} keys must be module-name regexes (str), got {key!r}.")
                if name == "rank_pattern" and (not isinstance(value, int) or value <= 0):
                    raise ConfigError(
                        f"rank_pattern[{key!r}] must be a positive integer rank, got {value!r}."
                    )
        if not 0.0 <= float(self.lora_dropout) <= 1.0:
            raise ConfigError(f"lora_dropout must be a probability in [0, 1], got {self.lora_dropout!r}.")
        if self.bias not in _BIAS_VALUES:
            raise ConfigError(f"bias must be one of {list(_BIAS_VALUES)}, got bias={self.bias!r}.")
        init = self.init_lora_weights
        if isinstance(init, str) and init in UNSUPPORTED_INITS:
            raise ConfigError(
                f"init_lora_weights={init!r} is not supported yet by peft-lora. Supported: True, False, "
                "'gaussian', 'pissa', 'pissa_niter_<n>', 'olora', 'eva', 'corda', 'loftq'."
            )
        if not isinstance(init, bool) and not (
            isinstance(init, str) and (init in _NAMED_INITS or _PISSA_NITER.fullmatch(init))
        ):
            raise ConfigError(
                f"Unknown init_lora_weights={init!r}; expected True, False, 'gaussian', 'pissa', "
                "'pissa_niter_<n>' (n a non-negative integer), 'olora', 'eva', 'corda' or 'loftq'."
            )

    def _normalise_init_configs(self) -> None:
        """Fill in the init sub-configs, with the reference library's defaults and warnings."""
        init = self.init_lora_weights
        if init == "loftq":
            if not self.loftq_config:
                raise ConfigError(
                    "init_lora_weights='loftq' needs loftq_config, e.g. loftq_config=LoftQConfig(loftq_bits=4)."
                )
            self.loftq_config = normalised("loftq_config", self.loftq_config)
        elif self.loftq_config:
            warnings.warn(
                "loftq_config is ignored (and dropped) because init_lora_weights is not 'loftq'.",
                UserWarning,
                stacklevel=4,
            )
            self.loftq_config = {}
        for option, name in (("eva_config", "eva"), ("corda_config", "corda")):
            value = getattr(self, option)
            if init == name and value is None:
                warnings.warn(
                    f"init_lora_weights={name!r} without {option}: using the default {option}.",
                    UserWarning,
                    stacklevel=4,
                )
                value = {}
            elif init != name and value is not None:
                warnings.warn(
                    f"{option} is ignored because init_lora_weights is not {name!r}.",
                    UserWarning,
                    stacklevel=4,
                )
            if value is not None:
                setattr(self, option, normalised(option, value))

    def _check_combinations(self) -> None:
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
        if self.lora_bias:
            if self.init_lora_weights not in (True, False):
                raise ConfigError(
                    "lora_bias=True is only supported with init_lora_weights=True or False, got "
                    f"init_lora_weights={self.init_lora_weights!r}."
                )
            if self.use_dora:
                raise ConfigError(
                    "lora_bias=True is not supported together with use_dora=True; drop one of them."
                )

    def _refuse_unsupported(self) -> None:
        # (option, is set, what it is): each one is a feature of the reference library that
        # peft-lora does not implement yet.
        unsupported = [
            ("megatron_config", self.megatron_config is not None, "Megatron parallel layers"),
            ("megatron_core", self.megatron_core not in (None, "megatron.core"), "Megatron parallel layers"),
            ("trainable_token_indices", self.trainable_token_indices is not None, "trainable tokens"),
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
                value = getattr(self, option)
                raise ConfigError(
                    f"{option}={value!r} ({feature}) is not supported yet by peft-lora. Leave {option} at its "
                    "default, or use the reference `peft` library for this feature."
                )

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` dict; like the reference, runtime settings are left out."""
        data = super().to_dict()
        data.pop("runtime_config", None)
        return data
