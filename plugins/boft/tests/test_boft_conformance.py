"""The peft-core conformance kit, run on every layer kind BOFT supports (linear, Conv2d, tiny Llama).

The kit generates model sizes, so the block geometry is drawn per model: among the block sizes
(or block counts) and butterfly factors that are valid for every targeted layer of the drawn
model. Sizes with no common divisor still get block size 1 (a pure rescaling), larger common
divisors get real rotations with up to three butterfly factors; the case strategy adds models
whose sizes admit those as often as the kit's own.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import strategies as st
from peft_core.errors import ConfigError
from torch import nn

try:
    from peft_core.testing import MethodConformance, ModelCase
    from peft_core.testing import strategies as pst
    from peft_core.testing.models import conv_case, mlp_case
except ImportError:  # the kit ships with peft-core; an older core without it cannot run this module
    pytest.skip("peft_core.testing (the conformance kit) is not available", allow_module_level=True)

from peft_boft import BOFTConfig
from peft_boft.butterfly import resolve_blocks

_GEOMETRIES: dict[str, list[tuple[str, int, int]]] = {}  # by case name, which encodes the sizes


def _rotated_dims(case: ModelCase) -> list[int]:
    model = case.build(torch.float32)
    dims = []
    for name, module in model.named_modules():
        if name and any(name == t or name.endswith("." + t) for t in case.target_modules):
            if isinstance(module, nn.Linear):
                dims.append(module.in_features)
            elif isinstance(module, nn.Conv2d):
                dims.append(module.weight[0].numel())
    return dims


def geometries(case: ModelCase) -> list[tuple[str, int, int]]:
    """``(option, value, n_butterfly_factor)`` valid for every target of ``case``; option is size/num."""
    if case.name not in _GEOMETRIES:
        dims = _rotated_dims(case)
        common = math.gcd(*dims)
        found = []
        for factor in (1, 2, 3):
            for value in (d for d in range(1, common + 1) if common % d == 0):
                for option in ("size", "num"):
                    size, num = (value, 0) if option == "size" else (0, value)
                    try:
                        for n in dims:
                            resolve_blocks(n, size, num, factor, where="probe")
                    except ConfigError:
                        continue
                    found.append((option, value, factor))
        _GEOMETRIES[case.name] = found
    return _GEOMETRIES[case.name]


def boft_configs(case: ModelCase, *, identity: bool) -> st.SearchStrategy[BOFTConfig]:
    options = geometries(case)

    @st.composite
    def configs(draw: st.DrawFn) -> BOFTConfig:
        option, value, factor = draw(st.sampled_from(options))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return BOFTConfig(
                target_modules=list(case.target_modules),
                boft_block_size=value if option == "size" else 0,
                boft_block_num=value if option == "num" else 0,
                boft_n_butterfly_factor=factor,
                boft_dropout=draw(st.sampled_from([0.0, 0.0, 0.5])),
                bias=draw(st.sampled_from(["none", "none", "boft_only"])),
                init_weights=identity,
                modules_to_save=draw(st.sampled_from([None, list(case.modules_to_save) or None])),
            )

    return configs()


class TestBOFTConformance(MethodConformance):
    peft_type = "BOFT"
    # Like the reference, BOFT adapts nn.Linear and nn.Conv2d only (embeddings, Conv1d/Conv3d and
    # transformers' Conv1D are refused with an error naming the module).
    layer_kinds = ("linear", "conv2d", "llama")
    deviations: dict[str, str] = {}
    additive_adapters = False  # several active adapters compose their rotations and multiply their scales

    def config_strategy(self, case: ModelCase, *, identity: bool):
        return boft_configs(case, identity=identity)

    def case_strategy(self) -> st.SearchStrategy[ModelCase]:
        # The kit's generated sizes (often without a common divisor), and as often sizes whose
        # dimensions take real butterflies (several factors, blocks of 2 and more).
        friendly_mlp = st.builds(
            mlp_case,
            d_in=st.sampled_from([4, 8, 16]),
            hidden=st.sampled_from([8, 16]),
            d_out=pst.features(1, 4),
            batch=pst.batch_shapes(),
            bias=st.booleans(),
        )
        friendly_conv = st.builds(
            conv_case,
            dims=st.just(2),
            c_in=st.sampled_from([4, 8]),
            c_mid=st.sampled_from([4, 8]),
            kernel=st.sampled_from([1, 3]),
            size=st.integers(3, 6),
            batch=st.integers(1, 2),
            bias=st.booleans(),
        )
        return st.one_of(pst.model_cases(*self.layer_kinds), friendly_mlp, friendly_conv)
