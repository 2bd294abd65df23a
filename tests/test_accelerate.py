"""LoRA under ``accelerate launch --multi_gpu --num_processes 2`` on CPU: DDP over gloo, two real processes.

(``accelerate launch --cpu`` starts several CPU processes only through mpirun; the torchrun-based
``--multi_gpu`` launcher with ``Accelerator(cpu=True)`` in the script gives a gloo process group.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft_lora")

SCRIPT = Path(__file__).parent / "scripts" / "ddp_lora_train.py"


@pytest.mark.slow
def test_two_processes_hold_identical_adapters_and_rank_zero_saves(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        os.fspath(SCRIPT),
        os.fspath(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in reports)
    assert reports[0]["losses"] != reports[1]["losses"]  # the ranks saw different data
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k)  # trained: B left its zero init

    # One adapter directory, written once, that reloads with the trained weights.
    from peft_core import PeftModel

    assert sorted(os.listdir(tmp_path / "adapter")) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
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
    reloaded = PeftModel.from_pretrained(transformers.LlamaForCausalLM(config), tmp_path / "adapter")
    loaded = {k: v for k, v in reloaded.named_parameters() if "lora_" in k}
    for key, value in rank0.items():
        assert torch.equal(loaded[key.removeprefix("module.")], value)
