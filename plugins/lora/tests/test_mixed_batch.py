"""Mixed-adapter batches through the model: each row equals that adapter run alone."""

from __future__ import annotations

import pytest
import torch
from peft_core import get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from peft_lora import LoraConfig

ATOL = 1e-5
NAMES = ["a", "b", "c"]


def llama_with_adapters(modules_to_save: list[str] | None = None):
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )
    model = None
    for i, name in enumerate(NAMES):
        config = LoraConfig(
            r=2 + i,
            lora_alpha=4 + i,
            target_modules="all-linear",
            init_lora_weights=False,
            modules_to_save=modules_to_save if name != "c" else None,
        )
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    model.eval()
    return model


def alone(model, name: str, fn):
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]], ids=["layers", "modules_to_save"])
def test_forward_rows_equal_each_adapter_alone(modules_to_save):
    model = llama_with_adapters(modules_to_save)
    rows = ["a", "__base__", "c", "b", "a", "c"]
    ids = torch.randint(3, 60, (len(rows), 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on one row
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
        for i, name in enumerate(rows):
            single = alone(
                model, name, lambda i=i: model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
            )
            torch.testing.assert_close(mixed[i : i + 1], single.logits, atol=ATOL, rtol=0)
    # The rows do differ between adapters, so the check above has teeth.
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam"])
def test_generate_rows_equal_each_adapter_alone(num_beams):
    model = llama_with_adapters(["lm_head"])
    rows = ["b", "__base__", "a"]
    ids = torch.randint(3, 60, (len(rows), 5), generator=torch.Generator().manual_seed(1))
    options = {"max_new_tokens": 6, "do_sample": False, "num_beams": num_beams, "pad_token_id": 0}
    with torch.no_grad():
        mixed = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=rows, **options
        )
        for i, name in enumerate(rows):
            row = ids[i : i + 1]
            single = alone(
                model,
                name,
                lambda row=row: model.generate(input_ids=row, attention_mask=torch.ones_like(row), **options),
            )
            assert mixed[i].tolist() == single[0].tolist(), (name, num_beams)


class Zoo(nn.Module):
    """One module of every layer type LoRA adapts, applied one after the other."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.lin = nn.Linear(6, 6)
        self.gpt2 = Conv1D(6, 6)
        self.conv1 = nn.Conv1d(6, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv3 = nn.Conv3d(2, 1, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.gpt2(self.lin(self.emb(ids)))  # (B, T, 6)
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2)
        h = self.conv2(h.unsqueeze(1))  # (B, 2, T, 6)
        h = self.conv3(h.unsqueeze(2)).squeeze(1).squeeze(1)  # (B, T, 6)
        return self.head(h)


def test_every_layer_type_and_modules_to_save_route_per_sample():
    torch.manual_seed(0)
    targets = ["emb", "lin", "gpt2", "conv1", "conv2", "conv3"]
    model = get_peft_model(
        Zoo(),
        LoraConfig(
            target_modules=targets, init_lora_weights=False, modules_to_save=["head"], fan_in_fan_out=False
        ),
        adapter_name="a",
    )
    model.add_adapter("b", LoraConfig(r=3, target_modules=targets[::2], init_lora_weights=False))
    with torch.no_grad():
        for p in model.base_model.model.head.modules_to_save["a"].parameters():
            p.add_(0.5)
    model.eval()
    rows = ["b", "a", "__base__", "a"]
    ids = torch.randint(0, 20, (len(rows), 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mixed = model(ids, adapter_names=rows)
        for i, name in enumerate(rows):
            single = alone(model, name, lambda i=i: model(ids[i : i + 1]))
            torch.testing.assert_close(mixed[i : i + 1], single, atol=ATOL, rtol=0)


def test_bad_adapter_names_are_refused_before_anything_runs():
    model = llama_with_adapters()
    ids = torch.randint(3, 60, (2, 4))
    with pytest.raises(ValueError, match="unknown adapter"):
        model(input_ids=ids, adapter_names=["a", "nope"])
    with pytest.raises(ValueError, match="one adapter name per sample"):
        model(input_ids=ids, adapter_names=["a", "b", "c"])
    with pytest.raises(TypeError, match="one adapter name per sample"):
        model(input_ids=ids, adapter_names="a")
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match="merged"):
        model(input_ids=ids, adapter_names=["a", "b"])
    model.unmerge_adapter()
    # No hook is left behind after an error: a plain forward runs as before.
    model.set_adapter("a")
    model(input_ids=ids)
