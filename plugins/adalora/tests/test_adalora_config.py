"""AdaLoraConfig: defaults, validation, JSON round trip, registration and default targets."""

from __future__ import annotations

import json
import warnings
from importlib.metadata import entry_points

import pytest
from peft_core import PeftConfig
from peft_core.errors import ConfigError
from peft_core.plugins import get_registry

from peft_adalora import AdaLoraConfig, plugin
from peft_adalora.default_targets import DEFAULT_TARGET_MODULES, DEFAULT_TARGET_REGEXES
from peft_adalora.model import AdaLoraModel


def make(**options) -> AdaLoraConfig:
    return AdaLoraConfig(**{"total_step": 100, "target_modules": ["q"], **options})


# ---------------------------------------------------------------------- defaults and round trip
def test_defaults_are_the_references():
    data = make().to_dict()
    assert data["peft_type"] == "ADALORA"
    assert {k: data[k] for k in ("target_r", "init_r", "tinit", "tfinal", "deltaT")} == {
        "target_r": 8,
        "init_r": 12,
        "tinit": 0,
        "tfinal": 0,
        "deltaT": 1,
    }
    assert (data["beta1"], data["beta2"], data["orth_reg_weight"]) == (0.85, 0.85, 0.5)
    assert data["rank_pattern"] is None and data["alpha_pattern"] == {}
    assert (data["r"], data["lora_alpha"], data["lora_dropout"], data["init_lora_weights"]) == (
        8,
        8,
        0.0,
        True,
    )
    assert "runtime_config" not in data  # runtime only, as in the reference


def test_json_round_trip_with_a_rank_pattern():
    config = make(
        rank_pattern={"model.q.lora_E": [True, False, True]},
        target_modules={"v", "q"},
        task_type="CAUSAL_LM",
    )
    assert config.target_modules == ["q", "v"]
    again = PeftConfig.from_dict(json.loads(config.to_json_string()))
    assert type(again) is AdaLoraConfig and again.to_dict() == config.to_dict()
    assert again.rank_pattern == {"model.q.lora_E": [True, False, True]}


def test_a_reference_written_config_reads_back_without_warnings():
    written = {
        **make().to_dict(),
        "peft_version": "0.21.2",
        "inference_mode": True,
        "target_modules": ["v", "q"],
        "total_step": 40,
        "tinit": 5,
        "tfinal": 10,
        "rank_pattern": {"lin0.lora_E": [False, False], "lin1.lora_E": [True, False]},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = PeftConfig.from_dict(json.loads(json.dumps(written)))
    assert isinstance(config, AdaLoraConfig) and config.inference_mode is True
    assert config.rank_pattern == written["rank_pattern"]


def test_rank_pattern_accepts_tensors_and_zero_one_ints():
    import torch

    config = make(rank_pattern={"a.lora_E": torch.tensor([[True], [False]]), "b.lora_E.default": [1, 0]})
    assert config.rank_pattern == {"a.lora_E": [True, False], "b.lora_E.default": [True, False]}
    config.rank_pattern = {"c.lora_E": torch.tensor([False, True])}  # assignments are converted too
    assert config.rank_pattern == {"c.lora_E": [False, True]}


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"total_step": None}, "needs total_step"),
        ({"total_step": 0}, "needs total_step"),
        ({"total_step": 10, "tinit": 6, "tfinal": 4}, r"tinit < total_step - tfinal"),
        ({"total_step": 10, "tinit": 10}, r"Decrease tinit or tfinal"),
        ({"init_r": 0}, "init_r must be a positive integer"),
        ({"target_r": -1}, "target_r must be a non-negative integer"),
        ({"deltaT": 0}, "deltaT must be a positive integer"),
        ({"tinit": -1}, "tinit must be a non-negative integer"),
        ({"beta1": 1.0}, "beta1 must be strictly between 0 and 1"),
        ({"beta2": 0}, "beta2 must be strictly between 0 and 1"),
        ({"orth_reg_weight": -0.1}, "orth_reg_weight must be >= 0"),
        ({"use_dora": True}, "does not support DoRA"),
        ({"init_lora_weights": "loftq"}, "does not support LoftQ"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"bias": "some"}, "bias must be one of"),
        ({"rank_pattern": {"q": 4}}, "not of the form '<module name>.lora_E'"),
        ({"rank_pattern": {"q.lora_E": 4}}, r"must be a list of booleans.*LoRA's rank_pattern"),
        ({"rank_pattern": {"q.lora_E": [2, 1]}}, "must be a list of booleans"),
        ({"rank_pattern": [True]}, "rank_pattern must be None or a dict"),
        ({"target_modules": r".*q", "layers_to_transform": [0]}, "regex string"),
        ({"layers_pattern": "layers"}, "needs layers_to_transform"),
        ({"layer_replication": [[0, 1]]}, "layer_replication.*AdaLoRA does not support"),
        ({"eva_config": {"rho": 2.0}}, "EVA"),
        ({"use_qalora": True}, "QALoRA"),
        ({"target_parameters": ["w"]}, "nn.Parameters"),
    ],
)
def test_invalid_configs_are_refused_with_the_fix(options, match):
    with pytest.raises(ConfigError, match=match):
        make(**options)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"r": 4}, "set init_r"),
        ({"use_rslora": True}, "use_rslora=True has no effect"),
        ({"alpha_pattern": {"q": 4}}, "alpha_pattern.*has no effect"),
        ({"lora_bias": True}, "lora_bias=True has no effect"),
        ({"init_lora_weights": "gaussian"}, "AdaLoRA's own init"),
        ({"loftq_config": {"loftq_bits": 4}}, "loftq_config is set but ignored"),
    ],
)
def test_options_the_reference_ignores_are_kept_with_a_warning(options, match):
    with pytest.warns(UserWarning, match=match):
        config = make(**options)
    if "loftq_config" in options:
        assert config.loftq_config == {}  # dropped, as the reference does
    else:
        key = next(iter(options))
        assert getattr(config, key) == options[key]


# ---------------------------------------------------------------------- registration
def test_registered_method_spec():
    spec = get_registry().method("ADALORA")
    assert spec.config_cls is AdaLoraConfig and spec.model_cls is AdaLoraModel
    assert spec.prefix == "lora_"
    caps = spec.capabilities
    assert (caps.mergeable, caps.identity_init, caps.mixable, caps.prompt_learning) == (
        True,
        True,
        False,  # its allocator runs only in AdaLoraModel, so it cannot join a mixed model
        False,
    )
    assert not caps.mixed_batch and not caps.weighted_combination
    assert dict(spec.default_target_modules) == {**DEFAULT_TARGET_MODULES, **DEFAULT_TARGET_REGEXES}


def test_entry_point_is_declared():
    found = [ep for ep in entry_points(group="peft_core") if ep.name == "adalora"]
    assert found and found[0].value == "peft_adalora.plugin"
    assert plugin.PEFT_TYPE == "ADALORA"


def test_config_is_exported_by_the_core_too():
    from peft_core import AdaLoraConfig as FromCore

    assert FromCore is AdaLoraConfig


def test_importing_the_plugin_imports_neither_transformers_nor_the_reference():
    import subprocess
    import sys

    code = "import sys, peft_adalora.plugin; print('transformers' in sys.modules, 'peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
