"""LoHaConfig: defaults, validation, JSON round trip."""

from __future__ import annotations

import json

import pytest
from peft_core.config import PeftConfig
from peft_core.errors import ConfigError

from peft_loha import LoHaConfig


def test_defaults_match_the_reference_values():
    config = LoHaConfig()
    assert config.peft_type == "LOHA"
    assert (config.r, config.alpha, config.rank_dropout, config.module_dropout) == (8, 8, 0.0, 0.0)
    assert config.init_weights is True and config.use_effective_conv2d is False
    assert config.rank_pattern == {} and config.alpha_pattern == {}
    assert config.target_modules is None and config.exclude_modules is None and config.modules_to_save is None
    assert config.layers_to_transform is None and config.layers_pattern is None


def test_json_round_trip(tmp_path):
    config = LoHaConfig(
        r=4,
        alpha=16,
        rank_dropout=0.1,
        module_dropout=0.2,
        use_effective_conv2d=True,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["k_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={r"layers\.0\.v_proj": 3.5},
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        modules_to_save=["score"],
        init_weights=False,
        task_type="CAUSAL_LM",
    )
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LOHA" and data["alpha"] == 16 and data["use_effective_conv2d"] is True
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LoHaConfig)
    assert loaded == config


def test_module_name_sets_become_sorted_lists_and_none_patterns_mean_none():
    config = LoHaConfig(target_modules={"v_proj", "q_proj"}, exclude_modules=("k_proj",), rank_pattern=None)
    assert config.target_modules == ["q_proj", "v_proj"] and config.exclude_modules == ["k_proj"]
    assert config.rank_pattern == {}
    assert LoHaConfig(target_modules=r".*\.q_proj").target_modules == r".*\.q_proj"


def test_unknown_keys_from_newer_versions_are_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="some_future_option"):
        config = PeftConfig.from_dict({"peft_type": "LOHA", "r": 2, "some_future_option": 1})
    assert isinstance(config, LoHaConfig) and config.r == 2


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": True}, "r must be a positive integer"),
        ({"alpha": "8"}, "alpha must be a number"),
        ({"rank_dropout": 1.5}, "rank_dropout must be a probability"),
        ({"module_dropout": -0.1}, "module_dropout must be a probability"),
        ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\] must be a positive integer"),
        ({"alpha_pattern": {"q": None}}, r"alpha_pattern\['q'\] must be a number"),
        ({"rank_pattern": [("q", 2)]}, "Expected a dict"),
        ({"layers_pattern": "layers"}, "needs layers_to_transform"),
        ({"layers_to_transform": "0"}, "layers_to_transform must be"),
        ({"init_weights": "lycoris"}, "init_weights must be True"),
        ({"target_modules": 3}, "Expected a list of module names"),
        ({"peft_type": "LORA"}, "is for peft_type 'LOHA'"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        LoHaConfig(**kwargs)


def test_layers_to_transform_with_a_regex_is_accepted_with_a_warning():
    with pytest.warns(UserWarning, match="has no effect when target_modules is a regex"):
        LoHaConfig(target_modules=r".*q_proj", layers_to_transform=[0])


def test_config_is_exported_through_the_core():
    import peft_core

    assert peft_core.LoHaConfig is LoHaConfig
