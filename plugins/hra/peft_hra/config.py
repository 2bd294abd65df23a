"""``HRAConfig``: every field of the reference library's HRA config, with its name and default."""

from __future__ import annotations

from typing import Any, ClassVar

from attrs import define, field
from peft_core.config import PeftConfig
from peft_core.errors import ConfigError

__all__ = ["HRAConfig"]

_BIAS_VALUES = ("none", "all", "hra_only")


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
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return list(value)
    raise ConfigError(f"layers_to_transform must be an int, a list of ints or None, got {value!r}.")


def _layer_patterns(value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(
        f"layers_pattern must be a name (e.g. 'layers' or 'h'), a list of names or None, got {value!r}."
    )


@define(kw_only=True)
class HRAConfig(PeftConfig):
    """Configuration of an HRA adapter (the reference library's ``HRAConfig``, field for field).

    Each targeted layer learns ``r`` vectors ``u_1 ... u_r`` (the columns of ``hra_u``); its weight
    ``W`` is used as ``W @ H_1 @ H_2 @ ... @ H_r`` with the Householder reflections
    ``H_i = I - 2 u_i u_i^T / |u_i|^2``, an orthogonal transform of the layer's input space.

    >>> from peft_hra import HRAConfig
    >>> HRAConfig(r=8, target_modules=["q_proj", "v_proj"]).peft_type
    'HRA'
    """

    PEFT_TYPE: ClassVar[str] = "HRA"

    r: int = 8
    """Number of reflections per layer. Keep it even: the identity init pairs equal vectors, and an
    odd ``r`` falls back (with a warning) to random vectors, which change the output from the start."""
    apply_GS: bool = False
    """Orthonormalise the vectors (Gram-Schmidt) first; the chain is then ``I - 2 Q Q^T``. No
    init is the identity with it, so it needs ``init_weights=False`` (or an odd ``r``)."""
    target_modules: list[str] | str | None = field(default=None, converter=_module_names)
    """Module names (exact or dotted suffix), a regex for the full name, or ``"all-linear"``;
    None picks the defaults for the model type."""
    exclude_modules: list[str] | str | None = field(default=None, converter=_module_names)
    init_weights: bool = True
    """True: the symmetric init (equal pairs of vectors, so the chain is the identity). False:
    every vector drawn at random (Kaiming-uniform), a non-identity start (for tests)."""
    layers_to_transform: list[int] | int | None = field(default=None, converter=_layer_indices)
    layers_pattern: list[str] | str | None = field(default=None, converter=_layer_patterns)
    bias: str = "none"
    """Which base-layer biases train and are saved: ``"none"``, ``"all"`` or ``"hra_only"``."""
    modules_to_save: list[str] | None = field(default=None, converter=_optional_names)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer (the number of reflections), got r={self.r!r}.")
        for name in ("apply_GS", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.bias not in _BIAS_VALUES:
            raise ConfigError(f"bias must be one of {list(_BIAS_VALUES)}, got bias={self.bias!r}.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(
                f"layers_to_transform={self.layers_to_transform!r} cannot be combined with a regex "
                f"target_modules={self.target_modules!r}; put the layer indices into the regex, or pass "
                "target_modules as a list of names."
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ConfigError(
                f"layers_pattern={self.layers_pattern!r} cannot be combined with a regex "
                f"target_modules={self.target_modules!r}; pass target_modules as a list of names."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(
                f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (the layer indices to adapt)."
            )
