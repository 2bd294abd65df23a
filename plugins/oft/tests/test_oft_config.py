"""OFTConfig: defaults, validation, JSON round trip; registration and the layer factories."""

from __future__ import annotations

import json
import warnings
from importlib.metadata import entry_points

import pytest
import torch
from peft_core import get_peft_model
from peft_core.config import PeftConfig
from peft_core.default_targets import LORA_STYLE_DEFAULT_TARGETS as DEFAULT_TARGET_MODULES
from peft_core.errors import ConfigError, TargetModulesError
from peft_core.plugins import get_registry
from peft_core.registry import LayerContext
from torch import nn

from peft_oft import OFTConfig, plugin
from peft_oft.layer import Conv2d, Embedding, Linear, OFTLayer
from peft_oft.model import OFTModel


def test_defaults_are_the_references():
    config = OFTConfig()
    assert config.peft_type == "OFT"
    assert (config.r, config.oft_block_size, config.module_dropout) == (0, 32, 0.0)
    assert (config.coft, config.eps, config.block_share) == (False, 6e-5, False)
    assert (config.use_cayley_neumann, config.num_cayley_neumann_terms) == (True, 5)
    assert (config.init_weights, config.fan_in_fan_out, config.bias) == (True, False, "none")
    assert config.target_modules is None and config.exclude_modules is None and config.modules_to_save is None
    assert config.layers_to_transform is None and config.layers_pattern is None


def test_json_round_trip_and_sets_become_sorted_lists(tmp_path):
    config = OFTConfig(
        r=4,
        oft_block_size=0,
        module_dropout=0.1,
        target_modules={"v_proj", "q_proj"},
        exclude_modules=("k_proj",),
        bias="oft_only",
        init_weights=False,
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        modules_to_save=["score"],
        coft=True,
        eps=1e-3,
        block_share=True,
        use_cayley_neumann=False,
        num_cayley_neumann_terms=7,
        task_type="CAUSAL_LM",
    )
    assert config.target_modules == ["q_proj", "v_proj"] and config.exclude_modules == ["k_proj"]
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        data["peft_type"] == "OFT" and data["r"] == 4 and data["oft_block_size"] == 0 and data["coft"] is True
    )
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, OFTConfig) and loaded == config


@pytest.mark.compat
def test_field_names_are_exactly_the_references():
    peft = pytest.importorskip("peft")
    import dataclasses

    import attrs

    ours = {a.name for a in attrs.fields(OFTConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.OFTConfig)}
    # Fields every reference config has but the core keeps elsewhere or does not write.
    assert ours <= theirs, sorted(ours - theirs)
    method_fields = theirs - {f.name for f in dataclasses.fields(peft.PeftConfig)}
    assert method_fields <= ours, sorted(method_fields - ours)
    defaults = peft.OFTConfig()
    for name in method_fields:
        assert getattr(OFTConfig(), name) == getattr(defaults, name) or name == "target_modules", name


@pytest.mark.compat
def test_reference_written_config_reads_back(tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"], coft=True, block_share=True)
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every field is known
        ours = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(ours, OFTConfig)
    assert (ours.oft_block_size, ours.coft, ours.block_share, ours.target_modules) == (
        4,
        True,
        True,
        ["q_proj"],
    )


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"r": 0, "oft_block_size": 0}, "Either r or oft_block_size must be non-zero"),
        ({"r": 4, "oft_block_size": 8}, "Set only one of r"),
        ({"r": -1, "oft_block_size": 0}, "r must be a non-negative integer"),
        ({"oft_block_size": 2.5}, "oft_block_size must be a non-negative integer"),
        ({"oft_block_size": True}, "oft_block_size must be a non-negative integer"),
        ({"num_cayley_neumann_terms": -2}, "num_cayley_neumann_terms must be"),
        ({"module_dropout": 1.5}, "module_dropout must be a probability"),
        ({"eps": 0}, "eps .* must be a positive number"),
        ({"coft": "yes"}, "coft must be True or False"),
        ({"block_share": 1}, "block_share must be True or False"),
        ({"use_cayley_neumann": None}, "use_cayley_neumann must be True or False"),
        ({"init_weights": "gaussian"}, "init_weights must be True or False"),
        ({"bias": "lora_only"}, "bias must be one of"),
        ({"layers_pattern": "layers"}, "needs layers_to_transform"),
        ({"layers_to_transform": "0"}, "layers_to_transform must be"),
        ({"target_modules": 3}, "Expected a list of module names"),
        ({"peft_type": "LORA"}, "is for peft_type 'OFT'"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        OFTConfig(**kwargs)


def test_unset_peft_version_is_the_reference_format_version():
    # The reference refuses a Cayley-Neumann OFT config whose peft_version is missing or null.
    assert OFTConfig().peft_version == "0.21.2"
    assert OFTConfig(peft_version="0.19.0").peft_version == "0.19.0"
    assert PeftConfig.from_dict({"peft_type": "OFT", "peft_version": None}).peft_version == "0.21.2"


def test_old_cayley_neumann_adapters_warn():
    with pytest.warns(UserWarning, match="before peft 0.18.0"):
        OFTConfig(peft_version="0.17.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OFTConfig(peft_version="0.21.2@abcdef")
        OFTConfig(peft_version="0.17.1", use_cayley_neumann=False)


def test_unknown_keys_from_newer_versions_are_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="some_future_option"):
        config = PeftConfig.from_dict({"peft_type": "OFT", "oft_block_size": 4, "some_future_option": 1})
    assert isinstance(config, OFTConfig) and config.oft_block_size == 4


@pytest.mark.compat
def test_default_targets_are_the_references():
    utils = pytest.importorskip("peft.utils")
    reference = utils.TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING
    ours = {k: v if isinstance(v, str) else list(v) for k, v in DEFAULT_TARGET_MODULES.items()}
    assert ours == {k: v if isinstance(v, str) else list(v) for k, v in reference.items()}


# ---------------------------------------------------------------------- registration and dispatch
def test_registered_method_spec():
    spec = get_registry().method("OFT")
    assert spec.config_cls is OFTConfig and spec.model_cls is OFTModel
    assert spec.prefix == "oft_" and spec.plugin
    caps = spec.capabilities
    assert caps.mergeable and caps.mixable and caps.identity_init and not caps.prompt_learning
    assert dict(spec.default_target_modules) == DEFAULT_TARGET_MODULES


def test_entry_point_is_declared():
    (entry,) = [ep for ep in entry_points(group="peft_core") if ep.name == "oft"]
    assert entry.value == "peft_oft.plugin"
    assert entry.load() is plugin


FACTORIES = {
    plugin.linear_factory: (Linear, lambda: nn.Linear(4, 4)),
    plugin.conv2d_factory: (Conv2d, lambda: nn.Conv2d(4, 4, 1)),
    plugin.embedding_factory: (Embedding, lambda: nn.Embedding(5, 4)),
}


@pytest.mark.parametrize("factory", list(FACTORIES), ids=lambda f: f.__name__)
def test_each_factory_handles_exactly_its_base_type(factory):
    config = OFTConfig(target_modules=["m"], oft_block_size=2)
    context = LayerContext(key="m")
    layer_cls, _ = FACTORIES[factory]
    for other, (_, other_build) in FACTORIES.items():
        made = factory(other_build(), "default", config, context)
        assert isinstance(made, layer_cls) if other is factory else made is None
    assert factory(nn.Conv1d(4, 4, 1), "default", config, context) is None
    assert factory(nn.Conv3d(4, 4, 1), "default", config, context) is None


def test_fan_in_fan_out_is_corrected_per_layer_with_a_warning():
    config = OFTConfig(target_modules=["m"], oft_block_size=2, fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="fan_in_fan_out=False"):
        layer = plugin.linear_factory(nn.Linear(4, 3), "default", config, LayerContext(key="m"))
    assert isinstance(layer, Linear)


def test_unsupported_targets_are_named_in_the_error():
    from transformers.pytorch_utils import Conv1D

    for module in (nn.Conv1d(6, 6, 1), Conv1D(6, 6), nn.Conv3d(2, 2, 1)):
        model = nn.Sequential(module)
        with pytest.raises(TargetModulesError, match=r"'0' is a .*which OFT cannot wrap"):
            get_peft_model(model, OFTConfig(target_modules=["0"], oft_block_size=2))
        assert not isinstance(model[0], OFTLayer)


def test_grouped_conv_is_refused_naming_the_module():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"'0'.*groups=2"):
        get_peft_model(model, OFTConfig(target_modules=["0"], oft_block_size=2))


def test_llama_defaults_fill_targets():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    model = get_peft_model(transformers.LlamaForCausalLM(config), OFTConfig(oft_block_size=4))
    assert sorted(model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
    adapted = sorted(n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, OFTLayer))
    assert adapted == ["q_proj", "v_proj"]


def test_trainable_parameters_are_the_rotations_only():
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))
    model = get_peft_model(model, OFTConfig(target_modules=["0", "2"], oft_block_size=2))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base_model.model.0.oft_R.default.weight", "base_model.model.2.oft_R.default.weight"]
    # 4 blocks of size 2 (one parameter each), then 3 blocks of size 2
    assert model.get_nb_trainable_parameters() == (4 + 3, 8 * 6 + 6 + 6 * 4 + 4 + 7)
