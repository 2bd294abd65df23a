"""The six task classes on tiny transformers models (built from configs, nothing downloaded)."""

from __future__ import annotations

import copy

import pytest
import torch

from peft_core import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)

transformers = pytest.importorskip("transformers")
peft_toy = pytest.importorskip("peft_toy")
ToyConfig = peft_toy.ToyConfig


def bert_config():
    return transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )


def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def t5():
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=50,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(cfg).eval()


IDS = torch.tensor([[3, 5, 7, 9, 11], [4, 6, 8, 10, 12]])


def test_causal_lm_forward_loss_and_generate(tmp_path):
    base = llama()
    model = get_peft_model(
        copy.deepcopy(base),
        ToyConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_weights=False),
    )
    assert type(model) is PeftModelForCausalLM
    out = model(input_ids=IDS, labels=IDS)
    assert out.loss.requires_grad
    out.loss.backward()
    assert model.base_model.model.model.layers[0].self_attn.q_proj.toy_scale["default"].grad is not None
    generated = model.generate(input_ids=IDS, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 9)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(merged.generate(input_ids=IDS, max_new_tokens=4, do_sample=False), generated)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=IDS).logits, base(input_ids=IDS).logits)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(loaded) is PeftModelForCausalLM
    torch.testing.assert_close(loaded.generate(input_ids=IDS, max_new_tokens=4, do_sample=False), generated)


def test_seq2seq_forward_and_generate():
    base = t5()
    model = get_peft_model(
        copy.deepcopy(base),
        ToyConfig(task_type="SEQ_2_SEQ_LM", target_modules=["q", "v"], init_weights=False),
    )
    assert type(model) is PeftModelForSeq2SeqLM
    out = model(input_ids=IDS, labels=IDS)
    assert torch.isfinite(out.loss)
    generated = model.generate(input_ids=IDS, max_new_tokens=3, do_sample=False, num_beams=2)
    merged = model.merge_and_unload()
    torch.testing.assert_close(
        merged.generate(input_ids=IDS, max_new_tokens=3, do_sample=False, num_beams=2), generated
    )


@pytest.mark.parametrize(
    ("task", "head_cls", "peft_cls", "head"),
    [
        ("SEQ_CLS", "BertForSequenceClassification", PeftModelForSequenceClassification, "classifier"),
        ("TOKEN_CLS", "BertForTokenClassification", PeftModelForTokenClassification, "classifier"),
        ("QUESTION_ANS", "BertForQuestionAnswering", PeftModelForQuestionAnswering, "qa_outputs"),
    ],
)
def test_heads_are_trained_and_saved_with_the_adapter(tmp_path, task, head_cls, peft_cls, head):
    torch.manual_seed(0)
    base = getattr(transformers, head_cls)(bert_config()).eval()
    model = get_peft_model(
        copy.deepcopy(base), ToyConfig(task_type=task, target_modules=["query", "value"], init_weights=False)
    )
    assert type(model) is peft_cls
    assert head in model.peft_config["default"].modules_to_save
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert f"base_model.model.{head}.modules_to_save.default.weight" in trainable
    with torch.no_grad():
        getattr(model.base_model.model, head).modules_to_save["default"].weight.mul_(2)
    expected = model(input_ids=IDS)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(reloaded) is peft_cls
    for key in expected.keys():
        torch.testing.assert_close(reloaded(input_ids=IDS)[key], expected[key])


def test_feature_extraction():
    torch.manual_seed(0)
    base = transformers.BertModel(bert_config()).eval()
    model = get_peft_model(
        copy.deepcopy(base),
        ToyConfig(task_type="FEATURE_EXTRACTION", target_modules=["query"], init_weights=False),
    )
    assert type(model) is PeftModelForFeatureExtraction
    hidden = model(input_ids=IDS).last_hidden_state
    assert hidden.shape == (2, 5, 16)
    assert not torch.allclose(hidden, base(input_ids=IDS).last_hidden_state)


def test_default_target_modules_come_from_the_method(monkeypatch):
    """A config without target_modules uses the plugin's defaults for the model type, or says how to fix it."""
    from peft_core.errors import ConfigError

    with pytest.raises(ConfigError, match="no default targets for model_type 'llama'"):
        get_peft_model(llama(), ToyConfig(target_modules=None))


def test_activation_checkpointing_still_trains_the_adapter():
    base = llama()
    base.activation_checkpointing_enable()
    model = get_peft_model(
        base, ToyConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], init_weights=False)
    )
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "toy_scale" in n]
    assert grads and all(g is not None and torch.any(g != 0) for g in grads)
