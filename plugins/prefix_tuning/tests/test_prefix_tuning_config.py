"""PrefixTuningConfig, grouped-query attention sizing, the cache, registration and the materialised save."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest
import torch
from peft_core import PeftConfig, PeftModel, get_peft_model
from peft_core.errors import ConfigError
from peft_core.plugins import get_registry
from peft_core.testing.prompt_learning import padded_batch, tiny_gpt2, tiny_llama, tiny_t5
from safetensors.torch import load_file
from transformers import DynamicCache, EncoderDecoderCache

from peft_prefix_tuning import PrefixTuningConfig, plugin
from peft_prefix_tuning.model import PrefixTuningModel


def test_defaults_and_json_round_trip():
    config = PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, init_weights="zero")
    data = config.to_dict()
    assert data["peft_type"] == "PREFIX_TUNING" and data["encoder_hidden_size"] is None
    again = PeftConfig.from_dict(json.loads(config.to_json_string()))
    assert type(again) is PrefixTuningConfig and again.to_dict() == data


@pytest.mark.parametrize("options", [{"init_weights": "ones"}, {"prefix_projection": "yes"}])
def test_invalid_configs_are_refused(options):
    with pytest.raises(ConfigError, match=next(iter(options))):
        PrefixTuningConfig(**options)


def test_grouped_query_attention_sizes_the_prefix_by_the_key_value_heads():
    model = get_peft_model(
        tiny_llama(kv_heads=2), PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    )
    config = model.peft_config["default"]
    assert (config.token_dim, config.num_attention_heads, config.encoder_hidden_size) == (16, 2, 16)
    cache = model.base_model.prompt_cache(2)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 3
    assert cache.layers[0].keys.shape == (2, 2, 3, 8)  # (batch, kv heads, virtual tokens, head dim)


def test_other_families_get_their_cache():
    gpt2 = get_peft_model(tiny_gpt2(), PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    assert (
        gpt2.peft_config["default"].token_dim == 32 and gpt2.peft_config["default"].num_attention_heads == 4
    )
    t5 = get_peft_model(tiny_t5(), PrefixTuningConfig(num_virtual_tokens=2, task_type="SEQ_2_SEQ_LM"))
    cache = t5.base_model.prompt_cache(2)
    assert isinstance(cache, EncoderDecoderCache)
    assert (
        cache.self_attention_cache.get_seq_length() == 2 and cache.cross_attention_cache.get_seq_length() == 0
    )


def test_zero_init_gives_zero_prefixes():
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=2, init_weights="zero"))
    assert not model.base_model.prompt_table("default").any()
    projected = get_peft_model(
        tiny_llama(), PrefixTuningConfig(num_virtual_tokens=2, init_weights="zero", prefix_projection=True)
    )
    assert not projected.base_model.prompt_table("default").any()


def test_position_ids_are_shifted_past_the_prefix():
    model = get_peft_model(
        tiny_llama(), PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
    ).eval()
    inputs = padded_batch(0, lengths=(5, 5))
    with torch.no_grad():
        implicit = model(**inputs).logits
        explicit = model(**inputs, position_ids=torch.arange(5).expand(2, -1)).logits
    torch.testing.assert_close(implicit, explicit)


@pytest.mark.parametrize("projection", [False, True])
def test_save_materialises_the_prefix_and_loads_for_inference(projection, tmp_path):
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection)
    model = get_peft_model(tiny_llama(), config).eval()
    inputs = padded_batch(1)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (3, 2 * 2 * 16)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="is_trainable"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)


def test_gradient_checkpointing_is_refused():
    base = tiny_llama()
    base.gradient_checkpointing_enable()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=2))


def test_registered_method_spec():
    spec = get_registry().method("PREFIX_TUNING")
    assert spec.config_cls is PrefixTuningConfig and spec.model_cls is PrefixTuningModel
    assert spec.capabilities.prompt_learning and not spec.capabilities.mergeable


def test_entry_point_is_declared():
    (entry,) = [ep for ep in entry_points(group="peft_core") if ep.name == "prefix_tuning"]
    assert entry.value == "peft_prefix_tuning.plugin" and entry.load() is plugin
