"""The peft-core conformance kit, run on every layer kind VeRA supports, with and without saved projections."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import strategies as st

try:
    from peft_core.testing import MethodConformance, ModelCase
    from peft_core.testing.strategies import model_cases
except ImportError:  # the kit ships with peft-core; an older core without it cannot run this module
    pytest.skip("peft_core.testing (the conformance kit) is not available", allow_module_level=True)

from peft_vera import VeraConfig


class TestVeraConformance(MethodConformance):
    peft_type = "VERA"
    layer_kinds = ("linear", "transformers_conv1d", "llama")
    deviations: dict[str, str] = {}
    save_projection = True

    def config_strategy(self, case: ModelCase, *, identity: bool):
        # Every adapter of a model shares the first one's projections, so the configs a check draws for one
        # model agree on r (rank of the projections), projection_prng_key and save_projection.
        @st.composite
        def configs(draw: st.DrawFn) -> VeraConfig:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return VeraConfig(
                    target_modules=list(case.target_modules),
                    r=4,
                    projection_prng_key=11,
                    save_projection=self.save_projection,
                    d_initial=draw(st.sampled_from([0.1, 0.5])),
                    vera_dropout=draw(st.sampled_from([0.0, 0.1])),
                    fan_in_fan_out=case.layer_kind == "transformers_conv1d",
                    init_weights=identity,
                    modules_to_save=draw(st.sampled_from([None, list(case.modules_to_save) or None])),
                )

        return configs()


class TestVeraConformanceRegeneratedProjections(TestVeraConformance):
    """save_projection=False: loading must regenerate bit-identical projections from the seed."""

    save_projection = False

    def case_strategy(self) -> st.SearchStrategy[ModelCase]:
        return model_cases("linear", "transformers_conv1d")
