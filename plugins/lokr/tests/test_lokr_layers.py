"""LoKr layers checked against hand-written formulas, and their merge, dropout and cache contracts."""

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

from peft_lokr import LoKrConfig
from peft_lokr.layer import Conv1d, Conv2d, Linear, LoKrLayer, factorization

ATOL = 1e-5


# ---------------------------------------------------------------------- builders
def wrap(base: nn.Module, *, key: str = "block.mod", adapter: str = "default", **options) -> LoKrLayer:
    """Wrap ``base`` through the registered factories, as the core does."""
    options.setdefault("init_weights", False)
    config = LoKrConfig(target_modules=["mod"], **options)
    for factory in get_registry().layer_factories("LOKR"):
        layer = factory(base, adapter, config, LayerContext(key=key))
        if layer is not None:
            return layer
    raise AssertionError(f"no LoKr factory for {type(base).__name__}")


def add(layer: LoKrLayer, adapter: str, *, key: str = "block.mod", **options) -> None:
    options.setdefault("init_weights", False)
    layer.update_layer(adapter, LoKrConfig(target_modules=["mod"], **options), key=key)


BASES = {
    "linear": lambda: nn.Linear(16, 36),
    "linear_no_bias": lambda: nn.Linear(8, 6, bias=False),
    "conv1d": lambda: nn.Conv1d(4, 36, 3, padding=1),
    "conv1d_k1": lambda: nn.Conv1d(4, 36, 1),
    "conv2d": lambda: nn.Conv2d(4, 36, 3, padding=1),
    "conv2d_1x1": lambda: nn.Conv2d(4, 36, 1),
    "conv2d_rect_strided_dilated": lambda: nn.Conv2d(4, 36, (3, 2), stride=2, dilation=(1, 2), padding=1),
    "conv2d_grouped": lambda: nn.Conv2d(8, 36, 3, groups=2, bias=False),
    "conv2d_reflect": lambda: nn.Conv2d(4, 36, 3, padding=1, padding_mode="reflect"),
    "conv1d_circular": lambda: nn.Conv1d(4, 36, 3, padding=1, padding_mode="circular"),
}

# Options that reach every way of building W1 and W2 on the bases above (out 36 = 6 x 6).
VARIANTS = {
    "full-w1-w2": {"r": 8},
    "decomposed-w2": {"r": 2},
    "decompose-both": {"r": 1, "decompose_both": True},
    "effective-core": {"r": 2, "use_effective_conv2d": True},
    "effective-r1": {"r": 1, "use_effective_conv2d": True, "decompose_both": True},
    "factor-4": {"r": 2, "decompose_factor": 4, "alpha": 3},
}


def inputs(kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    g = generator or torch.Generator().manual_seed(1)
    if kind == "linear":
        return torch.randn(3, 5, 16, generator=g)
    if kind == "linear_no_bias":
        return torch.randn(3, 5, 8, generator=g)
    if kind.startswith("conv1d"):
        return torch.randn(3, 4, 7, generator=g)
    channels = 8 if kind == "conv2d_grouped" else 4
    return torch.randn(3, channels, 7, 6, generator=g)


def base_and_layer(kind: str, **options) -> tuple[nn.Module, LoKrLayer]:
    torch.manual_seed(0)
    base = BASES[kind]()
    reference = BASES[kind]()
    reference.load_state_dict(base.state_dict())
    return reference, wrap(base, **options)


def factor(layer: LoKrLayer, name: str) -> torch.Tensor:
    return getattr(layer, name)["default"].detach()


# ---------------------------------------------------------------------- factorization
def test_factorization_examples():
    assert factorization(256) == (16, 16)
    assert factorization(128) == (8, 16)
    assert factorization(127) == (1, 127)
    assert factorization(128, 4) == (4, 32)
    assert factorization(128, 64) == (64, 2)  # a dividing factor is taken as given, not sorted
    assert factorization(36, 5) == (4, 9)  # the largest divisor not above 5
    assert factorization(1) == (1, 1)


@given(st.integers(1, 2000), st.sampled_from([-1, 1, 2, 3, 4, 5, 8, 16]))
def test_factorization_splits_the_dimension(dimension, split):
    m, n = factorization(dimension, split)
    assert m * n == dimension
    if not (split > 0 and dimension % split == 0):
        assert m <= n
        assert split == -1 or m <= split or m == 1


# ---------------------------------------------------------------------- the math
def test_linear_delta_is_the_scaled_kronecker_product():
    base, layer = base_and_layer("linear", r=8, alpha=4)
    w1, w2 = factor(layer, "lokr_w1"), factor(layer, "lokr_w2")
    assert w1.shape == (6, 4) and w2.shape == (6, 4)  # out 36 = 6 x 6, in 16 = 4 x 4
    expected = torch.kron(w1, w2) * 0.5
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)
    # the Kronecker structure, entry by entry
    assert torch.isclose(expected[1 * 6 + 2, 3 * 4 + 1], w1[1, 3] * w2[2, 1] * 0.5)
    x = inputs("linear")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + x @ expected.T, atol=ATOL, rtol=0)


def test_small_ranks_decompose_w2_and_with_decompose_both_w1():
    _, layer = base_and_layer("linear", r=2)
    assert set(layer.lokr_w1) == {"default"} and set(layer.lokr_w2) == set()
    w2 = factor(layer, "lokr_w2_a") @ factor(layer, "lokr_w2_b")
    assert factor(layer, "lokr_w2_a").shape == (6, 2) and w2.shape == (6, 4)
    torch.testing.assert_close(
        layer.get_delta_weight("default"), torch.kron(factor(layer, "lokr_w1"), w2) * 4
    )

    _, both = base_and_layer("linear", r=1, decompose_both=True)
    assert set(both.lokr_w1) == set() and factor(both, "lokr_w1_a").shape == (6, 1)
    w1 = factor(both, "lokr_w1_a") @ factor(both, "lokr_w1_b")
    w2 = factor(both, "lokr_w2_a") @ factor(both, "lokr_w2_b")
    torch.testing.assert_close(both.get_delta_weight("default"), torch.kron(w1, w2) * 8)


def test_decompose_factor_sets_the_split():
    _, layer = base_and_layer("linear", r=8, decompose_factor=4)
    # out 36 -> (4, 9), in 16 -> (4, 4)
    assert factor(layer, "lokr_w1").shape == (4, 4) and factor(layer, "lokr_w2").shape == (9, 4)


def test_conv2d_full_w2_broadcasts_w1_over_the_kernel():
    base, layer = base_and_layer("conv2d", r=8)
    w1, w2 = factor(layer, "lokr_w1"), factor(layer, "lokr_w2")
    assert w1.shape == (6, 2) and w2.shape == (6, 2, 3, 3)
    expected = torch.einsum("ac,bdhw->abcdhw", w1, w2).reshape(36, 4, 3, 3)
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)
    x = inputs("conv2d")
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + F.conv2d(x, expected, padding=1), atol=ATOL, rtol=0)


def test_conv2d_effective_core_builds_w2_from_a_tucker_core():
    _, layer = base_and_layer("conv2d", r=2, use_effective_conv2d=True)
    core, out_f, in_f = factor(layer, "lokr_t2"), factor(layer, "lokr_w2_a"), factor(layer, "lokr_w2_b")
    assert core.shape == (2, 2, 3, 3) and out_f.shape == (2, 6) and in_f.shape == (2, 2)
    tmp = torch.tensordot(out_f, core, dims=([0], [0]))  # (b, r, h, w)
    w2 = torch.tensordot(tmp, in_f, dims=([1], [0])).permute(0, 3, 1, 2)  # (b, d, h, w)
    expected = torch.einsum("ac,bdhw->abcdhw", factor(layer, "lokr_w1"), w2).reshape(36, 4, 3, 3)
    torch.testing.assert_close(layer.get_delta_weight("default"), expected * layer.scaling["default"])


def test_conv1d_full_w2_keeps_the_reference_layout():
    """A 3-d W2 is passed to torch.kron as is, exactly as the reference library does."""
    _, layer = base_and_layer("conv1d", r=8)
    w1, w2 = factor(layer, "lokr_w1"), factor(layer, "lokr_w2")
    assert w2.shape == (6, 2, 3)
    expected = torch.kron(w1, w2).reshape(36, 4, 3) * layer.scaling["default"]
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)


def test_effective_conv1d_with_rank_one_works():
    """The reference fails here (torch.kron rejects the einsum result's strides); peft-lokr does not."""
    base, layer = base_and_layer("conv1d", r=1, use_effective_conv2d=True)
    assert factor(layer, "lokr_t2").shape == (1, 1, 3, 1)
    x = inputs("conv1d")
    with torch.no_grad():
        out = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["conv1d_k1", "conv2d_1x1"])
def test_kernel_size_one_uses_the_flattened_form_even_when_effective_is_asked(kind):
    _, layer = base_and_layer(kind, r=2, use_effective_conv2d=True)
    assert set(layer.lokr_t2) == set() and factor(layer, "lokr_w2_b").shape == (2, 2)


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merged_forward_equals_unmerged_and_unmerge_restores_the_base(kind, variant):
    options = VARIANTS[variant]
    base, layer = base_and_layer(kind, **options)
    add(layer, "second", **{**options, "r": options["r"] + 1, "alpha": 2})
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
        torch.testing.assert_close(layer(x), unmerged, atol=1e-4, rtol=0)
        layer.unmerge()
        torch.testing.assert_close(layer.get_base_layer().weight, base.weight, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer(x), unmerged, atol=1e-4, rtol=0)


@given(
    kind=st.sampled_from(["linear", "conv1d", "conv2d"]),
    channels=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    kernel=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    r=st.integers(1, 6),
    decompose_both=st.booleans(),
    decompose_factor=st.sampled_from([-1, 2, 3]),
    effective=st.booleans(),
)
def test_merge_equals_forward_on_generated_layers(
    kind, channels, kernel, groups, r, decompose_both, decompose_factor, effective
):
    in_ch, out_ch = channels[0] * groups, channels[1] * groups
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(in_ch, out_ch), torch.randn(2, in_ch)
    elif kind == "conv1d":
        base, x = nn.Conv1d(in_ch, out_ch, kernel, groups=groups), torch.randn(2, in_ch, 5)
    else:
        base, x = nn.Conv2d(in_ch, out_ch, kernel, groups=groups), torch.randn(2, in_ch, 5, 4)
    layer = wrap(
        base,
        r=r,
        decompose_both=decompose_both,
        decompose_factor=decompose_factor,
        use_effective_conv2d=effective,
    ).eval()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge(safe_merge=True)
        torch.testing.assert_close(layer(x), unmerged, atol=1e-4, rtol=1e-4)


def test_unmerged_conv_honours_the_base_padding_mode():
    """The delta runs through the base conv's own routine, so reflect padding matches the merged layer."""
    base, layer = base_and_layer("conv2d_reflect", r=2)
    x = inputs("conv2d_reflect")
    with torch.no_grad():
        delta = layer.get_delta_weight("default")
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        torch.testing.assert_close(layer(x), base(x) + F.conv2d(padded, delta), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- init and patterns
ZERO_FACTORS = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv2d_grouped"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("init", [True, "lycoris"])
def test_identity_inits_give_the_base_output_and_random_init_does_not(kind, variant, init):
    base, layer = base_and_layer(kind, init_weights=init, **VARIANTS[variant])
    x = inputs(kind)
    zeros = [name for name in ZERO_FACTORS[init] if "default" in getattr(layer, name)]
    assert len(zeros) == 1 and torch.count_nonzero(factor(layer, zeros[0])) == 0
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))
        add(layer, "random", **VARIANTS[variant])
        layer.set_adapter("random")
        assert not torch.allclose(layer(x), base(x), atol=1e-4)


@pytest.mark.parametrize("init", [True, "lycoris"])
def test_identity_init_gives_the_zero_factor_a_gradient(init):
    _, layer = base_and_layer("linear", init_weights=init, r=1, decompose_both=True)
    layer.train()
    layer(inputs("linear")).square().sum().backward()
    zero = "lokr_w1_a" if init is True else "lokr_w2_b"
    assert getattr(layer, zero)["default"].grad.abs().sum() > 0


def test_rank_and_alpha_patterns_select_by_module_name():
    options = {"r": 4, "alpha": 8, "rank_pattern": {r"layers\.0\.mod": 1}, "alpha_pattern": {"mod": 3}}
    first = wrap(nn.Linear(16, 36), key="layers.0.mod", **options)
    other = wrap(nn.Linear(16, 36), key="layers.1.mod", **options)
    assert (first.r["default"], first.alpha["default"], first.scaling["default"]) == (1, 3, 3.0)
    assert (other.r["default"], other.alpha["default"], other.scaling["default"]) == (4, 3, 0.75)
    assert factor(first, "lokr_w2_a").shape == (6, 1) and factor(other, "lokr_w2").shape == (6, 4)


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


# ---------------------------------------------------------------------- dropout
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_dropouts_apply_in_training_only(kind):
    base, layer = base_and_layer(kind, r=2, rank_dropout=0.5, module_dropout=0.5, rank_dropout_scale=True)
    _, plain = base_and_layer(kind, r=2)
    x = inputs(kind)
    with torch.no_grad():
        layer.eval()
        plain.eval()
        assert torch.equal(layer(x), plain(x))
        layer.train()
        outputs = []
        for seed in range(8):
            torch.manual_seed(seed)
            outputs.append(layer(x))
    assert len({tuple(o.flatten()[:4].tolist()) for o in outputs}) > 2
    assert any(torch.equal(o, base(x)) for o in outputs), "module dropout never skipped the adapter"


def test_module_dropout_one_skips_the_adapter_in_training():
    base, layer = base_and_layer("linear", module_dropout=1.0)
    x = inputs("linear")
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("rescale", [False, True])
def test_rank_dropout_drops_whole_output_rows_and_rescales_only_when_asked(rescale):
    _, layer = base_and_layer("conv2d", r=2, rank_dropout=0.5, rank_dropout_scale=rescale)
    full = layer.get_delta_weight("default").detach()
    torch.manual_seed(3)
    dropped = layer.get_delta_weight("default", apply_rank_dropout=True).detach()
    kept = [i for i in range(full.shape[0]) if dropped[i].abs().sum() > 0]
    assert 0 < len(kept) < full.shape[0]
    scale = full.shape[0] / len(kept) if rescale else 1.0
    for i in range(full.shape[0]):
        torch.testing.assert_close(dropped[i], full[i] * scale if i in kept else torch.zeros_like(full[i]))


def test_rank_dropout_of_every_row_gives_a_zero_delta_not_nan():
    _, layer = base_and_layer("linear", rank_dropout=1.0, rank_dropout_scale=True)
    delta = layer.get_delta_weight("default", apply_rank_dropout=True)
    assert torch.count_nonzero(delta) == 0


def test_rank_dropout_keeps_a_half_precision_delta_in_its_dtype():
    torch.manual_seed(0)
    layer = wrap(nn.Linear(16, 36).to(torch.bfloat16), rank_dropout=0.3, rank_dropout_scale=True)
    assert layer.get_delta_weight("default", apply_rank_dropout=True).dtype == torch.bfloat16


# ---------------------------------------------------------------------- eval cache
def _fresh_delta(layer: LoKrLayer, name: str = "default") -> torch.Tensor:
    with torch.no_grad():
        return layer.get_delta_weight(name)


@pytest.mark.parametrize("variant", ["full-w1-w2", "effective-core"])
def test_eval_forward_caches_the_delta_exactly_and_refreshes_it_on_any_change(variant):
    _, layer = base_and_layer("conv2d", **VARIANTS[variant])
    _, uncached = base_and_layer("conv2d", **VARIANTS[variant])
    uncached.cache_delta = False
    layer.eval()
    uncached.eval()
    x = inputs("conv2d")
    with torch.no_grad():
        first = layer(x)
        cached = layer._delta_cache["default"][2]
        assert torch.equal(first, uncached(x))
        assert torch.equal(layer(x), first)
        assert layer._delta_cache["default"][2] is cached
        assert uncached._delta_cache == {}
        for name in layer.adapter_layer_names:
            if "default" in getattr(layer, name):
                getattr(layer, name)["default"].mul_(1.5)
                assert torch.equal(layer._eval_delta("default"), _fresh_delta(layer)), name
        layer.load_state_dict(
            {k: v + 0.1 for k, v in layer.state_dict().items() if "lokr" in k}, strict=False
        )
        assert torch.equal(layer._eval_delta("default"), _fresh_delta(layer))
        layer.set_scale("default", 3.0)
        assert torch.equal(layer._eval_delta("default"), _fresh_delta(layer))
    layer.train()
    assert layer._delta_cache == {}


def test_eval_with_gradients_does_not_cache_and_gradients_reach_the_factors():
    _, layer = base_and_layer("linear", r=1, decompose_both=True)
    layer.eval()
    layer(inputs("linear")).sum().backward()
    assert layer._delta_cache == {}
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)


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


def test_safe_merge_refuses_non_finite_weights_and_leaves_the_base_alone():
    base, layer = base_and_layer("linear")
    with torch.no_grad():
        layer.lokr_w1["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs or infs"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, base.weight) and not layer.merged


def test_half_precision_base_keeps_its_dtype():
    torch.manual_seed(0)
    layer = wrap(nn.Conv2d(4, 36, 3).to(torch.bfloat16), r=2, use_effective_conv2d=True)
    x = inputs("conv2d").to(torch.bfloat16)
    assert layer.lokr_t2["default"].dtype == torch.bfloat16
    with torch.no_grad():
        out = layer(x)
        assert out.dtype == torch.bfloat16
        layer.merge()
        torch.testing.assert_close(layer(x), out, atol=0.1, rtol=5e-2)


def test_delete_adapter_drops_its_factors_and_cache():
    _, layer = base_and_layer("conv2d", r=2, use_effective_conv2d=True)
    add(layer, "other", r=8)
    layer.eval()
    with torch.no_grad():
        layer(inputs("conv2d"))
    layer.delete_adapter("default")
    assert layer.adapter_names == ["other"] and "default" not in layer._delta_cache
    assert all("default" not in getattr(layer, attr) for attr in layer.adapter_layer_names)


def test_layer_classes_and_repr():
    assert isinstance(wrap(nn.Linear(4, 4)), Linear)
    assert isinstance(wrap(nn.Conv1d(4, 4, 1)), Conv1d)
    conv = wrap(nn.Conv2d(4, 4, 1))
    assert isinstance(conv, Conv2d) and repr(conv).startswith("lokr.Conv2d(")


def test_no_warnings_on_the_plain_path():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, layer = base_and_layer("conv1d", r=2, use_effective_conv2d=True)
        layer.eval()
        with torch.no_grad():
            layer(inputs("conv1d"))
        layer.merge()
        layer.unmerge()
    assert math.isclose(layer.scaling["default"], 4.0)
