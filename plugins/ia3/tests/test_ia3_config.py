"""IA3Config, IA3Model's config preparation, registration and layer dispatch."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest
import torch
from peft_core import PeftConfig, get_peft_model
from peft_core.errors import ConfigError, TargetModulesError
from peft_core.plugins import get_registry
from peft_core.registry import LayerContext
from torch import nn

from peft_ia3 import IA3Config, plugin
from peft_ia3.default_targets import DEFAULT_FEEDFORWARD_MODULES, DEFAULT_TARGET_MODULES
from peft_ia3.layer import Conv2d, Conv3d, IA3Layer, Linear
from peft_ia3.model import IA3Model


# ---------------------------------------------------------------------- the config
def test_defaults_are_the_references():
    data = IA3Config().to_dict()
    assert data["peft_type"] == "IA3"
    assert {
        k: data[k] for k in ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save")
    } == {
        "target_modules": None,
        "exclude_modules": None,
        "feedforward_modules": None,
        "modules_to_save": None,
    }
    assert data["fan_in_fan_out"] is False and data["init_ia3_weights"] is True


def test_json_round_trip_and_sets_become_sorted_lists():
    config = IA3Config(
        target_modules={"v", "k", "wo"},
        feedforward_modules={"wo"},
        exclude_modules="x",
        task_type="SEQ_2_SEQ_LM",
    )
    assert config.target_modules == ["k", "v", "wo"]
    again = PeftConfig.from_dict(json.loads(config.to_json_string()))
    assert type(again) is IA3Config and again.to_dict() == config.to_dict()


def test_feedforward_modules_must_be_among_the_targets():
    with pytest.raises(ConfigError, match=r"\['down_proj'\].*subset of target_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    # an entry that ends a target name counts (the reference saves "all-linear" targets as full names)
    IA3Config(target_modules=["model.layers.0.mlp.down_proj", "k_proj"], feedforward_modules=["down_proj"])
    # and one that a target name ends ("all-linear" expands to short names)
    IA3Config(target_modules=["down_proj", "k_proj"], feedforward_modules=["mlp.down_proj"])
    # a regex on either side is not checked (as in the reference)
    IA3Config(target_modules=r".*\.k_proj", feedforward_modules=["down_proj"])
    IA3Config(target_modules=["k_proj"], feedforward_modules=r".*down_proj")


@pytest.mark.parametrize("option", ["fan_in_fan_out", "init_ia3_weights"])
def test_flags_must_be_booleans(option):
    with pytest.raises(ConfigError, match=option):
        IA3Config(**{option: "yes"})


def test_reference_written_config_reads_back():
    written = {
        "auto_mapping": None,
        "base_model_name_or_path": "t5-small",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "feedforward_modules": ["wo"],
        "inference_mode": True,
        "init_ia3_weights": True,
        "modules_to_save": None,
        "peft_type": "IA3",
        "peft_version": "0.21.2",
        "revision": None,
        "target_modules": ["k", "wo", "v"],
        "task_type": "SEQ_2_SEQ_LM",
    }
    config = PeftConfig.from_dict(written)
    assert isinstance(config, IA3Config)
    assert config.to_dict() == written


# ---------------------------------------------------------------------- preparation
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )


def test_unset_feedforward_modules_without_model_defaults_is_an_error_naming_the_fix():
    with pytest.raises(ConfigError, match=r"feedforward_modules=\[\]"):
        get_peft_model(MLP(), IA3Config(target_modules=["fc1"]))
    model = get_peft_model(MLP(), IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=[]))
    assert not any(layer.is_feedforward["default"] for layer in model.base_model.adapter_layers())


def test_llama_defaults_fill_targets_and_feedforward_modules():
    model = get_peft_model(_tiny_llama(), IA3Config(task_type="CAUSAL_LM"))
    config = model.peft_config["default"]
    assert config.target_modules == ["k_proj", "v_proj", "down_proj"]
    assert config.feedforward_modules == ["down_proj"]
    layers = dict(model.base_model.named_adapter_layers())
    assert len(layers) == 6
    for name, layer in layers.items():
        assert layer.is_feedforward["default"] is name.endswith("down_proj")


def test_all_linear_targets_with_dotted_feedforward_names():
    model = get_peft_model(
        _tiny_llama(), IA3Config(target_modules="all-linear", feedforward_modules=["mlp.down_proj"])
    )
    layers = dict(model.base_model.named_adapter_layers())
    assert len(layers) == 14
    assert sorted(n for n, layer in layers.items() if layer.is_feedforward["default"]) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_default_feedforward_modules_need_not_be_targets():
    # as in the reference, the defaults are recorded as they are, without the subset rule
    model = get_peft_model(_tiny_llama(), IA3Config(target_modules=["q_proj"]))
    assert model.peft_config["default"].feedforward_modules == ["down_proj"]
    assert {name.rsplit(".", 1)[-1] for name, _ in model.base_model.named_adapter_layers()} == {"q_proj"}


def test_every_default_feedforward_model_type_has_default_targets():
    assert set(DEFAULT_FEEDFORWARD_MODULES) == set(DEFAULT_TARGET_MODULES)
    for model_type, feedforward in DEFAULT_FEEDFORWARD_MODULES.items():
        assert set(feedforward) <= set(DEFAULT_TARGET_MODULES[model_type]), model_type


# ---------------------------------------------------------------------- registration and dispatch
def test_registered_method_spec():
    spec = get_registry().method("IA3")
    assert spec.config_cls is IA3Config and spec.model_cls is IA3Model
    assert spec.prefix == "ia3_" and spec.plugin
    caps = spec.capabilities
    assert caps.mergeable and caps.mixable and caps.identity_init and not caps.prompt_learning
    assert dict(spec.default_target_modules) == DEFAULT_TARGET_MODULES


def test_entry_point_is_declared():
    (entry,) = [ep for ep in entry_points(group="peft_core") if ep.name == "ia3"]
    assert entry.value == "peft_ia3.plugin"
    assert entry.load() is plugin


def _conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(4, 4)


FACTORIES = {
    plugin.linear_factory: (Linear, lambda: nn.Linear(4, 4)),
    plugin.transformers_conv1d_factory: (Linear, _conv1d),
    plugin.conv2d_factory: (Conv2d, lambda: nn.Conv2d(4, 4, 1)),
    plugin.conv3d_factory: (Conv3d, lambda: nn.Conv3d(4, 4, 1)),
}


@pytest.mark.parametrize("factory", list(FACTORIES), ids=lambda f: f.__name__)
def test_each_factory_handles_exactly_its_base_type(factory):
    config = IA3Config(
        target_modules=["m"],
        feedforward_modules=[],
        fan_in_fan_out=factory is plugin.transformers_conv1d_factory,
    )
    context = LayerContext(key="m")
    layer_cls, build = FACTORIES[factory]
    for other, (_, other_build) in FACTORIES.items():
        module = other_build()
        made = factory(module, "default", config, context)
        if other is factory:
            assert isinstance(made, layer_cls)
        else:
            assert made is None
    assert factory(nn.Embedding(4, 4), "default", config, context) is None
    assert factory(nn.Conv1d(4, 4, 1), "default", config, context) is None


def test_fan_in_fan_out_is_corrected_per_layer_with_a_warning():
    config = IA3Config(target_modules=["m"], feedforward_modules=[], fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="fan_in_fan_out=False"):
        layer = plugin.linear_factory(nn.Linear(4, 3), "default", config, LayerContext(key="m"))
    assert layer.fan_in_fan_out is False
    with pytest.warns(UserWarning, match="fan_in_fan_out=True"):
        layer = plugin.transformers_conv1d_factory(
            _conv1d(), "default", config.copy(fan_in_fan_out=False), LayerContext(key="m")
        )
    assert layer.fan_in_fan_out is True


@pytest.mark.parametrize("module", [nn.Conv1d(6, 6, 1), nn.Embedding(6, 6)], ids=["conv1d", "embedding"])
def test_unsupported_targets_are_named_in_the_error(module):
    model = nn.Sequential(module)
    with pytest.raises(TargetModulesError, match="IA3 cannot wrap"):
        get_peft_model(model, IA3Config(target_modules=["0"], feedforward_modules=[]))
    assert not isinstance(model[0], IA3Layer)


def test_trainable_parameters_are_the_vectors_only():
    model = get_peft_model(MLP(), IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.fc1.ia3_l.default", "base_model.model.fc2.ia3_l.default"]
    assert model.get_nb_trainable_parameters() == (8 + 8, 6 * 8 + 8 + 8 * 4 + 4 + 16)
