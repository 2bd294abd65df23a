"""BOFTConfig, registration, layer dispatch, BOFTModel's rules and the checkpoint converter."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from importlib.metadata import entry_points

import pytest
import torch
from peft_core import PeftConfig, PeftModel, get_peft_model
from peft_core.default_targets import LORA_STYLE_DEFAULT_TARGETS as DEFAULT_TARGET_MODULES
from peft_core.errors import ConfigError, TargetModulesError
from peft_core.plugins import get_registry
from peft_core.registry import LayerContext
from torch import nn

from peft_boft import BOFTConfig, plugin
from peft_boft.layer import Conv2d, Linear
from peft_boft.model import BOFTModel


# ---------------------------------------------------------------------- the config
def test_defaults_are_the_references():
    data = BOFTConfig().to_dict()
    assert data["peft_type"] == "BOFT"
    assert {k: data[k] for k in data if k.startswith("boft_")} == {
        "boft_block_size": 4,
        "boft_block_num": 0,
        "boft_n_butterfly_factor": 1,
        "boft_dropout": 0.0,
    }
    assert data["bias"] == "none" and data["fan_in_fan_out"] is False and data["init_weights"] is True
    for key in (
        "target_modules",
        "exclude_modules",
        "modules_to_save",
        "layers_to_transform",
        "layers_pattern",
    ):
        assert data[key] is None, key


def test_json_round_trip_and_sets_become_sorted_lists():
    config = BOFTConfig(
        target_modules={"v_proj", "q_proj"},
        exclude_modules={"b", "a"},
        boft_block_size=0,
        boft_block_num=8,
        boft_n_butterfly_factor=2,
        boft_dropout=0.1,
        bias="boft_only",
        layers_to_transform=(0, 1),
        layers_pattern="layers",
        task_type="CAUSAL_LM",
    )
    assert config.target_modules == ["q_proj", "v_proj"] and config.exclude_modules == ["a", "b"]
    assert config.layers_to_transform == [0, 1]
    again = PeftConfig.from_dict(json.loads(config.to_json_string()))
    assert type(again) is BOFTConfig and again.to_dict() == config.to_dict()


def test_reference_written_config_reads_back():
    written = {
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "boft_block_num": 0,
        "boft_block_size": 4,
        "boft_dropout": 0.0,
        "boft_n_butterfly_factor": 1,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "peft_type": "BOFT",
        "peft_version": "0.21.2",
        "revision": None,
        "target_modules": ["v_proj", "q_proj"],
        "task_type": "CAUSAL_LM",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key is known
        config = PeftConfig.from_dict(written)
    assert type(config) is BOFTConfig
    assert config.to_dict() == written


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"boft_block_size": 0, "boft_block_num": 0},
            r"Either boft_block_size or boft_block_num must be non-zero",
        ),
        (
            {"boft_block_num": 2},
            r"Set only one of boft_block_size \(4\) and boft_block_num \(2\).*boft_block_size=0",
        ),
        ({"boft_block_size": -4}, r"boft_block_size must be a non-negative integer"),
        ({"boft_block_size": True}, r"boft_block_size must be a non-negative integer"),
        ({"boft_block_size": 0, "boft_block_num": 2.0}, r"boft_block_num must be a non-negative integer"),
        ({"boft_n_butterfly_factor": 0}, r"boft_n_butterfly_factor must be a positive integer"),
        ({"boft_n_butterfly_factor": 1.5}, r"boft_n_butterfly_factor must be a positive integer"),
        ({"boft_dropout": 1.5}, r"boft_dropout must be a probability in \[0, 1\]"),
        ({"boft_dropout": "0.1"}, r"boft_dropout must be a probability"),
        ({"bias": "lora_only"}, r"bias must be one of \['none', 'all', 'boft_only'\]"),
        ({"fan_in_fan_out": "yes"}, r"fan_in_fan_out must be True or False"),
        ({"init_weights": "gaussian"}, r"init_weights must be True or False"),
        ({"layers_pattern": "layers"}, r"layers_pattern='layers' needs layers_to_transform"),
        ({"layers_to_transform": "0"}, r"layers_to_transform must be an int, a list of ints"),
        ({"modules_to_save": "head"}, r"modules_to_save must be a list of module names"),
        ({"target_modules": 3}, r"Expected a list of module names, a regex string or None"),
        ({"peft_type": "LORA"}, r"BOFTConfig is for peft_type 'BOFT'"),
    ],
)
def test_bad_values_are_refused_naming_the_field_and_fix(options, message):
    with pytest.raises(ConfigError, match=message):
        BOFTConfig(**options)


def test_layers_to_transform_with_a_regex_target_warns_that_it_is_ignored():
    with pytest.warns(UserWarning, match="no effect when target_modules is a regex"):
        BOFTConfig(target_modules=r".*\.q_proj", layers_to_transform=[0])


# ---------------------------------------------------------------------- registration
def test_registered_method_spec():
    spec = get_registry().method("BOFT")
    assert spec.config_cls is BOFTConfig and spec.model_cls is BOFTModel
    assert spec.prefix == "boft_" and spec.plugin
    caps = spec.capabilities
    assert caps.mergeable and caps.identity_init
    assert not caps.mixable and not caps.prompt_learning and not caps.mixed_batch
    assert dict(spec.default_target_modules) == DEFAULT_TARGET_MODULES
    assert spec.default_target_modules["llama"] == ("q_proj", "v_proj")
    assert "boft-single-factor-checkpoint" in dict(get_registry().state_dict_converters())


def test_entry_point_is_declared():
    (entry,) = [ep for ep in entry_points(group="peft_core") if ep.name == "boft"]
    assert entry.value == "peft_boft.plugin"
    assert entry.load() is plugin


def test_importing_the_plugin_does_not_import_transformers():
    code = "import sys, peft_boft, peft_boft.plugin; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_core_exports_the_config_by_name():
    import peft_core

    assert peft_core.BOFTConfig is BOFTConfig


# ---------------------------------------------------------------------- dispatch
CONTEXT = LayerContext(key="block.layer")


def test_factories_build_the_layer_for_their_type_only():
    config = BOFTConfig(target_modules=["layer"], boft_block_size=2)
    assert isinstance(plugin.linear_factory(nn.Linear(4, 4), "default", config, CONTEXT), Linear)
    assert isinstance(plugin.conv2d_factory(nn.Conv2d(2, 2, 1), "default", config, CONTEXT), Conv2d)
    assert plugin.linear_factory(nn.Conv2d(2, 2, 1), "default", config, CONTEXT) is None
    assert plugin.conv2d_factory(nn.Linear(4, 4), "default", config, CONTEXT) is None
    assert plugin.unsupported_layer_factory(nn.LayerNorm(4), "default", config, CONTEXT) is None


class Int8Linear(nn.Linear):
    """Stands in for a quantized linear: an nn.Linear subclass with an integer weight."""

    def __init__(self) -> None:
        super().__init__(4, 4)
        self.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)


def test_quantized_linears_are_left_to_a_quantization_backend():
    config = BOFTConfig(target_modules=["layer"], boft_block_size=2)
    assert plugin.linear_factory(Int8Linear(), "default", config, CONTEXT) is None


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv1 = nn.Conv1d(8, 8, 1)
        self.conv3 = nn.Conv3d(2, 2, 1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.emb(ids)))


@pytest.mark.parametrize("target", ["emb", "conv1", "conv3"])
def test_layer_types_boft_does_not_adapt_are_refused_naming_module_and_reason(target):
    with pytest.raises(
        TargetModulesError, match=rf"'{target}' is a torch\.nn\..*nn\.Linear and nn\.Conv2d layers only"
    ):
        get_peft_model(Zoo(), BOFTConfig(target_modules=[target]))


def test_transformers_conv1d_is_refused_naming_module_and_reason():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential()
    model.add_module("c_attn", Conv1D(8, 8))
    with pytest.raises(TargetModulesError, match=r"'c_attn' is a transformers\.pytorch_utils\.Conv1D"):
        get_peft_model(model, BOFTConfig(target_modules=["c_attn"], fan_in_fan_out=True))


def test_other_module_types_get_the_cores_error():
    with pytest.raises(TargetModulesError, match=r"'norm' is a torch\.nn\.modules\.normalization\.LayerNorm"):
        get_peft_model(Zoo(), BOFTConfig(target_modules=["norm"]))


def test_another_methods_adapter_layer_is_not_wrapped():
    from peft_core.layer import AdapterLayer

    class Other(AdapterLayer):
        adapter_layer_names = ("other_A",)

        def update_layer(self, adapter_name, config, *, key="", **kwargs):
            raise NotImplementedError

        def forward(self, x):
            return self.base_layer(x)

    config = BOFTConfig(target_modules=["layer"], boft_block_size=2)
    with pytest.raises(TargetModulesError, match="another method"):
        plugin.linear_factory(Other(nn.Linear(4, 4)), "default", config, CONTEXT)


def test_fan_in_fan_out_on_a_linear_is_corrected_with_a_warning():
    with pytest.warns(UserWarning, match="fan_in_fan_out=False"):
        model = get_peft_model(Zoo(), BOFTConfig(target_modules=["fc"], fan_in_fan_out=True))
    assert model.peft_config["default"].fan_in_fan_out is True  # the config is not rewritten


def test_block_geometry_errors_name_the_layer():
    with pytest.raises(ConfigError, match=r"'fc' \(in_features=8\).*boft_block_size=3"):
        get_peft_model(Zoo(), BOFTConfig(target_modules=["fc"], boft_block_size=3))


# ---------------------------------------------------------------------- the model class
def test_default_targets_for_llama_are_q_and_v():
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=32,
        )
    )
    model = get_peft_model(base, BOFTConfig())
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, Linear)}
    assert adapted == {"q_proj", "v_proj"}
    assert sorted(model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]


def test_regex_default_targets_and_missing_defaults():
    model = BOFTModel.__new__(BOFTModel)
    nn.Module.__init__(model)
    model.spec = get_registry().method("BOFT")
    prepared = model._prepare_adapter_config(BOFTConfig(), {"model_type": "gemma4"})
    assert prepared.target_modules == DEFAULT_TARGET_MODULES["gemma4"]
    with pytest.raises(ConfigError, match="no default targets for model_type 'unknown'"):
        model._prepare_adapter_config(BOFTConfig(), {"model_type": "unknown"})


def test_biases_stay_frozen_when_loaded_for_inference(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(Zoo(), BOFTConfig(target_modules=["fc"], bias="boft_only", init_weights=False))
    assert "base_model.model.fc.base_layer.bias" in {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    frozen = PeftModel.from_pretrained(Zoo(), tmp_path)
    assert not [n for n, p in frozen.named_parameters() if p.requires_grad]
    torch.manual_seed(0)
    trainable = PeftModel.from_pretrained(Zoo(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        "base_model.model.fc.base_layer.bias",
        "base_model.model.fc.boft_R.default",
        "base_model.model.fc.boft_s.default",
    }


# ---------------------------------------------------------------------- the checkpoint converter
def test_single_factor_checkpoints_are_padded_with_identity_factors():
    state = {
        "base_model.model.fc.boft_R": torch.randn(1, 2, 4, 4),
        "base_model.model.fc.boft_s": torch.randn(8, 1),
    }
    config = BOFTConfig(target_modules=["fc"], boft_n_butterfly_factor=3)
    with pytest.warns(UserWarning, match="without its CUDA extension"):
        converted = plugin.pad_single_factor_checkpoint(state, config)
    assert converted is not None
    padded = converted["base_model.model.fc.boft_R"]
    assert padded.shape == (3, 2, 4, 4)
    assert torch.equal(padded[0], state["base_model.model.fc.boft_R"][0]) and not padded[1:].any()
    assert converted["base_model.model.fc.boft_s"] is state["base_model.model.fc.boft_s"]


def test_the_converter_leaves_other_checkpoints_alone():
    state = {"base_model.model.fc.boft_R": torch.randn(2, 2, 4, 4)}
    assert plugin.pad_single_factor_checkpoint(state, BOFTConfig(boft_n_butterfly_factor=2)) is None
    assert plugin.pad_single_factor_checkpoint({"x.boft_R": torch.randn(1, 2, 4, 4)}, BOFTConfig()) is None
    assert plugin.pad_single_factor_checkpoint(state, object()) is None


def test_padding_keeps_the_outputs(tmp_path):
    """A one-factor adapter, read under a three-factor config, computes exactly the same."""
    torch.manual_seed(0)
    model = get_peft_model(
        Zoo(), BOFTConfig(target_modules=["fc"], boft_block_size=2, init_weights=False)
    ).eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected = model(ids)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["boft_n_butterfly_factor"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="without its CUDA extension"):
        loaded = PeftModel.from_pretrained(Zoo(), tmp_path).eval()
    assert loaded.base_model.model.fc.boft_R["default"].shape == (3, 4, 2, 2)
    with torch.no_grad():
        assert torch.equal(loaded(ids), expected)
