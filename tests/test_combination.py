"""The core side of ``add_weighted_adapter``: the built-in strategy and the capability gate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_core import get_peft_model
from peft_core.combination import linear
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
    assert manager.registry.combination_strategies == {"linear": CORE_PLUGIN}

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
