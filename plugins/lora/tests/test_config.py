"""LoraConfig: defaults, validation, refusal of unsupported features, JSON round trip."""

from __future__ import annotations

import json

import pytest
from peft_core.config import PeftConfig
from peft_core.errors import ConfigError

from peft_lora import LoraConfig


def test_defaults_match_the_reference_values():
    config = LoraConfig()
    assert config.peft_type == "LORA"
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 8, 0.0)
    assert config.bias == "none" and config.init_lora_weights is True
    assert config.rank_pattern == {} and config.alpha_pattern == {}
    assert config.loftq_config == {} and config.megatron_core == "megatron.core"
    assert config.qalora_group_size == 16
    assert not (config.use_dora or config.use_rslora or config.lora_bias or config.fan_in_fan_out)


def test_json_round_trip_and_runtime_config_is_not_written(tmp_path):
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={r"layers\.0\.v_proj": 3},
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        modules_to_save=["score"],
        use_dora=True,
        init_lora_weights="gaussian",
        task_type="CAUSAL_LM",
    )
    data = config.to_dict()
    assert "runtime_config" not in data
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LoraConfig)
    assert loaded == config
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_module_name_sets_become_sorted_lists():
    config = LoraConfig(target_modules={"v_proj", "q_proj"}, exclude_modules=("k_proj",))
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.exclude_modules == ["k_proj"]
    assert LoraConfig(target_modules=r".*\.q_proj").target_modules == r".*\.q_proj"


def test_none_patterns_mean_no_pattern():
    assert LoraConfig(rank_pattern=None, alpha_pattern=None).rank_pattern == {}


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -3}, "r must be a positive integer"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern['q']"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"bias": "some"}, "bias must be one of"),
        ({"init_lora_weights": "xavier"}, "Unknown init_lora_weights"),
        ({"init_lora_weights": "pissa_niter_x"}, "Unknown init_lora_weights"),
        ({"target_modules": "q.*", "layers_to_transform": [0]}, "layers_to_transform cannot be used"),
        ({"target_modules": "q.*", "layers_pattern": "layers"}, "layers_pattern cannot be used"),
        ({"target_modules": ["q"], "layers_pattern": "layers"}, "needs layers_to_transform"),
        ({"lora_bias": True, "init_lora_weights": "pissa"}, "lora_bias=True is only supported"),
        ({"lora_bias": True, "use_dora": True}, "use_dora=True"),
        ({"task_type": "NOT_A_TASK"}, "Unknown task_type"),
        ({"modules_to_save": "classifier"}, "wrap a single name in a list"),
        ({"target_modules": 3}, "Expected a list of module names"),
        ({"layers_to_transform": "0"}, "layers_to_transform must be"),
    ],
)
def test_invalid_values_and_combinations_are_refused(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        LoraConfig(**kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("megatron_config", {"tensor_model_parallel_size": 2}),
        ("megatron_core", "my.megatron"),
        ("trainable_token_indices", [0, 1]),
        ("lora_ga_config", {"direction": "ArB2r"}),
        ("velora_config", {"num_groups": 64}),
        ("alora_invocation_tokens", [1, 2]),
        ("use_qalora", True),
        ("qalora_group_size", 32),
        ("monteclora_config", {"num_samples": 8}),
        ("layer_replication", [[0, 1]]),
        ("runtime_config", {"ephemeral_gpu_offload": True}),
        ("target_parameters", ["experts.gate_up_proj"]),
        ("use_bdlora", {"nblocks": 2}),
        ("arrow_config", {"top_k": 3}),
        ("kasa_config", {"beta": 0.1}),
        ("ensure_weight_tying", True),
    ],
)
def test_unsupported_features_are_refused_by_name(option, value):
    with pytest.raises(ConfigError) as info:
        LoraConfig(**{option: value})
    message = str(info.value)
    assert option in message and "not supported yet by peft-lora" in message


@pytest.mark.parametrize("init", ["orthogonal", "mica", "lora_ga"])
def test_unsupported_inits_are_refused_by_name(init):
    with pytest.raises(ConfigError, match=f"init_lora_weights='{init}' is not supported yet by peft-lora"):
        LoraConfig(init_lora_weights=init)


@pytest.mark.parametrize(
    "init", [True, False, "gaussian", "pissa", "pissa_niter_0", "pissa_niter_16", "olora"]
)
def test_supported_inits_are_accepted(init):
    assert LoraConfig(init_lora_weights=init).init_lora_weights == init


@pytest.mark.parametrize(
    ("init", "option", "value", "filled"),
    [
        ("eva", "eva_config", {"rho": 1.5}, {"rho": 1.5, "tau": 0.99, "whiten": False}),
        ("corda", "corda_config", {"corda_method": "kpm"}, {"corda_method": "kpm", "cache_file": None}),
        ("loftq", "loftq_config", {"loftq_iter": 2}, {"loftq_bits": 4, "loftq_iter": 2}),
    ],
)
def test_init_sub_configs_are_filled_with_the_reference_defaults(init, option, value, filled):
    config = LoraConfig(init_lora_weights=init, **{option: value})
    assert filled.items() <= getattr(config, option).items()
    assert PeftConfig.from_dict(config.to_dict()) == config


def test_reference_default_json_loads_without_warnings(recwarn):
    """The exact key set the reference writes (all defaults) is known here, so nothing is dropped."""
    data = LoraConfig(target_modules=["q"]).to_dict()
    data["peft_version"] = "0.21.2"
    assert PeftConfig.from_dict(data) == LoraConfig(target_modules=["q"], peft_version="0.21.2")
    assert not [w for w in recwarn if "Ignoring keys" in str(w.message)]


def test_copy_revalidates():
    with pytest.raises(ConfigError):
        LoraConfig().copy(r=0)
