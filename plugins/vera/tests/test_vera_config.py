"""VeraConfig, registration and layer dispatch."""

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

from peft_vera import VeraConfig, plugin
from peft_vera.default_targets import DEFAULT_TARGET_MODULES, DEFAULT_TARGET_REGEXES
from peft_vera.layer import Linear, VeraLayer
from peft_vera.model import VeraModel


def test_defaults_are_the_references():
    data = VeraConfig().to_dict()
    assert data["peft_type"] == "VERA"
    expected = {
        "r": 256,
        "target_modules": None,
        "projection_prng_key": 0,
        "save_projection": True,
        "vera_dropout": 0.0,
        "d_initial": 0.1,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    assert {k: data[k] for k in expected} == expected


def test_json_round_trip():
    config = VeraConfig(
        r=16,
        target_modules={"v", "q"},
        projection_prng_key=7,
        d_initial=0.3,
        bias="vera_only",
        task_type="SEQ_CLS",
    )
    assert config.target_modules == ["q", "v"]
    again = PeftConfig.from_dict(json.loads(config.to_json_string()))
    assert type(again) is VeraConfig and again.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": True}, "r must be a positive integer"),
        ({"projection_prng_key": 1.5}, "projection_prng_key"),
        ({"vera_dropout": 1.5}, "vera_dropout"),
        ({"bias": "lora_only"}, "bias must be one of"),
        ({"save_projection": "yes"}, "save_projection"),
        ({"init_weights": None}, "init_weights"),
        ({"layers_pattern": "layers"}, "needs layers_to_transform"),
        ({"layers_to_transform": "1"}, "layers_to_transform"),
    ],
)
def test_invalid_values_are_refused_with_the_value_named(options, match):
    with pytest.raises(ConfigError, match=match):
        VeraConfig(**options)


def test_reference_written_config_reads_back():
    written = {
        "auto_mapping": None,
        "base_model_name_or_path": "facebook/opt-125m",
        "bias": "none",
        "d_initial": 0.1,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "peft_type": "VERA",
        "peft_version": "0.21.2",
        "projection_prng_key": 0,
        "r": 128,
        "revision": None,
        "save_projection": False,
        "target_modules": ["v_proj", "q_proj"],
        "task_type": "CAUSAL_LM",
        "vera_dropout": 0.0,
    }
    config = PeftConfig.from_dict(written)
    assert isinstance(config, VeraConfig)
    assert config.to_dict() == written


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


def test_llama_defaults_target_q_and_v():
    model = get_peft_model(_tiny_llama(), VeraConfig(r=4, task_type="CAUSAL_LM"))
    assert model.peft_config["default"].target_modules == ["q_proj", "v_proj"]
    assert len(list(model.base_model.named_adapter_layers())) == 4
    assert model.base_model.vera_A["default"].shape == (4, 16)
    assert model.base_model.vera_B["default"].shape == (16, 4)  # q_proj: 16 outputs, v_proj: 8


def test_unknown_model_type_without_targets_is_an_error():
    with pytest.raises(ConfigError, match="target_modules is not set"):
        get_peft_model(nn.Sequential(nn.Linear(3, 3)), VeraConfig(r=2))


def test_save_projection_false_warns_when_the_adapter_is_created():
    with pytest.warns(UserWarning, match="regenerates them from projection_prng_key=3"):
        get_peft_model(
            nn.Sequential(nn.Linear(3, 3)),
            VeraConfig(target_modules=["0"], r=2, save_projection=False, projection_prng_key=3),
        )


# ---------------------------------------------------------------------- registration and dispatch
def test_registered_method_spec():
    spec = get_registry().method("VERA")
    assert spec.config_cls is VeraConfig and spec.model_cls is VeraModel
    assert spec.prefix == "vera_" and spec.plugin
    caps = spec.capabilities
    assert caps.mergeable and caps.identity_init and not caps.prompt_learning and not caps.mixable
    assert dict(spec.default_target_modules) == {**DEFAULT_TARGET_MODULES, **DEFAULT_TARGET_REGEXES}


def test_entry_point_is_declared():
    (entry,) = [ep for ep in entry_points(group="peft_core") if ep.name == "vera"]
    assert entry.value == "peft_vera.plugin"
    assert entry.load() is plugin


def _conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(4, 4)


@pytest.mark.parametrize(
    ("factory", "build", "other"),
    [
        (plugin.linear_factory, lambda: nn.Linear(4, 4), _conv1d),
        (plugin.transformers_conv1d_factory, _conv1d, lambda: nn.Linear(4, 4)),
    ],
    ids=["linear", "conv1d"],
)
def test_each_factory_handles_exactly_its_base_type(factory, build, other):
    config = VeraConfig(
        target_modules=["m"], r=2, fan_in_fan_out=factory is plugin.transformers_conv1d_factory
    )
    context = LayerContext(key="m")
    assert isinstance(factory(build(), "default", config, context), Linear)
    for module in (other(), nn.Embedding(4, 4), nn.Conv2d(4, 4, 1)):
        assert factory(module, "default", config, context) is None


def test_fan_in_fan_out_is_corrected_per_layer_with_a_warning():
    config = VeraConfig(target_modules=["m"], r=2, fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="fan_in_fan_out=False"):
        made = plugin.linear_factory(nn.Linear(4, 3), "default", config, LayerContext(key="m"))
    assert made.fan_in_fan_out is False
    with pytest.warns(UserWarning, match="fan_in_fan_out=True"):
        made = plugin.transformers_conv1d_factory(
            _conv1d(), "default", config.copy(fan_in_fan_out=False), LayerContext(key="m")
        )
    assert made.fan_in_fan_out is True


def test_unsupported_targets_are_named_in_the_error():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Linear(3, 3))
    with pytest.raises(TargetModulesError, match="VERA cannot wrap"):
        get_peft_model(model, VeraConfig(target_modules=["0", "1"], r=2))
    assert not any(isinstance(m, VeraLayer) for m in model.modules())


def test_trainable_parameters_are_the_lambdas_only():
    model = get_peft_model(
        nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)), VeraConfig(target_modules=["0", "1"], r=4)
    )
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "base_model.model.0.vera_lambda_b.default",
        "base_model.model.0.vera_lambda_d.default",
        "base_model.model.1.vera_lambda_b.default",
        "base_model.model.1.vera_lambda_d.default",
    ]
    assert model.get_nb_trainable_parameters()[0] == 5 + 4 + 2 + 4
