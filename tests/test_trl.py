"""TRL's SFTTrainer and DPOTrainer training a peft-core LoRA model (peft_core.integrations.trl).

Every test here also runs in a subprocess where the reference ``peft`` cannot be imported
(``test_all_of_this_passes_without_the_reference_peft``), the supported install.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")
lora = pytest.importorskip("peft_lora")

from safetensors.torch import load_file  # noqa: E402

from peft_core import PeftModel, get_peft_model  # noqa: E402
from peft_core.integrations.trl import DPOTrainer, SFTTrainer  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setattr(trl.trainer.base_trainer, "send_telemetry", lambda **_: None)


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (nothing from the hub)."""
    raw = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>")
    )
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )


def base_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)  # every call builds the same weights
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.LlamaForCausalLM(config)


def lora_config() -> lora.LoraConfig:
    return lora.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def options(out: Path) -> dict:
    return dict(
        output_dir=os.fspath(out),
        max_steps=6,
        save_steps=6,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL's configs default to bf16 autocast; fp32 keeps the output comparisons exact
        seed=0,
        dataset_num_proc=None,
        dataloader_num_workers=0,
    )


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.named_parameters() if not torch.equal(before[k], v)}


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def assert_adapter_only_checkpoint(checkpoint: Path, model: PeftModel) -> None:
    """The checkpoint is an adapter directory in the reference format, and nothing of the base."""
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}
    saved = load_file(checkpoint / "adapter_model.safetensors")
    lora_params = {k.replace(".default", ""): v for k, v in model.named_parameters() if ".default." in k}
    assert saved.keys() == lora_params.keys()  # base_model.model.<path>.lora_A.weight, no adapter name
    assert all(torch.equal(saved[k], v) for k, v in lora_params.items())
    # The optimizer state holds the adapter's parameters and nothing else.
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(lora_params)


def assert_reloads_with_equal_outputs(checkpoint: Path, model: PeftModel, input_ids: torch.Tensor) -> None:
    reloaded = PeftModel.from_pretrained(base_model(), checkpoint).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
        with model.disable_adapter():  # and the adapter does change the outputs
            assert not torch.allclose(model(input_ids=input_ids).logits, reloaded(input_ids=input_ids).logits)


def test_trl_takes_its_adapter_path_for_peft_core_models():
    model = get_peft_model(base_model(), lora_config())
    assert trl.trainer.sft_trainer.is_peft_model(model)
    assert trl.trainer.dpo_trainer.is_peft_model(model)
    assert not trl.trainer.sft_trainer.is_peft_model(base_model())


def test_sft_trains_only_the_lora_weights_and_checkpoints_only_the_adapter(tmp_path):
    model = get_peft_model(base_model(), lora_config())
    before = parameters(model)
    text = " ".join(f"w{i}" for i in range(12))
    data = datasets.Dataset.from_dict({"text": [text] * 4})  # one batch, seen six times
    trainer = SFTTrainer(
        model=model, args=trl.SFTConfig(**options(tmp_path)), train_dataset=data, processing_class=tokenizer()
    )
    assert trainer.model is model
    # TRL patched the transformers model with its fused LM head, not the PeftModel.
    assert "forward" in vars(model.get_base_model()) and "forward" not in vars(model)
    result = trainer.train()
    history = losses(trainer)
    assert result.global_step == 6 and all(math.isfinite(x) for x in history)
    assert history[-1] < history[0]
    moved = changed(before, model)
    assert moved and all(".lora_" in k and ".default." in k for k in moved)
    assert {k for k, v in model.named_parameters() if v.requires_grad} == {k for k in before if ".lora_" in k}
    checkpoint = tmp_path / "checkpoint-6"
    assert_adapter_only_checkpoint(checkpoint, model)
    ids = torch.tensor([[3 + i for i in range(10)]])
    assert_reloads_with_equal_outputs(checkpoint, model, ids)


def test_sft_accepts_a_peft_core_peft_config(tmp_path):
    trainer = SFTTrainer(
        model=base_model(),
        args=trl.SFTConfig(**{**options(tmp_path), "max_steps": 1}),
        train_dataset=datasets.Dataset.from_dict({"text": ["w1 w2 w3"] * 4}),
        processing_class=tokenizer(),
        peft_config=lora_config(),
    )
    assert isinstance(trainer.model, PeftModel)
    trainer.train()
    assert_adapter_only_checkpoint(tmp_path / "checkpoint-1", trainer.model)


def preference_data() -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8", "w9"],
            "chosen": [" w10 w11", " w12", " w13 w14", " w15"],
            "rejected": [" w20", " w21 w22", " w23", " w24 w25"],
        }
    )


def base_log_probs(reference: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probabilities of [chosen; rejected], computed from the base model's logits."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    with torch.no_grad():
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_token = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (per_token * (labels != -100)).sum(1).chunk(2)


@pytest.mark.parametrize("how", ["peft_config", "prewrapped"])
def test_dpo_reference_is_the_base_model_and_no_copy_is_made(tmp_path, how):
    """With an adapter model the reference comes from the policy itself, not from a second model."""
    if how == "peft_config":  # TRL: adapters disabled give the reference
        kwargs = {"model": base_model(), "peft_config": lora_config()}
    else:  # TRL: a frozen copy of the fresh adapter, named "ref", gives it
        kwargs = {"model": get_peft_model(base_model(), lora_config())}
    trainer = DPOTrainer(
        args=trl.DPOConfig(**options(tmp_path)),
        train_dataset=preference_data(),
        processing_class=tokenizer(),
        **kwargs,
    )
    model = trainer.model
    assert isinstance(model, PeftModel) and trainer.ref_model is None
    assert list(model.peft_config) == (["default"] if how == "peft_config" else ["default", "ref"])
    before = parameters(model)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    history = losses(trainer)
    assert all(math.isfinite(x) for x in history) and history[-1] < history[0]
    moved = changed(before, model)
    assert moved and all(".lora_" in k and ".default." in k for k in moved)  # never "ref", never the base

    # The reference log-probs TRL computes are the base model's, after training as before.
    reference = base_model().eval()
    expected = base_log_probs(reference, batch)
    model.eval()
    got = trainer.compute_ref_log_probs(model, batch)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # while the trained policy does differ from the base
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(logits, base_logits)
    assert model.active_adapters == ["default"]  # the reference forward left the policy's adapter on

    checkpoint = tmp_path / "checkpoint-6"
    assert_adapter_only_checkpoint(checkpoint, model)
    assert ("ref" in os.listdir(checkpoint)) == (how == "prewrapped")  # as TRL + peft write it
    assert_reloads_with_equal_outputs(checkpoint, model, batch["input_ids"][:1])


@pytest.mark.slow
def test_all_of_this_passes_without_the_reference_peft(tmp_path):
    """The supported install has no ``peft``: hide it (find_spec then says absent) and run this file again."""
    program = (
        "import sys; sys.modules['peft'] = None\n"
        "import transformers.utils, accelerate.utils\n"
        "assert not transformers.utils.is_peft_available() and not accelerate.utils.is_peft_available()\n"
        "import pytest\n"
        f"sys.exit(pytest.main([{__file__!r}, '-q', '-p', 'no:cacheprovider', '-k', 'not without_the_reference',"
        f" '--basetemp', {os.fspath(tmp_path / 'inner')!r}]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", program],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout
