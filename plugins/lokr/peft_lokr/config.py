"""``LoKrConfig``: every field of the reference library's LoKr config, with its name and default.

Keeping all fields lets ``adapter_config.json`` files move between the two libraries unchanged.
Every option of the reference's LoKr is implemented here, so no value is refused for being
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

__all__ = ["LoKrConfig"]


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
class LoKrConfig(PeftConfig):
    """Configuration of a LoKr adapter (the reference library's ``LoKrConfig``, field for field).

    LoKr (low-rank Kronecker product) adapts a weight by ``delta W = alpha / r * kron(W1, W2)``,
    with ``out = a * b`` and ``in = c * d`` factored so that ``W1`` is (a, c) and ``W2`` (b, d);
    either factor is itself a rank-``r`` product when that is smaller than the full matrix.

    >>> from peft_lokr import LoKrConfig
    >>> LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]).peft_type
    'LOKR'
    """

    PEFT_TYPE: ClassVar[str] = "LOKR"

    rank_pattern: dict = field(factory=dict, converter=_pattern_dict)
    """Per-module ranks: ``{regex matched against the end of the module name: r}``."""
    alpha_pattern: dict = field(factory=dict, converter=_pattern_dict)
    """Per-module alphas, matched like ``rank_pattern``."""
    r: int = 8
    """Rank of the decomposed Kronecker factors."""
    alpha: float = 8
    """Scale numerator: the delta is multiplied by ``alpha / r``."""
    rank_dropout: float = 0.0
    """In training, the probability of dropping each output row of the delta."""
    module_dropout: float = 0.0
    """In training, the probability of skipping the whole adapter for a step."""
    use_effective_conv2d: bool = False
    """For Conv1d/Conv2d with a kernel larger than 1 and a decomposed ``W2``: factor the kernel
    with a core tensor ``lokr_t2`` instead of flattening it into ``lokr_w2_b``."""
    decompose_both: bool = False
    """Also decompose the left factor ``W1`` into ``lokr_w1_a @ lokr_w1_b`` when ``r`` is below
    half its larger side (``W2`` is decomposed by that rule always)."""
    decompose_factor: int = -1
    """How ``in`` and ``out`` are split into the two Kronecker sides: -1 picks the divisor pair
    closest to the square root; ``f > 0`` takes ``(f, dim // f)`` when ``f`` divides ``dim``, else
    the largest divisor not above ``f``."""
    rank_dropout_scale: bool = False
    """Rescale the rows kept by rank dropout by the inverse of the kept fraction."""
    target_modules: list[str] | str | None = field(default=None, converter=_module_names)
    """Module names (exact or dotted suffix), a regex for the full name, or ``"all-linear"``;
    None picks the defaults for the model type."""
    exclude_modules: list[str] | str | None = field(default=None, converter=_module_names)
    init_weights: bool | str = True
    """True: ``W1`` (or ``lokr_w1_a``) starts at zero, so the adapter starts as the identity.
    ``"lycoris"``: ``W2`` (or ``lokr_w2_b``) is the zero factor instead, as the LyCORIS code does.
    False: every factor random (not an identity; for tests)."""
    layers_to_transform: list[int] | int | None = field(default=None, converter=_layer_indices)
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = field(default=None, converter=_optional_list)
    """Extra modules trained in full and saved with the adapter."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        _check_common_fields(self, "LoKr")
        if not (isinstance(self.init_weights, bool) or self.init_weights == "lycoris"):
            raise ConfigError(
                f"init_weights must be True (identity init), 'lycoris' (identity init with the zero factor in W2) or "
                f"False (random init), got init_weights={self.init_weights!r}."
            )
        factor = self.decompose_factor
        if isinstance(factor, bool) or not isinstance(factor, int) or (factor <= 0 and factor != -1):
            raise ConfigError(
                f"decompose_factor must be -1 (split near the square root) or a positive integer, got "
                f"decompose_factor={factor!r}."
            )
