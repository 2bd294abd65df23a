"""The conformance kit on the toy method: proves the kit and the core without any real plugin."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st

from peft_core.testing import MethodConformance, ModelCase

peft_toy = pytest.importorskip("peft_toy", reason="install tests/toy_plugin")


class TestToyConformance(MethodConformance):
    peft_type = "TOY"
    layer_kinds = ("linear", "llama")

    def config_strategy(self, case: ModelCase, *, identity: bool):
        return st.builds(
            peft_toy.ToyConfig,
            target_modules=st.just(list(case.target_modules)),
            init_weights=st.just(identity),
            modules_to_save=st.sampled_from([None, list(case.modules_to_save)])
            if case.modules_to_save
            else st.none(),
        )
