"""The kit's quantized-base checks for every installed method that declares ``quantized_bases``, on 4-bit and 8-bit.

Each method plugin is optional here (the plugin session installs only peft-bnb): a class whose
method is not installed is skipped with the reason.
"""

from __future__ import annotations

import importlib.util

import pytest
from peft_core.config import PeftConfig
from peft_core.plugins import get_registry
from peft_core.testing.quantized import QuantizedBaseConformance


def _needs(module: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


def _config(peft_type: str, **fields) -> PeftConfig:
    return get_registry().method(peft_type).config_cls(**fields)


class _LoRA(QuantizedBaseConformance):
    peft_type = "LORA"

    def make_config(self, target_modules, *, identity):
        return _config("LORA", target_modules=target_modules, r=4, lora_alpha=8, init_lora_weights=identity)


class _DoRA(QuantizedBaseConformance):
    peft_type = "LORA"

    def make_config(self, target_modules, *, identity):
        return _config(
            "LORA",
            target_modules=target_modules,
            r=4,
            use_dora=True,
            init_lora_weights=True if identity else False,
        )


class _IA3(QuantizedBaseConformance):
    peft_type = "IA3"

    def make_config(self, target_modules, *, identity):
        return _config(
            "IA3", target_modules=target_modules, feedforward_modules=["fc_mid"], init_ia3_weights=identity
        )


class _LoHa(QuantizedBaseConformance):
    peft_type = "LOHA"

    def make_config(self, target_modules, *, identity):
        return _config("LOHA", target_modules=target_modules, r=4, alpha=4, init_weights=identity)


class _LoKr(QuantizedBaseConformance):
    peft_type = "LOKR"

    def make_config(self, target_modules, *, identity):
        return _config("LOKR", target_modules=target_modules, r=4, alpha=4, init_weights=identity)


class _AdaLoRA(QuantizedBaseConformance):
    peft_type = "ADALORA"

    def make_config(self, target_modules, *, identity):
        return _config(
            "ADALORA",
            target_modules=target_modules,
            init_r=4,
            target_r=2,
            total_step=100,
            init_lora_weights=identity,
        )


class _VeRA(QuantizedBaseConformance):
    peft_type = "VERA"

    def make_config(self, target_modules, *, identity):
        return _config(
            "VERA",
            target_modules=target_modules,
            r=8,
            init_weights=identity,
            # VeRA's shared projections need one shape across the targets
            projection_prng_key=1,
        )


class _Toy(QuantizedBaseConformance):
    peft_type = "TOY"

    def make_config(self, target_modules, *, identity):
        return _config("TOY", target_modules=target_modules, init_weights=identity)


_METHODS = {
    "LoRA": (_LoRA, "peft_lora"),
    "DoRA": (_DoRA, "peft_lora"),
    "IA3": (_IA3, "peft_ia3"),
    "LoHa": (_LoHa, "peft_loha"),
    "LoKr": (_LoKr, "peft_lokr"),
    "AdaLoRA": (_AdaLoRA, "peft_adalora"),
    "VeRA": (_VeRA, "peft_vera"),
    "Toy": (_Toy, "peft_toy"),
}

for _label, (_base, _module) in _METHODS.items():
    for _bits, _backend in (("4bit", "bitsandbytes 4-bit"), ("8bit", "bitsandbytes 8-bit")):
        _name = f"Test{_label}On{_bits}"
        globals()[_name] = _needs(_module)(type(_name, (_base,), {"backend_name": _backend}))
