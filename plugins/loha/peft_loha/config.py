"""``LoHaConfig``: every field of the reference library's LoHa config, with its name and default.

Keeping all fields lets ``adapter_config.json`` files move between the two libraries unchanged.
Every option of the reference's LoHa is implemented here, so no value is refused for being
unsupported; values the reference would misread (a negative rank, a dropout outside [0, 1]) are
refused with a :class:`~peft_core.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, ClassVar

from attrs import define, field
from peft_core.config import PeftConfig
from peft_core.errors import ConfigError

__all__ = ["LoHaConfig"]


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


def _optional_list(value: Any) -> list | None:
    return None if value is None else list(value) if isinstance(value, (list, tuple, set)) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_common_fields(config: Any, method: str) -> None:
    """Validation shared by the LyCORIS-style configs (rank, alpha, dropouts, patterns, layers)."""
    if isinstance(config.r, bool) or not isinstance(config.r, int) or config.r <= 0:
        raise ConfigError(f"r must be a positive integer, got r={config.r!r}.")
    if not _is_number(config.alpha):
        raise ConfigError(f"alpha must be a number, got alpha={config.alpha!r}.")
    for name in ("rank_dropout", "module_dropout"):
        value = getattr(config, name)
        if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"{name} must be a probability in [0, 1], got {name}={value!r}.")
    for key, value in config.rank_pattern.items():
        if not isinstance(key, str):
            raise ConfigError(f"rank_pattern keys must be module-name regexes (str), got {key!r}.")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"rank_pattern[{key!r}] must be a positive integer rank, got {value!r}.")
    for key, value in config.alpha_pattern.items():
        if not isinstance(key, str):
            raise ConfigError(f"alpha_pattern keys must be module-name regexes (str), got {key!r}.")
        if not _is_number(value):
            raise ConfigError(f"alpha_pattern[{key!r}] must be a number, got {value!r}.")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ConfigError(
            f"layers_pattern={config.layers_pattern!r} needs layers_to_transform (the layer indices to adapt)."
        )
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        # The reference accepts this and ignores layers_to_transform; so do we, but say so.
        warnings.warn(
            f"{method}: layers_to_transform={config.layers_to_transform!r} has no effect when target_modules is a "
            "regex string; put the layer indices into the regex instead.",
            UserWarning,
            stacklevel=4,
        )


@define(kw_only=True)
class LoHaConfig(PeftConfig):
    """Configuration of a LoHa adapter (the reference library's ``LoHaConfig``, field for field).

    LoHa (low-rank Hadamard product, FedPara) adapts a weight by
    ``delta W = alpha / r * (W1a @ W1b) * (W2a @ W2b)``: the element-wise product of two rank-``r``
    matrices, whose rank can reach ``r**2`` for the parameter count of two rank-``r`` LoRAs.

    >>> from peft_loha import LoHaConfig
    >>> LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]).peft_type
    'LOHA'
    """

    PEFT_TYPE: ClassVar[str] = "LOHA"

    rank_pattern: dict = field(factory=dict, converter=_pattern_dict)
    """Per-module ranks: ``{regex matched against the end of the module name: r}``."""
    alpha_pattern: dict = field(factory=dict, converter=_pattern_dict)
    """Per-module alphas, matched like ``rank_pattern``."""
    r: int = 8
    """Rank of each of the two factor pairs."""
    alpha: float = 8
    """Scale numerator: the delta is multiplied by ``alpha / r``."""
    rank_dropout: float = 0.0
    """In training, the probability of dropping each output row of the delta (the kept rows are
    rescaled by the inverse of the kept fraction)."""
    module_dropout: float = 0.0
    """In training, the probability of skipping the whole adapter for a step."""
    use_effective_conv2d: bool = False
    """For Conv1d/Conv2d with a kernel larger than 1: factor the kernel with a small core tensor
    (``hada_t1``/``hada_t2``, FedPara's "Proposition 3") instead of flattening it."""
    target_modules: list[str] | str | None = field(default=None, converter=_module_names)
    """Module names (exact or dotted suffix), a regex for the full name, or ``"all-linear"``;
    None picks the defaults for the model type."""
    exclude_modules: list[str] | str | None = field(default=None, converter=_module_names)
    init_weights: bool = True
    """True: ``hada_w2_b`` starts at zero, so the adapter starts as the identity. False: every
    factor random (not an identity; for tests)."""
    layers_to_transform: list[int] | int | None = field(default=None, converter=_layer_indices)
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = field(default=None, converter=_optional_list)
    """Extra modules trained in full and saved with the adapter."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        _check_common_fields(self, "LoHa")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(
                f"init_weights must be True (identity init) or False (random init) for LoHa, got "
                f"init_weights={self.init_weights!r}."
            )
