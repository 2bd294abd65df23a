"""The butterfly transform and the BOFT layers, checked against dense matrices built from the definition."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_core import get_peft_model, get_peft_model_state_dict
from peft_core.errors import ConfigError
from torch import nn

from peft_boft import BOFTConfig
from peft_boft.butterfly import (
    MultiplicativeDropout,
    butterfly_permutation,
    cayley,
    dense_rotation,
    resolve_blocks,
    rotate,
)
from peft_boft.layer import BOFTLayer, Conv2d, Linear


# ---------------------------------------------------------------------- dense references
def permutation_matrix(indices: torch.Tensor) -> torch.Tensor:
    """``P[j, indices[j]] = 1``: the reference's convention for its ``boft_P`` buffers."""
    n = len(indices)
    matrix = torch.zeros(n, n)
    matrix[torch.arange(n), indices] = 1.0
    return matrix


def dense_butterfly(blocks: torch.Tensor) -> torch.Tensor:
    """``M[F-1] @ ... @ M[0]`` with ``M[i] = P[i] @ blockdiag(Q[i]) @ P[i].T``, all dense."""
    factors, num, size, _ = blocks.shape
    n = num * size
    result = torch.eye(n, dtype=blocks.dtype)
    for i in range(factors):
        perm = torch.arange(n) if i == 0 else butterfly_permutation(n, num // 2**i, size // 2)
        p = permutation_matrix(perm).to(blocks.dtype)
        result = p @ torch.block_diag(*blocks[i]) @ p.T @ result
    return result


@st.composite
def geometries(draw: st.DrawFn) -> tuple[int, int, int]:
    """``(block_num, block_size, factors)`` valid for the butterfly."""
    factors = draw(st.integers(1, 3))
    if factors == 1:
        return draw(st.integers(1, 6)), draw(st.integers(1, 5)), 1
    # more factors: even block sizes, and a multiple of 2 ** (factors - 1) (so an even number) of blocks
    return 2 ** (factors - 1) * draw(st.integers(1, 3)), 2 * draw(st.integers(1, 3)), factors


def random_blocks(num: int, size: int, factors: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return cayley(0.5 * torch.randn(factors, num, size, size, generator=g))


# ---------------------------------------------------------------------- the transform
@given(geometry=geometries(), seed=st.integers(0, 100))
def test_rotate_equals_the_dense_butterfly_both_ways(geometry, seed):
    num, size, factors = geometry
    blocks = random_blocks(num, size, factors, seed)
    dense = dense_butterfly(blocks)
    x = torch.randn(3, 2, num * size, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(rotate(x, blocks), x @ dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotate(x, blocks, transpose=True), x @ dense.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_rotation(blocks), dense, atol=1e-5, rtol=1e-5)


@given(geometry=geometries())
def test_the_rotation_is_orthogonal_and_its_transpose_inverts_it(geometry):
    num, size, factors = geometry
    blocks = random_blocks(num, size, factors)
    rot = dense_rotation(blocks)
    torch.testing.assert_close(rot @ rot.T, torch.eye(num * size), atol=1e-5, rtol=0)
    x = torch.randn(4, num * size)
    torch.testing.assert_close(rotate(rotate(x, blocks, transpose=True), blocks), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("n", "groups", "half"), [(8, 2, 1), (16, 2, 2), (16, 1, 4), (24, 3, 2), (32, 4, 1)])
def test_butterfly_permutation_is_a_permutation_moving_runs_within_groups(n, groups, half):
    perm = butterfly_permutation(n, groups, half)
    assert sorted(perm.tolist()) == list(range(n))
    group = n // groups
    for start in range(0, n, group):
        chunk = perm[start : start + group].tolist()
        assert sorted(chunk) == list(range(start, start + group))
        runs = [chunk[i : i + half] for i in range(0, group, half)]
        # even-numbered runs first, each run kept in order
        expected = [list(range(start + r * half, start + (r + 1) * half)) for r in range(0, group // half, 2)]
        expected += [
            list(range(start + r * half, start + (r + 1) * half)) for r in range(1, group // half, 2)
        ]
        assert runs == expected


def test_zero_parameters_give_exactly_the_identity():
    blocks = cayley(torch.zeros(3, 4, 2, 2))
    assert torch.equal(blocks, torch.eye(2).expand(3, 4, 2, 2))
    x = torch.randn(5, 8)
    assert torch.equal(rotate(x, blocks), x)
    assert torch.equal(rotate(x, blocks, transpose=True), x)


def test_cayley_blocks_are_orthogonal_and_ignore_the_symmetric_part():
    data = torch.randn(2, 3, 4, 4)
    q = cayley(data)
    torch.testing.assert_close(q @ q.transpose(-1, -2), torch.eye(4).expand(2, 3, 4, 4), atol=1e-5, rtol=0)
    symmetric = torch.randn(2, 3, 4, 4)
    symmetric = symmetric + symmetric.transpose(-1, -2)
    torch.testing.assert_close(cayley(data + symmetric), q, atol=1e-5, rtol=1e-5)


def test_half_precision_parameters_are_rotated_in_float32():
    assert cayley(torch.zeros(1, 2, 2, 2, dtype=torch.bfloat16)).dtype == torch.float32


# ---------------------------------------------------------------------- geometry rules
@pytest.mark.parametrize(
    ("n", "size", "num", "factors", "expected"),
    [
        (12, 4, 0, 1, (4, 3)),
        (12, 0, 3, 1, (4, 3)),
        (16, 2, 0, 3, (2, 8)),
        (16, 0, 4, 3, (4, 4)),
        (7, 1, 0, 1, (1, 7)),
        (7, 7, 0, 1, (7, 1)),
    ],
)
def test_block_geometry_is_derived_from_the_one_given(n, size, num, factors, expected):
    assert resolve_blocks(n, size, num, factors, where="layer") == expected


@pytest.mark.parametrize(
    ("n", "size", "num", "factors", "message"),
    [
        (12, 5, 0, 1, r"dimension 12 is not divisible by boft_block_size=5"),
        (12, 0, 5, 1, r"dimension 12 is not divisible by boft_block_num=5"),
        (12, 2, 0, 3, r"multiple of boft_block_size \* 2 \*\* \(boft_n_butterfly_factor - 1\) = 8"),
        (12, 0, 6, 3, r"boft_block_num=6 must be a multiple of 2 \*\* \(boft_n_butterfly_factor - 1\) = 4"),
        (12, 3, 0, 2, r"must both be even"),
        (12, 0, 4, 2, r"must both be even"),  # block size 3
    ],
)
def test_invalid_block_geometry_is_refused_with_the_fix(n, size, num, factors, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve_blocks(n, size, num, factors, where="BOFT on the nn.Linear 'fc'")
    assert "'fc'" in str(info.value) and "Block sizes that work" in str(info.value)


def test_geometry_error_lists_the_block_sizes_that_work():
    with pytest.raises(ConfigError, match=r"\[2, 4, 8\]"):
        resolve_blocks(16, 3, 0, 2, where="layer")


# ---------------------------------------------------------------------- the layers
def config(**options) -> BOFTConfig:
    options.setdefault("target_modules", ["layer"])
    return BOFTConfig(**options)


def make_linear(*, seed: int = 0, bias: bool = True, n_in: int = 8, n_out: int = 6, **options):
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=bias)
    options.setdefault("init_weights", False)
    layer = Linear(copy.deepcopy(base), "default", config(**options), key="layer")
    return layer.eval(), base.eval()


def make_conv(*, seed: int = 0, c_in: int = 2, c_out: int = 4, kernel=3, **conv_options):
    adapter_options = {k: conv_options.pop(k) for k in list(conv_options) if k.startswith("boft_")}
    torch.manual_seed(seed)
    base = nn.Conv2d(c_in, c_out, kernel, **conv_options)
    layer = Conv2d(copy.deepcopy(base), "default", config(init_weights=False, **adapter_options), key="layer")
    return layer.eval(), base.eval()


def test_linear_forward_rotates_the_input_and_scales_the_output():
    layer, base = make_linear(boft_block_size=2, boft_n_butterfly_factor=2)
    rot, scale = layer.get_rotation("default")
    x = torch.randn(3, 5, 8)
    expected = scale * F.linear(x @ rot, base.weight) + base.bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_parameters_have_the_references_shapes():
    layer, _ = make_linear(boft_block_size=0, boft_block_num=2, boft_n_butterfly_factor=2)
    assert layer.boft_R["default"].shape == (2, 2, 4, 4)
    assert layer.boft_s["default"].shape == (6, 1)
    assert (layer.boft_block_size, layer.boft_block_num) == ({"default": 4}, {"default": 2})
    conv, _ = make_conv(boft_block_size=3)
    assert conv.boft_R["default"].shape == (1, 6, 3, 3)  # rotated dimension 2 * 3 * 3 = 18
    assert conv.boft_s["default"].shape == (1, 4)
    # no permutation matrices are kept (nor saved, as in the reference)
    assert not any("boft_P" in k for k in layer.state_dict())
    assert set(layer.state_dict()) == {
        "base_layer.weight",
        "base_layer.bias",
        "boft_R.default",
        "boft_s.default",
    }


def merged_conv_reference(layer: Conv2d, base: nn.Conv2d) -> torch.Tensor:
    """``s * (W_flat @ Rot.T)`` from the dense rotation."""
    rot, scale = layer.get_rotation("default")
    flat = base.weight.detach().reshape(base.out_channels, -1)
    return (scale[:, None] * (flat @ rot.T)).reshape(base.weight.shape)


CONV_GEOMETRIES = {
    "3x3-same": {"kernel": 3, "padding": 1},
    "1x1": {"kernel": 1},
    "strided": {"kernel": 3, "stride": 2},
    "uneven-stride-padding": {"kernel": 3, "stride": (2, 1), "padding": (0, 2)},
    "dilated": {"kernel": 3, "dilation": 2, "padding": 2},
    "reflect": {"kernel": 3, "padding": 1, "padding_mode": "reflect"},
    "padding-same": {"kernel": 3, "padding": "same"},
    "rectangular-kernel": {"kernel": (1, 3), "padding": (0, 1)},
    "grouped": {"kernel": 3, "groups": 2, "padding": 1},
}


@pytest.mark.parametrize("geometry", list(CONV_GEOMETRIES))
def test_conv_forward_is_the_base_convolution_with_the_merged_filters(geometry):
    options = dict(CONV_GEOMETRIES[geometry])
    layer, base = make_conv(boft_block_size=2 if geometry == "1x1" else 3, **options)
    weight = merged_conv_reference(layer, base)
    x = torch.randn(2, 2, 7, 6)
    with torch.no_grad():
        expected = base._conv_forward(x, weight, base.bias)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=15)
@given(
    height=st.integers(3, 9),
    width=st.integers(3, 9),
    batch=st.integers(1, 3),
    geometry=st.sampled_from(list(CONV_GEOMETRIES)),
    factors=st.sampled_from([1, 2]),
)
def test_conv_merged_equals_unmerged_on_any_input_size(height, width, batch, geometry, factors):
    options = dict(CONV_GEOMETRIES[geometry])
    # rotated dimensions that admit the butterfly: (c_in // groups) * kh * kw divisible by 4
    c_in = 2 if factors == 1 else 8 if geometry == "grouped" else 4
    size = 3 if factors == 1 and geometry != "1x1" else 2
    layer, base = make_conv(c_in=c_in, boft_block_size=size, boft_n_butterfly_factor=factors, **options)
    x = torch.randn(batch, c_in, height, width)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer.get_base_layer().weight, base.weight, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("factors", [1, 2, 3])
def test_linear_merge_and_unmerge(bias, factors):
    layer, base = make_linear(bias=bias, n_in=16, boft_block_size=2, boft_n_butterfly_factor=factors)
    x = torch.randn(4, 16)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        rot, scale = layer.get_rotation("default")
        expected = scale[:, None] * (base.weight @ rot.T)
        torch.testing.assert_close(layer.get_base_layer().weight, expected, atol=1e-6, rtol=1e-5)
        if bias:  # the bias is not rotated or scaled
            assert torch.equal(layer.get_base_layer().bias, base.bias)
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer.get_base_layer().weight, base.weight, atol=1e-6, rtol=1e-5)


def _add(layer: BOFTLayer, name: str, seed: int, **options) -> None:
    torch.manual_seed(seed)
    options.setdefault("init_weights", False)
    layer.update_layer(name, config(**options), key="layer")


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_active_adapters_compose_in_order_and_merge_one_after_the_other(kind):
    if kind == "linear":
        layer, base = make_linear(n_in=8, boft_block_size=2, boft_n_butterfly_factor=2)
        x = torch.randn(3, 8)
    else:
        layer, base = make_conv(boft_block_size=3)
        x = torch.randn(2, 2, 5, 5)
    _add(layer, "second", 1, boft_block_size=0, boft_block_num=2)  # a different geometry on the same layer
    layer.set_adapter(["default", "second"])
    (rot1, s1), (rot2, s2) = layer.get_rotation("default"), layer.get_rotation("second")
    flat = base.weight.detach().reshape(base.weight.shape[0], -1)
    weight = ((s1 * s2)[:, None] * (flat @ rot1.T @ rot2.T)).reshape(base.weight.shape)
    with torch.no_grad():
        if kind == "linear":
            expected = F.linear(x, weight, base.bias)
        else:
            expected = base._conv_forward(x, weight, base.bias)
        actual = layer(x)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        layer.merge()
        assert layer.merged_adapters == ["default", "second"]
        torch.testing.assert_close(layer(x), actual, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer.get_base_layer().weight, base.weight, atol=1e-6, rtol=1e-5)
        # the order matters: rotations do not commute
        layer.set_adapter(["second", "default"])
        assert not torch.allclose(layer(x), actual, atol=1e-4)


def test_adapters_of_different_geometry_keep_their_own_permutations():
    layer, _ = make_linear(n_in=16, boft_block_size=2, boft_n_butterfly_factor=3)
    x = torch.randn(2, 16)
    with torch.no_grad():
        before = layer(x)
        _add(layer, "other", 3, boft_block_size=4, boft_n_butterfly_factor=2)
        torch.testing.assert_close(layer(x), before, atol=0, rtol=0)


def test_identity_init_is_exactly_the_base_layer():
    for factors in (1, 2):
        layer, base = make_linear(init_weights=True, boft_block_size=2, boft_n_butterfly_factor=factors)
        x = torch.randn(4, 8)
        with torch.no_grad():
            assert torch.equal(layer(x), base(x))
        conv, cbase = make_conv(c_in=4, boft_block_size=2, boft_n_butterfly_factor=factors)
        with torch.no_grad():
            conv.boft_R["default"].zero_()
            conv.boft_s["default"].fill_(1.0)
            x = torch.randn(1, 4, 5, 5)
            assert torch.equal(conv(x), cbase(x))


def test_random_init_is_the_references_draws():
    layer, _ = make_linear(seed=7, boft_block_size=4, boft_n_butterfly_factor=2)
    torch.manual_seed(7)
    nn.Linear(8, 6)  # the base layer's own init draws come first
    rotation, scale = torch.empty(2, 2, 4, 4), torch.empty(6, 1)
    nn.init.normal_(rotation, mean=0.0, std=0.1)
    nn.init.normal_(scale, mean=1.0, std=0.1)
    assert torch.equal(layer.boft_R["default"].detach(), rotation)
    assert torch.equal(layer.boft_s["default"].detach(), scale)


def test_unmerging_a_zero_scale_warns_and_stays_finite():
    layer, _ = make_linear(boft_block_size=2)
    with torch.no_grad():
        layer.boft_s["default"][0] = 0.0
    layer.merge()
    with pytest.warns(UserWarning, match="exactly 0"):
        layer.unmerge()
    assert torch.isfinite(layer.get_base_layer().weight).all()


@pytest.mark.parametrize("param", ["boft_R", "boft_s"])
def test_safe_merge_refuses_nan_and_leaves_the_base_unchanged(param):
    layer, base = make_linear(boft_block_size=2)
    with torch.no_grad():
        getattr(layer, param)["default"].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    assert torch.equal(layer.get_base_layer().weight, base.weight)


def test_disabled_layer_gives_the_base_output_and_unmerges_a_merged_adapter():
    layer, base = make_linear(boft_block_size=2)
    x = torch.randn(3, 8)
    layer.merge()
    layer.enable_adapters(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = layer(x)
    torch.testing.assert_close(out, base(x), atol=1e-5, rtol=1e-5)
    assert not layer.merged


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_half_precision_base_keeps_its_dtype_and_is_close_to_float32(kind):
    if kind == "linear":
        layer, _ = make_linear(boft_block_size=2, boft_n_butterfly_factor=2)
        x = torch.randn(3, 8)
    else:
        layer, _ = make_conv(boft_block_size=3)
        x = torch.randn(2, 2, 5, 5)
    expected = layer(x)
    low = copy.deepcopy(layer).to(torch.bfloat16)
    for name in ("boft_R", "boft_s"):  # as autocast_adapter_dtype does
        getattr(low, name)["default"].data = getattr(low, name)["default"].data.float()
    out = low(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)


def test_delete_adapter_removes_all_its_state():
    layer, _ = make_linear(boft_block_size=2)
    _add(layer, "other", 1, boft_block_size=4, boft_dropout=0.5)
    layer.delete_adapter("other")
    assert layer.adapter_names == ["default"]
    for attr in ("boft_R", "boft_s", "boft_dropout", "boft_block_size", "boft_block_num"):
        assert "other" not in getattr(layer, attr)


def test_layer_geometry_error_names_the_module_and_its_dimension():
    with pytest.raises(
        ConfigError, match=r"nn.Linear 'model.fc' \(in_features=6\).*not divisible by boft_block_size=4"
    ):
        Linear(nn.Linear(6, 3), "default", config(), key="model.fc")
    with pytest.raises(ConfigError, match=r"nn.Conv2d 'conv'.*in_channels 3 x kernel 1x1 = 3"):
        Conv2d(nn.Conv2d(3, 3, 1), "default", config(), key="conv")


# ---------------------------------------------------------------------- dropout
def test_dropout_replaces_int_p_times_d_blocks_of_one_factor_in_training_only():
    dropout = MultiplicativeDropout(0.5)
    blocks = random_blocks(6, 3, 2)
    dropout.eval()
    assert torch.equal(dropout(blocks), blocks)
    dropout.train()
    torch.manual_seed(0)
    out = dropout(blocks)
    replaced = (out == torch.eye(3)).all(-1).all(-1) & ~(blocks == torch.eye(3)).all(-1).all(-1)
    assert replaced.sum() == 3  # int(0.5 * 6)
    assert replaced.any(dim=1).sum() == 1  # all in one factor
    kept = ~replaced
    assert torch.equal(out[kept], blocks[kept])
    # the same seed drops the same blocks
    torch.manual_seed(0)
    assert torch.equal(dropout(blocks), out)


def test_dropout_acts_in_training_and_not_in_eval():
    layer, _ = make_linear(boft_block_size=2, boft_dropout=1.0)
    x = torch.randn(3, 8)
    with torch.no_grad():
        evaluated = layer(x)
        layer.train()
        trained = layer(x)
    # p = 1 sets every block of the (only) factor to the identity: only the scale remains
    _, scale = layer.get_rotation("default")
    base = layer.get_base_layer()
    with torch.no_grad():
        torch.testing.assert_close(
            trained, scale * F.linear(x, base.weight) + base.bias, atol=1e-6, rtol=1e-5
        )
    assert not torch.allclose(trained, evaluated)


# ---------------------------------------------------------------------- training
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc2 = nn.Linear(16 + 4, 3)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        c = torch.tanh(self.conv(image)).mean(dim=(2, 3))
        return self.fc2(torch.cat([h, c], dim=-1))


def test_adam_training_lowers_the_loss_and_changes_only_adapter_parameters():
    torch.manual_seed(0)
    model = get_peft_model(
        Tiny(),
        BOFTConfig(
            target_modules=["fc1", "conv"], boft_block_size=2, boft_n_butterfly_factor=2, boft_dropout=0.1
        ),
    )
    g = torch.Generator().manual_seed(1)
    x, image = torch.randn(32, 8, generator=g), torch.randn(32, 4, 5, 5, generator=g)
    target = torch.randn(32, 3, generator=g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("boft_" in n for n in trainable)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x=x, image=image), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == trainable  # every adapter tensor moved, nothing else did
    # the trained adapter still merges exactly
    model.eval()
    with torch.no_grad():
        unmerged = model(x=x, image=image)
        model.merge_adapter()
        torch.testing.assert_close(model(x=x, image=image), unmerged, atol=1e-5, rtol=1e-5)


def test_bias_boft_only_trains_the_adapted_layers_biases():
    torch.manual_seed(0)
    model = get_peft_model(Tiny(), BOFTConfig(target_modules=["fc1", "conv"], bias="boft_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.endswith("bias")} == {
        "base_model.model.fc1.base_layer.bias",
        "base_model.model.conv.base_layer.bias",
    }
    # saved under the reference's keys, next to the adapter tensors
    assert set(get_peft_model_state_dict(model)) == {
        f"base_model.model.{layer}.{tensor}"
        for layer in ("fc1", "conv")
        for tensor in ("boft_R", "boft_s", "base_layer.bias")
    }
