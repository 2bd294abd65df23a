"""``VeraConfig``: every field of the reference library's VeRA config, with its name and default."""

from __future__ import annotations

from typing import Any, ClassVar

from attrs import define, field
from peft_core.config import PeftConfig
from peft_core.errors import ConfigError

__all__ = ["VeraConfig"]

_BIAS_VALUES = ("none", "all", "vera_only")


def _module_names(value: Any) -> list[str] | str | None:
    """A regex string, a list of module names, or None (sets are sorted so JSON output is stable)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(f"Expected a list of module names, a regex string or None, got {value!r}.")


def _optional_names(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple, set, frozenset)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise ConfigError(
        f"Expected a list of module names or None, got {value!r} (wrap a single name in a list)."
    )


def _layer_indices(value: Any) -> list[int] | int | None:
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ConfigError(f"layers_to_transform must be an int, a list of ints or None, got {value!r}.")


@define(kw_only=True)
class VeraConfig(PeftConfig):
    """Configuration of a VeRA adapter (the reference library's ``VeraConfig``, field for field).

    All adapted layers share one pair of frozen random matrices ``A`` (r x in) and ``B`` (out x r),
    drawn from ``projection_prng_key``; each layer learns two vectors, and adds
    ``lambda_b * B(lambda_d * A(dropout(x)))`` to its output.

    >>> from peft_vera import VeraConfig
    >>> VeraConfig(r=64, target_modules=["q_proj", "v_proj"]).peft_type
    'VERA'
    """

    PEFT_TYPE: ClassVar[str] = "VERA"

    r: int = 256
    """Rank of the shared projections. Higher than typical LoRA ranks: VeRA trains only vectors."""
    target_modules: list[str] | str | None = field(default=None, converter=_module_names)
    """Module names (exact or dotted suffix), a regex for the full name, or ``"all-linear"``;
    None picks the defaults for the model type."""
    projection_prng_key: int = 0
    """Seed of the generator the shared projections are drawn from."""
    save_projection: bool = True
    """Save the shared projections with the adapter (``base_model.vera_A``/``base_model.vera_B``).
    False keeps files small and regenerates them from ``projection_prng_key`` on load."""
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    """Initial value of every ``vera_lambda_d`` entry (``vera_lambda_b`` starts at 0)."""
    fan_in_fan_out: bool = False
    """The base layer stores its weight as (fan_in, fan_out), like transformers' ``Conv1D``;
    corrected per layer (with a warning) when it disagrees with the layer type."""
    bias: str = "none"
    """Which base-layer biases train and are saved: ``"none"``, ``"all"`` or ``"vera_only"``."""
    modules_to_save: list[str] | None = field(default=None, converter=_optional_names)
    init_weights: bool = True
    """True: ``lambda_b = 0`` and ``lambda_d = d_initial`` (identity). False: ``lambda_b = 1`` and a
    standard-normal ``lambda_d`` (for tests)."""
    layers_to_transform: list[int] | int | None = field(default=None, converter=_layer_indices)
    layers_pattern: list[str] | str | None = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got r={self.r!r}.")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ConfigError(
                f"projection_prng_key must be an integer seed, got {self.projection_prng_key!r}."
            )
        if not 0.0 <= float(self.vera_dropout) <= 1.0:
            raise ConfigError(f"vera_dropout must be a probability in [0, 1], got {self.vera_dropout!r}.")
        if self.bias not in _BIAS_VALUES:
            raise ConfigError(f"bias must be one of {list(_BIAS_VALUES)}, got bias={self.bias!r}.")
        for name in ("save_projection", "fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(
                f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (the layer indices to adapt)."
            )
