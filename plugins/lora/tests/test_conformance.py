"""The peft-core conformance kit, run on every layer kind LoRA supports."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from peft_core.config import PeftConfig
from peft_core.testing import MethodConformance, ModelCase

from peft_lora import LoraConfig

_HAS_BIAS: dict[str, bool] = {}  # by case name, which encodes the sizes and the bias flag


def _targets_have_bias(case: ModelCase) -> bool:
    if case.name in _HAS_BIAS:
        return _HAS_BIAS[case.name]
    model = case.build(torch.float32)
    targets = [
        module
        for name, module in model.named_modules()
        if name and any(name == t or name.endswith("." + t) for t in case.target_modules)
    ]
    _HAS_BIAS[case.name] = bool(targets) and all(getattr(m, "bias", None) is not None for m in targets)
    return _HAS_BIAS[case.name]


class TestLoraConformance(MethodConformance):
    peft_type = "LORA"
    layer_kinds = ("linear", "embedding", "conv1d", "conv2d", "conv3d", "transformers_conv1d", "llama")
    deviations: dict[str, str] = {}

    def identity_is_exact(self, config: PeftConfig) -> bool:
        # DoRA's identity rescales by magnitude / norm, which is 1 only up to rounding when the
        # magnitude was computed in bfloat16 and the forward norm in float32.
        return not getattr(config, "use_dora", False)

    def config_strategy(self, case: ModelCase, *, identity: bool):
        kind = case.layer_kind
        # lora_bias needs a base bias to merge into, and embeddings do not support it.
        bias_ok = kind != "embedding" and _targets_have_bias(case)
        # With init_lora_weights=False an embedding's A and B are both N(0, 1), so a large scaling
        # makes the update dwarf the base weight, and a bfloat16 merge+unmerge then loses the base
        # weight to rounding (in any implementation). Keep the update at the size of a trained one.
        alphas = [1, 2] if kind == "embedding" and not identity else [1, 2, 8, 16]

        @st.composite
        def configs(draw: st.DrawFn) -> LoraConfig:
            use_dora = draw(st.booleans())
            init = draw(st.sampled_from([True, "gaussian"])) if identity else False
            return LoraConfig(
                target_modules=list(case.target_modules),
                r=draw(st.integers(min_value=1, max_value=4)),
                lora_alpha=draw(st.sampled_from(alphas)),
                lora_dropout=draw(st.sampled_from([0.0, 0.1])),
                use_rslora=draw(st.booleans()),
                use_dora=use_dora,
                lora_bias=bias_ok and not use_dora and init in (True, False) and draw(st.booleans()),
                fan_in_fan_out=kind == "transformers_conv1d",
                init_lora_weights=init,
                modules_to_save=draw(st.sampled_from([None, list(case.modules_to_save) or None])),
            )

        return configs()
