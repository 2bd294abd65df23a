"""``peft_core.walk``: the pruned walk the model-wide loops share must keep ``named_modules``' order and names."""

from __future__ import annotations

from torch import nn

from peft_core.walk import through_base_layer, walk


def _model() -> nn.Module:
    shared = nn.Linear(2, 2)
    inner = nn.Sequential(nn.Linear(2, 2), shared)
    return nn.Sequential(inner, nn.ModuleDict({"a": shared, "b": nn.ReLU()}), nn.Linear(2, 2))


def test_walk_without_pruning_is_named_modules():
    model = _model()
    assert [(n, id(m)) for n, m in walk(model, lambda m: m._modules)] == [
        (n, id(m)) for n, m in model.named_modules()
    ]


def test_walk_enters_only_the_children_it_is_given():
    model = _model()
    names = [n for n, _ in walk(model, lambda m: {} if isinstance(m, nn.ModuleDict) else m._modules)]
    assert names == ["", "0", "0.0", "0.1", "1", "2"]


class _Wrapper(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        self.factors = nn.ModuleDict({"x": nn.Linear(2, 2)})


def test_through_base_layer_skips_the_rest_of_a_wrapper():
    model = nn.Sequential(_Wrapper(_Wrapper(nn.Linear(2, 2))))
    names = [
        n for n, _ in walk(model, lambda m: through_base_layer(m) if isinstance(m, _Wrapper) else m._modules)
    ]
    assert names == ["", "0", "0.base_layer", "0.base_layer.base_layer"]
    assert through_base_layer(nn.Linear(2, 2)) == {}
