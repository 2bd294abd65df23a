"""Fast module construction (``new_linear``, ``new_module``) and the collector pause during injection.

``new_linear`` must give the same module, values and generator draws as ``nn.Linear``, and
``new_module`` the same state as the class's own ``__init__``: adapter layers built with them
must be indistinguishable from ones built the slow way.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

from peft_core.layer import linear_init_bound, new_linear, new_module


@pytest.mark.parametrize(
    ("n_in", "n_out", "bias"), [(64, 16, False), (16, 1376, True), (7, 3, True), (1, 1, False)]
)
def test_new_linear_equals_nn_linear_seed_for_seed(n_in, n_out, bias):
    torch.manual_seed(3)
    expected = nn.Linear(n_in, n_out, bias=bias)
    after_expected = torch.rand(4)
    torch.manual_seed(3)
    built = new_linear(n_in, n_out, bias=bias)
    after_built = torch.rand(4)
    assert type(built) is nn.Linear and repr(built) == repr(expected)
    assert built.state_dict().keys() == expected.state_dict().keys()
    for key, value in expected.state_dict().items():
        assert torch.equal(built.state_dict()[key], value), key
    assert torch.equal(after_built, after_expected), "the generator must be left where nn.Linear leaves it"
    assert all(p.requires_grad for p in built.parameters())


def test_linear_init_bound_is_kaimings():
    weight = torch.empty(8, 40)
    torch.manual_seed(0)
    nn.init.kaiming_uniform_(weight, a=5**0.5)
    torch.manual_seed(0)
    bound = linear_init_bound(40)
    assert torch.equal(torch.empty(8, 40).uniform_(-bound, bound), weight)


def _state_shape(module: nn.Module) -> dict[str, object]:
    """Its ``__dict__`` with containers reduced to their type: what must match between the two ways."""
    return {k: type(v) if isinstance(v, dict | set) else v for k, v in vars(module).items()}


@pytest.mark.parametrize(
    ("cls", "attrs"),
    [(nn.ModuleDict, {}), (nn.ParameterDict, {}), (nn.Identity, {}), (nn.Dropout, {"p": 0.25})],
)
def test_new_module_equals_the_class_init(cls, attrs):
    expected = cls(**attrs)
    built = new_module(cls, **attrs)
    assert type(built) is cls and repr(built) == repr(expected)
    assert _state_shape(built) == _state_shape(expected)


def test_new_modules_share_no_containers():
    first, second = new_module(nn.ModuleDict), new_module(nn.ModuleDict)
    for name, value in vars(first).items():
        if isinstance(value, dict | set):
            assert value is not vars(second)[name], name
    first["a"] = nn.Identity()
    first.register_forward_hook(lambda *args: None)
    assert len(second) == 0 and not second._forward_hooks


def test_new_module_behaves_as_a_module():
    params = new_module(nn.ParameterDict)
    params["w"] = nn.Parameter(torch.ones(2))
    container = new_module(nn.ModuleDict)
    container["drop"] = new_module(nn.Dropout, p=0.5)
    container["params"] = params
    assert list(container.state_dict()) == ["params.w"]
    clone = copy.deepcopy(container)
    assert torch.equal(clone["params"]["w"], params["w"]) and clone["params"]["w"] is not params["w"]
    container.eval()
    assert not container["drop"].training
    assert torch.equal(container["drop"](torch.ones(8)), torch.ones(8))


class _HoldsATensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.ones(1)  # a plain tensor attribute: cannot be shared between instances


def test_new_module_falls_back_to_init_for_other_state():
    first, second = new_module(_HoldsATensor), new_module(_HoldsATensor)
    assert first.scale is not second.scale


def test_injection_pauses_the_collector_and_restores_it(monkeypatch):
    import peft_core
    from peft_core.tuner import AdapterModel

    toy = pytest.importorskip("peft_toy", reason="the toy plugin (tests/toy_plugin) must be installed")
    seen: list[bool] = []
    original = AdapterModel._inject_adapter

    def spy(self, *args, **kwargs):
        seen.append(gc.isenabled())
        return original(self, *args, **kwargs)

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    monkeypatch.setattr(AdapterModel, "_inject_adapter", spy)
    assert gc.isenabled()
    peft_core.get_peft_model(mlp(), toy.ToyConfig(target_modules=["0"]))
    assert gc.isenabled(), "the collector must be back on after injection"
    with pytest.raises(peft_core.TargetModulesError):
        peft_core.get_peft_model(mlp(), toy.ToyConfig(target_modules=["missing"]))
    assert gc.isenabled(), "and after a failed injection"
    gc.disable()
    try:
        peft_core.get_peft_model(mlp(), toy.ToyConfig(target_modules=["0"]))
        assert not gc.isenabled(), "a collector the user turned off stays off"
    finally:
        gc.enable()
    assert seen == [False, False, False]
