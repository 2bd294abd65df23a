"""Hot-swapping LoRA adapters in place: equal to a fresh load, refused without any change."""

from __future__ import annotations

import os

import pytest
import torch
from peft_core import PeftModel, get_peft_model, hotswap_adapter, prepare_model_for_compiled_hotswap
from torch import nn

from peft_lora import LoraConfig

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.lin = nn.Linear(8, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x.abs() * 3).long().clamp(max=9)[:, :4]
        h = self.lin(x) + self.emb(ids).mean(1)
        h = self.conv(h.unsqueeze(-1).expand(-1, -1, 3)).mean(-1)
        return self.out(torch.relu(h))


TARGETS = ["emb", "lin", "conv", "out"]


def saved_adapter(tmp_path, name: str, seed: int, **options) -> str:
    options.setdefault("target_modules", TARGETS)
    torch.manual_seed(seed)
    model = get_peft_model(Net(), LoraConfig(init_lora_weights=False, **options))
    path = os.fspath(tmp_path / name)
    model.save_pretrained(path)
    return path


def fresh(path: str) -> nn.Module:
    return PeftModel.from_pretrained(Net(), path).eval()


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def snapshot(model: nn.Module) -> dict:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scalings = {n: dict(m.scaling) for n, m in model.named_modules() if hasattr(m, "scaling")}
    return {"state": state, "scalings": scalings, "config": model.peft_config["default"].to_dict()}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["config"] == before["config"] and after["scalings"] == before["scalings"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


def test_same_rank_other_alpha_and_rslora(tmp_path):
    first = saved_adapter(tmp_path, "a", 0, r=4, lora_alpha=8)
    second = saved_adapter(tmp_path, "b", 1, r=4, lora_alpha=3, use_rslora=True, alpha_pattern={"lin": 5})
    model = fresh(first)
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    hotswap_adapter(model, second, "default")
    torch.testing.assert_close(outputs(model), outputs(fresh(second)), atol=1e-6, rtol=0)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == pointers  # in place
    # The swapped adapter saves as itself.
    model.save_pretrained(tmp_path / "resaved")
    torch.testing.assert_close(outputs(fresh(os.fspath(tmp_path / "resaved"))), outputs(fresh(second)))


def test_lower_rank_into_a_padded_model_compiles_once(tmp_path):
    paths = [saved_adapter(tmp_path, f"r{r}", r, r=r, lora_alpha=2 * r + 1) for r in (2, 6, 4)]
    model = fresh(paths[0])
    prepare_model_for_compiled_hotswap(model, target_rank=6)
    torch.testing.assert_close(outputs(model), outputs(fresh(paths[0])), atol=1e-6, rtol=0)
    assert model.peft_config["default"].r == 6
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        outputs(compiled)
        for path in paths[1:] + paths[:1]:
            hotswap_adapter(compiled, path, "default")
            torch.testing.assert_close(outputs(compiled), outputs(fresh(path)), atol=1e-6, rtol=0)
    # Padded tensors save with a config that describes them, so the file reloads as the same map.
    model.save_pretrained(tmp_path / "padded")
    torch.testing.assert_close(
        outputs(fresh(os.fspath(tmp_path / "padded"))), outputs(fresh(paths[0])), atol=1e-6, rtol=0
    )


def test_an_adapter_on_fewer_modules_zeroes_the_rest(tmp_path):
    full = saved_adapter(tmp_path, "full", 0)
    partial = saved_adapter(tmp_path, "partial", 1, target_modules=["lin", "out"])
    model = fresh(full)
    hotswap_adapter(model, partial, "default")
    torch.testing.assert_close(outputs(model), outputs(fresh(partial)), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"target_modules": ["lin", "out", "conv", "emb"], "r": 12}, "prepare_model_for_compiled_hotswap"),
        ({"use_dora": True}, "use_dora"),
        ({"lora_bias": True, "target_modules": ["lin", "out"]}, "lora_bias|tensors the current one lacks"),
    ],
    ids=["higher_rank_unpadded", "dora", "lora_bias"],
)
def test_incompatible_adapters_are_refused_without_any_change(tmp_path, options, match):
    current = saved_adapter(tmp_path, "current", 0, r=8)
    other = saved_adapter(tmp_path, "other", 1, **options)
    model = fresh(current)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        hotswap_adapter(model, other, "default")
    assert_unchanged(model, before)


def test_other_targets_and_merged_adapters_are_refused(tmp_path):
    current = saved_adapter(tmp_path, "current", 0, target_modules=["lin"])
    wider = saved_adapter(tmp_path, "wider", 1, target_modules=["lin", "out"])
    model = fresh(current)
    before = snapshot(model)
    with pytest.raises(ValueError, match="tensors the current one lacks"):
        hotswap_adapter(model, wider, "default")
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="no such adapter"):
        hotswap_adapter(model, current, "missing")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        hotswap_adapter(model, current, "default")


@pytest.mark.compat
def test_equals_the_reference_hotswap(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils.hotswap import hotswap_adapter as reference_hotswap

    # Without the embedding: the reference's hot-swap cannot find an embedding layer's module.
    first = saved_adapter(tmp_path, "a", 0, r=4, lora_alpha=8, target_modules=["lin", "conv", "out"])
    second = saved_adapter(tmp_path, "b", 1, r=4, lora_alpha=16, target_modules=["lin", "conv", "out"])
    ours = fresh(first)
    hotswap_adapter(ours, second, "default")
    theirs = peft.PeftModel.from_pretrained(Net(), first).eval()
    reference_hotswap(theirs, second, "default", torch_device="cpu")
    torch.testing.assert_close(outputs(ours), outputs(theirs), atol=1e-6, rtol=0)
