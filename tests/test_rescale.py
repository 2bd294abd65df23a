"""``rescale_adapter_scale`` for every installed method with a scale, restored exactly on exit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_core import get_peft_model, rescale_adapter_scale

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def scaled_configs():
    cases = []
    lora = pytest.importorskip("peft_lora")
    cases.append(("lora", lora.LoraConfig(target_modules=["0", "2"], init_lora_weights=False)))
    cases.append(("lora_dora", lora.LoraConfig(target_modules=["0"], init_lora_weights=False, use_dora=True)))
    try:
        import peft_loha
        import peft_lokr

        cases.append(("loha", peft_loha.LoHaConfig(target_modules=["0", "2"], init_weights=False)))
        cases.append(("lokr", peft_lokr.LoKrConfig(target_modules=["0", "2"], init_weights=False)))
    except ImportError:
        pass
    try:
        import peft_adalora

        cases.append(
            (
                "adalora",
                peft_adalora.AdaLoraConfig(
                    target_modules=["0", "2"], init_r=4, total_step=10, init_lora_weights=False
                ),
            )
        )
    except ImportError:
        pass
    return cases


CASES = scaled_configs()


@pytest.mark.parametrize("config", [c for _, c in CASES], ids=[n for n, _ in CASES])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_rescaling_interpolates_and_restores_exactly(config, training):
    model = get_peft_model(base(), config)
    model.train(training)
    with torch.no_grad():
        adapted = model(X)
        with model.disable_adapter():
            plain = model(X)
    scalings = {
        n: dict(m.adapter_scaling) for n, m in model.named_modules() if getattr(m, "adapter_scaling", None)
    }
    assert scalings
    with torch.no_grad():
        with rescale_adapter_scale(model, 0.0):
            # DoRA renormalises the scaled weight by its learned magnitude, so scale 0 is not the base.
            if not getattr(config, "use_dora", False):
                torch.testing.assert_close(model(X), plain, atol=1e-6, rtol=0)
        with rescale_adapter_scale(model, 1.0):
            torch.testing.assert_close(model(X), adapted, atol=1e-6, rtol=0)
        with rescale_adapter_scale(model, 0.5):
            half = model(X)
        assert not torch.allclose(half, adapted) and not torch.allclose(half, plain)
        torch.testing.assert_close(model(X), adapted, atol=0, rtol=0)
    assert {
        n: dict(m.adapter_scaling) for n, m in model.named_modules() if getattr(m, "adapter_scaling", None)
    } == (scalings)


def test_linear_methods_move_halfway():
    lora = pytest.importorskip("peft_lora")
    model = get_peft_model(base(), lora.LoraConfig(target_modules=["2"], init_lora_weights=False)).eval()
    with torch.no_grad():
        adapted = model(X)
        with model.disable_adapter():
            plain = model(X)
        with rescale_adapter_scale(model, 0.5):
            torch.testing.assert_close(model(X), (adapted + plain) / 2, atol=1e-6, rtol=0)


def test_scales_are_restored_when_the_block_raises():
    lora = pytest.importorskip("peft_lora")
    model = get_peft_model(base(), lora.LoraConfig(target_modules=["0"], init_lora_weights=False))
    before = dict(model.base_model.model[0].scaling)
    with pytest.raises(RuntimeError, match="boom"), rescale_adapter_scale(model, 3):
        raise RuntimeError("boom")
    assert model.base_model.model[0].scaling == before


def test_refusals_name_the_problem():
    lora = pytest.importorskip("peft_lora")
    model = get_peft_model(base(), lora.LoraConfig(target_modules=["0"], init_lora_weights=False))
    with pytest.raises(TypeError, match="float"), rescale_adapter_scale(model, "2"):
        pass
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"), rescale_adapter_scale(model, 0.5):
        pass
    ia3 = pytest.importorskip("peft_ia3")
    scaleless = get_peft_model(base(), ia3.IA3Config(target_modules=["0"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="no scale"), rescale_adapter_scale(scaleless, 0.5):
        pass


@pytest.mark.compat
def test_equals_the_reference_library():
    peft = pytest.importorskip("peft")
    lora = pytest.importorskip("peft_lora")
    ours = get_peft_model(base(), lora.LoraConfig(target_modules=["0", "2"], init_lora_weights=False)).eval()
    theirs = peft.get_peft_model(base(), peft.LoraConfig(target_modules=["0", "2"])).eval()
    theirs.load_state_dict(ours.state_dict())
    from peft.helpers import rescale_adapter_scale as reference_rescale

    with torch.no_grad(), rescale_adapter_scale(ours, 0.3), reference_rescale(theirs, 0.3):
        torch.testing.assert_close(ours(X), theirs(X), atol=1e-6, rtol=0)
