"""The Householder chain, the HRA layers' forward, merging and init, checked against dense formulas."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_core import PeftModel, get_peft_model
from peft_core.registry import LayerContext
from torch import nn

from peft_hra import HRAConfig, plugin
from peft_hra.householder import apply_chain, chain_factor, gram_schmidt, initial_vectors, unit_vectors
from peft_hra.layer import Conv2d, Linear


def dense_chain(u: torch.Tensor) -> torch.Tensor:
    """``H_1 @ H_2 @ ... @ H_r`` as a dense matrix, straight from the definition."""
    result = torch.eye(u.shape[0], dtype=u.dtype)
    for i in range(u.shape[1]):
        v = u[:, i : i + 1] / u[:, i].norm()
        result = result @ (torch.eye(u.shape[0], dtype=u.dtype) - 2 * v @ v.T)
    return result


def dense_gs(u: torch.Tensor) -> torch.Tensor:
    """``I - 2 Q Q^T`` with ``Q`` from a QR decomposition (the projector does not depend on signs)."""
    q, _ = torch.linalg.qr(u)
    return torch.eye(u.shape[0], dtype=u.dtype) - 2 * q @ q.T


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------- the chain
@pytest.mark.parametrize(("d", "r"), [(5, 1), (5, 3), (4, 4), (3, 7)])
def test_chain_is_the_product_of_reflections_and_inverse_is_its_transpose(d, r):
    u, rows = _random(d, r), _random(6, d, seed=1)
    reference = dense_chain(u)
    torch.testing.assert_close(apply_chain(rows, u, apply_GS=False, inverse=False), rows @ reference)
    torch.testing.assert_close(apply_chain(rows, u, apply_GS=False, inverse=True), rows @ reference.T)
    torch.testing.assert_close(reference @ reference.T, torch.eye(d, dtype=u.dtype))  # orthogonal


def test_compact_factor_reproduces_the_product():
    u = _random(6, 5)
    directions = unit_vectors(u, False)
    factor = chain_factor(directions)
    assert torch.equal(factor, torch.triu(factor)) and torch.equal(
        factor.diagonal(), torch.full((5,), 2.0, dtype=u.dtype)
    )
    torch.testing.assert_close(
        torch.eye(6, dtype=u.dtype) - directions @ factor @ directions.T, dense_chain(u)
    )


@pytest.mark.parametrize(("d", "r"), [(5, 1), (5, 3), (4, 4)])
def test_gram_schmidt_chain_is_the_reflection_through_the_span(d, r):
    u, rows = _random(d, r), _random(6, d, seed=1)
    q = gram_schmidt(u)
    torch.testing.assert_close(q.T @ q, torch.eye(r, dtype=u.dtype))
    # the same as reflecting along each orthonormal direction in turn, and self-inverse
    torch.testing.assert_close(dense_chain(q), dense_gs(u))
    for inverse in (False, True):
        torch.testing.assert_close(apply_chain(rows, u, apply_GS=True, inverse=inverse), rows @ dense_gs(u))


def test_unit_vectors_normalise_each_column():
    u = _random(5, 3)
    torch.testing.assert_close(unit_vectors(u, False).norm(dim=0), torch.ones(3, dtype=u.dtype))


def test_chain_gradients_are_correct():
    u, rows = _random(4, 3).requires_grad_(), _random(2, 4, seed=1).requires_grad_()
    for apply_GS in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, g=apply_GS: apply_chain(a, b, apply_GS=g, inverse=False), (rows, u)
        )


# ---------------------------------------------------------------------- init
def test_symmetric_init_pairs_equal_vectors_and_is_the_identity():
    torch.manual_seed(0)
    u = initial_vectors(7, 6, init_weights=True)
    assert u.shape == (7, 6)
    for i in range(0, 6, 2):
        assert torch.equal(u[:, i], u[:, i + 1])
    torch.testing.assert_close(dense_chain(u.double()), torch.eye(7, dtype=torch.float64))


@pytest.mark.parametrize(("d", "r"), [(16, 32), (256, 32), (64, 64)])
def test_many_reflections_stay_accurate_in_float32(d, r):
    # the compact form's triangle stays bounded (the chain is orthogonal), so float32 stays close
    torch.manual_seed(0)
    for init_weights in (True, False):
        u, rows = initial_vectors(d, r, init_weights=init_weights), torch.randn(8, d)
        exact = rows.double() @ dense_chain(u.double())
        torch.testing.assert_close(
            apply_chain(rows, u, apply_GS=False, inverse=False).double(), exact, atol=2e-5, rtol=0
        )
        if init_weights:
            torch.testing.assert_close(
                apply_chain(rows, u, apply_GS=False, inverse=False), rows, atol=2e-5, rtol=0
            )


def test_init_draws_kaiming_uniform_like_the_reference():
    # symmetric: r/2 vectors with bound 1/sqrt(r/2); random: r vectors with bound 1/sqrt(r)
    torch.manual_seed(3)
    expected_half = torch.empty(5, 2).uniform_(-1 / math.sqrt(2), 1 / math.sqrt(2))
    torch.manual_seed(3)
    torch.testing.assert_close(
        initial_vectors(5, 4, init_weights=True), expected_half.repeat_interleave(2, dim=1)
    )
    torch.manual_seed(3)
    expected = torch.empty(5, 4).uniform_(-0.5, 0.5)
    torch.manual_seed(3)
    torch.testing.assert_close(initial_vectors(5, 4, init_weights=False), expected)


def test_odd_r_with_the_identity_init_warns_and_draws_random_vectors():
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match=r"needs an even r; with r=3.*Use an even r"):
        u = initial_vectors(6, 3, init_weights=True)
    torch.manual_seed(1)
    torch.testing.assert_close(u, initial_vectors(6, 3, init_weights=False))


def test_gram_schmidt_with_the_identity_init_is_refused_with_the_fix():
    with pytest.raises(
        ValueError, match=r"apply_GS=True cannot start from HRA's identity init.*'fc'.*init_weights=False"
    ):
        plugin.linear_factory(
            nn.Linear(8, 3), "default", HRAConfig(r=4, apply_GS=True), LayerContext(key="fc")
        )
    # odd r: the reference's random fallback, with its warning
    with pytest.warns(UserWarning, match="even r"):
        layer = plugin.linear_factory(
            nn.Linear(8, 3), "default", HRAConfig(r=3, apply_GS=True), LayerContext(key="fc")
        )
    assert layer.hra_u["default"].shape == (8, 3)


def test_gram_schmidt_needs_r_at_most_the_reflection_dimension():
    config = HRAConfig(r=5, apply_GS=True, init_weights=False)
    with pytest.raises(ValueError, match=r"apply_GS=True needs r <= 4.*'fc'.*in_features=4"):
        plugin.linear_factory(nn.Linear(4, 3), "default", config, LayerContext(key="fc"))
    with pytest.raises(ValueError, match=r"r <= 4.*'conv'.*= 1 \* 2 \* 2"):
        plugin.conv2d_factory(nn.Conv2d(2, 4, 2, groups=2), "default", config, LayerContext(key="conv"))
    # without Gram-Schmidt any number of reflections is fine
    layer = plugin.linear_factory(
        nn.Linear(4, 3), "default", HRAConfig(r=6, init_weights=False), LayerContext(key="fc")
    )
    assert layer.hra_u["default"].shape == (4, 6)


# ---------------------------------------------------------------------- linear layers
def _linear_layer(r: int = 4, apply_GS: bool = False, seed: int = 0, bias: bool = True) -> Linear:
    torch.manual_seed(seed)
    base = nn.Linear(6, 5, bias=bias)
    return Linear(base, "default", HRAConfig(r=r, apply_GS=apply_GS, init_weights=False))


@pytest.mark.parametrize("apply_GS", [False, True])
def test_linear_forward_uses_the_weight_times_the_chain(apply_GS):
    layer = _linear_layer(apply_GS=apply_GS)
    x = torch.randn(2, 3, 6)
    u = layer.hra_u["default"].detach().double()
    chain = dense_gs(u) if apply_GS else dense_chain(u)
    base = layer.base_layer
    expected = F.linear(x.double(), base.weight.double() @ chain, base.bias.double()).float()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_rotation_keeps_the_angles_between_neurons():
    # the property HRA is built for: W R (W R)^T = W W^T
    layer = _linear_layer()
    weight = layer.get_base_layer().weight.detach()
    rotated = layer.rotated_weight(["default"]).detach()
    torch.testing.assert_close(rotated @ rotated.T, weight @ weight.T, atol=1e-5, rtol=0)
    assert not torch.allclose(rotated, weight, atol=1e-3)


def test_several_active_adapters_compose_in_order_merged_or_not():
    layer = _linear_layer(r=3)
    torch.manual_seed(9)
    layer.update_layer("other", HRAConfig(r=2, apply_GS=True, init_weights=False))
    layer.set_adapter(["default", "other"])
    x = torch.randn(4, 6)
    base = layer.get_base_layer()
    w0 = base.weight.detach().clone()
    chain_1 = dense_chain(layer.hra_u["default"].detach().double())
    chain_2 = dense_gs(layer.hra_u["other"].detach().double())
    expected = F.linear(x.double(), w0.double() @ chain_1 @ chain_2, base.bias.double()).float()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    layer.merge()
    assert layer.merged_adapters == ["default", "other"]
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        base.weight.detach(), (w0.double() @ chain_1 @ chain_2).float(), atol=1e-6, rtol=0
    )
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=0)


def test_unmerge_restores_the_base_weight_to_float_precision():
    layer = _linear_layer(r=8)
    base = layer.get_base_layer()
    w0 = base.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), w0, atol=2e-6, rtol=0)
    # rounding does not build up beyond float32 noise over repeated round trips (r > d here)
    for _ in range(10):
        layer.merge()
        layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-5, rtol=0)
    assert not torch.equal(layer.rotated_weight(["default"]).float(), w0)


def test_disabling_a_merged_layer_unmerges_it_like_the_reference():
    layer = _linear_layer()
    x = torch.randn(3, 6)
    plain = layer.base_layer(x)
    layer.merge()
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), plain, atol=1e-6, rtol=0)
    assert not layer.merged


def test_half_precision_base_keeps_float32_vectors_and_its_own_dtype():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(2, 2, 3)).to(torch.bfloat16)
    peft_model = get_peft_model(model, HRAConfig(target_modules=["0"], r=4, init_weights=False))
    layer = peft_model.base_model.model[0]
    assert layer.hra_u["default"].dtype == torch.float32
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = peft_model.base_model.model[0](x)
    assert out.dtype == torch.bfloat16
    expected = F.linear(x.float(), layer.rotated_weight(["default"]).float(), layer.bias.float())
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------------- conv layers
def test_conv_vectors_cover_a_flattened_filter():
    for conv, d in [
        (nn.Conv2d(3, 4, 3), 27),
        (nn.Conv2d(3, 4, (3, 1)), 9),
        (nn.Conv2d(4, 6, 2, groups=2), 8),
        (nn.Conv2d(5, 2, 1), 5),
    ]:
        layer = Conv2d(conv, "default", HRAConfig(r=2))
        assert layer.hra_u["default"].shape == (d, 2)


_GEOMETRIES = st.fixed_dictionaries(
    {
        "kernel_size": st.sampled_from([1, 2, 3, (3, 1), (2, 3)]),
        "stride": st.sampled_from([1, 2, (1, 2)]),
        "padding": st.sampled_from([0, 1, (1, 0), (0, 2)]),
        "dilation": st.sampled_from([1, 2, (2, 1)]),
        "groups": st.sampled_from([1, 2]),
        "padding_mode": st.sampled_from(["zeros", "reflect", "circular"]),
        "bias": st.booleans(),
    }
)


@settings(deadline=None)
@given(
    geometry=_GEOMETRIES,
    size=st.tuples(st.integers(5, 9), st.integers(5, 9)),
    batch=st.integers(1, 2),
    r=st.integers(1, 5),
    apply_GS=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv_forward_is_the_convolution_with_the_merged_weight_on_any_geometry(
    geometry, size, batch, r, apply_GS, seed
):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, **geometry)
    d = 4 // geometry["groups"] * math.prod(conv.kernel_size)
    if apply_GS and r > d:
        r = d
    layer = Conv2d(copy.deepcopy(conv), "default", HRAConfig(r=r, apply_GS=apply_GS, init_weights=False))
    x = torch.randn(batch, 4, *size)
    unmerged = layer(x)
    chain = (dense_gs if apply_GS else dense_chain)(layer.hra_u["default"].detach().double())
    # the expected output: the base layer itself, with its weight replaced by W @ R
    expected_conv = copy.deepcopy(conv).double()
    with torch.no_grad():
        expected_conv.weight.copy_((conv.weight.double().reshape(6, -1) @ chain).reshape(conv.weight.shape))
    torch.testing.assert_close(unmerged, expected_conv(x.double()).float(), atol=1e-5, rtol=0)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    layer.unmerge()
    # Gram-Schmidt in float32 leaves Q orthonormal to a few ulps times its conditioning (r up to d here)
    torch.testing.assert_close(layer.get_base_layer().weight, conv.weight, atol=1e-5, rtol=0)


def test_conv_same_padding_keeps_the_input_size():
    torch.manual_seed(0)
    layer = Conv2d(nn.Conv2d(3, 3, 3, padding="same"), "default", HRAConfig(r=2, init_weights=False))
    x = torch.randn(1, 3, 6, 5)
    out = layer(x)
    assert out.shape == (1, 3, 6, 5)
    layer.merge()
    torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- training
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        return self.head(torch.tanh(self.fc(h)))


@pytest.mark.parametrize("apply_GS", [False, True])
def test_adam_steps_lower_the_loss_and_train_only_the_vectors(apply_GS):
    torch.manual_seed(0)
    model = get_peft_model(
        _Tiny(),
        HRAConfig(target_modules=["conv", "fc", "head"], r=2, apply_GS=apply_GS, init_weights=not apply_GS),
    )
    x = torch.randn(16, 2, 5, 5)
    target = torch.randn(16, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=0.05)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and all(".hra_u.default" in n for n in changed)
    # the trained adapter still merges exactly into the trained output
    with torch.no_grad():
        trained = model(x)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x), trained, atol=1e-5, rtol=0)


def _seeded_tiny() -> nn.Module:
    torch.manual_seed(0)
    return _Tiny()


def test_loading_skips_the_init_and_its_warnings(tmp_path):
    with pytest.warns(UserWarning, match="even r"):
        model = get_peft_model(_seeded_tiny(), HRAConfig(target_modules=["fc"], r=3, apply_GS=True))
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the odd-r warning nor anything else
        loaded = PeftModel.from_pretrained(_seeded_tiny(), tmp_path)
    torch.testing.assert_close(
        loaded.base_model.model.fc.hra_u["default"],
        model.base_model.model.fc.hra_u["default"],
        atol=0,
        rtol=0,
    )
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
