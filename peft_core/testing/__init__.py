"""The conformance kit: the contract every peft-core method plugin passes.

Ships in the core wheel; ``pip install peft-core[testing]`` brings pytest and hypothesis. A
plugin's test module needs one subclass::

    from peft_core.testing import MethodConformance

    class TestMyMethodConformance(MethodConformance):
        peft_type = "MY_METHOD"
        layer_kinds = ("linear",)

        def config_strategy(self, case, *, identity):
            return st.builds(MyConfig, target_modules=st.just(list(case.target_modules)),
                             init_weights=st.just(identity))

Hypothesis profiles: :func:`register_profiles` registers ``dev`` (fast), ``ci`` and
``derandomized`` (reproducible, for third-party CI) and loads the one named by
``HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os

from hypothesis import settings

from peft_core.testing.kit import MethodConformance, tolerance
from peft_core.testing.models import ModelCase, model_output, standard_model_cases

__all__ = [
    "MethodConformance",
    "ModelCase",
    "model_output",
    "register_profiles",
    "standard_model_cases",
    "tolerance",
]


def register_profiles() -> str:
    """Register the kit's hypothesis profiles and load ``$HYPOTHESIS_PROFILE`` (default ``dev``)."""
    settings.register_profile("dev", max_examples=8, deadline=None)
    settings.register_profile("ci", max_examples=20, deadline=None)
    settings.register_profile("derandomized", max_examples=20, deadline=None, derandomize=True)
    name = os.environ.get("HYPOTHESIS_PROFILE", "dev")
    settings.load_profile(name)
    return name
