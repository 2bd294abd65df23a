"""(IA)³ layers on their own: the math of output and input scaling, merging, unmerging, adapters."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from peft_ia3 import IA3Config
from peft_ia3.layer import Conv2d, Conv3d, IA3Layer, Linear, is_feedforward


def _conv1d(n_in: int, n_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(n_out, n_in)  # transformers' argument order: (nf=out, nx=in)


# name -> (base builder, input builder, layer class, extra kwargs)
KINDS = {
    "linear": (lambda: nn.Linear(6, 5), lambda g: torch.randn(3, 6, generator=g), Linear, {}),
    "linear-no-bias": (
        lambda: nn.Linear(6, 5, bias=False),
        lambda g: torch.randn(3, 6, generator=g),
        Linear,
        {},
    ),
    "conv1d-transformers": (
        lambda: _conv1d(6, 5),
        lambda g: torch.randn(2, 3, 6, generator=g),
        Linear,
        {"fan_in_fan_out": True},
    ),
    "conv2d": (
        lambda: nn.Conv2d(4, 6, 3, padding=1),
        lambda g: torch.randn(2, 4, 5, 5, generator=g),
        Conv2d,
        {},
    ),
    "conv2d-grouped": (
        lambda: nn.Conv2d(4, 6, 3, groups=2),
        lambda g: torch.randn(2, 4, 5, 5, generator=g),
        Conv2d,
        {},
    ),
    "conv3d": (
        lambda: nn.Conv3d(2, 3, (1, 2, 2)),
        lambda g: torch.randn(1, 2, 3, 4, 4, generator=g),
        Conv3d,
        {},
    ),
}


def make(
    kind: str, *, feedforward: bool, init: bool = False, seed: int = 0
) -> tuple[IA3Layer, nn.Module, torch.Tensor]:
    """An (IA)³ layer (adapter "default") over a fresh base, a pristine copy of that base, and an input."""
    build, inputs, layer_cls, kwargs = KINDS[kind]
    torch.manual_seed(seed)
    base = build()
    config = IA3Config(
        target_modules=["layer"], feedforward_modules=["layer"] if feedforward else [], init_ia3_weights=init
    )
    layer = layer_cls(copy.deepcopy(base), "default", config, key="layer", **kwargs)
    return layer.eval(), base.eval(), inputs(torch.Generator().manual_seed(seed + 1))


def channel_view(vector: torch.Tensor, kind: str, ndim: int) -> torch.Tensor:
    """The vector shaped to broadcast over the channel/feature axis of a tensor with ``ndim`` dims."""
    flat = vector.detach().flatten()
    if kind.startswith("conv") and kind != "conv1d-transformers":
        return flat.view(1, -1, *([1] * (ndim - 2)))
    return flat


BOTH = pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward"])


@pytest.mark.parametrize("kind", list(KINDS))
@BOTH
def test_forward_scales_outputs_or_inputs(kind, feedforward):
    layer, base, x = make(kind, feedforward=feedforward)
    vector = layer.ia3_l["default"]
    with torch.no_grad():
        if feedforward:
            expected = base(x * channel_view(vector, kind, x.dim()))
        else:
            out = base(x)
            expected = out * channel_view(vector, kind, out.dim())
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
@BOTH
def test_vector_layout_is_the_references(kind, feedforward):
    layer, base, _ = make(kind, feedforward=feedforward)
    n_in, n_out = layer.in_features, layer.out_features
    shape = tuple(layer.ia3_l["default"].shape)
    if kind.startswith("conv") and kind != "conv1d-transformers":
        trailing = (1,) * (base.weight.dim() - 2)
        assert shape == (1, n_in if feedforward else n_out, *trailing)
    else:
        assert shape == ((1, n_in) if feedforward else (n_out, 1))


@pytest.mark.parametrize("kind", list(KINDS))
@BOTH
def test_merged_forward_equals_unmerged_and_unmerge_restores_the_base(kind, feedforward):
    layer, base, x = make(kind, feedforward=feedforward)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        assert not layer.merged
        for name, tensor in base.named_parameters():
            torch.testing.assert_close(getattr(layer.get_base_layer(), name), tensor, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d-transformers", "conv2d"])
@BOTH
def test_merge_scales_the_bias_only_for_output_scaling(kind, feedforward):
    layer, base, _ = make(kind, feedforward=feedforward)
    layer.merge()
    merged_bias = layer.get_base_layer().bias.detach()
    if feedforward:
        torch.testing.assert_close(merged_bias, base.bias.detach(), atol=0, rtol=0)
    else:
        torch.testing.assert_close(
            merged_bias, base.bias.detach() * layer.ia3_l["default"].detach().flatten()
        )


def test_grouped_conv_input_scaling_merges_per_group():
    # Each output channel of a grouped conv sees its own group's input channels: the merged weight
    # must scale column j of output channel o by l[group(o) * in_per_group + j].
    layer, base, _ = make("conv2d-grouped", feedforward=True)
    layer.merge()
    vector = layer.ia3_l["default"].detach().flatten()  # 4 input channels, 2 groups
    expected = base.weight.detach().clone()
    for out_channel in range(6):
        group = out_channel // 3
        expected[out_channel] *= vector[group * 2 : group * 2 + 2].view(2, 1, 1)
    torch.testing.assert_close(layer.get_base_layer().weight.detach(), expected)


def _add(layer: IA3Layer, name: str, *, feedforward: bool, seed: int) -> None:
    torch.manual_seed(seed)
    config = IA3Config(
        target_modules=["layer"], feedforward_modules=["layer"] if feedforward else [], init_ia3_weights=False
    )
    layer.update_layer(name, config, key="layer")


@pytest.mark.parametrize("kind", ["linear", "conv1d-transformers", "conv2d"])
def test_active_adapters_multiply_and_may_differ_in_what_they_scale(kind):
    layer, base, x = make(kind, feedforward=False)
    _add(layer, "in", feedforward=True, seed=3)
    _add(layer, "out2", feedforward=False, seed=4)
    assert layer.is_feedforward == {"default": False, "in": True, "out2": False}
    layer.set_adapter(["default", "in", "out2"])
    vectors = {n: layer.ia3_l[n] for n in layer.adapter_names}
    with torch.no_grad():
        out = base(x * channel_view(vectors["in"], kind, x.dim()))
        expected = out * channel_view(
            vectors["default"] * vectors["out2"].view_as(vectors["default"]), kind, out.dim()
        )
        actual = layer(x)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        layer.merge()
        assert layer.merged_adapters == ["default", "in", "out2"]
        torch.testing.assert_close(layer(x), actual, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer.get_base_layer().weight, base.weight, atol=1e-6, rtol=1e-5)


@given(scale=st.floats(min_value=1e-3, max_value=1e3), feedforward=st.booleans())
def test_unmerge_is_exact_to_float_precision_for_any_scale(scale, feedforward):
    layer, base, _ = make("linear", feedforward=feedforward)
    with torch.no_grad():
        layer.ia3_l["default"].mul_(scale)
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, base.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.get_base_layer().bias, base.bias, atol=1e-6, rtol=1e-5)


def test_unmerging_a_zero_scale_warns_and_does_not_produce_nan():
    layer, _, _ = make("linear", feedforward=False)
    with torch.no_grad():
        layer.ia3_l["default"][0] = 0.0
    layer.merge()
    with pytest.warns(UserWarning, match="exactly 0"):
        layer.unmerge()
    assert torch.isfinite(layer.get_base_layer().weight).all()
    assert torch.isfinite(layer.get_base_layer().bias).all()


@BOTH
def test_safe_merge_refuses_nan_and_leaves_the_base_unchanged(feedforward):
    layer, base, _ = make("linear", feedforward=feedforward)
    with torch.no_grad():
        layer.ia3_l["default"].view(-1)[1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    torch.testing.assert_close(layer.get_base_layer().weight, base.weight, atol=0, rtol=0)
    torch.testing.assert_close(layer.get_base_layer().bias, base.bias, atol=0, rtol=0)


def test_disabled_layer_gives_the_base_output_and_unmerges_a_merged_adapter():
    layer, base, x = make("linear", feedforward=False)
    layer.merge()
    layer.enable_adapters(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = layer(x)
    torch.testing.assert_close(out, base(x), atol=1e-6, rtol=1e-5)
    assert not layer.merged


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@BOTH
def test_default_init_is_ones_and_random_init_is_the_references_draw(kind, feedforward):
    layer, _, _ = make(kind, feedforward=feedforward, init=True)
    assert torch.equal(layer.ia3_l["default"].detach(), torch.ones_like(layer.ia3_l["default"]))
    layer, _, _ = make(kind, feedforward=feedforward, init=False, seed=7)
    shape = layer.ia3_l["default"].shape
    torch.manual_seed(7)
    KINDS[kind][0]()  # the base layer's own init draws come first
    assert torch.equal(layer.ia3_l["default"].detach(), torch.randn(shape))


def test_half_precision_base_keeps_its_output_dtype():
    layer, base, x = make("linear", feedforward=True)
    layer = layer.to(torch.bfloat16)
    layer.ia3_l["default"].data = layer.ia3_l["default"].data.float()  # as autocast_adapter_dtype does
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    layer, base, x = make("conv2d", feedforward=False)
    layer = layer.to(torch.bfloat16)
    layer.ia3_l["default"].data = layer.ia3_l["default"].data.float()
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_delete_adapter_removes_its_vector_and_its_mode():
    layer, _, _ = make("linear", feedforward=False)
    _add(layer, "other", feedforward=True, seed=1)
    layer.delete_adapter("other")
    assert layer.adapter_names == ["default"]
    assert "other" not in layer.is_feedforward and "other" not in layer.ia3_l


def test_conv_layer_refuses_a_weight_of_the_wrong_rank():
    config = IA3Config(target_modules=["layer"], feedforward_modules=[])
    with pytest.raises(ValueError, match="4 dimensions"):
        Conv2d(nn.Conv3d(2, 2, 1), "default", config, key="layer")


@pytest.mark.parametrize(
    ("feedforward_modules", "key", "expected"),
    [
        (["down_proj"], "model.layers.0.mlp.down_proj", True),
        (["mlp.c_proj"], "transformer.h.0.mlp.c_proj", True),
        (["mlp.c_proj"], "transformer.h.0.attn.c_proj", False),
        # a plain suffix, as in the reference: "proj" matches "down_proj"
        (["proj"], "model.layers.0.mlp.down_proj", True),
        ([], "model.layers.0.mlp.down_proj", False),
        (r".*\.1\.mlp\.down_proj", "model.layers.1.mlp.down_proj", True),
        (r".*\.1\.mlp\.down_proj", "model.layers.0.mlp.down_proj", False),
        (r"down_proj", "model.layers.0.mlp.down_proj", False),  # a regex must match the whole name
    ],
)
def test_feedforward_matching_follows_the_reference(feedforward_modules, key, expected):
    targets = feedforward_modules if isinstance(feedforward_modules, list) else None
    config = IA3Config(target_modules=targets, feedforward_modules=feedforward_modules)
    assert is_feedforward(config, key) is expected
