"""OFT layers and rotations: the maths, checked against dense matrices written out independently."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft_core import get_peft_model
from torch import nn

from peft_oft import OFTConfig
from peft_oft.layer import Conv2d, Embedding, Linear, OFTLayer
from peft_oft.rotation import OFTRotation, adjust_to_divisor, split_dimension

pytestmark = pytest.mark.filterwarnings("ignore:OFT for .*does not divide:UserWarning")


def rotation(block_size=4, n_blocks=3, **kwargs) -> OFTRotation:
    options = (
        dict(block_share=False, coft=False, eps=6e-5, use_cayley_neumann=True, num_cayley_neumann_terms=5)
        | kwargs
    )
    module = OFTRotation(n_blocks=n_blocks, block_size=block_size, **options)
    with torch.no_grad():
        module.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    return module


def dense(blocks: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*blocks)


# ---------------------------------------------------------------------- rotations
def test_packed_parameters_are_the_row_major_strict_upper_triangle():
    module = rotation(block_size=3, n_blocks=1)
    skew = module.skew(torch.tensor([[1.0, 2.0, 3.0]]))[0]
    assert torch.equal(skew, torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.0, 3.0], [-2.0, -3.0, 0.0]]))


def test_exact_cayley_is_orthogonal_and_is_the_cayley_transform():
    module = rotation(use_cayley_neumann=False)
    blocks = module.blocks()
    eye = torch.eye(4).expand_as(blocks)
    torch.testing.assert_close(blocks @ blocks.transpose(-2, -1), eye, atol=1e-6, rtol=0)
    q = module.skew(module.weight.detach()).double()
    expected = (torch.eye(4, dtype=torch.float64) - q) @ torch.linalg.inv(
        torch.eye(4, dtype=torch.float64) + q
    )
    torch.testing.assert_close(blocks.double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 5, 6, 8])
def test_neumann_series_has_the_references_coefficients(terms):
    module = rotation(num_cayley_neumann_terms=terms)
    q = module.skew(module.weight.detach()).double()
    eye = torch.eye(4, dtype=torch.float64).expand_as(q)
    if terms <= 1:
        expected = eye
    elif terms == 2:
        expected = eye + 2 * q
    else:
        last = max(terms - 1, 3)
        expected = (
            eye
            + sum(2 * torch.linalg.matrix_power(q, k) for k in range(1, last))
            + torch.linalg.matrix_power(q, last)
        )
    torch.testing.assert_close(module.blocks().double(), expected, atol=1e-6, rtol=0)


def test_neumann_approaches_the_cayley_transform_of_opposite_sign():
    # (I + Q)(I - Q)^-1 is the transpose of the exact branch's (I - Q)(I + Q)^-1.
    exact = rotation(use_cayley_neumann=False).blocks()
    series = rotation(num_cayley_neumann_terms=12).blocks()
    torch.testing.assert_close(series, exact.transpose(-2, -1), atol=1e-5, rtol=0)


def test_zero_parameters_give_the_identity_in_every_variant():
    for kwargs in ({}, {"use_cayley_neumann": False}, {"coft": True}, {"block_share": True}):
        module = rotation(**kwargs)
        with torch.no_grad():
            module.weight.zero_()
        assert torch.equal(module.blocks(), torch.eye(4).expand(3, 4, 4)), kwargs


def test_block_share_stores_one_block_used_everywhere():
    module = rotation(block_share=True)
    assert module.weight.shape == (1, 6)
    blocks = module.blocks()
    assert blocks.shape == (3, 4, 4) and all(torch.equal(b, blocks[0]) for b in blocks)


def test_adjust_to_divisor_picks_the_nearest_divisor_ties_down():
    assert adjust_to_divisor(12, 5) == 4  # 4 and 6 are both 1 away: the lower one
    assert adjust_to_divisor(12, 7) == 6
    assert adjust_to_divisor(7, 2) == 1  # 1 is nearer than 7
    assert adjust_to_divisor(7, 5) == 7
    assert adjust_to_divisor(10, 32) == 10
    assert split_dimension(12, 0, 4) == (3, 4, None)
    assert split_dimension(12, 5, 0)[:2] == (4, 3) and "r=5" in split_dimension(12, 5, 0)[2]
    assert split_dimension(12, 0, 32)[:2] == (1, 12)


# ---------------------------------------------------------------------- COFT
def test_coft_projects_each_block_into_the_ball():
    module = rotation(coft=True, eps=0.05)
    projected = module.project(module.weight.detach())
    radius = 0.05 / 3**0.5
    norms = torch.linalg.matrix_norm(module.skew(projected))
    assert (norms <= radius * (1 + 1e-5)).all()
    torch.testing.assert_close(norms, torch.full((3,), radius), atol=1e-7, rtol=1e-5)  # all started outside
    assert torch.equal(module.project(projected), projected), "projection must be idempotent"
    small = module.weight.detach() * 1e-3  # inside the ball: untouched
    assert torch.equal(module.project(small), small)


def test_coft_training_forward_stores_the_projection_evaluation_does_not():
    base = nn.Linear(8, 3)
    layer = Linear(
        base,
        "default",
        OFTConfig(target_modules=["x"], oft_block_size=4, coft=True, eps=0.05, init_weights=False),
    )
    before = layer.oft_R["default"].weight.detach().clone()
    x = torch.randn(2, 8)
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(layer.oft_R["default"].weight, before)
    layer.train()
    y_train = layer(x)
    after = layer.oft_R["default"].weight.detach()
    torch.testing.assert_close(after, layer.oft_R["default"].project(before))
    torch.testing.assert_close(y_train, y_eval, atol=1e-6, rtol=0)


def test_coft_gradient_is_finite_at_the_identity_init():
    layer = Linear(nn.Linear(8, 3), "default", OFTConfig(target_modules=["x"], oft_block_size=4, coft=True))
    layer.train()
    layer(torch.randn(2, 8)).pow(2).sum().backward()
    grad = layer.oft_R["default"].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------------------- forward vs dense maths
def _config(**kwargs) -> OFTConfig:
    return OFTConfig(**({"target_modules": ["x"], "init_weights": False, "oft_block_size": 4} | kwargs))


def test_linear_rotates_the_input():
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    layer = Linear(copy.deepcopy(base), "default", _config()).eval()
    x = torch.randn(2, 3, 8)
    m = dense(layer.oft_R["default"].blocks().detach())
    torch.testing.assert_close(layer(x), base(x @ m), atol=1e-6, rtol=0)


def test_embedding_rotates_the_rows():
    torch.manual_seed(0)
    base = nn.Embedding(10, 8)
    layer = Embedding(copy.deepcopy(base), "default", _config()).eval()
    ids = torch.randint(0, 10, (2, 5))
    m = dense(layer.oft_embedding_R["default"].blocks().detach())
    torch.testing.assert_close(layer(ids), base(ids) @ m, atol=1e-6, rtol=0)
    assert "oft_embedding_R" in layer.adapter_layer_names and not hasattr(layer, "oft_R")


CONVS = {
    "k3_pad1": dict(in_channels=2, out_channels=3, kernel_size=3, padding=1),
    "k3_stride2_dilation2": dict(
        in_channels=2, out_channels=4, kernel_size=3, stride=2, dilation=2, padding=2
    ),
    "k2x3_nonsquare": dict(in_channels=2, out_channels=3, kernel_size=(2, 3)),
    "k1": dict(in_channels=4, out_channels=3, kernel_size=1),
    "reflect_padding": dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"),
}


@pytest.mark.parametrize("geometry", list(CONVS))
@pytest.mark.parametrize("size", [(3, 3), (7, 5)])
def test_conv2d_forward_is_the_conv_with_rotated_patches(geometry, size):
    torch.manual_seed(0)
    base = nn.Conv2d(**CONVS[geometry])
    layer = Conv2d(copy.deepcopy(base), "default", _config(oft_block_size=2)).eval()
    x = torch.randn(2, base.in_channels, *size)
    m = dense(layer.oft_R["default"].blocks().detach())
    # Independent route: the kernel applied to every patch rotated by M (patches in the weight's layout).
    flat = base.weight.reshape(base.out_channels, -1)
    rotated = (flat @ m.T).reshape(base.weight.shape)
    torch.testing.assert_close(layer(x), base._conv_forward(x, rotated, base.bias), atol=1e-6, rtol=0)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert torch.equal(layer(x), unmerged), "merged and unmerged conv outputs must be identical"
        layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, base.weight, atol=1e-6, rtol=0)


def test_conv2d_rotated_dimension_is_the_whole_patch():
    layer = Conv2d(nn.Conv2d(3, 4, (2, 3)), "default", _config(oft_block_size=6))
    assert layer.r["default"] == 3 and layer.oft_R["default"].weight.shape == (3, 15)


# ---------------------------------------------------------------------- merging
LAYERS = {
    "linear": (lambda: nn.Linear(8, 5), lambda: torch.randn(3, 8)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 2, padding=1), lambda: torch.randn(2, 2, 5, 4)),
    "embedding": (lambda: nn.Embedding(10, 8), lambda: torch.randint(0, 10, (2, 4))),
}
LAYER_TYPES = {"linear": Linear, "conv2d": Conv2d, "embedding": Embedding}


def _layer(kind: str, **kwargs) -> tuple[OFTLayer, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    build, inputs = LAYERS[kind]
    base = build()
    layer = LAYER_TYPES[kind](copy.deepcopy(base), "default", _config(**kwargs)).eval()
    return layer, base, inputs()


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("neumann", [True, False])
def test_merge_then_unmerge_restores_the_base(kind, neumann):
    layer, base, x = _layer(kind, use_cayley_neumann=neumann)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=0)
        layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, base.weight, atol=1e-6, rtol=0)


def test_neumann_unmerge_inverts_rather_than_transposes():
    # With few terms the series is far from orthogonal: its transpose would not undo the merge.
    layer, base, _ = _layer("linear", num_cayley_neumann_terms=2)
    blocks = layer.oft_R["default"].blocks().detach()
    off = blocks @ blocks.transpose(-2, -1) - torch.eye(4)
    assert off.abs().max() > 1e-2
    with torch.no_grad():
        layer.merge()
        layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, base.weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_several_active_adapters_compose_and_merge_to_the_same(kind):
    layer, base, x = _layer(kind)
    torch.manual_seed(1)
    layer.update_layer("other", _config(oft_block_size=2))
    layer.set_adapter(["default", "other"])
    m1 = dense(layer.rotations["default"].blocks().detach())
    m2 = dense(layer.rotations["other"].blocks().detach())
    assert not torch.allclose(m1 @ m2, m2 @ m1, atol=1e-4), "the test needs non-commuting rotations"
    with torch.no_grad():
        if kind == "linear":
            expected = base(x @ m1 @ m2)
        elif kind == "embedding":
            expected = base(x) @ m1 @ m2
        else:
            flat = base.weight.reshape(base.out_channels, -1)
            expected = base._conv_forward(x, (flat @ (m1 @ m2).T).reshape(base.weight.shape), base.bias)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
        layer.merge()
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
        layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, base.weight, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_safe_merge_refuses_nan_and_leaves_the_base_unchanged(kind):
    layer, base, _ = _layer(kind)
    with torch.no_grad():
        layer.rotations["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, base.weight) and not layer.merged


def test_disabled_layer_gives_the_base_output_and_unmerges_a_merged_adapter():
    layer, base, x = _layer("linear")
    with torch.no_grad():
        layer.merge()
        layer.enable_adapters(False)
        torch.testing.assert_close(layer(x), base(x), atol=1e-6, rtol=0)
    assert not layer.merged


# ---------------------------------------------------------------------- dropout, dtypes, init
def test_module_dropout_sets_blocks_to_the_identity_in_training_only():
    layer, base, x = _layer("linear", oft_block_size=2, module_dropout=0.5)  # 4 blocks, 2 dropped
    rot = layer.oft_R["default"]
    layer.train()
    torch.manual_seed(3)
    blocks = layer._blocks("default")
    identity = [torch.equal(b, torch.eye(2)) for b in blocks]
    assert sum(identity) == 2
    kept = [i for i, is_eye in enumerate(identity) if not is_eye]
    assert all(torch.equal(blocks[i], rot.blocks()[i]) for i in kept)
    layer.eval()
    assert torch.equal(layer._blocks("default"), rot.blocks())
    with torch.no_grad():
        layer.merge()  # merging ignores dropout
        torch.testing.assert_close(
            layer.get_base_layer().weight, base.weight @ dense(rot.blocks()).T, atol=1e-6, rtol=0
        )


def test_default_init_is_zero_and_random_init_is_normal_with_std_0_1():
    layer, _, _ = _layer("linear", init_weights=True)
    assert torch.equal(layer.oft_R["default"].weight, torch.zeros(2, 6))
    big = Linear(nn.Linear(512, 2), "default", _config(oft_block_size=32))
    std = big.oft_R["default"].weight.std().item()
    assert 0.09 < std < 0.11


def test_half_precision_base_keeps_its_output_dtype():
    torch.manual_seed(0)
    lin = get_peft_model(nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16), _config(target_modules=["0"]))
    assert lin(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert lin.base_model.model[0].oft_R["default"].weight.dtype == torch.float32  # adapters upcast
    conv = get_peft_model(
        nn.Sequential(nn.Conv2d(4, 2, 1)).to(torch.bfloat16), _config(target_modules=["0"], oft_block_size=2)
    )
    assert conv(torch.randn(1, 4, 3, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16
    emb = get_peft_model(nn.Sequential(nn.Embedding(5, 8)).to(torch.bfloat16), _config(target_modules=["0"]))
    assert emb(torch.tensor([[1, 2]])).dtype == torch.bfloat16


def test_delete_adapter_removes_its_rotation_and_bookkeeping():
    layer, _, _ = _layer("linear")
    layer.update_layer("other", _config())
    layer.delete_adapter("other")
    assert list(layer.oft_R) == ["default"] and list(layer.r) == ["default"]
    assert list(layer.oft_block_size) == ["default"] and list(layer.module_dropout) == ["default"]


def test_conv2d_refuses_to_stack_on_another_adapter_layer():
    inner = Conv2d(nn.Conv2d(2, 2, 1), "default", _config(oft_block_size=2))
    with pytest.raises(TypeError, match="already a Conv2d of another method"):
        Conv2d(inner, "other", _config(oft_block_size=2), key="conv")


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("coft", [False, True])
def test_adam_steps_lower_the_loss_and_change_only_the_adapter(coft):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Conv2d(16, 4, 1))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = base[0]
            self.conv = base[2]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.lin(x))  # (batch, 16)
            return self.conv(h[:, :, None, None]).flatten(1)

    model = get_peft_model(
        Net(), OFTConfig(target_modules=["lin", "conv"], oft_block_size=4, coft=coft, eps=0.5)
    )
    x = torch.randn(32, 8)
    target = torch.randn(32, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == {n for n in before if ".oft_R.default." in n}
    if coft:
        for layer in model.base_model.adapter_layers():
            rot = layer.oft_R["default"]
            norms = torch.linalg.matrix_norm(rot.skew(rot.effective_weight().detach()))
            assert (norms <= 0.5 / rot.weight.shape[0] ** 0.5 * (1 + 1e-5)).all()
