"""File and output equivalence with the reference ``peft`` (0.21.2), both ways (marker ``compat``)."""

from __future__ import annotations

import pytest
import torch
from peft_core.testing.prompt_compat import both_ways

from peft_multitask_prompt_tuning import MultitaskPromptTuningConfig

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_CLS"])
def test_adapters_move_both_ways(peft, task, tmp_path, max_abs_diffs):
    options = {"task_type": task, "num_virtual_tokens": 3, "num_tasks": 3, "num_ranks": 2}
    both_ways(
        peft,
        task,
        peft.MultitaskPromptTuningConfig(**options),
        MultitaskPromptTuningConfig(**options),
        tmp_path,
        max_abs_diffs,
        skip=3,
        extra={"task_ids": torch.tensor([2, 0])},
    )


def test_every_reference_config_field_exists_here_with_the_same_default(peft):
    import dataclasses

    import attrs

    ours = {a.name for a in attrs.fields(MultitaskPromptTuningConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.MultitaskPromptTuningConfig) if f.init}
    assert theirs == ours
    ref_defaults, our_defaults = (
        peft.MultitaskPromptTuningConfig().to_dict(),
        MultitaskPromptTuningConfig().to_dict(),
    )
    assert set(our_defaults) == set(ref_defaults)
    for key in set(ref_defaults) - {"peft_version", "peft_type"}:
        assert our_defaults[key] == ref_defaults[key], key
