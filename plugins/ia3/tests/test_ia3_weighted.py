"""``add_weighted_adapter`` for (IA)³: the combined vectors, the refusals, and the same result as ``peft``."""

from __future__ import annotations

import copy

import pytest
import torch
from peft_core import PeftModel, get_peft_model
from peft_core.hookspecs import hookimpl
from peft_core.plugins import get_registry, register_plugin
from torch import nn

from peft_ia3 import IA3Config


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 8)
        self.lin1 = nn.Linear(8, 8)
        self.lin10 = nn.Linear(8, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.lin10(torch.relu(self.lin1(torch.relu(self.lin0(x)))))))


def _two_adapters(second_targets=("lin1", "lin10"), modules_to_save=(None, None)):
    torch.manual_seed(0)
    base = MLP()
    first = IA3Config(
        target_modules=["lin0", "lin1"],
        feedforward_modules=["lin1"],
        init_ia3_weights=False,
        modules_to_save=modules_to_save[0],
    )
    second = IA3Config(
        target_modules=list(second_targets),
        feedforward_modules=["lin1"],
        init_ia3_weights=False,
        modules_to_save=modules_to_save[1],
    )
    model = get_peft_model(base, first, adapter_name="one")
    model.add_adapter("two", second)
    return model


def test_combined_vectors_are_the_weighted_sum_on_the_union_of_targets():
    model = _two_adapters()
    model.add_weighted_adapter(["one", "two"], [0.7, -1.5], "mix")
    inner = model.base_model.model
    # a layer both adapt: the weighted sum; a layer only one adapts: that one's weighted vector
    torch.testing.assert_close(
        inner.lin1.ia3_l["mix"],
        0.7 * inner.lin1.ia3_l["one"] - 1.5 * inner.lin1.ia3_l["two"],
        rtol=1e-6,
        atol=0,
    )
    torch.testing.assert_close(inner.lin0.ia3_l["mix"], 0.7 * inner.lin0.ia3_l["one"], rtol=0, atol=0)
    torch.testing.assert_close(inner.lin10.ia3_l["mix"], -1.5 * inner.lin10.ia3_l["two"], rtol=0, atol=0)
    assert inner.lin1.is_feedforward["mix"] and not inner.lin0.is_feedforward["mix"]
    assert model.active_adapters == ["one"]  # added, not activated
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix." in n)


def test_combined_adapter_forward_equals_a_hand_built_model_and_survives_save_load(tmp_path):
    model = _two_adapters()
    model.add_weighted_adapter(["one", "two"], [0.5, 2.0], "mix")
    model.set_adapter("mix")
    inner = model.base_model.model
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected_model = copy.deepcopy(model.get_base_model())
        got = model(x)
        plain = MLP()
        plain.load_state_dict(
            {
                k.replace("base_layer.", ""): v
                for k, v in expected_model.state_dict().items()
                if "ia3_l" not in k
            }
        )
        plain.lin0.weight.mul_(inner.lin0.ia3_l["mix"])  # output scaling: rows
        plain.lin0.bias.mul_(inner.lin0.ia3_l["mix"].flatten())
        plain.lin1.weight.mul_(inner.lin1.ia3_l["mix"])  # input scaling: columns
        plain.lin10.weight.mul_(inner.lin10.ia3_l["mix"])
        plain.lin10.bias.mul_(inner.lin10.ia3_l["mix"].flatten())
        torch.testing.assert_close(got, plain(x), rtol=1e-6, atol=1e-6)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(MLP(), tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), got, rtol=0, atol=0)


def test_regex_feedforward_names_exact_modules_only():
    # lin0 is output-scaled while "lin10" ends with "0": the combined config must not confuse them.
    model = _two_adapters()
    model.add_weighted_adapter(["one"], [1.0], "solo")
    inner = model.base_model.model
    assert model.peft_config["solo"].target_modules == ["lin0", "lin1"]
    assert not inner.lin0.is_feedforward["solo"] and inner.lin1.is_feedforward["solo"]


def test_refusals_leave_the_model_unchanged():
    model = _two_adapters()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    configs = dict(model.peft_config)
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "two")
    with pytest.raises(ValueError, match="Unknown adapter"):
        model.add_weighted_adapter(["one", "nope"], [1.0, 1.0], "c")
    with pytest.raises(ValueError, match="one weight per source"):
        model.add_weighted_adapter(["one", "two"], [1.0], "c")
    with pytest.raises(ValueError, match="Unknown combination type 'svd'"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "c", combination_type="svd")
    with pytest.raises(TypeError, match="takes no options"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "c", density=0.5)
    assert model.peft_config == configs
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_sources_disagreeing_on_feedforward_are_refused():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), IA3Config(target_modules=["lin1"], feedforward_modules=["lin1"]), "one")
    model.add_adapter("two", IA3Config(target_modules=["lin1"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="disagree on whether 'lin1' is a feedforward module"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix")
    assert "mix" not in model.peft_config


def test_modules_to_save_copy_comes_from_its_single_owner_and_two_owners_are_refused():
    model = _two_adapters(modules_to_save=(None, ["head"]))
    head = model.base_model.model.head
    with torch.no_grad():
        head.modules_to_save["two"].weight.add_(1.0)
    model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix")
    torch.testing.assert_close(head.modules_to_save["mix"].weight, head.modules_to_save["two"].weight)

    both = _two_adapters(modules_to_save=(["head"], ["head"]))
    with pytest.raises(ValueError, match="each have their own trained copy of 'head'"):
        both.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix")
    assert "mix" not in both.peft_config and "mix" not in both.base_model.model.head.modules_to_save


@pytest.mark.compat
def test_same_combined_adapter_as_peft():
    peft = pytest.importorskip("peft")
    ours = _two_adapters(second_targets=("lin1",))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(
        MLP(),
        peft.IA3Config(target_modules=["lin0", "lin1"], feedforward_modules=["lin1"], init_ia3_weights=False),
        adapter_name="one",
    )
    theirs.add_adapter(
        "two", peft.IA3Config(target_modules=["lin1"], feedforward_modules=["lin1"], init_ia3_weights=False)
    )
    theirs.load_state_dict(ours.state_dict())  # same module layout and key names in both libraries
    ours.add_weighted_adapter(["one", "two"], [0.3, 0.9], "mix")
    theirs.add_weighted_adapter(["one", "two"], [0.3, 0.9], "mix")
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


def test_a_strategy_from_another_plugin_is_used_by_name():
    class ElementwiseMax:
        @hookimpl
        def peft_register_combination_strategies(self, registry):
            def strategy(deltas, weights, **options):
                return torch.stack([w * d for d, w in zip(deltas, weights)]).amax(dim=0)

            registry.register_combination_strategy("test-ia3-elementwise-max", strategy)

    if "test-ia3-elementwise-max" not in get_registry().combination_strategies:
        register_plugin(ElementwiseMax(), name="test-ia3-strategies")
    assert get_registry().combination_strategies["linear"] == "peft-core"
    model = _two_adapters()
    model.add_weighted_adapter(["one", "two"], [1.0, 2.0], "mix", combination_type="test-ia3-elementwise-max")
    lin1 = model.base_model.model.lin1
    torch.testing.assert_close(
        lin1.ia3_l["mix"], torch.maximum(lin1.ia3_l["one"], 2.0 * lin1.ia3_l["two"]), rtol=0, atol=0
    )
