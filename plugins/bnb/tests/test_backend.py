"""The two bitsandbytes backends on their own: recognition, dequantize / requantize, error bounds, imports."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_core.plugins import get_registry
from peft_core.quantization import backend_for, dequantized_weight, is_adaptable_linear, weight_shape
from torch import nn

from peft_bnb import BNB_4BIT, BNB_8BIT, quantize_4bit, quantize_8bit

BACKENDS = [(BNB_4BIT, quantize_4bit), (BNB_8BIT, quantize_8bit)]


@pytest.mark.parametrize(("backend", "quantize"), BACKENDS)
def test_the_registry_finds_the_backend_of_each_layer_kind(backend, quantize):
    layer = quantize(nn.Linear(32, 16))
    assert get_registry().quantization_backends[backend.name].name == backend.name
    assert backend_for(layer).name == backend.name
    assert is_adaptable_linear(layer) and weight_shape(layer) == (16, 32)
    assert backend_for(nn.Linear(32, 16)) is None


@pytest.mark.parametrize(("backend", "quantize"), BACKENDS)
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.floats(0.0, 0.5))
def test_requantizing_stays_within_the_documented_bound(backend, quantize, seed, shift):
    torch.manual_seed(seed)
    layer = quantize(nn.Linear(64, 32))
    x = torch.randn(3, 64)
    layer(x)  # 8-bit: the first forward moves the scales into the layer state; dequantize must still work
    weight = dequantized_weight(layer).clone() + shift * torch.randn(32, 64)
    backend.requantize(layer, weight)
    error = (backend.dequantize(layer) - weight).abs()
    assert bool((error <= backend.weight_error_bound(layer, weight)).all())
    # the layer computes with the new weight
    torch.testing.assert_close(layer(x), x @ backend.dequantize(layer).T + layer.bias, rtol=0.05, atol=0.05)


def test_requantizing_an_unchanged_weight_changes_nothing_in_4bit():
    layer = quantize_4bit(nn.Linear(64, 32))
    before = layer.weight.detach().clone()
    BNB_4BIT.requantize(layer, BNB_4BIT.dequantize(layer))
    assert torch.equal(layer.weight, before)  # values on the grid quantize to themselves


def test_importing_the_core_lora_and_this_plugin_does_not_import_bitsandbytes():
    code = textwrap.dedent(
        """
        import sys, torch
        from torch import nn
        import peft_core
        from peft_core.plugins import get_registry
        registry = get_registry()
        assert "bitsandbytes 4-bit" in registry.quantization_backends
        try:
            from peft_core import LoraConfig, get_peft_model
        except ImportError:
            pass  # the plugin session installs no method plugin
        else:
            model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(target_modules=["0"]))
            model.merge_and_unload()
        assert "bitsandbytes" not in sys.modules, "bitsandbytes was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- AVX512-BF16 CPUs
def _repacks_on_this_cpu() -> bool:
    layer = quantize_4bit(nn.Linear(64, 32)).eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def test_a_repacked_4bit_layer_dequantizes_to_what_its_kernel_computes_with():
    """bitsandbytes repacks a Linear4bit at its first inference forward on AVX512-BF16 CPUs."""
    if not _repacks_on_this_cpu():
        pytest.skip("bitsandbytes does not repack 4-bit weights on this CPU (no AVX512-BF16)")
    torch.manual_seed(0)
    layer = quantize_4bit(nn.Linear(128, 64, bias=False)).eval()
    standard = BNB_4BIT.dequantize(layer)
    x = torch.randn(5, 128)
    with torch.no_grad():
        out = layer(x)
    assert layer.weight.quant_state.packing_format_for_cpu
    repacked = BNB_4BIT.dequantize(layer)
    # the same codes on bfloat16 scales: within a bf16 rounding of each weight, and exactly the kernel's weight
    assert (repacked - standard).abs().max() <= standard.abs().max() * 2**-8
    torch.testing.assert_close(out, x @ repacked.T, atol=2e-2, rtol=2e-2)
    assert layer.weight.quant_state.packing_format_for_cpu, "dequantizing must leave the layer as it was"
    # prepare returns it to the standard layout with those same values, and keeps it there
    BNB_4BIT.prepare(layer)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(BNB_4BIT.dequantize(layer), repacked, atol=0, rtol=0)
    with torch.no_grad():
        layer(x)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def test_qlora_trains_after_an_evaluation_pass():
    """Trainer evaluates between steps; on AVX512-BF16 CPUs bitsandbytes would repack and then raise."""
    from peft_core import get_peft_model

    LoraConfig = pytest.importorskip(
        "peft_lora", reason="needs the LoRA plugin (the tests session has it)"
    ).LoraConfig

    torch.manual_seed(0)
    base = nn.Sequential(quantize_4bit(nn.Linear(64, 64)), nn.ReLU(), quantize_4bit(nn.Linear(64, 32)))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(8, 64)
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
    model.train()
    loss = model(x).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), evaluated, atol=0, rtol=0)
