"""The core side of ``add_weighted_adapter``: the built-in strategy and the capability gate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_core import get_peft_model
from peft_core.combination import dare_linear, dare_ties, linear, magnitude_prune, ties
from peft_core.hookspecs import hookimpl
from peft_core.plugins import PluginManager
from peft_core.registry import CORE_PLUGIN

peft_toy = pytest.importorskip("peft_toy", reason="the toy plugin (tests/toy_plugin) must be installed")


def test_linear_is_the_weighted_sum_and_takes_no_options():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(linear([a, b], [2.0, -0.5]), 2.0 * a - 0.5 * b, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="takes no options"):
        linear([a, b], [1.0, 1.0], density=0.3)


def test_every_registry_starts_with_the_core_strategies_and_a_plugin_cannot_take_their_names():
    manager = PluginManager()
    assert manager.registry.combination_strategies == dict.fromkeys(
        ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"], CORE_PLUGIN
    )

    class Squatter:
        @hookimpl
        def peft_register_combination_strategies(self, registry):
            registry.register_combination_strategy("linear", lambda deltas, weights, **kw: deltas[0])

    with pytest.warns(UserWarning, match="'linear' is provided by both 'peft-core' and 'squatter'"):
        manager.register_plugin(Squatter(), name="squatter")
    assert manager.registry.combination_strategy("linear") is linear


def test_a_method_without_the_capability_refuses_and_changes_nothing():
    model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), peft_toy.ToyConfig(target_modules=["0"]), "one")
    model.add_adapter("two", peft_toy.ToyConfig(target_modules=["0"]))
    with pytest.raises(TypeError, match="TOY adapters cannot be combined with add_weighted_adapter"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix")
    assert list(model.peft_config) == ["one", "two"]


TENSORS = [torch.randn(6, 7, generator=torch.Generator().manual_seed(i)) for i in range(3)]
WEIGHTS = [0.5, -1.2, 2.0]


def test_pruning_strategies_keep_what_they_promise():
    kept = magnitude_prune([TENSORS[0]], [1.0], density=0.25)
    assert (kept != 0).sum().item() == int(0.25 * 42)
    assert kept.abs().min() == 0 and kept.abs().max() == TENSORS[0].abs().max()
    # ties: every entry is the weighted mean of the agreeing sources, never of opposite signs
    merged = ties(TENSORS, [1.0, 1.0, 1.0], density=1.0)
    stacked = torch.stack(TENSORS)
    assert (merged.sign() == stacked.sum(0).sign()).all()
    with pytest.raises(TypeError, match="needs density="):
        dare_linear(TENSORS, WEIGHTS)
    with pytest.raises(ValueError, match="majority_sign_method"):
        dare_ties(TENSORS, WEIGHTS, density=0.5, majority_sign_method="median")


@pytest.mark.parametrize(
    "name", ["linear", "ties", "ties-frequency", "magnitude_prune", "dare_linear", "dare_ties"]
)
def test_strategies_equal_the_references_merge_utilities(name):
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    weights = torch.tensor(WEIGHTS)
    ours, theirs = {
        "linear": (lambda: linear(TENSORS, WEIGHTS), lambda: merge_utils.task_arithmetic(TENSORS, weights)),
        "ties": (
            lambda: ties(TENSORS, WEIGHTS, density=0.4),
            lambda: merge_utils.ties(TENSORS, weights, 0.4),
        ),
        "ties-frequency": (
            lambda: ties(TENSORS, WEIGHTS, density=0.4, majority_sign_method="frequency"),
            lambda: merge_utils.ties(TENSORS, weights, 0.4, "frequency"),
        ),
        "magnitude_prune": (
            lambda: magnitude_prune(TENSORS, WEIGHTS, density=0.3),
            lambda: merge_utils.magnitude_prune(TENSORS, weights, 0.3),
        ),
        "dare_linear": (
            lambda: dare_linear(TENSORS, WEIGHTS, density=0.5),
            lambda: merge_utils.dare_linear(TENSORS, weights, 0.5),
        ),
        "dare_ties": (
            lambda: dare_ties(TENSORS, WEIGHTS, density=0.5),
            lambda: merge_utils.dare_ties(TENSORS, weights, 0.5),
        ),
    }[name]
    torch.manual_seed(3)  # DARE draws its masks from the global generator, as the reference does
    mine = ours()
    torch.manual_seed(3)
    assert torch.equal(mine, theirs())
