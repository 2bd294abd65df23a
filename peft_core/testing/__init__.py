"""The conformance kit: the contract every peft-core method plugin passes.

It ships in the core wheel; ``pip install "peft-core[testing]"`` brings pytest and hypothesis,
which only this subpackage imports. A plugin's whole conformance test module::

    from hypothesis import strategies as st
    from peft_core.testing import MethodConformance, ModelCase

    class TestMyMethodConformance(MethodConformance):
        peft_type = "MY_METHOD"
        layer_kinds = ("linear", "llama")
        deviations = {}  # {"<check>": "why my method cannot meet it"}

        def config_strategy(self, case: ModelCase, *, identity: bool):
            return st.builds(MyConfig, target_modules=st.just(list(case.target_modules)),
                             init_weights=st.just(identity))

and in its ``conftest.py``::

    from peft_core.testing import register_profiles
    register_profiles()   # "dev" (default), "ci", "derandomized", chosen by $HYPOTHESIS_PROFILE

Building blocks for a method's own tests: :mod:`peft_core.testing.models` (tiny base models),
:mod:`peft_core.testing.strategies` (hypothesis strategies), :data:`CHECKS` (the check names).
"""

from __future__ import annotations

from peft_core.testing.kit import CHECKS, MethodConformance
from peft_core.testing.models import LAYER_KINDS, ModelCase, model_output, standard_model_cases
from peft_core.testing.profiles import register_profiles
from peft_core.testing.tolerances import assert_identical, assert_outputs_close, tolerance

__all__ = [
    "CHECKS",
    "LAYER_KINDS",
    "MethodConformance",
    "ModelCase",
    "assert_identical",
    "assert_outputs_close",
    "model_output",
    "register_profiles",
    "standard_model_cases",
    "tolerance",
]
