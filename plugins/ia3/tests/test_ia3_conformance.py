"""The peft-core conformance kit, run on every layer kind (IA)³ supports."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st

try:
    from peft_core.testing import MethodConformance, ModelCase
except ImportError:  # the kit ships with peft-core; an older core without it cannot run this module
    pytest.skip("peft_core.testing (the conformance kit) is not available", allow_module_level=True)

from peft_ia3 import IA3Config


class TestIA3Conformance(MethodConformance):
    peft_type = "IA3"
    # nn.Conv1d and nn.Embedding are not (IA)³ layers (nor in the reference).
    layer_kinds = ("linear", "conv2d", "conv3d", "transformers_conv1d", "llama")
    deviations: dict[str, str] = {}
    additive_adapters = False  # several active adapters multiply their vectors

    def config_strategy(self, case: ModelCase, *, identity: bool):
        targets = list(case.target_modules)

        @st.composite
        def configs(draw: st.DrawFn) -> IA3Config:
            # any subset of the targets scales its input instead of its output
            feedforward = draw(st.lists(st.sampled_from(targets), unique=True, max_size=len(targets)))
            return IA3Config(
                target_modules=targets,
                feedforward_modules=feedforward,
                fan_in_fan_out=case.layer_kind == "transformers_conv1d",
                init_ia3_weights=identity,
                modules_to_save=draw(st.sampled_from([None, list(case.modules_to_save) or None])),
            )

        return configs()
