"""The peft-core conformance kit, run on every layer kind AdaLoRA supports."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st

try:
    from peft_core.testing import MethodConformance, ModelCase
except ImportError:  # the kit ships with peft-core; an older core without it cannot run this module
    pytest.skip("peft_core.testing (the conformance kit) is not available", allow_module_level=True)

from peft_adalora import AdaLoraConfig


class TestAdaLoraConformance(MethodConformance):
    peft_type = "ADALORA"
    # nn.Embedding, nn.Conv1d and nn.Conv3d are not AdaLoRA layers (nor in the reference).
    layer_kinds = ("linear", "conv2d", "transformers_conv1d", "llama")
    deviations: dict[str, str] = {}

    def config_strategy(self, case: ModelCase, *, identity: bool):
        targets = list(case.target_modules)

        @st.composite
        def configs(draw: st.DrawFn) -> AdaLoraConfig:
            init_r = draw(st.integers(1, 6))
            tinit = draw(st.integers(0, 3))
            rank_pattern = None
            if case.layer_kind != "llama" and draw(st.booleans()):
                # A saved, pruned adapter: some targets keep only some triplets (at least one, since the kit
                # writes into every adapter tensor). The targets of these models are top-level modules.
                pruned = draw(st.lists(st.sampled_from(targets), min_size=1, unique=True))
                masks = st.lists(st.booleans(), min_size=init_r, max_size=init_r).filter(any)
                rank_pattern = {f"{name}.lora_E": draw(masks) for name in pruned}
            tfinal = draw(st.integers(0, 3))
            return AdaLoraConfig(
                target_modules=targets,
                init_r=init_r,
                target_r=draw(st.integers(0, init_r)),
                # The non-identity init draws all three factors from N(0, 1), so its update is far larger than
                # the tiny models' weights; a small lora_alpha keeps it at their scale, where bfloat16 merges round
                # within the kit's tolerance. (lora_alpha <= 0, which scales by the rank, is tested in test_adalora_layers.)
                lora_alpha=draw(st.sampled_from([8, 32] if identity else [0.02, 0.05, 0.1])),
                tinit=tinit,
                tfinal=tfinal,
                total_step=tinit + tfinal + draw(st.integers(1, 20)),
                deltaT=draw(st.integers(1, 4)),
                orth_reg_weight=draw(st.sampled_from([0.5, 0.0, 0.1])),
                fan_in_fan_out=case.layer_kind == "transformers_conv1d",
                init_lora_weights=identity,
                rank_pattern=rank_pattern,
                lora_dropout=draw(st.sampled_from([0.0, 0.1])),
                modules_to_save=draw(st.sampled_from([None, list(case.modules_to_save) or None])),
            )

        return configs()

    @staticmethod
    def _add_adapter(model, name, config, seed):
        # AdaLoRA trains one adapter at a time (as in the reference): the kit's extra adapters are added
        # in inference mode, which is how a second AdaLoRA adapter is used.
        MethodConformance._add_adapter(model, name, config.copy(inference_mode=True), seed)
