"""``prepare_model_for_kbit_training`` on tiny transformers models, next to the reference's."""

from __future__ import annotations

import pytest
import torch

from peft_core import get_peft_model, prepare_model_for_kbit_training

transformers = pytest.importorskip("transformers")
lora = pytest.importorskip("peft_lora")


def half_llama(quantized: bool = False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    if quantized:  # what transformers sets on a bitsandbytes model; enough to take the quantized branch
        model.is_loaded_in_4bit = True
    return model


def test_freezes_upcasts_and_leaves_plain_models_without_checkpointing():
    model = prepare_model_for_kbit_training(half_llama())
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.is_activation_checkpointing


@pytest.mark.parametrize("reentrant", [True, False])
def test_quantized_models_checkpoint_and_still_train_the_adapter(reentrant):
    model = prepare_model_for_kbit_training(
        half_llama(quantized=True), gradient_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    assert model.is_activation_checkpointing
    peft_model = get_peft_model(model, lora.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.train()
    ids = torch.randint(1, 32, (2, 6))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]  # A gets none while B is zero
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_integer_backends_keep_their_dtype():
    model = half_llama()
    model.quantization_method = "gptq"
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.compat
def test_same_result_as_the_reference():
    peft = pytest.importorskip("peft")
    ours = prepare_model_for_kbit_training(half_llama(quantized=True))
    theirs = peft.prepare_model_for_kbit_training(half_llama(quantized=True))
    assert [(n, p.dtype, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, p.dtype, p.requires_grad) for n, p in theirs.named_parameters()
    ]
    assert ours.is_activation_checkpointing == theirs.is_activation_checkpointing
