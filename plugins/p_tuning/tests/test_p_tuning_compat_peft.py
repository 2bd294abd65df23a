"""File and output equivalence with the reference ``peft`` (0.21.2), both ways (marker ``compat``)."""

from __future__ import annotations

import pytest
import torch
from peft_core import get_peft_model
from peft_core.testing.prompt_compat import both_ways
from peft_core.testing.prompt_learning import tiny_llama

from peft_p_tuning import PromptEncoderConfig

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.mark.parametrize(
    "task, kind",
    [("CAUSAL_LM", "MLP"), ("CAUSAL_LM", "LSTM"), ("SEQ_2_SEQ_LM", "MLP"), ("SEQ_CLS", "LSTM")],
)
def test_adapters_move_both_ways(peft, task, kind, tmp_path, max_abs_diffs):
    options = {
        "task_type": task,
        "num_virtual_tokens": 3,
        "encoder_reparameterization_type": kind,
        "encoder_hidden_size": 16,
    }
    both_ways(
        peft,
        task,
        peft.PromptEncoderConfig(**options),
        PromptEncoderConfig(**options),
        tmp_path,
        max_abs_diffs,
        skip=3,
    )


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_the_same_seed_builds_the_same_encoder(peft, kind):
    options = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "encoder_reparameterization_type": kind}
    torch.manual_seed(7)
    reference = peft.get_peft_model(tiny_llama(), peft.PromptEncoderConfig(**options))
    torch.manual_seed(7)
    ours = get_peft_model(tiny_llama(), PromptEncoderConfig(**options))
    theirs = reference.prompt_encoder["default"].state_dict()
    mine = ours.base_model.prompt_encoder["default"].state_dict()
    assert theirs.keys() == mine.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0, msg=key)


def test_every_reference_config_field_exists_here_with_the_same_default(peft):
    import dataclasses

    import attrs

    ours = {a.name for a in attrs.fields(PromptEncoderConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.PromptEncoderConfig) if f.init}
    assert theirs == ours
    ref_defaults, our_defaults = peft.PromptEncoderConfig().to_dict(), PromptEncoderConfig().to_dict()
    assert set(our_defaults) == set(ref_defaults)
    for key in set(ref_defaults) - {"peft_version", "peft_type"}:
        assert our_defaults[key] == ref_defaults[key], key
