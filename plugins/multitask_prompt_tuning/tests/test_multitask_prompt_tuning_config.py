"""MultitaskPromptTuningConfig, the inits (text, source tasks), task ids, registration and the saved files."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest
import torch
from peft_core import PeftConfig, PeftModel, get_peft_model
from peft_core.errors import ConfigError
from peft_core.plugins import get_registry
from peft_core.testing.prompt_learning import padded_batch, tiny_llama, tiny_t5
from safetensors.torch import load_file

from peft_multitask_prompt_tuning import MultitaskPromptTuningConfig, plugin
from peft_multitask_prompt_tuning.model import MultitaskPromptTuningModel


def config(**options) -> MultitaskPromptTuningConfig:
    return MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, **options)


def test_defaults_and_json_round_trip():
    data = config(num_tasks=4, num_ranks=2).to_dict()
    assert data["peft_type"] == "MULTITASK_PROMPT_TUNING" and data["prompt_tuning_init"] == "RANDOM"
    assert (data["prompt_tuning_init_task"], data["prompt_tuning_init_state_dict_path"]) == (0, None)
    again = PeftConfig.from_dict(json.loads(json.dumps(data)))
    assert type(again) is MultitaskPromptTuningConfig and again.to_dict() == data


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_tasks": 0}, "num_tasks"),
        ({"num_ranks": 0}, "num_ranks"),
        ({"prompt_tuning_init": "SAMPLE_VOCAB"}, "SAMPLE_VOCAB"),
        ({"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "x"}, "tokenizer_name_or_path"),
    ],
)
def test_invalid_configs_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        config(**options)


def test_task_ids_are_required_and_select_the_task_prompt():
    model = get_peft_model(tiny_llama(), config(num_tasks=2)).eval()
    inputs = padded_batch(0)
    with pytest.raises(ValueError, match="task_ids"):
        model(**inputs)
    with torch.no_grad():
        first = model(**inputs, task_ids=torch.tensor([0, 0])).logits
        mixed = model(**inputs, task_ids=torch.tensor([0, 1])).logits
    torch.testing.assert_close(mixed[0], first[0])
    assert not torch.allclose(mixed[1], first[1])


def test_saved_file_holds_the_shared_table_and_the_task_factors(tmp_path):
    model = get_peft_model(tiny_llama(), config(num_tasks=2, num_ranks=3))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "prompt_embeddings": (3, 32),
        "prefix_task_cols": (2, 3, 3),
        "prefix_task_rows": (2, 3, 32),
    }
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert len([n for n, p in loaded.named_parameters() if p.requires_grad]) == 3


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_source_task_inits(init, tmp_path):
    source = get_peft_model(tiny_llama(), config(num_tasks=3, num_ranks=2))
    source.save_pretrained(tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    saved = load_file(path)
    target = get_peft_model(
        tiny_llama(),
        config(
            num_ranks=2,
            prompt_tuning_init=init,
            prompt_tuning_init_state_dict_path=path,
            prompt_tuning_init_task=1,
        ),
    )
    encoder = target.base_model.prompt_encoder["default"]
    torch.testing.assert_close(encoder.embedding.weight, saved["prompt_embeddings"])
    if init == "AVERAGE_SOURCE_TASKS":
        torch.testing.assert_close(encoder.prefix_task_cols[0], saved["prefix_task_cols"].mean(0))
    elif init == "EXACT_SOURCE_TASK":
        torch.testing.assert_close(encoder.prefix_task_rows[0], saved["prefix_task_rows"][1])


def test_pickled_source_files_are_refused():
    with pytest.raises(ConfigError, match="unpickle"):
        get_peft_model(
            tiny_llama(),
            config(prompt_tuning_init="ONLY_SOURCE_SHARED", prompt_tuning_init_state_dict_path="source.bin"),
        )


def test_seq2seq_is_refused_saying_why():
    with pytest.raises(ConfigError, match="SEQ_2_SEQ_LM"):
        get_peft_model(tiny_t5(), MultitaskPromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2))


def test_registered_method_spec_and_entry_point():
    spec = get_registry().method("MULTITASK_PROMPT_TUNING")
    assert spec.config_cls is MultitaskPromptTuningConfig and spec.model_cls is MultitaskPromptTuningModel
    assert spec.capabilities.prompt_learning and not spec.capabilities.mergeable
    (entry,) = [ep for ep in entry_points(group="peft_core") if ep.name == "multitask_prompt_tuning"]
    assert entry.load() is plugin
