"""File and output equivalence with the reference ``peft`` (0.21.2), both ways (marker ``compat``)."""

from __future__ import annotations

import pytest
from peft_core.testing.prompt_compat import both_ways

from peft_prefix_tuning import PrefixTuningConfig

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.mark.parametrize(
    "task, projection",
    [
        ("CAUSAL_LM", False),
        ("CAUSAL_LM", True),
        ("SEQ_2_SEQ_LM", False),
        ("SEQ_2_SEQ_LM", True),
        ("SEQ_CLS", False),
    ],
)
def test_adapters_move_both_ways(peft, task, projection, tmp_path, max_abs_diffs):
    options = {"task_type": task, "num_virtual_tokens": 3, "prefix_projection": projection}
    both_ways(
        peft,
        task,
        peft.PrefixTuningConfig(**options),
        PrefixTuningConfig(**options),
        tmp_path,
        max_abs_diffs,
        skip=0,
    )


def test_every_reference_config_field_exists_here_with_the_same_default(peft):
    import dataclasses

    import attrs

    ours = {a.name for a in attrs.fields(PrefixTuningConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.PrefixTuningConfig) if f.init}
    assert theirs == ours
    ref_defaults = peft.PrefixTuningConfig().to_dict()
    our_defaults = PrefixTuningConfig().to_dict()
    assert set(our_defaults) == set(ref_defaults)
    for key in set(ref_defaults) - {"peft_version", "peft_type"}:
        assert our_defaults[key] == ref_defaults[key], key
