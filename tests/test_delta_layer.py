"""The delta-weight base layer's eval fold: one product ``op(x, W + deltas)`` where it applies."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_core.delta_layer import DeltaWeightLayer

ATOL = 1e-5
NO_DROPOUT = SimpleNamespace(rank_dropout=0.0, module_dropout=0.0)


class DenseDelta(DeltaWeightLayer):
    """A toy method whose factor is the delta itself: nothing but the base class's logic."""

    adapter_layer_names = ("delta_w",)

    def __init__(self, base: nn.Module, adapter_name: str = "default") -> None:
        super().__init__(base)
        self.delta_w = nn.ParameterDict()
        self._active_adapters = [adapter_name]
        self.update_layer(adapter_name, NO_DROPOUT)

    def update_layer(self, adapter_name, config, *, key="", **kwargs):
        generator = torch.Generator().manual_seed(len(self.delta_w) + 7)
        shape = self.get_base_layer().weight.shape
        self.delta_w[adapter_name] = nn.Parameter(torch.randn(shape, generator=generator) * 0.1)
        self._set_hyper_parameters(adapter_name, r=2, alpha=3.0, config=config)
        self.set_adapter(self.active_adapters)

    def get_delta_weight(self, adapter_name, *, apply_rank_dropout=False):
        return self.delta_w[adapter_name] * self.scaling[adapter_name]


def layer_and_input(rows: int) -> tuple[DenseDelta, torch.Tensor]:
    torch.manual_seed(0)
    layer = DenseDelta(nn.Linear(16, 12))
    return layer, torch.randn(rows, 16)


def separate(layer: DenseDelta, x: torch.Tensor, names=("default",)) -> torch.Tensor:
    base = layer.get_base_layer()
    out = base(x)
    for name in names:
        out = out + F.linear(x, layer.get_delta_weight(name))
    return out


def test_eval_forward_of_many_rows_is_one_product_with_the_folded_weight():
    layer, x = layer_and_input(64)
    layer.eval()
    base = layer.get_base_layer()
    with torch.no_grad():
        out = layer(x)
        assert torch.equal(out, F.linear(x, base.weight + layer.get_delta_weight("default"), base.bias))
        torch.testing.assert_close(out, separate(layer, x), atol=ATOL, rtol=0)
    assert "default" in layer._delta_cache  # the delta is cached, the folded sum is not kept


def test_few_rows_training_and_hooks_keep_the_two_products():
    layer, x = layer_and_input(64)
    layer.eval()
    with torch.no_grad():
        small = x[: layer.fold_min_rows - 1]
        assert torch.equal(layer(small), separate(layer, small))
        calls = []
        handle = layer.get_base_layer().register_forward_hook(lambda *a: calls.append(1))
        assert torch.equal(layer(x), separate(layer, x)) and calls  # the hook ran
        handle.remove()
        layer.train()
        assert torch.equal(layer(x), separate(layer, x))


def test_several_active_adapters_fold_together():
    layer, x = layer_and_input(40)
    layer.update_layer("other", NO_DROPOUT)
    layer.set_adapter(["default", "other"])
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), separate(layer, x, ("default", "other")), atol=ATOL, rtol=0)


@pytest.mark.parametrize("grad", [True, False], ids=["trainable", "frozen"])
def test_gradients_reach_the_factors_and_the_input_through_the_fold(grad):
    layer, x = layer_and_input(48)
    layer.eval()
    layer.delta_w["default"].requires_grad_(grad)
    x.requires_grad_(True)
    layer(x).sum().backward()
    expected_x = (layer.get_base_layer().weight + layer.get_delta_weight("default")).sum(0).expand_as(x)
    torch.testing.assert_close(x.grad, expected_x.detach(), atol=ATOL, rtol=0)
    factor_grad = layer.delta_w["default"].grad
    assert (factor_grad is not None) == grad
    if grad:
        expected = layer.scaling["default"] * torch.ones(12, 48) @ x.detach()
        torch.testing.assert_close(factor_grad, expected, atol=1e-4, rtol=0)
