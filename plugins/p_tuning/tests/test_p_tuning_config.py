"""PromptEncoderConfig, the encoders, registration, and the materialised save."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest
import torch
from peft_core import PeftConfig, PeftModel, get_peft_model
from peft_core.errors import ConfigError
from peft_core.plugins import get_registry
from peft_core.testing.prompt_learning import padded_batch, tiny_llama
from safetensors.torch import load_file

from peft_p_tuning import PromptEncoderConfig, plugin
from peft_p_tuning.model import PromptEncoderModel


def test_defaults_and_json_round_trip():
    config = PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="LSTM")
    data = config.to_dict()
    assert data["peft_type"] == "P_TUNING" and data["encoder_reparameterization_type"] == "LSTM"
    assert (data["encoder_hidden_size"], data["encoder_num_layers"], data["encoder_dropout"]) == (
        None,
        2,
        0.0,
    )
    again = PeftConfig.from_dict(json.loads(config.to_json_string()))
    assert type(again) is PromptEncoderConfig and again.to_dict() == data


@pytest.mark.parametrize(
    "options, message",
    [
        ({"encoder_reparameterization_type": "GRU"}, "GRU"),
        ({"encoder_dropout": 1.5}, "encoder_dropout"),
        ({"encoder_hidden_size": 0}, "encoder_hidden_size"),
    ],
)
def test_invalid_configs_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        PromptEncoderConfig(**options)


def test_encoder_hidden_size_defaults_to_the_model_width():
    model = get_peft_model(tiny_llama(), PromptEncoderConfig(num_virtual_tokens=2))
    assert model.peft_config["default"].encoder_hidden_size == 32
    assert model.base_model.prompt_encoder["default"].mlp_head[0].weight.shape == (32, 32)


def test_mlp_warns_that_encoder_num_layers_is_ignored():
    with pytest.warns(UserWarning, match="encoder_num_layers=3 is ignored"):
        get_peft_model(tiny_llama(), PromptEncoderConfig(num_virtual_tokens=2, encoder_num_layers=3))


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_save_materialises_the_prompt_and_loads_for_inference(kind, tmp_path):
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_reparameterization_type=kind
    )
    model = get_peft_model(tiny_llama(), config).eval()
    inputs = padded_batch(0)
    with torch.no_grad():
        expected = model(**inputs).logits
        table = model.base_model.prompt_encoder["default"](torch.arange(3).unsqueeze(0))[0]
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"]
    torch.testing.assert_close(saved["prompt_embeddings"], table, rtol=0, atol=0)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert set(loaded.base_model.prompt_encoder["default"]._modules) == {"embedding"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="is_trainable"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)


def test_registered_method_spec():
    spec = get_registry().method("P_TUNING")
    assert spec.config_cls is PromptEncoderConfig and spec.model_cls is PromptEncoderModel
    assert (
        spec.capabilities.prompt_learning
        and not spec.capabilities.mergeable
        and not spec.capabilities.mixable
    )


def test_entry_point_is_declared():
    (entry,) = [ep for ep in entry_points(group="peft_core") if ep.name == "p_tuning"]
    assert entry.value == "peft_p_tuning.plugin" and entry.load() is plugin
