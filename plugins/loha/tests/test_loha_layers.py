"""LoHa layers checked against hand-written formulas, and their merge, dropout and cache contracts."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from peft_core.plugins import get_registry
from peft_core.registry import LayerContext
from torch import nn

from peft_loha import LoHaConfig
from peft_loha.layer import Conv1d, Conv2d, Linear, LoHaLayer

ATOL = 1e-5


# ---------------------------------------------------------------------- builders
def wrap(base: nn.Module, *, key: str = "block.mod", adapter: str = "default", **options) -> LoHaLayer:
    """Wrap ``base`` through the registered factories, as the core does."""
    options.setdefault("init_weights", False)
    config = LoHaConfig(target_modules=["mod"], **options)
    for factory in get_registry().layer_factories("LOHA"):
        layer = factory(base, adapter, config, LayerContext(key=key))
        if layer is not None:
            return layer
    raise AssertionError(f"no LoHa factory for {type(base).__name__}")


def add(layer: LoHaLayer, adapter: str, *, key: str = "block.mod", **options) -> None:
    options.setdefault("init_weights", False)
    layer.update_layer(adapter, LoHaConfig(target_modules=["mod"], **options), key=key)


BASES = {
    "linear": lambda: nn.Linear(8, 6),
    "linear_no_bias": lambda: nn.Linear(8, 6, bias=False),
    "conv1d": lambda: nn.Conv1d(3, 4, 3, padding=1),
    "conv1d_k1": lambda: nn.Conv1d(3, 4, 1),
    "conv2d": lambda: nn.Conv2d(3, 4, 3, padding=1),
    "conv2d_1x1": lambda: nn.Conv2d(3, 4, 1),
    "conv2d_rect_strided_dilated": lambda: nn.Conv2d(3, 4, (3, 2), stride=2, dilation=(1, 2), padding=1),
    "conv2d_grouped": lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False),
    "conv2d_reflect": lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    "conv1d_circular": lambda: nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"),
}


def inputs(kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    g = generator or torch.Generator().manual_seed(1)
    if kind.startswith("linear"):
        return torch.randn(3, 5, 8, generator=g)
    if kind.startswith("conv1d"):
        return torch.randn(3, 3, 7, generator=g)
    channels = 4 if kind == "conv2d_grouped" else 3
    return torch.randn(3, channels, 7, 6, generator=g)


def base_and_layer(kind: str, **options) -> tuple[nn.Module, LoHaLayer]:
    torch.manual_seed(0)
    base = BASES[kind]()
    reference = BASES[kind]()
    reference.load_state_dict(base.state_dict())
    return reference, wrap(base, **options)


# ---------------------------------------------------------------------- the math
def test_linear_delta_is_the_hadamard_product_of_two_low_rank_products():
    base, layer = base_and_layer("linear", r=3, alpha=5)
    p = {
        name: getattr(layer, name)["default"].detach()
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    }
    expected = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * (5 / 3)
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)
    assert p["hada_w1_a"].shape == (6, 3) and p["hada_w1_b"].shape == (3, 8)
    x = inputs("linear")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + x @ expected.T, atol=ATOL, rtol=0)


def _mode_product(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """(r, r, h, w) core times (r, out) on mode 0 and (r, in) on mode 1, via tensordot."""
    tmp = torch.tensordot(out_factor, core, dims=([0], [0]))  # (out, r, h, w)
    return torch.tensordot(tmp, in_factor, dims=([1], [0])).permute(0, 3, 1, 2)  # (out, in, h, w)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d"])
def test_effective_conv_delta_is_the_product_of_two_cp_kernels(kind):
    base, layer = base_and_layer(kind, r=2, alpha=3, use_effective_conv2d=True)
    p = {name: getattr(layer, name)["default"].detach() for name in layer.adapter_layer_names}
    kernel = (3, 1) if kind == "conv1d" else (3, 3)
    assert (
        p["hada_t1"].shape == (2, 2, *kernel)
        and p["hada_w1_a"].shape == (2, 4)
        and p["hada_w1_b"].shape == (2, 3)
    )
    first = _mode_product(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
    second = _mode_product(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
    expected = (first * second * 1.5).reshape(base.weight.shape)
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)
    x = inputs(kind)
    conv = F.conv1d if kind == "conv1d" else F.conv2d
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + conv(x, expected, padding=1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["conv1d_k1", "conv2d_1x1"])
def test_kernel_size_one_uses_the_flattened_form_even_when_effective_is_asked(kind):
    _, layer = base_and_layer(kind, r=2, use_effective_conv2d=True)
    assert "default" not in layer.hada_t1 and layer.hada_w1_a["default"].shape == (4, 2)
    assert layer.hada_w1_b["default"].shape == (2, 3)


def test_flattened_conv_folds_the_kernel_into_the_input_dimension():
    _, layer = base_and_layer("conv2d_grouped", r=2)
    # groups=2: each group sees 2 of the 4 input channels, kernel 3x3
    assert layer.hada_w1_a["default"].shape == (6, 2) and layer.hada_w1_b["default"].shape == (2, 2 * 9)
    assert layer.get_delta_weight("default").shape == (6, 2, 3, 3)


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("effective", [False, True])
def test_merged_forward_equals_unmerged_and_unmerge_restores_the_base(kind, effective):
    base, layer = base_and_layer(kind, r=2, alpha=3, use_effective_conv2d=effective)
    add(layer, "second", r=3, alpha=2, use_effective_conv2d=effective)
    layer.set_adapter(["default", "second"])
    layer.eval()
    x = inputs(kind)
    with torch.no_grad():
        unmerged = layer(x)
        expected = base(x)
        for name in ("default", "second"):
            expected = expected + layer._delta_forward(x, layer.get_delta_weight(name))
        torch.testing.assert_close(unmerged, expected, atol=ATOL, rtol=0)
        assert not torch.allclose(unmerged, base(x), atol=1e-3)
        layer.merge()
        assert layer.merged_adapters == ["default", "second"]
        torch.testing.assert_close(layer(x), unmerged, atol=ATOL, rtol=0)
        layer.unmerge()
        torch.testing.assert_close(layer.get_base_layer().weight, base.weight, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer(x), unmerged, atol=ATOL, rtol=0)


@given(
    kind=st.sampled_from(["linear", "conv1d", "conv2d"]),
    channels=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    kernel=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    r=st.integers(1, 4),
    alpha=st.floats(0.5, 16),
    effective=st.booleans(),
)
def test_merge_equals_forward_on_generated_layers(kind, channels, kernel, groups, r, alpha, effective):
    in_ch, out_ch = channels[0] * groups, channels[1] * groups
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(in_ch, out_ch), torch.randn(2, in_ch)
    elif kind == "conv1d":
        base, x = nn.Conv1d(in_ch, out_ch, kernel, groups=groups), torch.randn(2, in_ch, 5)
    else:
        base, x = nn.Conv2d(in_ch, out_ch, kernel, groups=groups), torch.randn(2, in_ch, 5, 4)
    layer = wrap(base, r=r, alpha=alpha, use_effective_conv2d=effective).eval()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge(safe_merge=True)
        torch.testing.assert_close(layer(x), unmerged, atol=1e-4, rtol=1e-4)


def test_unmerged_conv_honours_the_base_padding_mode():
    """The delta runs through the base conv's own routine, so reflect/circular padding match the merged layer."""
    base, layer = base_and_layer("conv2d_reflect", r=2)
    x = inputs("conv2d_reflect")
    with torch.no_grad():
        delta = layer.get_delta_weight("default")
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        torch.testing.assert_close(layer(x), base(x) + F.conv2d(padded, delta), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- init and patterns
@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("effective", [False, True])
def test_default_init_is_the_identity_and_random_init_is_not(kind, effective):
    base, layer = base_and_layer(kind, init_weights=True, use_effective_conv2d=effective)
    x = inputs(kind)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))
        assert not torch.equal(layer.hada_w1_a["default"], torch.zeros_like(layer.hada_w1_a["default"]))
        assert torch.count_nonzero(layer.hada_w2_b["default"]) == 0
        add(layer, "random", use_effective_conv2d=effective)
        layer.set_adapter("random")
        assert not torch.allclose(layer(x), base(x), atol=1e-4)


def test_identity_init_gives_the_zero_factor_a_gradient():
    _, layer = base_and_layer("linear", init_weights=True)
    layer.train()
    layer(inputs("linear")).square().sum().backward()
    # d delta / d w2_b = w2_a^T (grad * (w1_a w1_b)) is not zero, so training can start.
    assert layer.hada_w2_b["default"].grad.abs().sum() > 0


def test_rank_and_alpha_patterns_select_by_module_name():
    options = {"r": 4, "alpha": 8, "rank_pattern": {r"layers\.0\.mod": 2}, "alpha_pattern": {"mod": 3}}
    first = wrap(nn.Linear(8, 6), key="layers.0.mod", **options)
    other = wrap(nn.Linear(8, 6), key="layers.1.mod", **options)
    assert (first.r["default"], first.alpha["default"], first.scaling["default"]) == (2, 3, 1.5)
    assert (other.r["default"], other.alpha["default"], other.scaling["default"]) == (4, 3, 0.75)
    assert first.hada_w1_a["default"].shape == (6, 2) and other.hada_w1_a["default"].shape == (6, 4)


def test_scaling_can_be_set_scaled_and_reset():
    _, layer = base_and_layer("linear", r=2, alpha=4)
    layer.set_scale("default", 0.5)
    assert layer.scaling["default"] == 1.0
    layer.scale_layer(3)
    assert layer.scaling["default"] == 3.0
    layer.unscale_layer(3)
    assert layer.scaling["default"] == 1.0
    layer.unscale_layer()
    assert layer.scaling["default"] == 2.0
    layer.set_scale("missing", 5)  # adapters a layer does not hold are ignored
    assert "missing" not in layer.scaling


# ---------------------------------------------------------------------- dropout
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dropouts_apply_in_training_only(kind):
    base, layer = base_and_layer(kind, r=2, rank_dropout=0.5, module_dropout=0.5)
    _, plain = base_and_layer(kind, r=2)
    x = inputs(kind)
    with torch.no_grad():
        layer.eval()
        plain.eval()
        assert torch.equal(layer(x), plain(x))
        assert torch.equal(layer(x), layer(x))
        layer.train()
        outputs = []
        for seed in range(8):
            torch.manual_seed(seed)
            outputs.append(layer(x))
    distinct = {tuple(o.flatten()[:4].tolist()) for o in outputs}
    assert len(distinct) > 2, "rank/module dropout did not vary the training output"
    assert any(torch.equal(o, base(x)) for o in outputs), "module dropout never skipped the adapter"


def test_module_dropout_one_skips_the_adapter_in_training():
    base, layer = base_and_layer("linear", module_dropout=1.0)
    x = inputs("linear")
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))


def test_rank_dropout_drops_whole_output_rows_and_rescales_the_rest():
    torch.manual_seed(0)
    layer = wrap(nn.Conv2d(3, 12, 3), r=2, rank_dropout=0.5)
    full = layer.get_delta_weight("default").detach()
    torch.manual_seed(3)
    dropped = layer.get_delta_weight("default", apply_rank_dropout=True).detach()
    kept = [i for i in range(full.shape[0]) if dropped[i].abs().sum() > 0]
    assert 0 < len(kept) < full.shape[0]
    factor = full.shape[0] / len(kept)
    for i in range(full.shape[0]):
        torch.testing.assert_close(dropped[i], full[i] * factor if i in kept else torch.zeros_like(full[i]))


def test_rank_dropout_of_every_row_gives_a_zero_delta_not_nan():
    _, layer = base_and_layer("linear", rank_dropout=1.0)
    delta = layer.get_delta_weight("default", apply_rank_dropout=True)
    assert torch.count_nonzero(delta) == 0


# ---------------------------------------------------------------------- eval cache
def _fresh_delta(layer: LoHaLayer, name: str = "default") -> torch.Tensor:
    with torch.no_grad():
        return layer.get_delta_weight(name)


def test_eval_forward_caches_the_delta_exactly_and_refreshes_it_on_any_change():
    _, layer = base_and_layer("linear", r=2)
    _, uncached = base_and_layer("linear", r=2)
    uncached.cache_delta = False
    layer.eval()
    uncached.eval()
    x = inputs("linear")
    with torch.no_grad():
        first = layer(x)
        cached = layer._delta_cache["default"][2]
        assert torch.equal(first, uncached(x))
        assert layer(x) is not first and torch.equal(layer(x), first)
        assert layer._delta_cache["default"][2] is cached  # reused, not rebuilt
        assert uncached._delta_cache == {}

        # an optimizer-style in-place update
        layer.hada_w1_a["default"].add_(0.5)
        assert torch.equal(layer._eval_delta("default"), _fresh_delta(layer))
        # a state-dict load
        layer.load_state_dict(
            {k: v + 0.1 for k, v in layer.state_dict().items() if "hada" in k}, strict=False
        )
        assert torch.equal(layer._eval_delta("default"), _fresh_delta(layer))
        # a replaced tensor
        layer.hada_w2_b["default"].data = layer.hada_w2_b["default"].data * 2
        assert torch.equal(layer._eval_delta("default"), _fresh_delta(layer))
        # a new scale
        layer.set_scale("default", 3.0)
        assert torch.equal(layer._eval_delta("default"), _fresh_delta(layer))
    layer.train()
    assert layer._delta_cache == {}


def test_eval_with_gradients_does_not_cache_and_gradients_reach_the_factors():
    _, layer = base_and_layer("linear")
    layer.eval()
    layer(inputs("linear")).sum().backward()
    assert layer._delta_cache == {}
    assert all(
        layer_param.grad is not None for layer_param in layer.parameters() if layer_param.requires_grad
    )


def test_frozen_adapters_use_the_cache_under_grad_but_inference_mode_deltas_stay_there():
    _, layer = base_and_layer("linear")
    layer.requires_grad_(False)
    layer.eval()
    x = inputs("linear").requires_grad_(True)
    layer(x).sum().backward()  # frozen factors: the cache is fine, input gradients still flow
    assert "default" in layer._delta_cache and x.grad is not None
    with torch.inference_mode():
        layer(inputs("linear"))
    x2 = inputs("linear").requires_grad_(True)
    layer(x2).sum().backward()  # an inference-mode delta is never reused outside inference mode
    assert x2.grad is not None


def test_copies_and_pickles_start_without_the_cache_and_give_the_same_output():
    import copy
    import pickle

    _, layer = base_and_layer("conv2d")
    layer.eval()
    x = inputs("conv2d")
    with torch.no_grad():
        expected = layer(x)
        assert layer._delta_cache
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert clone._delta_cache == {}
            assert torch.equal(clone(x), expected)
    assert layer._delta_cache


# ---------------------------------------------------------------------- other layer contracts
def test_disabled_adapters_give_the_base_output_and_unmerge():
    base, layer = base_and_layer("linear")
    x = inputs("linear")
    with torch.no_grad():
        layer.merge()
        layer.enable_adapters(False)
        torch.testing.assert_close(layer(x), base(x), atol=ATOL, rtol=0)
        assert not layer.merged
        layer.enable_adapters(True)
        assert not torch.allclose(layer(x), base(x), atol=1e-4)


def test_safe_merge_refuses_non_finite_weights_and_leaves_the_base_alone():
    base, layer = base_and_layer("linear")
    with torch.no_grad():
        layer.hada_w1_a["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, base.weight) and not layer.merged


def test_merging_twice_warns_and_does_not_double_apply():
    _, layer = base_and_layer("linear")
    layer.merge()
    merged = layer.get_base_layer().weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.get_base_layer().weight, merged)


def test_half_precision_base_keeps_its_dtype():
    torch.manual_seed(0)
    layer = wrap(nn.Linear(8, 6).to(torch.bfloat16))
    x = inputs("linear").to(torch.bfloat16)
    assert layer.hada_w1_a["default"].dtype == torch.bfloat16
    with torch.no_grad():
        out = layer(x)
        assert out.dtype == torch.bfloat16
        layer.merge()
        torch.testing.assert_close(layer(x), out, atol=5e-2, rtol=5e-2)


def test_delete_adapter_drops_its_factors_and_cache():
    _, layer = base_and_layer("conv2d", use_effective_conv2d=True)
    add(layer, "other", use_effective_conv2d=True)
    layer.eval()
    with torch.no_grad():
        layer(inputs("conv2d"))
    layer.delete_adapter("default")
    assert layer.adapter_names == ["other"] and layer.active_adapters == ["other"]
    assert "default" not in layer._delta_cache
    assert all("default" not in getattr(layer, attr) for attr in layer.adapter_layer_names)


def test_layer_classes_and_repr():
    assert isinstance(wrap(nn.Linear(4, 4)), Linear)
    assert isinstance(wrap(nn.Conv1d(4, 4, 1)), Conv1d)
    conv = wrap(nn.Conv2d(4, 4, 1))
    assert isinstance(conv, Conv2d) and repr(conv).startswith("loha.Conv2d(")
    assert (conv.in_features, conv.out_features) == (4, 4)


def test_no_warnings_on_the_plain_path():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, layer = base_and_layer("conv1d", use_effective_conv2d=True)
        layer.eval()
        with torch.no_grad():
            layer(inputs("conv1d"))
        layer.merge()
        layer.unmerge()
    assert math.isclose(layer.scaling["default"], 1.0)
