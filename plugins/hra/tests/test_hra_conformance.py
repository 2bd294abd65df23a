"""The peft-core conformance kit, run on every layer kind HRA supports."""

from __future__ import annotations

import functools

import pytest
from hypothesis import strategies as st

try:
    from peft_core.testing import MethodConformance, ModelCase
except ImportError:  # the kit ships with peft-core; an older core without it cannot run this module
    pytest.skip("peft_core.testing (the conformance kit) is not available", allow_module_level=True)

from peft_hra import HRAConfig
from peft_hra.layer import reflection_dim

# Odd ranks with init_weights=True are drawn on purpose (they fall back to random vectors, with a warning).
pytestmark = pytest.mark.filterwarnings("ignore:HRA's identity init pairs equal reflection vectors")


@functools.lru_cache(maxsize=256)
def _smallest_reflection_dim(case: ModelCase) -> int:
    """The smallest dimension HRA reflects in among ``case``'s targets (Gram-Schmidt needs r <= it)."""
    model = case.build()
    dims = [
        reflection_dim(module)
        for name, module in model.named_modules()
        if name.split(".")[-1] in case.target_modules
    ]
    return min(dims)


class TestHRAConformance(MethodConformance):
    peft_type = "HRA"
    # nn.Embedding, nn.Conv1d/Conv3d and transformers' Conv1D are not HRA layers (nor in the reference).
    layer_kinds = ("linear", "conv2d", "llama")
    deviations: dict[str, str] = {}
    additive_adapters = False  # several active adapters compose their rotations: W @ R_1 @ R_2

    def identity_is_exact(self, config: HRAConfig) -> bool:
        # Each pair of equal reflections cancels only up to rounding (x - 2(x.v)v, twice).
        return False

    def config_strategy(self, case: ModelCase, *, identity: bool):
        targets = list(case.target_modules)
        to_save = st.sampled_from([None, list(case.modules_to_save) or None])
        bias = st.sampled_from(["none", "hra_only", "all"])

        if identity:
            return st.builds(
                HRAConfig,
                target_modules=st.just(targets),
                r=st.sampled_from([2, 4, 6, 8]),
                apply_GS=st.just(False),
                init_weights=st.just(True),
                bias=bias,
                modules_to_save=to_save,
            )

        @st.composite
        def configs(draw: st.DrawFn) -> HRAConfig:
            variant = draw(st.sampled_from(["random", "gram_schmidt", "odd_r_fallback"]))
            # With Gram-Schmidt, r equal to the dimension spans it all: R = -I whatever the vectors, so the
            # adapter could not train (and the non-identity checks would be vacuous); stay below it.
            max_gs_rank = min(6, _smallest_reflection_dim(case) - 1)
            if max_gs_rank < 1 and variant != "random":
                variant = "random"
            if variant == "random":
                r, apply_GS, init_weights = draw(st.integers(1, 8)), False, False
            elif variant == "gram_schmidt":
                r, apply_GS, init_weights = draw(st.integers(1, max_gs_rank)), True, False
            else:  # init_weights=True with an odd r: random vectors, as in the reference
                apply_GS = draw(st.booleans())
                odd = [r for r in (1, 3, 5, 7) if not apply_GS or r <= max_gs_rank]
                r, init_weights = draw(st.sampled_from(odd)), True
            return HRAConfig(
                target_modules=targets,
                r=r,
                apply_GS=apply_GS,
                init_weights=init_weights,
                bias=draw(bias),
                modules_to_save=draw(to_save),
            )

        return configs()
