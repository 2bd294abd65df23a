"""File, output and loss equivalence with the reference ``peft`` (0.21.2), both ways (marker ``compat``)."""

from __future__ import annotations

import pytest
import torch
from peft_core import get_peft_model
from peft_core.testing.prompt_compat import both_ways, quiet
from peft_core.testing.prompt_learning import padded_batch, tiny_llama

from peft_cpt import CPTConfig

pytestmark = pytest.mark.compat

OPTIONS = {
    "task_type": "CAUSAL_LM",
    "cpt_token_ids": [5, 6, 7, 8],
    "cpt_tokens_type_mask": [1, 2, 3, 4],
    "opt_projection_epsilon": 5.0,
    "opt_projection_format_epsilon": 5.0,
}


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def test_adapters_move_both_ways(peft, tmp_path, max_abs_diffs):
    both_ways(
        peft, "CAUSAL_LM", peft.CPTConfig(**OPTIONS), CPTConfig(**OPTIONS), tmp_path, max_abs_diffs, skip=4
    )


@pytest.mark.parametrize("weighting", ["none", "decay"])
def test_the_loss_and_its_gradient_are_the_references(peft, weighting, max_abs_diffs):
    options = {**OPTIONS, "opt_weighted_loss_type": weighting, "opt_loss_decay_factor": 0.5}
    torch.manual_seed(0)
    reference = quiet(lambda: peft.get_peft_model(tiny_llama(), peft.CPTConfig(**options)))
    ours = get_peft_model(tiny_llama(), CPTConfig(**options))
    ours.base_model.prompt_encoder["default"].load_state_dict(
        reference.prompt_encoder["default"].state_dict()
    )
    with torch.no_grad():
        for encoder in (reference.prompt_encoder["default"], ours.base_model.prompt_encoder["default"]):
            encoder.delta_embedding.weight.add_(
                torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
            )
    inputs = padded_batch(2)
    types = torch.tensor([[0, 0, 1, 2, 4], [1, 2, 4, 2, 4]])
    losses = []
    for model in (reference, ours):
        loss = quiet(
            lambda model=model: (
                model(**inputs, labels=inputs["input_ids"], input_type_mask=types.clone()).loss
            )
        )
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    theirs = reference.prompt_encoder["default"].delta_embedding.weight.grad
    mine = ours.base_model.prompt_encoder["default"].delta_embedding.weight.grad
    max_abs_diffs[f"loss grad {weighting}"] = (mine - theirs).abs().max().item()
    torch.testing.assert_close(mine, theirs)


def test_every_reference_config_field_exists_here_with_the_same_default(peft):
    import dataclasses

    import attrs

    ours = {a.name for a in attrs.fields(CPTConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.CPTConfig) if f.init}
    assert theirs == ours
    ref_defaults = quiet(lambda: peft.CPTConfig(task_type="CAUSAL_LM")).to_dict()
    our_defaults = CPTConfig(task_type="CAUSAL_LM").to_dict()
    assert set(our_defaults) == set(ref_defaults)
    for key in set(ref_defaults) - {"peft_version", "peft_type"}:
        assert our_defaults[key] == ref_defaults[key], key
