"""File and output equivalence with the reference ``peft`` (0.21.2), both ways (marker ``compat``)."""

from __future__ import annotations

import pytest
import torch
from peft_core import get_peft_model
from peft_core.testing.prompt_compat import both_ways, quiet

from peft_prompt_tuning import PromptTuningConfig

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS"])
def test_adapters_move_both_ways(peft, task, tmp_path, max_abs_diffs):
    options = {"task_type": task, "num_virtual_tokens": 3}
    both_ways(
        peft,
        task,
        peft.PromptTuningConfig(**options),
        PromptTuningConfig(**options),
        tmp_path,
        max_abs_diffs,
        skip=3,
    )


def test_text_init_gives_the_references_table(peft, tokenizer_dir):
    from peft_core.testing.prompt_learning import tiny_llama

    options = {
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": 7,
        "prompt_tuning_init": "TEXT",
        "prompt_tuning_init_text": "the cat sat",
        "tokenizer_name_or_path": str(tokenizer_dir),
    }
    reference = quiet(lambda: peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(**options)))
    ours = get_peft_model(tiny_llama(), PromptTuningConfig(**options))
    torch.testing.assert_close(
        ours.base_model.prompt_encoder["default"].embedding.weight,
        reference.prompt_encoder["default"].embedding.weight,
        rtol=0,
        atol=0,
    )


def test_every_reference_config_field_exists_here_with_the_same_default(peft):
    import dataclasses

    import attrs

    ours = {a.name for a in attrs.fields(PromptTuningConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.PromptTuningConfig) if f.init}
    assert theirs == ours
    ref_defaults = peft.PromptTuningConfig().to_dict()
    our_defaults = PromptTuningConfig().to_dict()
    assert set(our_defaults) == set(ref_defaults)
    for key in set(ref_defaults) - {"peft_version", "peft_type"}:
        assert our_defaults[key] == ref_defaults[key], key
