"""``IA3Config``: every field of the reference library's (IA)³ config, with its name and default."""

from __future__ import annotations

from typing import Any, ClassVar

from attrs import define, field
from peft_core.config import PeftConfig
from peft_core.errors import ConfigError

__all__ = ["IA3Config"]


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


@define(kw_only=True)
class IA3Config(PeftConfig):
    """Configuration of an (IA)³ adapter (the reference library's ``IA3Config``, field for field).

    Each targeted layer learns one vector ``l``: the layer computes ``base(x) * l`` (one entry per
    output unit), or ``base(x * l)`` (one entry per input unit) for ``feedforward_modules``.

    >>> from peft_ia3 import IA3Config
    >>> IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]).peft_type
    'IA3'
    """

    PEFT_TYPE: ClassVar[str] = "IA3"

    target_modules: list[str] | str | None = field(default=None, converter=_module_names)
    """Module names (exact or dotted suffix), a regex for the full name, or ``"all-linear"``;
    None picks the defaults for the model type."""
    exclude_modules: list[str] | str | None = field(default=None, converter=_module_names)
    feedforward_modules: list[str] | str | None = field(default=None, converter=_module_names)
    """Targets whose *input* is rescaled: a list of name endings, or a regex for the full name.
    None picks the defaults for the model type (an error for models without defaults: pass ``[]``
    if no target is a feedforward layer)."""
    fan_in_fan_out: bool = False
    """The base layer stores its weight as (fan_in, fan_out), like transformers' ``Conv1D``;
    corrected per layer (with a warning) when it disagrees with the layer type."""
    modules_to_save: list[str] | None = field(default=None, converter=_optional_names)
    init_ia3_weights: bool = True
    """True: vectors of ones (an identity). False: random normal vectors (for tests)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for name in ("fan_in_fan_out", "init_ia3_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        # With both given as lists, every feedforward module must be targeted. The reference demands a
        # literal subset; here an entry also counts when it and a target can name the same module (one ends
        # with the other), since the reference itself saves "all-linear" targets as full module names next
        # to short feedforward names (and then cannot read its own file back), and "all-linear" expands to
        # short names next to which a user's feedforward names may be longer.
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = [
                name
                for name in self.feedforward_modules
                if not any(target.endswith(name) or name.endswith(target) for target in self.target_modules)
            ]
            if extra:
                raise ConfigError(
                    f"feedforward_modules {extra} are not in target_modules={self.target_modules!r}; "
                    "feedforward_modules must be a subset of target_modules. Add them to target_modules or drop them."
                )
