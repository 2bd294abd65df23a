"""``BOFTConfig``: every field of the reference library's BOFT config, with its name and default.

Keeping all fields lets ``adapter_config.json`` files move between the two libraries unchanged.
Every option is implemented; values the reference would misread or only reject deep inside a
layer (a zero butterfly factor, a dropout outside [0, 1], both block options set) are refused
here with a :class:`~peft_core.errors.ConfigError` naming the field and the fix. Checks that need
a layer's size (divisibility of its dimension by the blocks) run when the layer is built, see
:func:`peft_boft.butterfly.resolve_blocks`.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, ClassVar

from attrs import define, field
from peft_core.config import PeftConfig
from peft_core.errors import ConfigError

__all__ = ["BIAS_CHOICES", "BOFTConfig"]

BIAS_CHOICES = ("none", "all", "boft_only")


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


def _optional_names(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ConfigError(
        f"modules_to_save must be a list of module names or None, got {value!r} (wrap a single name in a list)."
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@define(kw_only=True)
class BOFTConfig(PeftConfig):
    """Configuration of a BOFT adapter (the reference library's ``BOFTConfig``, field for field).

    BOFT (Liu et al., "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization",
    ICLR 2024) multiplies each targeted weight by a learned orthogonal matrix and rescales its
    output units: ``W' = s * (W @ Rot.T)``. ``Rot`` is a product of ``boft_n_butterfly_factor``
    block-diagonal orthogonal matrices (Cayley transforms of ``boft_R``), each conjugated by a
    butterfly permutation so that, together, every input unit can mix with every other.

    Give exactly one of ``boft_block_size`` and ``boft_block_num`` (the other is 0); per layer the
    other follows from ``block_size * block_num == in_features`` (for a Conv2d:
    ``in_channels * kernel_height * kernel_width``).

    >>> from peft_boft import BOFTConfig
    >>> BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "v_proj"]).peft_type
    'BOFT'
    """

    PEFT_TYPE: ClassVar[str] = "BOFT"

    boft_block_size: int = 4
    """Size of each orthogonal block (0: derive it from ``boft_block_num``)."""
    boft_block_num: int = 0
    """Number of orthogonal blocks per layer (0: derive it from ``boft_block_size``)."""
    boft_n_butterfly_factor: int = 1
    """Number of butterfly factors; 1 is plain block-diagonal OFT, each further factor doubles
    the span of the blocks' mixing."""
    target_modules: list[str] | str | None = field(default=None, converter=_module_names)
    """Module names (exact or dotted suffix), a regex for the full name, or ``"all-linear"``;
    None picks the defaults for the model type."""
    exclude_modules: list[str] | str | None = field(default=None, converter=_module_names)
    boft_dropout: float = 0.0
    """In training, the fraction of one butterfly factor's blocks replaced by the identity
    (multiplicative dropout)."""
    fan_in_fan_out: bool = False
    """Weights stored as (fan_in, fan_out). BOFT adapts ``nn.Linear`` and ``nn.Conv2d`` only,
    which store (out, in), so this is corrected to False per layer with a warning."""
    bias: str = "none"
    """Which biases train: ``"none"``, ``"all"`` or ``"boft_only"`` (those of adapted layers)."""
    modules_to_save: list[str] | None = field(default=None, converter=_optional_names)
    """Extra modules trained in full and saved with the adapter."""
    init_weights: bool = True
    """True: ``boft_R = 0`` and ``boft_s = 1``, the identity. False: ``boft_R ~ N(0, 0.1)`` and
    ``boft_s ~ N(1, 0.1)`` (not an identity; for tests)."""
    layers_to_transform: list[int] | int | None = field(default=None, converter=_layer_indices)
    layers_pattern: list[str] | str | None = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for name in ("boft_block_size", "boft_block_num"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(
                    f"{name} must be a non-negative integer (0 means: derive it), got {name}={value!r}."
                )
        if self.boft_block_size == 0 and self.boft_block_num == 0:
            raise ConfigError(
                "Either boft_block_size or boft_block_num must be non-zero (got both 0); set one of them, e.g. "
                "boft_block_size=4, and leave the other at 0."
            )
        if self.boft_block_size != 0 and self.boft_block_num != 0:
            raise ConfigError(
                f"Set only one of boft_block_size ({self.boft_block_size}) and boft_block_num ({self.boft_block_num}): "
                "boft_block_size * boft_block_num must equal each layer's input dimension, so the other is derived. "
                "Set the one you do not choose to 0 (boft_block_size defaults to 4: pass boft_block_size=0 together "
                "with boft_block_num)."
            )
        factor = self.boft_n_butterfly_factor
        if not _is_int(factor) or factor < 1:
            raise ConfigError(
                f"boft_n_butterfly_factor must be a positive integer (1 is plain block-diagonal OFT), got {factor!r}."
            )
        dropout = self.boft_dropout
        if (
            not isinstance(dropout, numbers.Real)
            or isinstance(dropout, bool)
            or not 0.0 <= float(dropout) <= 1.0
        ):
            raise ConfigError(f"boft_dropout must be a probability in [0, 1], got boft_dropout={dropout!r}.")
        for name in ("fan_in_fan_out", "init_weights", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {name}={getattr(self, name)!r}.")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"bias must be one of {list(BIAS_CHOICES)}, got bias={self.bias!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(
                f"layers_pattern={self.layers_pattern!r} needs layers_to_transform (the layer indices to adapt)."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            # The reference accepts this and ignores layers_to_transform; so do we, but say so.
            warnings.warn(
                f"BOFT: layers_to_transform={self.layers_to_transform!r} has no effect when target_modules is a "
                "regex string; put the layer indices into the regex instead.",
                UserWarning,
                stacklevel=3,
            )
