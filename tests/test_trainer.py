"""transformers.Trainer with a peft-core model: adapter-only checkpoints, resume, best model."""

from __future__ import annotations

import os

import pytest
import torch

from peft_core import PeftModel, get_peft_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
lora = pytest.importorskip("peft_lora")

from peft_core.integrations.transformers import Trainer  # noqa: E402


def make_model() -> PeftModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    base = transformers.LlamaForCausalLM(config)
    return get_peft_model(
        base, lora.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 32, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def arguments(out, **overrides) -> transformers.TrainingArguments:
    options = dict(
        output_dir=os.fspath(out),
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        max_steps=6,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        save_strategy="steps",
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def adapter_tensors(model: PeftModel) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_trains_and_checkpoints_only_the_adapter(tmp_path):
    model = make_model()
    before = adapter_tensors(model)
    trainer = Trainer(
        model=model, args=arguments(tmp_path), train_dataset=Tokens(4, 0)
    )  # one batch, six times
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] and result.global_step == 6
    assert any(not torch.equal(before[k], v) for k, v in adapter_tensors(model).items())
    checkpoint = tmp_path / "checkpoint-6"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files and "pytorch_model.bin" not in files
    reloaded = PeftModel.from_pretrained(make_model().get_base_model(), checkpoint)
    saved = {k: v for k, v in reloaded.named_parameters() if "lora_" in k}
    assert all(torch.equal(saved[k], v) for k, v in adapter_tensors(model).items())


def test_resume_from_an_adapter_checkpoint_equals_resuming_from_a_full_one(tmp_path):
    """Resuming from the adapter-only checkpoint gives what the Trainer's own full-state resume gives."""

    def interrupted_then_resumed(trainer_cls, out):
        # The plain Trainer cannot see a PeftModel's columns, hence remove_unused_columns=False there.
        keep = {"remove_unused_columns": False}
        trainer_cls(
            model=make_model(), args=arguments(out, max_steps=4, **keep), train_dataset=Tokens(16, 0)
        ).train()
        model = make_model()
        trainer = trainer_cls(model=model, args=arguments(out, **keep), train_dataset=Tokens(16, 0))
        trainer.train(resume_from_checkpoint=os.fspath(out / "checkpoint-4"))
        assert trainer.state.global_step == 6
        return adapter_tensors(model)

    ours = interrupted_then_resumed(Trainer, tmp_path / "adapter")
    assert "model.safetensors" not in os.listdir(tmp_path / "adapter" / "checkpoint-4")
    full = interrupted_then_resumed(transformers.Trainer, tmp_path / "full")
    assert "model.safetensors" in os.listdir(tmp_path / "full" / "checkpoint-4")
    for key, value in ours.items():
        torch.testing.assert_close(value, full[key], atol=1e-6, rtol=0)
    at_checkpoint = PeftModel.from_pretrained(
        make_model().get_base_model(), tmp_path / "adapter" / "checkpoint-4"
    )
    saved = {k: v for k, v in at_checkpoint.named_parameters() if "lora_" in k}
    assert any(not torch.equal(saved[k], v) for k, v in ours.items())  # and it trained on from there


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    model = make_model()
    args = arguments(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the worst loss is "best" here, so the restored adapter is not the last one
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(4, 0), eval_dataset=Tokens(4, 0))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")
    restored = PeftModel.from_pretrained(make_model().get_base_model(), best)
    expected = {k: v for k, v in restored.named_parameters() if "lora_" in k}
    for key, value in adapter_tensors(model).items():
        torch.testing.assert_close(value, expected[key], atol=0, rtol=0)


def test_sharded_placeholders_are_not_saved_as_an_adapter(tmp_path):
    """Under ZeRO-3 a process holds empty stand-ins; saving them would write an adapter of zeros."""
    model = make_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    full = layer.lora_A["default"].weight.detach().clone()
    layer.lora_A["default"].weight.data = torch.empty(0)
    layer.lora_A[
        "default"
    ].weight.ds_numel = full.numel()  # what DeepSpeed attaches to a partitioned parameter
    with pytest.raises(ValueError, match="state_dict=accelerator.get_state_dict"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # With the gathered state dict the adapter is written in full.
    gathered = {k: v for k, v in model.state_dict().items()}
    key = next(k for k in gathered if k.endswith("q_proj.lora_A.default.weight"))
    gathered[key] = full
    model.save_pretrained(tmp_path / "out", state_dict=gathered)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert torch.equal(saved[key.replace(".default", "")], full)
