"""LoRA under FSDP2 (``fully_shard``) with two CPU processes over gloo (tests/scripts/fsdp_lora_train.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft_lora")
pytest.importorskip("torch.distributed.fsdp")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_lora_train.py"


@pytest.mark.slow
def test_sharded_lora_trains_and_rank_zero_saves_the_gathered_adapter(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port: other test runs may share the machine
        "--nproc_per_node",
        "2",
        os.fspath(SCRIPT),
        os.fspath(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["sharded"] for r in reports)
    assert reports[0]["losses"] != reports[1]["losses"]  # the ranks saw different data
    # Each process held half of every LoRA A (rank 4 -> 2 rows): the adapter really was sharded.
    assert all(shape == [2, 16] for r in reports for shape in r["local_lora_A_shapes"].values())
    # Saving a process's shards directly is refused (with what to do), and leaves nothing behind.
    assert all("under FSDP each process holds a shard" in r["naive_error"] for r in reports)
    assert not any(name.startswith("naive") for name in os.listdir(tmp_path))
    assert reports[0]["gathered_keys"] > 0 and reports[1]["gathered_keys"] == 0  # gathered to rank 0

    assert sorted(os.listdir(tmp_path / "adapter")) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)
    assert len(saved) == 8  # q_proj and v_proj, A and B, in two layers
    for key, value in saved.items():  # full rank-4 tensors, not shards or ZeRO-3-style placeholders
        assert value.numel() > 0 and value.shape[0 if "lora_A" in key else 1] == 4
        assert torch.equal(value, gathered["lora"][key.replace(".weight", ".default.weight")])
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained: B left its zero init

    from peft_core import PeftModel

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
    reloaded = PeftModel.from_pretrained(transformers.LlamaForCausalLM(config), tmp_path / "adapter").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=torch.arange(1, 9).unsqueeze(0)).logits
    torch.testing.assert_close(logits, gathered["logits"], atol=1e-5, rtol=1e-5)  # the sharded model's output
