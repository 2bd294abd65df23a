"""``OFTConfig``: every field of the reference library's OFT config, with its name and default.

Keeping all fields lets ``adapter_config.json`` files move between the two libraries unchanged.
Values the reference would misread (a negative block size, a dropout outside [0, 1], both or
neither of ``r`` / ``oft_block_size``) are refused with a :class:`~peft_core.errors.ConfigError`
that names the field and the fix.
"""

from __future__ import annotations

import numbers
import re
import warnings
from typing import Any, ClassVar

from attrs import define, field
from peft_core.config import PeftConfig
from peft_core.errors import ConfigError

__all__ = ["OFTConfig"]

_BIAS_MODES = ("none", "all", "oft_only")
# The reference changed its Cayley-Neumann series in 0.18.0; older adapters compute other rotations.
_NEUMANN_CHANGED_IN = (0, 18, 0)


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
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return list(value)
    raise ConfigError(f"layers_to_transform must be an int, a list of ints or None, got {value!r}.")


def _optional_list(value: Any) -> list | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple, set, frozenset)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise ConfigError(
        f"Expected a list of module names or None, got {value!r} (wrap a single name in a list)."
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _version_tuple(version: str) -> tuple[int, ...] | None:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version.partition("@")[0].strip())
    if match is None:
        return None
    return tuple(int(part or 0) for part in match.groups())


@define(kw_only=True)
class OFTConfig(PeftConfig):
    """Configuration of an OFT adapter (the reference library's ``OFTConfig``, field for field).

    OFT (orthogonal finetuning, Qiu et al. 2023) multiplies each targeted weight by a learned
    block-diagonal orthogonal matrix acting on its *input* side: ``W' = W R^T`` for a linear layer
    (``R`` has ``r`` blocks of size ``oft_block_size``, ``r * oft_block_size = in_features``).
    Each block is the Cayley transform of a skew-symmetric matrix, stored as its strictly upper
    triangle. Give exactly one of ``r`` and ``oft_block_size``; the other follows per layer.

    >>> from peft_oft import OFTConfig
    >>> OFTConfig(oft_block_size=16, target_modules=["q_proj", "v_proj"]).peft_type
    'OFT'
    >>> OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj"]).r
    4
    """

    PEFT_TYPE: ClassVar[str] = "OFT"

    r: int = 0
    """Number of blocks per layer (0: derived from ``oft_block_size``)."""
    oft_block_size: int = 32
    """Size of each block (0: derived from ``r``). A value that does not divide a layer's input
    dimension is moved, with a warning, to the nearest divisor (as in the reference)."""
    module_dropout: float = 0.0
    """In training, the fraction of blocks replaced by the identity (multiplicative dropout)."""
    target_modules: list[str] | str | None = field(default=None, converter=_module_names)
    """Module names (exact or dotted suffix), a regex for the full name, or ``"all-linear"``;
    None picks the defaults for the model type."""
    fan_in_fan_out: bool = False
    """Kept for file compatibility; OFT adapts only layers that store (out, in), so a True value is
    corrected to False per layer with a warning (as in the reference)."""
    bias: str = "none"
    """Which biases train too: ``"none"``, ``"all"`` or ``"oft_only"`` (biases of adapted layers)."""
    exclude_modules: list[str] | str | None = field(default=None, converter=_module_names)
    init_weights: bool = True
    """True: zero skew-symmetric parameters, i.e. identity rotations. False: normal(0, 0.1)
    parameters (not an identity; for tests)."""
    layers_to_transform: list[int] | int | None = field(default=None, converter=_layer_indices)
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = field(default=None, converter=_optional_list)
    """Extra modules trained in full and saved with the adapter."""
    coft: bool = False
    """Constrained OFT: each skew-symmetric block is projected into a Frobenius ball of radius
    ``eps / sqrt(number of stored blocks)`` before use."""
    eps: float = 6e-5
    """COFT's radius (the freedom of rotation); only used with ``coft=True``."""
    block_share: bool = False
    """One block shared by all diagonal positions of a layer (one stored block instead of ``r``)."""
    use_cayley_neumann: bool = True
    """Approximate the Cayley transform's inverse by a truncated Neumann series (faster, only
    approximately orthogonal) instead of solving a linear system (exact)."""
    num_cayley_neumann_terms: int = 5
    """Terms of the Neumann series (more: closer to orthogonal)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for name in ("r", "oft_block_size", "num_cayley_neumann_terms"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {name}={value!r}.")
        if self.r == 0 and self.oft_block_size == 0:
            raise ConfigError(
                "Either r or oft_block_size must be non-zero, got r=0 and oft_block_size=0. Set one of them "
                "(e.g. oft_block_size=32); the other is derived from each layer's input size."
            )
        if self.r != 0 and self.oft_block_size != 0:
            raise ConfigError(
                f"Set only one of r ({self.r}) and oft_block_size ({self.oft_block_size}): r * oft_block_size is "
                "the layer's input size, so the other is derived. Pass oft_block_size=0 to choose r, or r=0 "
                "to choose oft_block_size."
            )
        if not _is_number(self.module_dropout) or not 0.0 <= float(self.module_dropout) <= 1.0:
            raise ConfigError(
                f"module_dropout must be a probability in [0, 1], got module_dropout={self.module_dropout!r}."
            )
        if not _is_number(self.eps) or float(self.eps) <= 0:
            raise ConfigError(f"eps (COFT's radius) must be a positive number, got eps={self.eps!r}.")
        for name in ("fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {name}={getattr(self, name)!r}.")
        if self.bias not in _BIAS_MODES:
            raise ConfigError(f"bias must be one of {list(_BIAS_MODES)}, got bias={self.bias!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(
                f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (the layer indices to adapt)."
            )
        if self.use_cayley_neumann:
            version = _version_tuple(str(self.peft_version))
            if version is not None and version < _NEUMANN_CHANGED_IN:
                warnings.warn(
                    f"This OFT adapter was written by peft {self.peft_version}, before peft 0.18.0 changed the "
                    "Cayley-Neumann parametrisation; its rotations (and outputs) differ from what it was trained "
                    "with. Retrain it, or use the peft version it came from.",
                    UserWarning,
                    stacklevel=3,
                )
