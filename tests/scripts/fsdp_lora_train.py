"""Train LoRA on a tiny Llama under FSDP2 (``fully_shard``) over gloo on CPU; run by tests/test_fsdp.py.

Launched with ``python -m torch.distributed.run --nproc_per_node 2 fsdp_lora_train.py OUT``. Every
rank holds a shard of every parameter (DTensors), the LoRA weights included. Saving gathers the full
state dict on all ranks (a collective), then rank 0 alone writes the adapter.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import transformers
from peft_lora import LoraConfig
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from peft_core import get_peft_model


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)  # the same base and the same initial adapter on every rank
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(config)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    for layer in model.get_base_model().model.layers:  # one FSDP unit per decoder layer, then the rest
        fully_shard(layer)
    fully_shard(model)
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    # Each rank draws different data: only gradient reduction keeps the shards consistent.
    g = torch.Generator().manual_seed(100 + rank)
    losses = []
    for _ in range(5):
        ids = torch.randint(1, 32, (4, 8), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    probe = torch.arange(1, 9).unsqueeze(0)  # the same input on every rank
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    local = {k: tuple(v.to_local().shape) for k, v in model.named_parameters() if "lora_A" in k}

    # What saving the sharded model directly does (each rank's local shard is not the adapter).
    naive_error = None
    try:
        model.save_pretrained(os.path.join(out, f"naive{rank}"))
    except Exception as error:  # recorded for the test, which asserts it refused
        naive_error = f"{type(error).__name__}: {error}"

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(os.path.join(out, "adapter"), state_dict=full)
        torch.save(
            {"logits": logits, "lora": {k: v for k, v in full.items() if "lora_" in k}},
            os.path.join(out, "gathered.pt"),
        )
    dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        report = {
            "world_size": world,
            "sharded": sharded,
            "losses": losses,
            "local_lora_A_shapes": local,
            "gathered_keys": len(full),
            "naive_error": naive_error,
        }
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
