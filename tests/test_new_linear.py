"""``peft_core.layer.new_linear``: the same module, values and generator draws as ``nn.Linear``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_core.layer import linear_init_bound, new_linear


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
