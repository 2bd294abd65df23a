"""The method-agnostic adapter config and its ``adapter_config.json`` round trip."""

from __future__ import annotations

import enum
import json
import os
import warnings
from typing import Any, ClassVar, TypeVar

import attrs
from attrs import define, field

from peft_core.errors import ConfigError

__all__ = ["REFERENCE_FORMAT_VERSION", "PeftConfig", "TaskType"]

REFERENCE_FORMAT_VERSION = "0.21.2"
"""The reference library release whose file format this core writes, recorded as ``peft_version``.

The reference fills ``peft_version`` with its own version when it creates a config and reads it
back to choose between format revisions (OFT's Cayley-Neumann series changed in 0.18.0, and a
missing value is refused there), so configs written here carry the release they are compatible with.
"""

C = TypeVar("C", bound="PeftConfig")


class TaskType(str, enum.Enum):
    """Task types of the reference library; they pick the ``PeftModel`` task class."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


def _task_type(value: Any) -> str | None:
    if value is None:
        return None
    value = getattr(value, "value", value)
    if value not in TaskType._value2member_map_:
        raise ConfigError(
            f"Unknown task_type {value!r}; expected one of {[t.value for t in TaskType]} or None."
        )
    return str(value)


def _json_value(value: Any) -> Any:
    """Make a config value JSON-ready the way the reference library writes it."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if attrs.has(type(value)):
        return {k: _json_value(v) for k, v in attrs.asdict(value, recurse=False).items()}
    return value


@define(kw_only=True)
class PeftConfig:
    """Fields every adapter config shares, with the reference library's names and defaults.

    A method subclasses this with ``@define(kw_only=True)`` and sets ``PEFT_TYPE``; the
    ``peft_type`` field is then filled in automatically, so ``adapter_config.json`` files
    written here and by the reference library read the same.
    """

    PEFT_TYPE: ClassVar[str] = ""
    IS_PROMPT_LEARNING: ClassVar[bool] = False

    task_type: str | None = field(default=None, converter=_task_type)
    peft_type: str | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __attrs_post_init__(self) -> None:
        if self.peft_version is None:
            self.peft_version = REFERENCE_FORMAT_VERSION
        if self.PEFT_TYPE:
            if self.peft_type not in (None, self.PEFT_TYPE):
                raise ConfigError(
                    f"{type(self).__name__} is for peft_type {self.PEFT_TYPE!r}, got peft_type={self.peft_type!r}."
                )
            self.peft_type = self.PEFT_TYPE
        elif self.peft_type is not None:
            self.peft_type = str(getattr(self.peft_type, "value", self.peft_type)).upper()

    # ------------------------------------------------------------------ properties
    @property
    def is_prompt_learning(self) -> bool:
        return self.IS_PROMPT_LEARNING

    # ------------------------------------------------------------------ dict / JSON
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict written to ``adapter_config.json``."""
        return {a.name: _json_value(getattr(self, a.name)) for a in attrs.fields(type(self))}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build a config from a dict, resolving the concrete class from ``peft_type``.

        Unknown keys (from a newer version of either library) are dropped with one warning.
        """
        data = dict(data)
        target: type[PeftConfig] = cls
        if not cls.PEFT_TYPE:
            if data.get("peft_type") is None:
                raise ConfigError(
                    "The adapter config has no 'peft_type' field, so its method cannot be determined. "
                    'Add e.g. "peft_type": "LORA" to adapter_config.json, or pass a config object.'
                )
            from peft_core.plugins import get_registry

            target = get_registry().method(str(data["peft_type"])).config_cls
        known = {a.name for a in attrs.fields(target) if a.init}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"Ignoring keys {unknown} in the {target.__name__} data: this peft-core version does not know them "
                "(they may come from a newer version).",
                UserWarning,
                stacklevel=2,
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        return target(**kwargs)  # type: ignore[return-value]

    @classmethod
    def from_json_file(cls: type[C], path: str | os.PathLike[str]) -> C:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{os.fspath(path)!r} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{os.fspath(path)!r} must hold a JSON object, got {type(data).__name__}.")
        return cls.from_dict(data)

    # ------------------------------------------------------------------ files
    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (atomically)."""
        from peft_core.hub import CONFIG_NAME
        from peft_core.io import atomic_write_text

        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), self.to_json_string())

    @classmethod
    def from_pretrained(
        cls: type[C],
        pretrained_model_name_or_path: str | os.PathLike[str],
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> C:
        """Read ``adapter_config.json`` from a local directory or a Hub repository.

        Extra keyword arguments that are not hub-client options override fields of the result.
        """
        from peft_core.hub import CONFIG_NAME, resolve_file, split_hub_kwargs

        hub_kwargs, overrides = split_hub_kwargs(kwargs)
        path = resolve_file(pretrained_model_name_or_path, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
        assert path is not None
        config = cls.from_json_file(path)
        return attrs.evolve(config, **overrides) if overrides else config

    def copy(self: C, **changes: Any) -> C:
        return attrs.evolve(self, **changes)
