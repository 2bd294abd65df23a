"""``AutoPeftModel*``: the base model named in the adapter config is loaded, then the adapter."""

from __future__ import annotations

import os

import pytest
import torch

from peft_core import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForSequenceClassification,
    PeftModelForCausalLM,
    PeftModelForSequenceClassification,
    get_peft_model,
)
from peft_core.errors import ConfigError

transformers = pytest.importorskip("transformers")
lora = pytest.importorskip("peft_lora")

CONFIG = dict(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=16,
    pad_token_id=0,
)
IDS = torch.tensor([[3, 5, 7, 9, 11]])


def save_base(tmp_path, cls_name: str) -> str:
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(transformers.LlamaConfig(**CONFIG, num_labels=3))
    path = os.fspath(tmp_path / "base")
    model.save_pretrained(path)
    return path


def save_adapter(tmp_path, base_path: str, cls_name: str, task_type: str | None) -> tuple[str, torch.Tensor]:
    base = getattr(transformers, cls_name).from_pretrained(base_path)
    config = lora.LoraConfig(
        target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type=task_type
    )
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        out = model(input_ids=IDS)
    path = os.fspath(tmp_path / "adapter")
    model.save_pretrained(path)
    return path, (out.logits if hasattr(out, "logits") else out.last_hidden_state)


def test_causal_lm_loads_base_and_adapter(tmp_path):
    base = save_base(tmp_path, "LlamaForCausalLM")
    adapter, expected = save_adapter(tmp_path, base, "LlamaForCausalLM", "CAUSAL_LM")
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert isinstance(model, PeftModelForCausalLM) and model.tokenizer is None
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in model.parameters())
    trainable = AutoPeftModelForCausalLM.from_pretrained(adapter, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_sequence_classification_keeps_the_trained_head(tmp_path):
    base = save_base(tmp_path, "LlamaForSequenceClassification")
    adapter, expected = save_adapter(tmp_path, base, "LlamaForSequenceClassification", "SEQ_CLS")
    model = AutoPeftModelForSequenceClassification.from_pretrained(adapter)
    assert isinstance(model, PeftModelForSequenceClassification)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, atol=0, rtol=0)


def test_task_type_mismatch_and_missing_base_are_clear_errors(tmp_path):
    base = save_base(tmp_path, "LlamaForCausalLM")
    adapter, _ = save_adapter(tmp_path, base, "LlamaForCausalLM", "CAUSAL_LM")
    with pytest.raises(ConfigError, match="task_type"):
        AutoPeftModelForSequenceClassification.from_pretrained(adapter)
    with pytest.raises(ConfigError, match="AutoPeftModelForCausalLM"):
        AutoPeftModel.from_pretrained(adapter)


def test_no_task_type_uses_the_auto_mapping_within_the_allowlist(tmp_path):
    base = save_base(tmp_path, "LlamaModel")
    adapter, expected = save_adapter(tmp_path, base, "LlamaModel", None)
    model = AutoPeftModel.from_pretrained(adapter)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).last_hidden_state, expected, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="allowlist"):
        AutoPeftModel.from_pretrained(adapter, import_allowlist=["diffusers"])
    feature = AutoPeftModelForFeatureExtraction  # task-specific class for a task-less adapter works too
    assert feature.from_pretrained(adapter) is not None


def test_a_tokenizer_next_to_the_adapter_is_loaded_and_grows_the_embeddings(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    base = save_base(tmp_path, "LlamaForCausalLM")
    adapter, _ = save_adapter(tmp_path, base, "LlamaForCausalLM", "CAUSAL_LM")
    vocab = {f"w{i}": i for i in range(45)}  # 45 tokens > the base's 40 embeddings
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="w0", pad_token="w0"
    ).save_pretrained(adapter)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert model.tokenizer is not None and len(model.tokenizer) == 45
    assert model.get_base_model().get_input_embeddings().weight.shape[0] == 45


def test_cannot_be_instantiated_directly():
    with pytest.raises(OSError, match="from_pretrained"):
        AutoPeftModelForCausalLM()
