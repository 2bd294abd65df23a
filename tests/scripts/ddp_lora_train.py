"""Train LoRA on a tiny Llama under Accelerate (run by tests/test_accelerate.py with 2 processes)."""

from __future__ import annotations

import json
import os
import sys

import torch
import transformers
from accelerate import Accelerator
from peft_lora import LoraConfig

from peft_core import get_peft_model


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)  # the same base and the same initial adapter on every rank
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    model = get_peft_model(
        transformers.LlamaForCausalLM(config),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    # Each rank draws different data: only gradient averaging keeps the adapters equal.
    g = torch.Generator().manual_seed(100 + accelerator.process_index)
    batches = [torch.randint(1, 32, (4, 8), generator=g) for _ in range(5)]
    model, optimizer = accelerator.prepare(model, optimizer)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    unwrapped = accelerator.unwrap_model(model)
    tensors = {k: v.detach() for k, v in unwrapped.named_parameters() if "lora_" in k}
    torch.save(tensors, os.path.join(out, f"rank{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    unwrapped.save_pretrained(os.path.join(out, "adapter"), is_main_process=accelerator.is_main_process)
    with open(os.path.join(out, f"rank{accelerator.process_index}.json"), "w") as f:
        json.dump({"world_size": accelerator.num_processes, "losses": losses}, f)


if __name__ == "__main__":
    main(sys.argv[1])
