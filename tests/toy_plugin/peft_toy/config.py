"""The TOY config: the targeting fields every layer method shares, plus ``init_weights``."""

from __future__ import annotations

from attrs import define

from peft_core.config import PeftConfig


@define(kw_only=True)
class ToyConfig(PeftConfig):
    """A per-output scale ``s`` of a fixed input direction ``u``: ``W + s uᵀ``."""

    PEFT_TYPE = "TOY"

    target_modules: list[str] | str | None = None
    """Modules to adapt: names (a module matches when its path ends with one) or a full-match regex."""
    exclude_modules: list[str] | str | None = None
    """Modules never to adapt, in the same two forms."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a head)."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt these layer indices (of the ``layers_pattern`` block list)."""
    layers_pattern: list[str] | str | None = None
    """Name of the block list ``layers_to_transform`` indexes (e.g. ``"layers"``)."""
    init_weights: bool = True
    """True: ``s = 0``, so a new adapter leaves outputs unchanged; False: a random ``s``."""
