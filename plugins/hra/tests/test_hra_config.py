"""HRAConfig, HRAModel's config preparation, registration and layer dispatch."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from peft_core import PeftConfig, PeftModel, get_peft_model
from peft_core.default_targets import LORA_STYLE_DEFAULT_TARGETS as DEFAULT_TARGET_MODULES
from peft_core.errors import ConfigError, TargetModulesError
from peft_core.plugins import get_registry
from peft_core.registry import LayerContext
from torch import nn

from peft_hra import HRAConfig, plugin
from peft_hra.layer import Conv2d, HRALayer, Linear
from peft_hra.model import HRAModel


# ---------------------------------------------------------------------- the config
def test_defaults_are_the_references():
    data = HRAConfig().to_dict()
    assert data["peft_type"] == "HRA"
    assert {k: data[k] for k in ("r", "apply_GS", "init_weights", "bias")} == {
        "r": 8,
        "apply_GS": False,
        "init_weights": True,
        "bias": "none",
    }
    for key in (
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
    ):
        assert data[key] is None, key


def test_json_round_trip_and_sets_become_sorted_lists():
    config = HRAConfig(
        r=6,
        apply_GS=True,
        init_weights=False,
        target_modules={"v_proj", "q_proj"},
        exclude_modules={"b", "a"},
        layers_to_transform=[0, 2],
        layers_pattern="layers",
        bias="hra_only",
        modules_to_save={"score"},
        task_type="SEQ_CLS",
    )
    assert config.target_modules == ["q_proj", "v_proj"] and config.exclude_modules == ["a", "b"]
    again = PeftConfig.from_dict(json.loads(config.to_json_string()))
    assert type(again) is HRAConfig and again.to_dict() == config.to_dict()


def test_reference_written_config_reads_back():
    written = {
        "apply_GS": False,
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "exclude_modules": None,
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "peft_type": "HRA",
        "peft_version": "0.21.2",
        "r": 8,
        "revision": None,
        "target_modules": ["v_proj", "q_proj"],
        "task_type": "CAUSAL_LM",
    }
    config = PeftConfig.from_dict(written)
    assert isinstance(config, HRAConfig)
    assert config.to_dict() == written


@pytest.mark.parametrize("r", [0, -2, 2.0, True, "8"])
def test_r_must_be_a_positive_integer(r):
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        HRAConfig(r=r)


@pytest.mark.parametrize("option", ["apply_GS", "init_weights"])
def test_flags_must_be_booleans(option):
    with pytest.raises(ConfigError, match=option):
        HRAConfig(**{option: "yes"})


def test_bias_must_be_a_known_mode():
    with pytest.raises(ConfigError, match=r"'none', 'all', 'hra_only'.*lora_only"):
        HRAConfig(bias="lora_only")


def test_layer_selection_rules_are_the_references():
    with pytest.raises(ConfigError, match="layers_to_transform=.*regex"):
        HRAConfig(target_modules=r".*q_proj", layers_to_transform=[0])
    with pytest.raises(ConfigError, match="layers_pattern=.*regex"):
        HRAConfig(target_modules=r".*q_proj", layers_pattern="layers")
    with pytest.raises(ConfigError, match="needs layers_to_transform"):
        HRAConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(ConfigError, match="layers_to_transform must be"):
        HRAConfig(target_modules=["q_proj"], layers_to_transform=["0"])
    with pytest.raises(ConfigError, match="layers_pattern must be"):
        HRAConfig(target_modules=["q_proj"], layers_to_transform=0, layers_pattern=3)
    config = HRAConfig(target_modules=["q_proj"], layers_to_transform=1, layers_pattern=["layers", "h"])
    assert config.layers_to_transform == 1 and config.layers_pattern == ["layers", "h"]


# ---------------------------------------------------------------------- preparation
def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )


def test_llama_defaults_are_q_and_v_proj():
    model = get_peft_model(_tiny_llama(), HRAConfig(task_type="CAUSAL_LM", r=4))
    assert model.peft_config["default"].target_modules == ["q_proj", "v_proj"]
    names = sorted(n for n, _ in model.base_model.named_adapter_layers())
    assert len(names) == 6 and all(n.endswith(("q_proj", "v_proj")) for n in names)


def test_layers_to_transform_selects_layer_indices():
    config = HRAConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0, 2], layers_pattern="layers")
    model = get_peft_model(_tiny_llama(), config)
    assert sorted(n for n, _ in model.base_model.named_adapter_layers()) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.2.self_attn.q_proj",
    ]


def test_regex_defaults_for_gemma4_are_applied_as_a_regex():
    model = HRAModel.__new__(HRAModel)  # only the config preparation is exercised
    nn.Module.__init__(model)
    model.spec = get_registry().method("HRA")
    prepared = model._prepare_adapter_config(HRAConfig(), {"model_type": "gemma4"})
    assert prepared.target_modules == r".*language_model\..*\.(q_proj|v_proj)"
    with pytest.raises(ConfigError, match="no default targets for model_type 'unknown'"):
        model._prepare_adapter_config(HRAConfig(), {"model_type": "unknown"})


# ---------------------------------------------------------------------- registration and dispatch
def test_registered_method_spec():
    spec = get_registry().method("HRA")
    assert spec.config_cls is HRAConfig and spec.model_cls is HRAModel
    assert spec.prefix == "hra_" and spec.plugin
    caps = spec.capabilities
    assert caps.mergeable and caps.identity_init and not caps.prompt_learning
    assert not caps.mixable  # a rotation of the whole weight does not commute with other methods' merges
    assert dict(spec.default_target_modules) == DEFAULT_TARGET_MODULES


def test_entry_point_is_declared():
    (entry,) = [ep for ep in entry_points(group="peft_core") if ep.name == "hra"]
    assert entry.value == "peft_hra.plugin"
    assert entry.load() is plugin


def test_importing_the_plugin_does_not_import_transformers():
    code = "import sys, peft_hra, peft_hra.plugin; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


FACTORIES = {
    plugin.linear_factory: (Linear, lambda: nn.Linear(4, 4)),
    plugin.conv2d_factory: (Conv2d, lambda: nn.Conv2d(4, 4, 1)),
}


@pytest.mark.parametrize("factory", list(FACTORIES), ids=lambda f: f.__name__)
def test_each_factory_handles_exactly_its_base_type(factory):
    config = HRAConfig(target_modules=["m"], r=2)
    context = LayerContext(key="m")
    layer_cls, _ = FACTORIES[factory]
    for other, (_, other_build) in FACTORIES.items():
        made = factory(other_build(), "default", config, context)
        assert isinstance(made, layer_cls) if other is factory else made is None
    for unsupported in (nn.Embedding(4, 4), nn.Conv1d(4, 4, 1), nn.Conv3d(4, 4, 1), nn.LayerNorm(4)):
        assert factory(unsupported, "default", config, context) is None
    # an adapter layer (of any method) is not wrapped again: HRA does not stack
    wrapped = factory(FACTORIES[factory][1](), "default", config, context)
    assert factory(wrapped, "other", config, context) is None


def test_integer_weights_are_left_to_quantization_backends():
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    assert plugin.linear_factory(layer, "default", HRAConfig(r=2), LayerContext(key="m")) is None


@pytest.mark.parametrize(
    "module",
    [nn.Conv1d(6, 6, 1), nn.Embedding(6, 6), nn.Conv3d(6, 6, 1)],
    ids=["conv1d", "embedding", "conv3d"],
)
def test_unsupported_targets_are_named_in_the_error(module):
    model = nn.Sequential(module)
    with pytest.raises(TargetModulesError, match=r"Target module '0' is a torch\.nn\..*HRA cannot wrap"):
        get_peft_model(model, HRAConfig(target_modules=["0"], r=2))
    assert not isinstance(model[0], HRALayer)


def test_trainable_parameters_are_the_vectors_only():
    model = get_peft_model(
        nn.Sequential(nn.Linear(6, 8), nn.Conv2d(8, 4, 3)), HRAConfig(target_modules=["0", "1"], r=4)
    )
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "base_model.model.0.hra_u.default": (6, 4),
        "base_model.model.1.hra_u.default": (72, 4),
    }


@pytest.mark.parametrize(("bias", "expected"), [("none", set()), ("hra_only", {"0"}), ("all", {"0", "2"})])
def test_bias_option_trains_and_saves_biases_but_not_for_inference(tmp_path, bias, expected):
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))

    model = get_peft_model(build(), HRAConfig(target_modules=["0"], r=2, bias=bias))
    trained = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert trained == expected
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(build(), tmp_path, is_trainable=True)
    assert {
        n.split(".")[2] for n, p in trainable.named_parameters() if p.requires_grad and n.endswith("bias")
    } == (expected)
