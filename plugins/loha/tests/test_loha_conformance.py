"""The peft-core conformance kit, run on every layer kind LoHa supports."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st

try:
    from peft_core.testing import MethodConformance, ModelCase
except ImportError:  # the kit ships with peft-core; an older core without it cannot run this module
    pytest.skip("peft_core.testing (the conformance kit) is not available", allow_module_level=True)

from peft_loha import LoHaConfig


class TestLoHaConformance(MethodConformance):
    peft_type = "LOHA"
    # Embeddings, Conv3d and transformers' Conv1D are not LoHa layers (nor in the reference).
    layer_kinds = ("linear", "conv1d", "conv2d")
    deviations: dict[str, str] = {}

    def config_strategy(self, case: ModelCase, *, identity: bool):
        @st.composite
        def configs(draw: st.DrawFn) -> LoHaConfig:
            return LoHaConfig(
                target_modules=list(case.target_modules),
                r=draw(st.integers(min_value=1, max_value=4)),
                alpha=draw(st.sampled_from([1, 2, 8, 16])),
                use_effective_conv2d=draw(st.booleans()),
                init_weights=identity,
            )

        return configs()
