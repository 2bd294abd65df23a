"""The LoRA branch's CPU dropout: nn.Dropout's law (keep with 1 - p, rescale by 1 / (1 - p)), drawn cheaper."""

from __future__ import annotations

import math

import pytest
import torch
from peft_core.plugins import get_registry
from peft_core.registry import LayerContext
from torch import nn

from peft_lora import LoraConfig
from peft_lora.dropout import dropout_input, keep_mask


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_keep_mask_keeps_each_entry_with_probability_one_minus_p_independently(p):
    torch.manual_seed(0)
    n = 1_000_001  # odd: the last 64-bit draw is used for one entry only
    keep = keep_mask((n,), p)
    assert keep.dtype == torch.bool and keep.shape == (n,)
    q = 1.0 - p
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(keep.double().mean().item() - q) < 6 * sigma
    # neighbours come from the two halves of one 64-bit draw (even i) or from two draws (odd i)
    for offset in (0, 1):
        pairs = (keep[offset:-1:2] & keep[offset + 1 :: 2]).double()
        pair_sigma = math.sqrt(q * q * (1 - q * q) / len(pairs))
        assert abs(pairs.mean().item() - q * q) < 6 * pair_sigma


def test_keep_mask_at_the_ends_of_the_range():
    assert keep_mask((1000,), 1e-12).all()
    assert not keep_mask((1000,), 1.0 - 1e-12).any()


def test_keep_mask_follows_the_global_seed_and_any_shape():
    torch.manual_seed(7)
    first = keep_mask((3, 5, 7), 0.3)
    torch.manual_seed(7)
    again = keep_mask((3, 5, 7), 0.3)
    assert first.shape == (3, 5, 7)
    assert torch.equal(first, again)
    assert not torch.equal(first, keep_mask((3, 5, 7), 0.3))  # the generator moved on


def _wrap(base: nn.Linear, p: float):
    config = LoraConfig(
        target_modules=["mod"], r=4, lora_alpha=6, lora_dropout=p, init_lora_weights="gaussian"
    )
    for factory in get_registry().layer_factories("LORA"):
        layer = factory(base, "default", config, LayerContext(key="block.mod"))
        if layer is not None:
            nn.init.normal_(layer.lora_B["default"].weight)
            return layer
    raise AssertionError("no LoRA factory for nn.Linear")


def test_training_forward_and_gradients_are_dropout_of_the_input_with_the_drawn_mask():
    """Output and every gradient equal ``base(x) + scaling * B(A(x * keep / (1 - p)))`` for the mask drawn."""
    torch.manual_seed(0)
    p = 0.3
    base = nn.Linear(10, 7)
    layer = _wrap(base, p).train()
    x = torch.randn(2, 5, 10, requires_grad=True)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    torch.manual_seed(11)
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), (x, A, B))

    torch.manual_seed(11)
    keep = keep_mask(x.shape, p)
    expected = base(x) + (x * keep / (1 - p)) @ A.T @ B.T * (6 / 4)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, A, B))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert 0 < keep.sum() < keep.numel()  # the draw dropped some entries and kept others


def test_modules_and_cases_it_does_not_cover_run_the_dropout_module_itself():
    x = torch.randn(4, 6)
    assert torch.equal(dropout_input(nn.Dropout(1.0), x)[0], torch.zeros_like(x))
    assert dropout_input(nn.Dropout(0.5).eval(), x) == (x, 1.0)

    class Recording(nn.Dropout):
        calls = 0

        def forward(self, input):
            Recording.calls += 1
            return super().forward(input)

    dropped, factor = dropout_input(Recording(0.5), x)
    assert Recording.calls == 1 and factor == 1.0
    assert set(torch.unique(dropped / x).tolist()) <= {0.0, 2.0}


def test_activation_checkpointing_recomputes_the_same_mask():
    """checkpoint() restores the CPU generator before recomputing, so the mask and the gradients match."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = _wrap(nn.Linear(10, 7), 0.4).train()
    x = torch.randn(3, 10, requires_grad=True)
    params = (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight)

    torch.manual_seed(5)
    direct = torch.autograd.grad(layer(x).square().sum(), params)
    torch.manual_seed(5)
    checkpointed = torch.autograd.grad(checkpoint(layer, x, use_reentrant=False).square().sum(), params)
    for got, want in zip(checkpointed, direct):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
