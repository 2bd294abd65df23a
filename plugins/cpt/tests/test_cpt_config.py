"""CPTConfig, registration and the saved file."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest
from peft_core import PeftConfig, get_peft_model
from peft_core.errors import ConfigError
from peft_core.plugins import get_registry
from peft_core.testing.prompt_learning import tiny_llama
from safetensors.torch import load_file

from peft_cpt import CPTConfig, plugin
from peft_cpt.model import CPTModel


def test_defaults_follow_the_token_ids_and_round_trip():
    config = CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[3, 4, 5])
    assert (config.num_virtual_tokens, config.cpt_mask, config.cpt_tokens_type_mask) == (
        3,
        [1, 1, 1],
        [1, 1, 1],
    )
    assert CPTConfig(task_type="CAUSAL_LM").cpt_token_ids == [0]
    again = PeftConfig.from_dict(json.loads(config.to_json_string()))
    assert type(again) is CPTConfig and again.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"task_type": "SEQ_CLS"}, "CAUSAL_LM"),
        ({"cpt_token_ids": [1, 2], "cpt_mask": [1]}, "same length"),
        ({"opt_weighted_loss_type": "linear"}, "opt_weighted_loss_type"),
    ],
)
def test_invalid_configs_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        CPTConfig(**{"task_type": "CAUSAL_LM", **options})


def test_the_prompt_starts_at_the_example_tokens_and_only_deltas_train(tmp_path):
    base = tiny_llama()
    model = get_peft_model(base, CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[5, 6]))
    encoder = model.base_model.prompt_encoder["default"]
    assert (encoder.embedding.weight == base.get_input_embeddings().weight[[5, 6]]).all()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.prompt_encoder.default.delta_embedding.weight"
    ]
    model.save_pretrained(tmp_path)
    assert list(load_file(tmp_path / "adapter_model.safetensors")) == ["prompt_embeddings"]


def test_registered_method_spec_and_entry_point():
    spec = get_registry().method("CPT")
    assert spec.config_cls is CPTConfig and spec.model_cls is CPTModel and spec.capabilities.prompt_learning
    (entry,) = [ep for ep in entry_points(group="peft_core") if ep.name == "cpt"]
    assert entry.load() is plugin
