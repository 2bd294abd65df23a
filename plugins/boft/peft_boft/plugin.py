"""The hooks peft-core calls when it loads peft-boft (entry point ``boft`` in group ``peft_core``).

* One layer factory per base-layer type (priority 0), each returning None for modules it does
  not handle, so another plugin can add BOFT support for a new layer type with a factory of
  higher priority, without touching this package. A last factory (priority -100) explains why
  layer types the reference does not adapt with BOFT either (embeddings, other convolutions,
  transformers' ``Conv1D``) are refused.
* A state-dict converter reading the adapters that the reference writes when its CUDA extension
  is missing (see :func:`pad_single_factor_checkpoint`).
"""

from __future__ import annotations

import warnings

import torch
from peft_core.default_targets import LORA_STYLE_DEFAULT_TARGETS
from peft_core.errors import TargetModulesError
from peft_core.hookspecs import hookimpl
from peft_core.layer import AdapterLayer
from peft_core.quantization import is_plain_float
from peft_core.registry import Capabilities, LayerContext, MethodSpec, Registry
from torch import nn

from peft_boft.config import BOFTConfig
from peft_boft.layer import BOFTLayer, Conv2d, Linear
from peft_boft.model import BOFTModel

__all__ = [
    "PEFT_TYPE",
    "conv2d_factory",
    "linear_factory",
    "pad_single_factor_checkpoint",
    "peft_register_layer_factories",
    "peft_register_methods",
    "peft_register_state_dict_converters",
    "unsupported_layer_factory",
]

PEFT_TYPE = "BOFT"


def _plain_target(target: nn.Module, context: LayerContext) -> nn.Module:
    """``target`` itself; another method's adapter layer is refused (BOFT does not stack)."""
    if isinstance(target, AdapterLayer):
        raise TargetModulesError(
            f"Target module {context.key!r} already holds a {type(target).__name__} adapter of another method. "
            "BOFT rotates the base weight itself, so it cannot wrap another method's adapter (peft does not mix "
            "BOFT with other methods either); adapt this module with one method only."
        )
    return target


def linear_factory(
    target: nn.Module, adapter_name: str, config: BOFTConfig, context: LayerContext
) -> BOFTLayer | None:
    """BOFT for ``nn.Linear`` (with a plain floating-point weight)."""
    base = _plain_target(target, context)
    if not isinstance(base, nn.Linear) or not is_plain_float(base):
        return None
    if config.fan_in_fan_out:
        warnings.warn(
            f"fan_in_fan_out=True, but {context.key!r} is an nn.Linear, which stores (out, in); using "
            "fan_in_fan_out=False for it.",
            UserWarning,
            stacklevel=3,
        )
    return Linear(base, adapter_name, config, key=context.key)


def conv2d_factory(
    target: nn.Module, adapter_name: str, config: BOFTConfig, context: LayerContext
) -> BOFTLayer | None:
    """BOFT for ``nn.Conv2d`` (any kernel, stride, padding, dilation or groups)."""
    base = _plain_target(target, context)
    if not isinstance(base, nn.Conv2d) or not is_plain_float(base):
        return None
    return Conv2d(base, adapter_name, config, key=context.key)


def _is_transformers_conv1d(module: nn.Module) -> bool:
    # By name, so that transformers is never imported here.
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def unsupported_layer_factory(
    target: nn.Module, adapter_name: str, config: BOFTConfig, context: LayerContext
) -> BOFTLayer | None:
    """Refuse, saying why, the layer types that BOFT (here and in the reference) does not adapt."""
    if isinstance(target, (nn.Embedding, nn.Conv1d, nn.Conv3d)) or _is_transformers_conv1d(target):
        kind = f"{type(target).__module__}.{type(target).__name__}"
        raise TargetModulesError(
            f"Target module {context.key!r} is a {kind}. BOFT adapts nn.Linear and nn.Conv2d layers only (as in "
            "peft): its rotation acts on a layer's input features, which this layer type does not expose in that "
            "form. Remove the module from target_modules (or add it to exclude_modules)."
        )
    return None


# ---------------------------------------------------------------------- checkpoints
def pad_single_factor_checkpoint(
    state_dict: dict[str, torch.Tensor], config: object
) -> dict[str, torch.Tensor] | None:
    """Read BOFT adapters written by the reference without its CUDA extension.

    Without its compiled extension, the reference silently trains with one butterfly factor
    whatever ``boft_n_butterfly_factor`` says, and saves ``boft_R`` with a leading dimension of
    1 next to a config naming more factors. Such a file is loaded here with the missing factors
    set to ``boft_R = 0``: their Cayley transforms are the identity, and factor 0's permutation
    is the identity, so the rotation (and every output) is exactly the reference's. The added
    factors train like the others if training continues. Returns None for every other file.
    """
    if not isinstance(config, BOFTConfig) or config.boft_n_butterfly_factor == 1:
        return None
    factors = config.boft_n_butterfly_factor
    short = [
        key
        for key, value in state_dict.items()
        if key.rsplit(".", 1)[-1] == "boft_R" and value.dim() == 4 and value.shape[0] == 1
    ]
    if not short:
        return None
    warnings.warn(
        f"The checkpoint's boft_R tensors hold 1 butterfly factor, but its config says boft_n_butterfly_factor="
        f"{factors}: it was written by peft without its CUDA extension, which trains with a single factor. "
        f"Loading it with the other {factors - 1} factor(s) set to the identity, which gives the same outputs as in "
        "peft.",
        UserWarning,
        stacklevel=3,
    )
    converted = dict(state_dict)
    for key in short:
        value = state_dict[key]
        converted[key] = torch.cat([value, value.new_zeros((factors - 1, *value.shape[1:]))])
    return converted


# ---------------------------------------------------------------------- hooks
@hookimpl
def peft_register_methods(registry: Registry) -> None:
    registry.register_method(
        MethodSpec(
            peft_type=PEFT_TYPE,
            config_cls=BOFTConfig,
            model_cls=BOFTModel,
            prefix="boft_",
            # Not mixable: the rotation acts on the base weight (and, for Conv2d, replaces the base
            # convolution's weight), so it cannot compose with another method's layer underneath; the
            # reference's mixed models exclude BOFT as well.
            capabilities=Capabilities(mergeable=True, mixable=False, identity_init=True),
            default_target_modules=LORA_STYLE_DEFAULT_TARGETS,
        )
    )


@hookimpl
def peft_register_layer_factories(registry: Registry) -> None:
    for factory in (linear_factory, conv2d_factory):
        registry.register_layer_factory(PEFT_TYPE, factory, priority=0)
    registry.register_layer_factory(PEFT_TYPE, unsupported_layer_factory, priority=-100)


@hookimpl
def peft_register_state_dict_converters(registry: Registry) -> None:
    registry.register_state_dict_converter("boft-single-factor-checkpoint", pad_single_factor_checkpoint)
