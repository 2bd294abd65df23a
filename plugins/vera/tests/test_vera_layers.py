"""VeRA layers and VeraModel: the math, the shared projections, merging, several adapters, state dicts."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft_core import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft_core.errors import ConfigError
from torch import nn

from peft_vera import VeraConfig
from peft_vera.layer import Linear, VeraLayer
from peft_vera.projections import BufferDict, generate_projections


class MLP(nn.Module):
    """Layers of different shapes, so that each uses its own block of the shared projections."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 4, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class GPT2Style(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(12, 8)  # weight stored (in=8, out=12)
        self.c_proj = Conv1D(8, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.tanh(self.c_attn(x)))


TARGETS = ["fc1", "fc2", "head"]
X = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))


def quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def make(*, seed: int = 0, **options) -> tuple[PeftModel, MLP]:
    torch.manual_seed(seed)
    base = MLP().eval()
    config = VeraConfig(**{"target_modules": TARGETS, "r": 3, "init_weights": False, **options})
    return quiet(lambda: get_peft_model(copy.deepcopy(base), config)).eval(), base


def layer(model: PeftModel, name: str) -> VeraLayer:
    return model.base_model.model.get_submodule(name)


# ---------------------------------------------------------------------- projections
def test_projections_come_from_a_private_generator_with_kaiming_bounds():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    vera_A, vera_B = generate_projections(4, 10, 7, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before), "the global generator must not be used"
    assert vera_A.shape == (4, 10) and vera_B.shape == (7, 4)
    assert vera_A.abs().max() <= math.sqrt(3) * math.sqrt(2) / math.sqrt(10)
    assert vera_B.abs().max() <= math.sqrt(3) * math.sqrt(2) / math.sqrt(4)
    again = generate_projections(4, 10, 7, seed=5)
    assert torch.equal(again[0], vera_A) and torch.equal(again[1], vera_B)
    assert not torch.equal(generate_projections(4, 10, 7, seed=6)[0], vera_A)


def test_projections_are_sized_for_the_largest_target_and_shared_by_all_layers():
    model, _ = make()
    vera_model = model.base_model
    assert vera_model.vera_A["default"].shape == (3, 10)  # largest in_features: fc2
    assert vera_model.vera_B["default"].shape == (10, 3)  # largest out_features: fc1
    expected = generate_projections(3, 10, 10, seed=0)
    assert torch.equal(vera_model.vera_A["default"], expected[0])
    assert torch.equal(vera_model.vera_B["default"], expected[1])
    for name in TARGETS:
        assert layer(model, name).vera_A is vera_model.vera_A
        assert layer(model, name).vera_B is vera_model.vera_B


# ---------------------------------------------------------------------- the math
def test_forward_adds_the_scaled_random_projection_of_each_layer_block():
    model, base = make(vera_dropout=0.3)
    fc2 = layer(model, "fc2")  # 10 -> 4
    vera_A, vera_B = model.base_model.vera_A["default"], model.base_model.vera_B["default"]
    h = torch.randn(5, 10)
    expected = base.fc2(h) + fc2.vera_lambda_b["default"] * (
        (fc2.vera_lambda_d["default"] * (h @ vera_A[:, :10].T)) @ vera_B[:4, :].T
    )
    with torch.no_grad():
        torch.testing.assert_close(fc2(h), expected)
    # dropout acts on the input of the adapter path only, in training
    fc2.train()
    torch.manual_seed(0)
    dropped = fc2(h)
    assert not torch.allclose(dropped, expected)


@pytest.mark.parametrize("case", ["mlp", "conv1d"])
def test_merged_forward_equals_unmerged_and_unmerge_restores_the_base(case):
    if case == "mlp":
        model, base = make()
        x = X
    else:
        torch.manual_seed(0)
        base = GPT2Style().eval()
        config = VeraConfig(target_modules=["c_attn", "c_proj"], r=4, init_weights=False, fan_in_fan_out=True)
        model = get_peft_model(copy.deepcopy(base), config).eval()
        x = torch.randn(2, 3, 8)
    with torch.no_grad():
        unmerged = model(x)
        assert not torch.allclose(unmerged, base(x), atol=1e-3)
        model.merge_adapter()
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        for name, tensor in base.named_parameters():
            module, _, attr = name.rpartition(".")
            torch.testing.assert_close(
                getattr(model.base_model.model.get_submodule(module).get_base_layer(), attr),
                tensor,
                atol=1e-6,
                rtol=1e-5,
            )


def test_conv1d_delta_is_transposed_to_the_base_layout():
    torch.manual_seed(0)
    config = VeraConfig(target_modules=["c_attn"], r=4, init_weights=False, fan_in_fan_out=True)
    model = get_peft_model(GPT2Style(), config)
    c_attn = layer(model, "c_attn")
    assert c_attn.fan_in_fan_out
    assert c_attn.get_delta_weight("default").shape == c_attn.get_base_layer().weight.shape == (8, 12)


def test_default_init_is_an_identity_and_random_init_is_the_references_draw():
    model, base = make(init_weights=True, d_initial=0.25)
    fc1 = layer(model, "fc1")
    assert torch.equal(fc1.vera_lambda_b["default"].detach(), torch.zeros(10))
    assert torch.equal(fc1.vera_lambda_d["default"].detach(), torch.full((3,), 0.25))
    with torch.no_grad():
        torch.testing.assert_close(model(X), base(X), atol=0, rtol=0)
    model, _ = make(seed=4)
    torch.manual_seed(4)
    MLP()  # the base model's own init draws come first
    for name, n_out in (("fc1", 10), ("fc2", 4), ("head", 3)):
        assert torch.equal(layer(model, name).vera_lambda_b["default"].detach(), torch.ones(n_out))
        assert torch.equal(layer(model, name).vera_lambda_d["default"].detach(), torch.randn(3))


@given(scale=st.floats(min_value=-3, max_value=3))
def test_unmerge_restores_the_base_for_any_lambda(scale):
    model, base = make()
    with torch.no_grad():
        layer(model, "fc1").vera_lambda_b["default"].mul_(scale)
    model.merge_adapter()
    model.unmerge_adapter()
    torch.testing.assert_close(
        layer(model, "fc1").get_base_layer().weight, base.fc1.weight, atol=1e-6, rtol=1e-5
    )


def test_half_precision_base_gets_projections_rounded_like_the_reference():
    torch.manual_seed(0)
    base = MLP().to(torch.bfloat16)
    model = get_peft_model(base, VeraConfig(target_modules=TARGETS, r=3))
    projection = model.base_model.vera_A["default"]
    assert projection.dtype == torch.float32  # upcast like the adapter's own parameters
    expected = generate_projections(3, 10, 10, seed=0)[0].to(torch.bfloat16).float()
    assert torch.equal(projection, expected)
    assert model(X.to(torch.bfloat16)).dtype == torch.bfloat16


def test_a_layer_without_an_adapter_model_explains_itself():
    alone = Linear(nn.Linear(4, 4), "default", VeraConfig(target_modules=["x"], r=2, init_weights=False))
    with pytest.raises(RuntimeError, match="no shared projections"):
        alone(torch.randn(1, 4))


# ---------------------------------------------------------------------- several adapters
def test_later_adapters_use_a_copy_of_the_first_adapters_projections():
    model, _ = make()
    model.add_adapter("other", VeraConfig(target_modules=["fc1"], r=2, init_weights=False))
    vera_A = model.base_model.vera_A
    assert torch.equal(vera_A["other"], vera_A["default"])
    assert vera_A["other"].data_ptr() != vera_A["default"].data_ptr()
    # a smaller rank uses the leading rows
    fc1 = layer(model, "fc1")
    assert fc1.projections("other")[0].shape == (2, 6)
    model.set_adapter("other")
    with torch.no_grad():
        out = model(X)
    model.set_adapter(["default", "other"])
    with torch.no_grad():
        both = model(X)
    assert not torch.allclose(out, both)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"r": 4}, "r=4.*rank 3"),
        ({"projection_prng_key": 1}, "projection_prng_key"),
        ({"save_projection": False}, "save_projection"),
    ],
)
def test_incompatible_later_adapters_are_refused_and_leave_nothing_behind(options, match):
    model, _ = make(bias="vera_only")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = quiet(lambda: VeraConfig(**{"target_modules": ["fc1"], "r": 3, **options}))
    with pytest.raises(ConfigError, match=match):
        model.add_adapter("other", config)
    assert list(model.peft_config) == ["default"]
    assert "other" not in model.base_model.vera_A
    assert all("other" not in name for name in model.state_dict())
    assert model.state_dict().keys() == before.keys()


def test_only_one_adapter_may_train_biases():
    model, _ = make(bias="vera_only")
    with pytest.raises(ConfigError, match="only one VeRA adapter"):
        model.add_adapter("other", VeraConfig(target_modules=["fc1"], r=3, bias="all"))


def test_projections_larger_than_the_first_adapters_are_refused():
    model, _ = make(target_modules=["fc2"])  # projections sized for fc2: 10 -> 4
    with pytest.raises(ConfigError, match="too small for 'fc1'"):
        model.add_adapter("other", VeraConfig(target_modules=["fc1"], r=3))  # fc1: 6 -> 10
    assert list(model.peft_config) == ["default"]
    assert not hasattr(model.base_model.model.fc1, "vera_lambda_d")


def test_deleting_adapters_drops_their_projections_and_a_new_first_adapter_decides_afresh():
    model, _ = make()
    model.add_adapter("other", VeraConfig(target_modules=["fc1"], r=3))
    model.delete_adapter("other")
    assert list(model.base_model.vera_A.keys()) == ["default"]
    model.base_model.delete_adapter("default")
    assert len(model.base_model.vera_A) == 0
    config = quiet(
        lambda: VeraConfig(target_modules=["fc1"], r=2, save_projection=False, projection_prng_key=3)
    )
    quiet(lambda: model.add_adapter("new", config))
    model.set_adapter("new")
    assert model.base_model.vera_A["new"].shape == (2, 6)
    assert not model.base_model.vera_A.persistent
    assert "base_model.vera_A.new" not in model.state_dict()


# ---------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("save_projection", [True, False])
def test_checkpoint_keys_are_the_references(save_projection):
    model, _ = make(save_projection=save_projection)
    keys = set(get_peft_model_state_dict(model))
    lambdas = {f"base_model.model.{n}.vera_lambda_{v}" for n in TARGETS for v in "bd"}
    projections = {"base_model.vera_A", "base_model.vera_B"}
    assert keys == (lambdas | projections if save_projection else lambdas)
    layer_level = {k for k in model.state_dict() if ".vera_A." in k or ".vera_B." in k}
    assert bool(layer_level) is save_projection


def test_loading_projections_changes_only_that_adapter():
    model, _ = make()
    model.add_adapter("other", VeraConfig(target_modules=TARGETS, r=3))
    state = get_peft_model_state_dict(model, adapter_name="other")
    state = {k: v + 1 if k == "base_model.vera_A" else v for k, v in state.items()}
    result = set_peft_model_state_dict(model, state, adapter_name="other")
    assert not result.unexpected_keys and not result.missing_keys
    vera_A = model.base_model.vera_A
    torch.testing.assert_close(vera_A["other"], vera_A["default"] + 1)


def test_a_reference_checkpoint_without_projections_regenerates_them(tmp_path):
    model, base = make(save_projection=False)
    with torch.no_grad():
        expected = model(X)
    quiet(lambda: model.save_pretrained(tmp_path))
    loaded = quiet(lambda: PeftModel.from_pretrained(copy.deepcopy(base), tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), expected, atol=0, rtol=0)


@pytest.mark.parametrize("bias", ["vera_only", "all"])
def test_bias_options_train_and_save_base_biases(bias):
    model, _ = make(bias=bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    target_biases = {"base_model.model.fc1.base_layer.bias", "base_model.model.head.base_layer.bias"}
    assert target_biases <= trainable
    assert all("vera_A" not in n and "vera_B" not in n for n in trainable)
    saved = set(get_peft_model_state_dict(model))
    assert target_biases <= saved


def test_layers_to_transform_selects_layer_indices():
    torch.manual_seed(0)
    base = nn.Module()
    base.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(3)])
    config = VeraConfig(target_modules=["0"], r=2, layers_to_transform=[1], layers_pattern="layers")
    model = get_peft_model(base, config)
    adapted = [name for name, _ in model.base_model.named_adapter_layers()]
    assert adapted == ["layers.1.0"]


def test_the_core_saves_and_loads_the_model_level_projections():
    model, _ = make()
    assert [(m, c) for m, c, _ in model.base_model.adapter_state_items("default")] == [
        ("vera_A.default", "vera_A"),
        ("vera_B.default", "vera_B"),
    ]
    saved = get_peft_model_state_dict(model)
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(saved)
    zeros = {k: torch.zeros_like(v) for k, v in saved.items()}
    set_peft_model_state_dict(model, zeros)
    assert not model.base_model.vera_A["default"].any() and not model.base_model.vera_B["default"].any()


def test_buffer_dict_persistence_follows_save_projection():
    holder = BufferDict(persistent=False)
    holder["a"] = torch.zeros(2)
    assert "a" not in holder.state_dict()
    holder.set_persistent(True)
    assert "a" in holder.state_dict()
    del holder["a"]
    assert len(holder) == 0 and "a" not in holder


def test_an_unpickled_model_in_a_fresh_process_saves_its_projections(tmp_path):
    import subprocess
    import sys

    # only library classes, so that the fresh process can unpickle it
    base = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    model = get_peft_model(base, VeraConfig(target_modules=["0", "1"], r=2))
    torch.save(model, tmp_path / "model.pt")
    script = (
        "import torch; from peft_core import get_peft_model_state_dict\n"
        f"model = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        "print(sorted(k for k in get_peft_model_state_dict(model) if 'lambda' not in k))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['base_model.vera_A', 'base_model.vera_B']"
