"""The peft-core conformance kit, run on every layer kind OFT supports."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from torch import nn

try:
    from peft_core.testing import MethodConformance, ModelCase
except ImportError:  # the kit ships with peft-core; an older core without it cannot run this module
    pytest.skip("peft_core.testing (the conformance kit) is not available", allow_module_level=True)

from peft_oft import OFTConfig
from peft_oft.rotation import split_dimension

# Drawn block sizes that do not divide a layer's size are moved to a divisor, with a warning each time.
pytestmark = pytest.mark.filterwarnings("ignore:OFT for .*does not divide:UserWarning")


def rotated_dims(case: ModelCase) -> dict[str, list[int]]:
    """Per target name, the rotated dimension of every module it names in ``case``'s model."""
    dims: dict[str, list[int]] = {name: [] for name in case.target_modules}
    for key, module in case.build().named_modules():
        name = key.rpartition(".")[2]
        if name not in dims:
            continue
        if isinstance(module, nn.Linear):
            dims[name].append(module.in_features)
        elif isinstance(module, nn.Conv2d):
            dims[name].append(module.in_channels * module.kernel_size[0] * module.kernel_size[1])
        elif isinstance(module, nn.Embedding):
            dims[name].append(module.embedding_dim)
    return dims


def _blocks_ok(dims: list[int], r: int, block_size: int) -> bool:
    # A block of size 1 has no parameter (its rotation is always the identity); the kit's checks need
    # every adapted layer to hold a real one.
    return all(split_dimension(dim, r, block_size)[1] >= 2 for dim in dims)


class TestOFTConformance(MethodConformance):
    peft_type = "OFT"
    # transformers Conv1D, nn.Conv1d and nn.Conv3d are not OFT layers (nor in the reference).
    layer_kinds = ("linear", "embedding", "conv2d", "llama")
    deviations: dict[str, str] = {}
    additive_adapters = False  # several active adapters compose their rotations (multiply)

    def config_strategy(self, case: ModelCase, *, identity: bool):
        dims = rotated_dims(case)
        # A target whose dimension is 1 (a 1x1 conv on one channel) can only hold an empty block.
        targets = [name for name, found in dims.items() if found and max(found) >= 2]
        all_dims = [dim for name in targets for dim in dims[name]]
        largest = max(all_dims)

        @st.composite
        def configs(draw: st.DrawFn) -> OFTConfig:
            if draw(st.booleans(), label="choose r"):
                r = draw(st.integers(1, 4).filter(lambda v: _blocks_ok(all_dims, v, 0)), label="r")
                block_size = 0
            else:
                r = 0
                choices = [*range(2, min(largest, 8) + 1), largest]
                block_size = draw(
                    st.sampled_from(choices).filter(lambda v: _blocks_ok(all_dims, 0, v)),
                    label="oft_block_size",
                )
            coft = draw(st.booleans(), label="coft")
            return OFTConfig(
                target_modules=targets,
                r=r,
                oft_block_size=block_size,
                init_weights=identity,
                coft=coft,
                # a radius large enough that the projected rotation still changes float32 outputs visibly
                eps=draw(st.sampled_from([6e-5, 1e-2, 0.3])) if coft else 6e-5,
                block_share=draw(st.booleans(), label="block_share"),
                use_cayley_neumann=draw(st.booleans(), label="use_cayley_neumann"),
                num_cayley_neumann_terms=draw(st.integers(2, 7), label="terms"),
                module_dropout=draw(st.sampled_from([0.0, 0.0, 0.25, 0.5]), label="module_dropout"),
                modules_to_save=draw(st.sampled_from([None, list(case.modules_to_save) or None])),
            )

        return configs()


def test_rotated_dims_sees_every_target():
    """The helper above finds each standard case's targets (else the strategy would test nothing)."""
    from peft_core.testing.models import conv_case, embedding_case, llama_case, mlp_case

    assert rotated_dims(mlp_case(d_in=8, hidden=12)) == {"lin0": [8], "lin1": [12]}
    assert rotated_dims(conv_case(2, c_in=3, c_mid=6, kernel=3)) == {"conv": [27], "conv_b": [6]}
    assert rotated_dims(embedding_case(dim=8)) == {"emb": [8]}
    assert rotated_dims(llama_case(hidden=16, layers=2)) == {"q_proj": [16, 16], "v_proj": [16, 16]}
