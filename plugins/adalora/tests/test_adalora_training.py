"""Training with AdaLoRA: the budget schedule, rank allocation, the orthogonality penalty, pruned saving."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft_core import PeftModel, get_peft_model
from peft_core.errors import ConfigError
from safetensors.torch import load_file
from torch import nn

from peft_adalora import AdaLoraConfig


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 12)
        self.lin1 = nn.Linear(12, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin1(torch.tanh(self.lin0(x))))


SCHEDULE = {"init_r": 6, "target_r": 2, "tinit": 3, "tfinal": 5, "total_step": 20, "deltaT": 2}


def adapted(seed: int = 0, **options) -> tuple[nn.Module, PeftModel]:
    torch.manual_seed(seed)
    base = MLP().eval()
    torch.manual_seed(seed + 1)
    config = AdaLoraConfig(target_modules=["lin0", "lin1"], **{**SCHEDULE, **options})
    return base, get_peft_model(copy.deepcopy(base), config)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 8, generator=g)
    return x, torch.sin(x[:, :3]) + 0.1 * torch.randn(32, 3, generator=g)


def train(model: PeftModel, steps: int, lr: float = 1e-2) -> list[float]:
    """The documented loop: backward, step, update_and_allocate, zero_grad."""
    x, y = data()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        optimizer.step()
        # the PeftModel forwards to its adapter model, as in the reference
        (model.update_and_allocate if step % 2 else model.base_model.update_and_allocate)(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def kept(model: PeftModel) -> dict[str, int]:
    pattern = model.peft_config["default"].rank_pattern
    return {k: sum(v) for k, v in pattern.items()}


# ---------------------------------------------------------------------- training
def test_twenty_adam_steps_lower_the_loss_and_change_only_the_adapter():
    _, model = adapted()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = data()
    with torch.no_grad():
        initial = (model.eval()(x) - y).pow(2).mean().item()
    losses = train(model, 20)
    assert sum(losses[-5:]) < sum(losses[:5])
    with torch.no_grad():
        final = (model.eval()(x) - y).pow(2).mean().item()
    assert final < 0.95 * initial, (initial, final)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    adapter = {f"base_model.model.{m}.lora_{f}.default" for m in ("lin0", "lin1") for f in "ABE"}
    assert changed <= adapter, sorted(changed - adapter)
    # every factor trained; a singular value vector may be back at its initial zeros if all of it was pruned
    assert {n for n in adapter if "lora_E" not in n} <= changed and any("lora_E" in n for n in changed)


def test_the_final_allocation_meets_the_target_budget_and_stays_applied():
    _, model = adapted()
    train(model, SCHEDULE["total_step"] - SCHEDULE["tfinal"] + 1)  # up to and including the final allocation
    pattern = model.peft_config["default"].rank_pattern
    assert set(pattern) == {"lin0.lora_E", "lin1.lora_E"} and all(len(m) == 6 for m in pattern.values())
    assert sum(kept(model).values()) <= SCHEDULE["target_r"] * 2
    assert model.base_model.rankallocator.ipt == {}  # reset after the final allocation
    # the final phase keeps pruned singular values at zero, although the optimizer moves them
    train(model, SCHEDULE["total_step"])
    for key, mask in pattern.items():
        layer = model.base_model.model.get_submodule(key.removesuffix(".lora_E"))
        values = layer.lora_E["default"].detach().view(-1)
        assert torch.all(values[~torch.tensor(mask)] == 0), key
        assert layer.rank_mask["default"] == mask


def test_budget_schedule_is_constant_then_cubic_then_the_target():
    _, model = adapted()
    allocator = model.base_model.rankallocator
    assert (allocator.init_bgt, allocator.target_bgt) == (12, 4)
    schedule = [allocator.budget_schedule(step) for step in range(SCHEDULE["total_step"] + 2)]
    tinit, final = SCHEDULE["tinit"], SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    assert all(b == (12, False) for b in schedule[: tinit + 1])
    middle = schedule[tinit + 1 : final]
    budgets = [b for b, _ in middle]
    assert budgets == sorted(budgets, reverse=True) and 4 <= budgets[-1] < 12
    for step, (budget, _) in enumerate(middle, start=tinit + 1):
        expected = int(8 * (1 - (step - tinit) / (final - tinit)) ** 3 + 4)
        assert budget == expected
    assert [m for _, m in middle] == [step % 2 == 0 for step in range(tinit + 1, final)]
    assert schedule[final][0] == 4 and all(b == (4, True) for b in schedule[final + 1 :])


def test_a_target_at_or_above_init_r_prunes_nothing():
    _, model = adapted(target_r=6)
    train(model, SCHEDULE["total_step"] - SCHEDULE["tfinal"] + 1)
    assert kept(model) == {"lin0.lora_E": 6, "lin1.lora_E": 6}


def test_update_and_allocate_refuses_to_run_without_gradients():
    _, model = adapted()
    with pytest.raises(RuntimeError, match=r"after loss.backward\(\) and before optimizer.zero_grad\(\)"):
        model.base_model.update_and_allocate(0)


def test_the_final_phase_needs_the_final_allocation():
    _, model = adapted()
    with pytest.raises(ConfigError, match="must also run at step total_step - tfinal = 15"):
        model.base_model.update_and_allocate(17)


# ---------------------------------------------------------------------- saving the pruned adapter
def test_saving_writes_the_pruned_shapes_and_loading_rebuilds_them(tmp_path):
    base, model = adapted()
    train(model, SCHEDULE["total_step"])
    counts = kept(model)
    assert counts["lin0.lora_E"] < 6 or counts["lin1.lora_E"] < 6
    x, _ = data()
    with torch.no_grad():
        expected = model.eval()(x)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for module in ("lin0", "lin1"):
        r = counts[f"{module}.lora_E"]
        assert tuple(saved[f"base_model.model.{module}.lora_E"].shape) == (r, 1)
        assert saved[f"base_model.model.{module}.lora_A"].shape[0] == r
        assert saved[f"base_model.model.{module}.lora_B"].shape[1] == r
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] == (
        model.peft_config["default"].rank_pattern
    )
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    for module in ("lin0", "lin1"):
        layer, r = loaded.base_model.model.get_submodule(module), counts[f"{module}.lora_E"]
        # a pruned layer keeps init_r's scale; one pruned to nothing gets 0 (as in the reference)
        assert layer.r["default"] == r and layer.ranknum["default"].item() == (6.0 if r else 0.0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=1e-6)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


def test_a_loaded_pruned_adapter_trains_on(tmp_path):
    base, model = adapted()
    train(model, SCHEDULE["total_step"])
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    sizes = {m: loaded.base_model.model.get_submodule(m).r["default"] for m in ("lin0", "lin1")}
    assert loaded.base_model.rankallocator.init_bgt == sum(sizes.values())
    losses = train(loaded, 5, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    loaded.save_pretrained(tmp_path / "again")
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again")
    x, _ = data()
    with torch.no_grad():
        torch.testing.assert_close(again(x), loaded.eval()(x), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------- the orthogonality penalty
def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(config).eval()


def _penalty(model: PeftModel) -> torch.Tensor:
    terms = []
    for layer in model.base_model.adapter_layers():
        A, B = layer.lora_A["default"], layer.lora_B["default"]
        terms.append(torch.linalg.matrix_norm(A @ A.T - torch.eye(A.shape[0])))
        terms.append(torch.linalg.matrix_norm(B.T @ B - torch.eye(B.shape[1])))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("weight", [0.5, 0.0])
def test_the_penalty_is_added_to_the_loss_when_the_model_returns_one(weight):
    base = _llama()
    torch.manual_seed(1)
    config = AdaLoraConfig(
        target_modules=["q_proj", "v_proj"], init_r=4, total_step=10, orth_reg_weight=weight
    )
    model = get_peft_model(copy.deepcopy(base), config)
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = base(input_ids=ids, labels=ids).loss
        loss = model(input_ids=ids, labels=ids).loss
        without_labels = model(input_ids=ids)
    assert without_labels.loss is None
    torch.testing.assert_close(loss, plain + weight * _penalty(model), atol=1e-6, rtol=1e-6)
    if weight:
        assert loss > plain + 0.5  # N(0, 0.02) factors are far from orthonormal
    model(input_ids=ids, labels=ids).loss.backward()  # the penalty is differentiable
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].grad is not None


def test_no_penalty_without_a_trainable_adapter(tmp_path):
    base = _llama()
    config = AdaLoraConfig(target_modules=["q_proj"], init_r=4, total_step=10)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 32, (1, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, labels=ids).loss, base(input_ids=ids, labels=ids).loss, atol=0, rtol=0
        )
