from __future__ import annotations

from attrs import define

from peft_core.config import PeftConfig


@define(kw_only=True)
class ToyConfig(PeftConfig):
    """A per-output scale ``s`` of a fixed input direction ``u``: ``W + s uᵀ``."""

    PEFT_TYPE = "TOY"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    init_weights: bool = True
