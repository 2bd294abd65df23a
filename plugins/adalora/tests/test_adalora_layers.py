"""AdaLoRA layers and the adapter model: shapes, formulas, merging, rank patterns, adapter rules."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft_core import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft_core.errors import ConfigError, TargetModulesError
from peft_core.layer import AdapterLayer
from peft_core.registry import LayerContext
from torch import nn

from peft_adalora import AdaLoraConfig
from peft_adalora.layer import SVDConv2d, SVDLinear
from peft_adalora.plugin import conv2d_factory, linear_factory, transformers_conv1d_factory


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 10)
        self.lin1 = nn.Linear(10, 6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin1(torch.tanh(self.lin0(x))))


class ConvNet(nn.Module):
    def __init__(self, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1, padding_mode=padding_mode)
        self.conv_s = nn.Conv2d(5, 4, 2, stride=2, dilation=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv_s(torch.tanh(self.conv(x))).mean(dim=(2, 3)))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


def config(**options) -> AdaLoraConfig:
    defaults = {"target_modules": ["lin0", "lin1"], "init_r": 4, "target_r": 2, "total_step": 10}
    return AdaLoraConfig(**{**defaults, **options})


def adapted(base: nn.Module, seed: int = 1, **options) -> PeftModel:
    torch.manual_seed(seed)
    return get_peft_model(base, config(**options)).eval()


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------- shapes and names
def test_parameters_have_the_references_names_shapes_and_trainability():
    model = adapted(mlp())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "lin0" in n}
    assert shapes == {
        "base_model.model.lin0.base_layer.weight": (10, 6),
        "base_model.model.lin0.base_layer.bias": (10,),
        "base_model.model.lin0.lora_A.default": (4, 6),
        "base_model.model.lin0.lora_B.default": (10, 4),
        "base_model.model.lin0.lora_E.default": (4, 1),
        "base_model.model.lin0.ranknum.default": (1,),
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{m}.lora_{f}.default" for m in ("lin0", "lin1") for f in "ABE"}
    layer = model.base_model.model.lin0
    assert isinstance(layer, SVDLinear) and layer.ranknum["default"].item() == 4.0
    assert torch.equal(layer.lora_E["default"], torch.zeros(4, 1))  # identity init
    assert 0.01 < layer.lora_A["default"].std().item() < 0.04  # N(0, 0.02)
    # ranknum is not saved (it is always init_r), as in the reference
    assert sorted(get_peft_model_state_dict(model)) == sorted(
        f"base_model.model.{m}.lora_{f}" for m in ("lin0", "lin1") for f in "ABE"
    )


def test_conv1d_and_conv2d_factor_shapes():
    from transformers.pytorch_utils import Conv1D

    conv1d = SVDLinear(Conv1D(7, 5), "a", config(init_r=3), fan_in_fan_out=True)  # weight (in=5, out=7)
    assert tuple(conv1d.lora_A["a"].shape) == (3, 5) and tuple(conv1d.lora_B["a"].shape) == (7, 3)
    conv2d = SVDConv2d(nn.Conv2d(3, 5, (2, 3)), "a", config(init_r=3))
    assert tuple(conv2d.lora_A["a"].shape) == (3, 3 * 2 * 3) and tuple(conv2d.lora_B["a"].shape) == (5, 3)
    assert conv2d.get_delta_weight("a").shape == conv2d.base_layer.weight.shape


# ---------------------------------------------------------------------- the formula
@pytest.mark.parametrize(("lora_alpha", "scaling"), [(8, 8.0), (3, 3.0), (0, 4.0), (-1, 4.0)])
def test_linear_output_is_base_plus_scaled_svd_update(lora_alpha, scaling):
    base = mlp()
    model = adapted(copy.deepcopy(base), init_lora_weights=False, lora_alpha=lora_alpha)
    layer = model.base_model.model.lin0
    assert layer.scaling["default"] == scaling  # lora_alpha, or the rank when lora_alpha <= 0
    A, B, E = (getattr(layer, f"lora_{f}")["default"].detach() for f in "ABE")
    expected = base.lin0(X) + X @ (A * E).T @ B.T * scaling / (4 + 1e-5)
    torch.testing.assert_close(layer(X), expected, atol=1e-5, rtol=1e-5)
    delta = layer.get_delta_weight("default")
    torch.testing.assert_close(delta, B @ (A * E) * scaling / (4 + 1e-5), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_conv2d_merges_to_its_unmerged_output_in_every_padding_mode(padding_mode):
    torch.manual_seed(0)
    base = ConvNet(padding_mode).eval()
    torch.manual_seed(1)
    model = get_peft_model(
        base, config(target_modules=["conv", "conv_s"], init_lora_weights=False, lora_alpha=0.1)
    ).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        unmerged = model(x)
        with model.disable_adapter():
            plain = model(x)
        model.merge_adapter()
        merged = model(x)
    assert not torch.allclose(unmerged, plain, atol=1e-3)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_transformers_conv1d_merge_transposes_the_delta():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(7, 5)
    layer = SVDLinear(
        copy.deepcopy(base),
        "a",
        config(init_r=3, init_lora_weights=False, lora_alpha=0.5),
        fan_in_fan_out=True,
    )
    x = torch.randn(4, 5)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, base.weight, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- dispatch
def test_each_factory_handles_exactly_its_base_type():
    from transformers.pytorch_utils import Conv1D

    context = LayerContext(key="m")
    cfg = config()
    modules = {"linear": nn.Linear(3, 4), "conv1d": Conv1D(4, 3), "conv2d": nn.Conv2d(2, 3, 1)}
    factories = {"linear": linear_factory, "conv1d": transformers_conv1d_factory, "conv2d": conv2d_factory}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out corrections
        for kind, factory in factories.items():
            for other, module in modules.items():
                made = factory(module, "a", cfg, context)
                assert (made is not None) is (kind == other), (kind, other)


@pytest.mark.parametrize(
    "target",
    [nn.Embedding(5, 3), nn.Conv1d(2, 3, 1), nn.Conv3d(2, 3, 1)],
    ids=["embedding", "conv1d", "conv3d"],
)
def test_unsupported_targets_are_refused_naming_the_module_type(target):
    model = nn.Sequential()
    model.add_module("m", target)
    with pytest.raises(TargetModulesError, match=type(target).__name__):
        get_peft_model(model, config(target_modules=["m"]))


def test_grouped_conv2d_is_refused():
    model = nn.Sequential()
    model.add_module("g", nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TargetModulesError, match=r"grouped Conv2d \(groups=2\)"):
        get_peft_model(model, config(target_modules=["g"]))
    assert isinstance(model.g, nn.Conv2d)  # left as it was


def test_fan_in_fan_out_is_corrected_per_layer_with_a_warning():
    with pytest.warns(UserWarning, match="fan_in_fan_out=True, but 'lin[01]' is an nn.Linear"):
        model = adapted(mlp(), fan_in_fan_out=True)
    assert model.base_model.model.lin0.fan_in_fan_out is False
    assert model.peft_config["default"].fan_in_fan_out is True  # the config is left as given


class _Scale(AdapterLayer):
    """A minimal adapter layer of another method, to stack AdaLoRA on."""

    adapter_layer_names = ("other_s",)

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.other_s = nn.ParameterDict({"x": nn.Parameter(torch.tensor(2.0))})
        self.set_adapter("x")

    def update_layer(self, adapter_name, config, *, key="", **kwargs):
        raise NotImplementedError

    def forward(self, x, *args, **kwargs):
        return self.base_layer(x) * self.other_s["x"]


def test_adalora_stacks_on_another_methods_layer():
    inner = _Scale(nn.Linear(6, 4))
    layer = linear_factory(inner, "a", config(init_lora_weights=False), LayerContext(key="m"))
    assert isinstance(layer, SVDLinear) and layer.base_layer is inner
    assert layer.get_base_layer() is inner.base_layer
    with torch.no_grad():
        expected = inner(X) + X @ (layer.lora_A["a"] * layer.lora_E["a"]).T @ layer.lora_B["a"].T * 8 / (
            4 + 1e-5
        )
        torch.testing.assert_close(layer(X), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- rank patterns
def test_a_rank_pattern_builds_pruned_layers_that_keep_the_unpruned_scale():
    pattern = {"lin0.lora_E": [True, False, True, False], "lin1.lora_E": [False] * 4}
    model = adapted(mlp(), rank_pattern=pattern)
    lin0, lin1 = model.base_model.model.lin0, model.base_model.model.lin1
    assert tuple(lin0.lora_A["default"].shape) == (2, 6) and tuple(lin0.lora_B["default"].shape) == (10, 2)
    assert (
        lin0.r["default"] == 2 and lin0.ranknum["default"].item() == 4.0
    )  # scale of init_r, as the reference
    assert tuple(lin1.lora_E["default"].shape) == (0, 1) and lin1.ranknum["default"].item() == 0.0
    with torch.no_grad():
        assert torch.isfinite(model(X)).all()


def test_rank_pattern_keys_may_carry_the_adapter_name():
    model = adapted(mlp(), rank_pattern={"lin0.lora_E.default": [True, True, False, False]})
    assert model.base_model.model.lin0.r["default"] == 2
    assert model.base_model.model.lin1.r["default"] == 4  # not listed: init_r


def test_a_rank_pattern_for_other_modules_is_refused_and_leaves_the_model_unchanged():
    base = mlp()
    with pytest.raises(ConfigError, match=r"rank_pattern names \['fc9.lora_E'\]"):
        adapted(base, rank_pattern={"fc9.lora_E": [True] * 4})
    assert isinstance(base.lin0, nn.Linear)


def test_a_pruned_checkpoint_loads_into_a_full_size_layer_where_it_belongs():
    trained = adapted(mlp(), init_lora_weights=False)
    trained.base_model._set_rank_pattern(
        "default", {"lin0.lora_E": [True, False, True, True], "lin1.lora_E": [False, True, False, False]}
    )
    state = {k: v.clone() for k, v in get_peft_model_state_dict(trained).items()}
    assert tuple(state["base_model.model.lin0.lora_A"].shape) == (3, 6)
    assert tuple(state["base_model.model.lin1.lora_B"].shape) == (6, 1)

    target = adapted(mlp(), seed=7, init_lora_weights=False)
    target.base_model._set_rank_pattern("default", trained.peft_config["default"].rank_pattern)
    result = set_peft_model_state_dict(target, state)
    assert not result.unexpected_keys and not result.missing_keys
    keep = torch.tensor([True, False, True, True])
    lin0 = target.base_model.model.lin0
    torch.testing.assert_close(
        lin0.lora_A["default"][keep], state["base_model.model.lin0.lora_A"], atol=0, rtol=0
    )
    torch.testing.assert_close(
        lin0.lora_B["default"][:, keep], state["base_model.model.lin0.lora_B"], atol=0, rtol=0
    )
    # the entries the pattern prunes are not written
    assert not torch.equal(
        lin0.lora_A["default"][~keep], trained.base_model.model.lin0.lora_A["default"][~keep]
    )


# ---------------------------------------------------------------------- the adapter rules
def test_only_one_adapter_may_train():
    model = adapted(mlp())
    with pytest.raises(ConfigError, match=r"only one adapter at a time, and 'default' is trainable"):
        model.add_adapter("second", config())
    assert list(model.peft_config) == ["default"]
    model.add_adapter("second", config(inference_mode=True))
    assert model.base_model.trainable_adapter_name == "default"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".second" in n)
    model.delete_adapter("default")
    assert model.base_model.trainable_adapter_name is None and model.base_model.rankallocator is None
    model.add_adapter("third", config())  # the trainable slot is free again
    assert model.base_model.trainable_adapter_name == "third"


def test_inject_adapter_in_model_without_a_peft_model():
    from peft_core import inject_adapter_in_model

    torch.manual_seed(1)
    model = inject_adapter_in_model(config(init_lora_weights=False, lora_alpha=0.5), mlp())
    assert isinstance(model, MLP) and isinstance(model.lin0, SVDLinear)
    assert sorted(get_peft_model_state_dict(model)) == sorted(
        f"{m}.lora_{f}" for m in ("lin0", "lin1") for f in "ABE"
    )
    with torch.no_grad():
        assert not torch.allclose(model(X), mlp()(X))


def test_only_one_adapter_may_train_biases():
    model = adapted(mlp(), bias="all")
    with pytest.raises(ConfigError, match="already trains biases"):
        model.add_adapter("second", config(bias="lora_only", inference_mode=True))


def test_update_and_allocate_needs_a_trainable_adapter(tmp_path):
    model = adapted(mlp())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(mlp(), tmp_path)  # inference mode
    with pytest.raises(ConfigError, match="no trainable AdaLoRA adapter"):
        loaded.base_model.update_and_allocate(0)
    trainable = PeftModel.from_pretrained(mlp(), tmp_path, is_trainable=True)
    assert trainable.base_model.trainable_adapter_name == "default"


def test_adding_adapters_of_other_shapes_keeps_the_first_intact():
    model = adapted(mlp(), init_lora_weights=False, lora_alpha=0.5)
    before = model(X).detach()
    model.add_adapter("small", config(init_r=2, inference_mode=True, init_lora_weights=False))
    model.set_adapter("small")
    assert tuple(model.base_model.model.lin0.lora_A["small"].shape) == (2, 6)
    model.set_adapter("default")
    torch.testing.assert_close(model(X).detach(), before, atol=0, rtol=0)
