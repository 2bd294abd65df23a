"""PiSSA / OLoRA adapters saved as plain LoRA for the original base (save_pretrained and the CLI)."""

from __future__ import annotations

import os

import pytest
import torch
from peft_core import PeftModel, cli, get_peft_model
from torch import nn

from peft_lora import LoraConfig

X = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))


def train_a_little(model: nn.Module) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(X).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize(
    "options",
    [
        {"init_lora_weights": "pissa"},
        {"init_lora_weights": "olora"},
        {"init_lora_weights": "pissa", "use_rslora": True, "alpha_pattern": {"2": 5.0}},
        {"init_lora_weights": "pissa", "rank_pattern": {"0": 2}, "modules_to_save": ["1"]},
    ],
    ids=["pissa", "olora", "pissa_rslora_alpha_pattern", "pissa_rank_pattern"],
)
def test_converted_adapter_gives_the_trained_model_on_the_original_base(tmp_path, options):
    model = get_peft_model(base(), LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], **options))
    model.peft_config["default"].init_lora_weights = True  # saved as-is, the init must not rerun on load
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = options["init_lora_weights"]
    train_a_little(model)
    model.eval()
    with torch.no_grad():
        trained = model(X)
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "initial")
    plain = PeftModel.from_pretrained(base(), tmp_path / "plain").eval()
    assert plain.peft_config["default"].r == 6 and plain.peft_config["default"].init_lora_weights is True
    with torch.no_grad():
        torch.testing.assert_close(plain(X), trained, atol=1e-5, rtol=0)
    # The model being saved is untouched by the conversion.
    with torch.no_grad():
        torch.testing.assert_close(model(X), trained, atol=0, rtol=0)

    # The CLI does the same from the two directories.
    model.save_pretrained(tmp_path / "trained")
    assert (
        cli.main(
            [
                "convert",
                os.fspath(tmp_path / "initial"),
                os.fspath(tmp_path / "trained"),
                os.fspath(tmp_path / "cli"),
            ]
        )
        == 0
    )
    from_cli = PeftModel.from_pretrained(base(), tmp_path / "cli").eval()
    with torch.no_grad():
        torch.testing.assert_close(from_cli(X), trained, atol=1e-5, rtol=0)


def test_conversion_of_other_methods_is_refused_clearly(tmp_path):
    ia3 = pytest.importorskip("peft_ia3")
    model = get_peft_model(base(), ia3.IA3Config(target_modules=["0"], feedforward_modules=[]))
    model.save_pretrained(tmp_path / "initial")
    with pytest.raises(TypeError, match="nothing to convert"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "initial")
    assert not (tmp_path / "out").exists()


@pytest.mark.compat
def test_the_reference_library_reads_the_converted_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model = get_peft_model(base(), LoraConfig(r=3, target_modules=["0", "2"], init_lora_weights="pissa"))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = "pissa"
    train_a_little(model)
    model.eval()
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "initial")
    theirs = peft.PeftModel.from_pretrained(base(), os.fspath(tmp_path / "plain")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(X), model(X), atol=1e-5, rtol=0)
