"""LoRA layers checked against hand-written formulas, and their merge/unmerge contract."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from peft_core.errors import ConfigError
from peft_core.plugins import get_registry
from peft_core.registry import LayerContext
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_lora import LoraConfig
from peft_lora.layer import BASE_PLACEHOLDER, Embedding, Linear, LoraLayer

ATOL = 1e-5


# ---------------------------------------------------------------------- builders
def wrap(base: nn.Module, *, key: str = "block.mod", adapter: str = "default", **options) -> LoraLayer:
    """Wrap ``base`` through the registered factories, as the core does."""
    options.setdefault("init_lora_weights", False)
    options.setdefault("fan_in_fan_out", isinstance(base, Conv1D))
    config = LoraConfig(target_modules=["mod"], **options)
    for factory in get_registry().layer_factories("LORA"):
        layer = factory(base, adapter, config, LayerContext(key=key))
        if layer is not None:
            return layer
    raise AssertionError(f"no LoRA factory for {type(base).__name__}")


def add(layer: LoraLayer, adapter: str, *, key: str = "block.mod", **options) -> None:
    options.setdefault("init_lora_weights", False)
    layer.update_layer(adapter, LoraConfig(target_modules=["mod"], **options), key=key)


BASES = {
    "linear": lambda: nn.Linear(8, 6),
    "linear_no_bias": lambda: nn.Linear(8, 6, bias=False),
    "transformers_conv1d": lambda: Conv1D(6, 8),  # nf=out=6, nx=in=8, weight stored (8, 6)
    "embedding": lambda: nn.Embedding(12, 6, padding_idx=0),
    "conv1d": lambda: nn.Conv1d(3, 4, 3, padding=1),
    "conv2d": lambda: nn.Conv2d(3, 4, 3, padding=1),
    "conv2d_1x1": lambda: nn.Conv2d(3, 4, 1),
    "conv3d": lambda: nn.Conv3d(2, 4, (1, 2, 2)),
}


def inputs(kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    g = generator or torch.Generator().manual_seed(1)
    if kind == "embedding":
        return torch.randint(0, 12, (3, 5), generator=g)
    shapes = {
        "linear": (3, 5, 8),
        "linear_no_bias": (3, 5, 8),
        "transformers_conv1d": (3, 5, 8),
        "conv1d": (3, 3, 7),
        "conv2d": (3, 3, 6, 6),
        "conv2d_1x1": (3, 3, 5, 5),
        "conv3d": (3, 2, 3, 4, 4),
    }
    return torch.randn(shapes[kind], generator=g)


def perturb_magnitude(layer: LoraLayer, adapter: str = "default") -> None:
    """DoRA's magnitude starts at the weight norm; move it so the check is not trivial."""
    with torch.no_grad():
        weight = layer.lora_magnitude_vector[adapter].weight
        weight.mul_(1 + 0.2 * torch.rand_like(weight))


def randomize_lora_bias(layer: LoraLayer, adapter: str = "default") -> None:
    with torch.no_grad():
        layer.lora_B[adapter].bias.normal_()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------- forward vs formulas
def test_linear_forward_is_base_plus_scaled_BA():
    base = nn.Linear(8, 6)
    layer = wrap(base, r=3, lora_alpha=6).eval()
    x = inputs("linear")
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ base.weight.T + base.bias + (6 / 3) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    layer = wrap(nn.Linear(8, 6), r=4, lora_alpha=6, use_rslora=True)
    assert layer.scaling["default"] == pytest.approx(6 / math.sqrt(4))
    assert wrap(nn.Linear(8, 6), r=4, lora_alpha=6).scaling["default"] == pytest.approx(6 / 4)


def test_transformers_conv1d_uses_fan_in_fan_out():
    base = Conv1D(6, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = wrap(base, r=2, lora_alpha=4, fan_in_fan_out=False).eval()
    assert any("fan_in_fan_out=True" in str(w.message) for w in caught)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (8, 6)
    x = inputs("linear")
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ base.weight + base.bias + 2 * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
    # the delta is in the base weight's (in, out) layout
    torch.testing.assert_close(layer.get_delta_weight("default"), 2 * (B @ A).T)


def test_linear_ignores_fan_in_fan_out_with_a_warning():
    with pytest.warns(UserWarning, match="fan_in_fan_out=False for it"):
        layer = wrap(nn.Linear(8, 6), fan_in_fan_out=True)
    assert not layer.fan_in_fan_out


def test_embedding_forward_is_base_plus_scaled_lookup():
    base = nn.Embedding(12, 6, padding_idx=0)
    layer = wrap(base, r=3, lora_alpha=3).eval()
    x = inputs("embedding")
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    assert (A.shape, B.shape) == ((3, 12), (6, 3))
    expected = base.weight[x] + A.T[x] @ B.T
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


def test_embedding_scale_applies_to_the_lora_share():
    base = nn.Embedding(12, 6)
    base.embed_scale = 2.5  # e.g. Gemma's scaled word embeddings: forward returns scale * lookup

    layer = wrap(base, r=2, lora_alpha=2).eval()
    base_forward = nn.Embedding.forward
    base.forward = lambda ids: base_forward(base, ids) * 2.5
    x = inputs("embedding")
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    torch.testing.assert_close(layer(x), 2.5 * (base.weight[x] + A.T[x] @ B.T), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "conv2d_1x1", "conv3d"])
def test_conv_delta_is_the_composed_kernel(kind):
    base = BASES[kind]()
    layer = wrap(base, r=2, lora_alpha=3).eval()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = 1.5 * torch.einsum("or,ri...->oi...", B.flatten(1), A)
    torch.testing.assert_close(layer.get_delta_weight("default"), expected, atol=ATOL, rtol=0)
    x = inputs(kind)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[base.weight.dim()]
    dense = conv(x, base.weight + expected, base.bias, base.stride, base.padding)
    torch.testing.assert_close(layer(x), dense, atol=ATOL, rtol=0)


def _row_norm_rescaled(weight_out_in: torch.Tensor, delta_out_in: torch.Tensor, magnitude: torch.Tensor):
    adapted = weight_out_in + delta_out_in
    return magnitude.view(-1, 1) * adapted / adapted.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("kind", ["linear", "transformers_conv1d"])
def test_dora_linear_matches_the_weight_decomposition(kind):
    base = BASES[kind]()
    layer = wrap(base, r=2, lora_alpha=4, use_dora=True).eval()
    perturb_magnitude(layer)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    weight = base.weight.T if kind == "transformers_conv1d" else base.weight
    dora_weight = _row_norm_rescaled(weight, 2 * B @ A, m)
    x = inputs(kind)
    torch.testing.assert_close(layer(x), x @ dora_weight.T + base.bias, atol=ATOL, rtol=0)


def test_dora_embedding_matches_the_weight_decomposition():
    base = nn.Embedding(12, 6)
    layer = wrap(base, r=2, lora_alpha=4, use_dora=True).eval()
    perturb_magnitude(layer)
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    m = layer.lora_magnitude_vector["default"].weight
    # the "weight" of an embedding is (dim, num_embeddings) seen as a linear map from one-hots
    dora_weight = _row_norm_rescaled(base.weight.T, 2 * B @ A, m)
    x = inputs("embedding")
    torch.testing.assert_close(layer(x), dora_weight.T[x], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "conv3d"])
def test_dora_conv_matches_the_weight_decomposition(kind):
    base = BASES[kind]()
    layer = wrap(base, r=2, lora_alpha=4, use_dora=True).eval()
    perturb_magnitude(layer)
    delta = layer.get_delta_weight("default")
    m = layer.lora_magnitude_vector["default"].weight.flatten()
    adapted = base.weight + delta
    norm = adapted.flatten(1).norm(dim=1).view((-1,) + (1,) * (adapted.dim() - 1))
    dora_weight = m.view_as(norm) * adapted / norm
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[base.weight.dim()]
    x = inputs(kind)
    expected = conv(x, dora_weight, base.bias, base.stride, base.padding)
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


def test_dora_magnitude_starts_at_the_adapted_weight_norm():
    base = nn.Linear(8, 6)
    layer = wrap(base, r=2, lora_alpha=4, use_dora=True)
    expected = (base.weight + layer.get_delta_weight("default")).norm(dim=1)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight, expected)


def test_lora_bias_adds_scaled_bias_of_B():
    base = nn.Linear(8, 6)
    layer = wrap(base, r=2, lora_alpha=4, lora_bias=True).eval()
    randomize_lora_bias(layer)
    A, B, b = (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_B["default"].bias)
    x = inputs("linear")
    expected = x @ base.weight.T + base.bias + 2 * (x @ A.T @ B.T + b)
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- merge == unmerged
MERGE_CASES = [
    (kind, options)
    for kind in BASES
    for options in (
        {},
        {"use_rslora": True, "r": 3, "lora_alpha": 5},
        {"use_dora": True},
        {"lora_bias": True},
    )
    if not (kind == "embedding" and options.get("lora_bias"))
    and not (kind == "linear_no_bias" and options.get("lora_bias"))
]


@pytest.mark.parametrize(
    ("kind", "options"), MERGE_CASES, ids=lambda v: v if isinstance(v, str) else "-".join(v) or "plain"
)
@pytest.mark.parametrize("safe_merge", [False, True], ids=["unsafe", "safe"])
def test_merged_forward_equals_unmerged_and_unmerge_restores(kind, options, safe_merge):
    base = BASES[kind]()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    layer = wrap(base, **options).eval()
    if options.get("use_dora"):
        perturb_magnitude(layer)
    if options.get("lora_bias"):
        randomize_lora_bias(layer)
    x = inputs(kind)
    with torch.no_grad():
        unmerged = layer(x)
        assert not torch.allclose(unmerged, base(x), atol=1e-4), "the check would be trivial"
        layer.merge(safe_merge=safe_merge)
        assert layer.merged
        torch.testing.assert_close(layer(x), unmerged, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(base(x), unmerged, atol=1e-4, rtol=1e-4)
        layer.unmerge()
    for key, value in base.state_dict().items():
        torch.testing.assert_close(value, original[key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), unmerged, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "transformers_conv1d", "embedding", "conv2d"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_several_adapters_merge_in_turn(kind, dora):
    """Two active adapters: the merged result equals their summed (DoRA: chained) unmerged effect."""
    base = BASES[kind]()
    layer = wrap(base, use_dora=dora, r=2)
    add(layer, "other", use_dora=dora, r=3, lora_alpha=5)
    layer.set_adapter(["default", "other"])
    layer.eval()
    for adapter in ("default", "other"):
        if dora:
            perturb_magnitude(layer, adapter)
    x = inputs(kind)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged_adapters == ["default", "other"]
        torch.testing.assert_close(base(x), unmerged, atol=1e-4, rtol=1e-4)
        layer.unmerge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-4, rtol=1e-4)


def test_merging_twice_warns_and_does_not_double_apply():
    base = nn.Linear(8, 6)
    layer = wrap(base)
    layer.merge()
    merged = base.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    torch.testing.assert_close(base.weight, merged)


def test_safe_merge_refuses_non_finite_weights_and_leaves_the_base_alone():
    base = nn.Linear(8, 6)
    layer = wrap(base, use_dora=True)
    before = base.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    torch.testing.assert_close(base.weight, before)


def test_lora_bias_is_folded_into_the_base_bias():
    base = nn.Linear(8, 6)
    layer = wrap(base, lora_bias=True, lora_alpha=16, r=8)
    randomize_lora_bias(layer)
    bias_before = base.bias.detach().clone()
    layer.merge()
    torch.testing.assert_close(base.bias, bias_before + 2 * layer.lora_B["default"].bias)


def test_lora_bias_without_base_bias_warns_then_refuses_to_merge():
    with pytest.warns(UserWarning, match="has no bias"):
        layer = wrap(nn.Linear(8, 6, bias=False), lora_bias=True)
    with pytest.raises(RuntimeError, match="no bias"):
        layer.merge()


# ---------------------------------------------------------------------- options
def test_rank_and_alpha_patterns_follow_the_module_name():
    options = {"r": 4, "lora_alpha": 8, "rank_pattern": {r"layers\.0\.q": 2}, "alpha_pattern": {"q": 6}}
    matched = wrap(nn.Linear(8, 6), key="model.layers.0.q", **options)
    assert (matched.r["default"], matched.scaling["default"]) == (2, 3.0)
    assert matched.lora_A["default"].weight.shape == (2, 8)
    alpha_only = wrap(nn.Linear(8, 6), key="model.layers.1.q", **options)
    assert (alpha_only.r["default"], alpha_only.scaling["default"]) == (4, 1.5)
    neither = wrap(nn.Linear(8, 6), key="model.layers.0.v", **options)
    assert (neither.r["default"], neither.scaling["default"]) == (4, 2.0)
    # a pattern matches at a name boundary only: "q" must not match "layers.0.kq"
    boundary = wrap(nn.Linear(8, 6), key="model.layers.0.kq", **options)
    assert boundary.r["default"] == 4


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_dropout_only_acts_in_training(dora):
    base = nn.Linear(8, 6)
    layer = wrap(base, r=4, lora_dropout=0.5, use_dora=dora)
    x = inputs("linear")
    layer.eval()
    eval_out = layer(x)
    torch.testing.assert_close(layer(x), eval_out)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    if not dora:
        torch.testing.assert_close(eval_out, base(x) + x @ A.T @ B.T * 2, atol=ATOL, rtol=0)
    layer.train()
    train_out = layer(x)
    assert not torch.allclose(train_out, eval_out, atol=1e-4)


def test_embedding_never_applies_dropout():
    layer = wrap(nn.Embedding(12, 6), lora_dropout=0.9).train()
    x = inputs("embedding")
    torch.testing.assert_close(layer(x), layer(x))


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("kind", list(BASES))
def test_default_inits_are_identities(kind, init):
    base = BASES[kind]()
    layer = wrap(base, init_lora_weights=init).eval()
    x = inputs(kind)
    torch.testing.assert_close(layer(x), base(x))


def test_gaussian_init_draws_A_with_std_one_over_r():
    layer = wrap(nn.Linear(400, 300), r=5, init_lora_weights="gaussian")
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 5, rel=0.05)
    assert not layer.lora_B["default"].weight.any()


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("kind", ["linear", "transformers_conv1d"])
def test_pissa_and_olora_keep_the_output_and_store_the_residual(kind, init):
    base = BASES[kind]()
    original_weight = base.weight.detach().clone()
    x = inputs(kind)
    before = base(x).detach()
    layer = wrap(base, r=3, lora_alpha=6, init_lora_weights=init).eval()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base.weight, original_weight, atol=1e-4), (
        "the base weight must hold the residual"
    )
    torch.testing.assert_close(
        base.weight + layer.get_delta_weight("default"), original_weight, atol=1e-5, rtol=0
    )
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    if init == "olora":  # B has orthonormal columns
        torch.testing.assert_close(B.T @ B, torch.eye(3), atol=1e-5, rtol=0)
    if init == "pissa":  # B A (times scaling) is the best rank-3 approximation of W
        weight = original_weight.T if kind == "transformers_conv1d" else original_weight
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        torch.testing.assert_close(2 * B @ A, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], atol=1e-5, rtol=0)


def test_pissa_rank_larger_than_the_weight_is_refused_without_leftovers():
    with pytest.raises(ConfigError, match="r must be at most"):
        wrap(nn.Linear(4, 3), r=5, init_lora_weights="pissa")
    base = nn.Linear(4, 3)
    weight = base.weight.detach().clone()
    layer = wrap(base, r=2)
    with pytest.raises(ConfigError, match="r must be at most"):
        add(layer, "too_big", r=4, init_lora_weights="olora")
    assert layer.adapter_names == ["default"]
    torch.testing.assert_close(base.weight, weight)


def test_base_dependent_inits_are_refused_on_conv_and_fall_back_on_embeddings():
    with pytest.raises(ConfigError, match="not supported for conv layers"):
        wrap(nn.Conv2d(3, 4, 3), init_lora_weights="pissa")
    base = nn.Embedding(12, 6)
    with pytest.warns(UserWarning, match="applies to linear layers only"):
        layer = wrap(base, init_lora_weights="olora")
    x = inputs("embedding")
    torch.testing.assert_close(layer(x), base(x))


def test_embedding_refuses_lora_bias():
    with pytest.raises(ConfigError, match="lora_bias=True is not supported for embedding"):
        wrap(nn.Embedding(12, 6), lora_bias=True)


def test_grouped_conv_rank_must_divide_and_merge_is_refused():
    with pytest.raises(ConfigError, match="divisible"):
        wrap(nn.Conv2d(4, 4, 3, groups=2), r=3)
    with pytest.raises(ConfigError, match="DoRA is not supported on the grouped conv"):
        wrap(nn.Conv2d(4, 4, 3, groups=2), r=2, use_dora=True)
    with pytest.warns(UserWarning, match="cannot be merged"):
        layer = wrap(nn.Conv2d(4, 4, 3, groups=2), r=2)
    x = torch.randn(2, 4, 5, 5)
    assert layer(x).shape == (2, 4, 3, 3)
    with pytest.raises(NotImplementedError, match="grouped conv"):
        layer.merge()


# ---------------------------------------------------------------------- activation, dtype, mixed batches
def test_disabled_layer_gives_the_base_output_and_unmerges():
    base = nn.Linear(8, 6)
    layer = wrap(base).eval()
    x = inputs("linear")
    plain = nn.functional.linear(x, base.weight, base.bias).detach()
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), plain)
    layer.enable_adapters(True)
    layer.merge()
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), plain, atol=1e-5, rtol=1e-5)
    assert not layer.merged


def test_active_adapters_add_up_and_inactive_ones_are_ignored():
    base = nn.Linear(8, 6)
    layer = wrap(base).eval()
    add(layer, "second", r=2, lora_alpha=2)
    x = inputs("linear")
    delta = {name: x @ layer.get_delta_weight(name).T for name in ("default", "second")}
    torch.testing.assert_close(layer(x), base(x) + delta["default"], atol=ATOL, rtol=0)
    layer.set_adapter(["default", "second"])
    torch.testing.assert_close(layer(x), base(x) + delta["default"] + delta["second"], atol=ATOL, rtol=0)
    layer.set_adapter("second")
    assert not layer.lora_A["default"].weight.requires_grad
    assert layer.lora_A["second"].weight.requires_grad
    torch.testing.assert_close(layer(x), base(x) + delta["second"], atol=ATOL, rtol=0)


def test_delete_adapter_removes_every_trace():
    layer = wrap(nn.Linear(8, 6), use_dora=True)
    add(layer, "second")
    layer.delete_adapter("default")
    assert layer.adapter_names == ["second"] and layer.active_adapters == ["second"]
    for attr in LoraLayer.adapter_layer_names + LoraLayer.other_param_names:
        assert "default" not in getattr(layer, attr)


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv2d"])
def test_mixed_batch_runs_each_sample_with_its_adapter(kind):
    base = BASES[kind]()
    layer = wrap(base).eval()
    add(layer, "second", r=2)
    x = inputs(kind)
    names = ["second", BASE_PLACEHOLDER, "default"]
    out = layer(x, adapter_names=names)
    for i, name in enumerate(names):
        if name == BASE_PLACEHOLDER:
            expected = base(x[i : i + 1])
        else:
            layer.set_adapter(name)
            expected = layer(x[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="one adapter name per sample"):
        layer(x, adapter_names=["default"])


def test_mixed_batch_refuses_dora():
    layer = wrap(nn.Linear(8, 6), use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        layer(inputs("linear"), adapter_names=["default"] * 3)


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv2d"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_float32_adapter_on_bfloat16_base(kind, dora):
    """Adapters kept in float32 on a bf16 base: input cast to the adapter, output back to bf16."""
    reference_base = BASES[kind]()
    base = BASES[kind]().to(torch.bfloat16)
    base.load_state_dict({k: v.to(torch.bfloat16) for k, v in reference_base.state_dict().items()})
    reference_base.load_state_dict({k: v.float() for k, v in base.state_dict().items()})
    layer = wrap(base, use_dora=dora).eval()
    reference = wrap(reference_base, use_dora=dora).eval()
    for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
        for name, item in getattr(layer, attr).items():
            item.data = item.data.float() if isinstance(item, torch.Tensor) else item.float()
            getattr(reference, attr)[name] = item
    x = inputs(kind)
    out = layer(x.to(torch.bfloat16) if x.is_floating_point() else x)
    assert out.dtype == torch.bfloat16
    expected = reference(x.to(torch.bfloat16).float() if x.is_floating_point() else x)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_bfloat16_delta_is_computed_in_float32_on_cpu():
    layer = wrap(nn.Linear(8, 6)).to(torch.bfloat16)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    delta = layer.get_delta_weight("default")
    assert delta.dtype == torch.bfloat16
    torch.testing.assert_close(delta, (B.float() @ A.float()).to(torch.bfloat16))


# ---------------------------------------------------------------------- scaling helpers, keys
def test_scale_helpers():
    layer = wrap(nn.Linear(8, 6), r=4, lora_alpha=8)
    layer.scale_layer(0.5)
    assert layer.scaling["default"] == 1.0
    layer.unscale_layer(0.5)
    assert layer.scaling["default"] == 2.0
    layer.set_scale("default", 3)
    assert layer.scaling["default"] == 6.0
    layer.unscale_layer()
    assert layer.scaling["default"] == 2.0


def test_state_dict_and_checkpoint_names_are_the_reference_ones():
    layer = wrap(nn.Linear(8, 6), use_dora=True, lora_bias=False)
    assert set(layer.state_dict()) == {
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.default.weight",
        "lora_B.default.weight",
        "lora_magnitude_vector.default.weight",
    }
    items = {model: ckpt for model, ckpt, _ in layer.adapter_state_items("default")}
    assert items == {
        "lora_A.default.weight": "lora_A.weight",
        "lora_B.default.weight": "lora_B.weight",
        "lora_magnitude_vector.default.weight": "lora_magnitude_vector",
    }
    embedding = wrap(nn.Embedding(12, 6))
    assert {ckpt for _, ckpt, _ in embedding.adapter_state_items("default")} == {
        "lora_embedding_A",
        "lora_embedding_B",
    }


def test_layer_types_and_repr():
    assert isinstance(wrap(nn.Linear(8, 6)), Linear)
    assert isinstance(wrap(nn.Embedding(4, 2)), Embedding)
    assert repr(wrap(nn.Linear(8, 6))).startswith("lora.")


# ---------------------------------------------------------------------- property: any shape, any option
@st.composite
def linear_cases(draw: st.DrawFn) -> dict:
    use_dora = draw(st.booleans())
    return {
        "n_in": draw(st.integers(1, 12)),
        "n_out": draw(st.integers(1, 12)),
        "conv1d": draw(st.booleans()),
        "options": {
            "r": draw(st.integers(1, 6)),
            "lora_alpha": draw(st.sampled_from([1, 3, 8, 16])),
            "use_rslora": draw(st.booleans()),
            "use_dora": use_dora,
            "lora_bias": not use_dora and draw(st.booleans()),
        },
    }


@given(case=linear_cases(), seed=st.integers(0, 2**16))
def test_linear_matches_its_dense_weight_and_merges_exactly(case, seed):
    """Forward == x @ W_adapted^T + b_adapted with W_adapted built by hand; merge gives W_adapted."""
    torch.manual_seed(seed)
    n_in, n_out, options = case["n_in"], case["n_out"], case["options"]
    base = Conv1D(n_out, n_in) if case["conv1d"] else nn.Linear(n_in, n_out)
    layer = wrap(base, **options).eval()
    if options["use_dora"]:
        perturb_magnitude(layer)
    if options["lora_bias"]:
        randomize_lora_bias(layer)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    r, alpha = options["r"], options["lora_alpha"]
    scaling = alpha / math.sqrt(r) if options["use_rslora"] else alpha / r
    weight = base.weight.T if case["conv1d"] else base.weight  # (out, in)
    adapted = weight + scaling * B @ A
    if options["use_dora"]:
        adapted = _row_norm_rescaled(weight, scaling * B @ A, layer.lora_magnitude_vector["default"].weight)
    bias = base.bias + (scaling * layer.lora_B["default"].bias if options["lora_bias"] else 0)
    x = torch.randn(4, n_in)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ adapted.T + bias, atol=1e-4, rtol=1e-4)
        layer.merge(safe_merge=True)
        merged_weight = base.weight.T if case["conv1d"] else base.weight
        torch.testing.assert_close(merged_weight, adapted, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(base.bias, bias, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_merge_adds_scaling_b_a_and_unmerge_takes_it_back(conv1d, dtype):
    """The fused path (one GEMM into the weight, float32) and the delta path (bfloat16 on CPU) agree with the formula."""
    torch.manual_seed(0)
    base = (Conv1D(6, 9) if conv1d else nn.Linear(9, 6)).to(dtype)
    layer = wrap(base, r=3, lora_alpha=5, init_lora_weights="gaussian").to(dtype)
    nn.init.normal_(layer.lora_B["default"].weight)
    original = base.weight.detach().clone()
    A, B = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    delta = (5 / 3) * B @ A
    expected = original.float() + (delta.T if conv1d else delta)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 1e-2}
    layer.merge()
    torch.testing.assert_close(base.weight.float(), expected, **tol)
    layer.unmerge()
    torch.testing.assert_close(base.weight.float(), original.float(), **tol)


# ---------------------------------------------------------------------- batched mixed path
@pytest.mark.parametrize("kind", ["linear", "transformers_conv1d"])
@pytest.mark.parametrize("shape", [(7, 5, 8), (7, 8)], ids=["3d", "2d"])
@pytest.mark.parametrize("with_base_rows", [False, True], ids=["adapters", "with-base-rows"])
def test_batched_mixed_path_equals_the_per_adapter_loop(kind, shape, with_base_rows):
    """Many adapters of different ranks in one batch: the batched products give the loop's rows."""
    layer = wrap(BASES[kind]()).eval()
    for i, r in enumerate([1, 3, 2, 5]):
        add(layer, f"a{i}", r=r, lora_alpha=2 * r + i)
    names = ["a0", "a3", "default", "a1", "a2", "a3", "a0"]
    if with_base_rows:
        names[1] = names[4] = BASE_PLACEHOLDER
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched = layer(x, adapter_names=names)
        looped = LoraLayer._mixed_batch_forward(layer, x, adapter_names=names)
    torch.testing.assert_close(batched, looped, atol=ATOL, rtol=0)


def test_batched_mixed_path_trains_each_adapter_on_its_own_rows():
    layer = wrap(nn.Linear(8, 6), init_lora_weights=True)
    add(layer, "other", r=3, init_lora_weights=True)
    layer.set_adapter(["default", "other"])
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(4))
    layer(x, adapter_names=["default", "other", "other", BASE_PLACEHOLDER]).sum().backward()
    # B starts at zero, so A gets no gradient yet; B of each adapter sees only its own rows.
    grads = {n: layer.lora_B[n].weight.grad for n in ("default", "other")}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    expected = torch.autograd.grad(
        (layer.lora_B["other"](layer.lora_A["other"](x[1:3])) * layer.scaling["other"]).sum(),
        layer.lora_B["other"].weight,
    )[0]
    torch.testing.assert_close(grads["other"], expected, atol=ATOL, rtol=0)
