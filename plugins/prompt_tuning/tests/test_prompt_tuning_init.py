"""PromptTuningConfig, the three inits, registration and the saved files."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest
import torch
from peft_core import PeftConfig, PeftModel, get_peft_model
from peft_core.errors import ConfigError
from peft_core.plugins import get_registry
from peft_core.testing.prompt_learning import tiny_llama, tiny_t5
from safetensors.torch import load_file

from peft_prompt_tuning import PromptTuningConfig, PromptTuningInit, plugin
from peft_prompt_tuning.model import PromptTuningModel


def test_defaults_and_json_round_trip():
    config = PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    data = config.to_dict()
    assert data["peft_type"] == "PROMPT_TUNING" and data["prompt_tuning_init"] == "RANDOM"
    assert data["token_dim"] is None and data["modules_to_save"] is None
    again = PeftConfig.from_dict(json.loads(config.to_json_string()))
    assert type(again) is PromptTuningConfig and again.to_dict() == data


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "x"}, "tokenizer_name_or_path"),
        ({"prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "t"}, "prompt_tuning_init_text"),
        ({"tokenizer_kwargs": {"a": 1}}, "tokenizer_kwargs"),
        ({"prompt_tuning_init": "WORDS"}, "WORDS"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ],
)
def test_invalid_configs_are_refused_naming_the_problem(options, message):
    with pytest.raises(ConfigError, match=message):
        PromptTuningConfig(**options)


def test_missing_num_virtual_tokens_is_an_error():
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        get_peft_model(tiny_llama(), PromptTuningConfig())


def test_dimensions_are_filled_from_the_model():
    config = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2)).peft_config["default"]
    assert (config.token_dim, config.num_layers, config.num_attention_heads) == (32, 2, 4)
    assert config.num_transformer_submodules == 1
    seq2seq = get_peft_model(tiny_t5(), PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_2_SEQ_LM"))
    assert seq2seq.peft_config["default"].num_transformer_submodules == 2
    assert seq2seq.base_model.prompt_encoder["default"].embedding.weight.shape == (4, 32)


def test_sample_vocab_init_takes_rows_of_the_vocabulary():
    base = tiny_llama()
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"))
    table = model.base_model.prompt_encoder["default"].embedding.weight
    vocab = base.get_input_embeddings().weight
    assert table.dtype == torch.float32
    for row in table:
        assert (vocab - row).abs().sum(-1).min() == 0


def test_text_init_cycles_the_text_tokens(tokenizer_dir):
    base = tiny_llama()
    config = PromptTuningConfig(
        num_virtual_tokens=5,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text="the cat sat",
        tokenizer_name_or_path=str(tokenizer_dir),
        tokenizer_kwargs={"trust_remote_code": True},
    )
    model = get_peft_model(base, config)
    table = model.base_model.prompt_encoder["default"].embedding.weight
    ids = torch.tensor([2, 3, 4, 2, 3])  # "the cat sat" -> 2 3 4, cycled to 5 rows
    torch.testing.assert_close(table, base.get_input_embeddings()(ids), rtol=0, atol=0)
    assert config.tokenizer_kwargs == {"trust_remote_code": True}  # the config is not mutated


def test_saved_file_holds_the_prompt_table_under_the_reference_key(tmp_path):
    model = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (3, 32)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        "base_model.prompt_encoder.default.embedding.weight"
    ]


def test_registered_method_spec():
    spec = get_registry().method("PROMPT_TUNING")
    assert spec.config_cls is PromptTuningConfig and spec.model_cls is PromptTuningModel
    caps = spec.capabilities
    assert caps.prompt_learning and not caps.mergeable and not caps.mixable and not caps.identity_init


def test_entry_point_is_declared():
    (entry,) = [ep for ep in entry_points(group="peft_core") if ep.name == "prompt_tuning"]
    assert entry.value == "peft_prompt_tuning.plugin" and entry.load() is plugin


def test_merging_is_refused():
    model = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_and_unload()
