"""Sub-configs of the data-driven and quantization-aware inits: ``EvaConfig``, ``CordaConfig``, ``LoftQConfig``.

They have the reference library's field names and defaults. ``LoraConfig`` keeps them as plain
dicts (the form ``adapter_config.json`` holds them in), filled in with every field, so a config
written here reads the same in both libraries; :func:`init_options` turns the dict back into
the class for code that runs the init.
"""

from __future__ import annotations

from typing import Any

import attrs
from attrs import define, field
from peft_core.errors import ConfigError

__all__ = ["CordaConfig", "EvaConfig", "LoftQConfig", "init_options"]


def _between_0_and_1(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"EvaConfig.tau is a cosine-similarity threshold in [0, 1], got tau={value!r}.")


def _at_least_1(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if value < 1.0:
        raise ConfigError(
            f"EvaConfig.rho is the most a layer's rank may grow (r * rho), so it must be >= 1.0, got rho={value!r}."
        )


@define
class EvaConfig:
    """Options of EVA (Explained Variance Adaptation), ``init_lora_weights="eva"``.

    EVA puts the top right-singular vectors of each target layer's inputs (collected over batches
    of data) into ``lora_A``, and gives more rank to the layers whose inputs have more explained
    variance. Run it with :func:`peft_lora.initialize_lora_eva_weights` after ``get_peft_model``.

    >>> from peft_lora import EvaConfig, LoraConfig
    >>> LoraConfig(r=4, init_lora_weights="eva", eva_config=EvaConfig(rho=1.5)).eva_config["rho"]
    1.5
    """

    rho: float = field(default=2.0, validator=_at_least_1)
    """A layer's rank may reach ``round(r * rho)``; the total stays ``r`` per layer. 1.0: no redistribution."""
    tau: float = field(default=0.99, validator=_between_0_and_1)
    """A component has converged once its cosine similarity between two steps is at least ``tau``."""
    use_label_mask: bool = True
    """Leave out the positions whose label is ``label_mask_value`` (language modelling inputs)."""
    label_mask_value: int = -100
    whiten: bool = False
    """Divide each component by the square root of its singular value."""
    adjust_scaling_factors: bool = True
    """Scale ``lora_alpha`` with a layer's new rank, so that every layer keeps ``alpha / r``."""


_CORDA_METHODS = ("ipm", "kpm")


def _corda_method(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in _CORDA_METHODS:
        raise ConfigError(f"CordaConfig.corda_method must be 'ipm' or 'kpm', got {value!r}.")


@define
class CordaConfig:
    """Options of CorDA (context-oriented decomposition), ``init_lora_weights="corda"``.

    CorDA decomposes ``W C`` (``C`` the covariance of the layer's inputs on sample data) and puts
    the top (``"ipm"``, instruction-previewed) or bottom (``"kpm"``, knowledge-preserved) ``r``
    components into ``B @ A``; the base weight keeps the rest. Run
    :func:`peft_lora.preprocess_corda` on the base model before ``get_peft_model``.
    """

    cache_file: str | None = None
    """Where to store (or read) the decomposition for each target layer."""
    covariance_file: str | None = None
    """Where to store (or read) each target layer's input covariance."""
    corda_method: str = field(default="ipm", validator=_corda_method)
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True
    """Remove the covariance and bookkeeping attributes from the layers once preprocessing is done."""


def _bits(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value not in (4, 8):
        raise ConfigError(
            f"LoftQConfig.loftq_bits must be 4 (NF4) or 8 (int8), got {value!r}, as in the reference library."
        )


def _iterations(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"LoftQConfig.loftq_iter must be a positive number of iterations, got {value!r}.")


@define
class LoftQConfig:
    """Options of LoftQ, ``init_lora_weights="loftq"`` (with ``loftq_config=LoftQConfig(...)``).

    LoftQ alternates between quantizing ``W - B A`` and fitting ``B A`` to the quantization
    error, then replaces the base weight by its quantized-dequantized part, so that ``Q + B A``
    starts close to ``W``.

    >>> from peft_lora import LoftQConfig, LoraConfig
    >>> LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_iter=2)).loftq_config
    {'loftq_bits': 4, 'loftq_iter': 2}
    """

    loftq_bits: int = field(default=4, validator=_bits)
    loftq_iter: int = field(default=1, validator=_iterations)


_CLASSES: dict[str, type] = {
    "eva_config": EvaConfig,
    "corda_config": CordaConfig,
    "loftq_config": LoftQConfig,
}


def _build(option: str, value: Any) -> Any:
    cls = _CLASSES[option]
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a {cls.__name__}, a dict of its fields or None, got {value!r}.")
    known = {a.name for a in attrs.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{option} has unknown field(s) {unknown}; {cls.__name__} has {sorted(known)}.")
    return cls(**value)


def normalised(option: str, value: Any) -> dict[str, Any]:
    """``value`` (a sub-config object or a partial dict) as the complete, validated dict."""
    return attrs.asdict(_build(option, value))


def init_options(option: str, value: Any) -> Any:
    """The sub-config object for ``value`` (a dict as stored in ``LoraConfig``, an object, or None)."""
    return _CLASSES[option]() if value is None or value == {} else _build(option, value)
