"""LoftQ initialisation on an unquantized base: Q + scaling * B A fits W better than Q alone."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from peft_core import PeftModel, get_peft_model
from peft_core.errors import ConfigError
from torch import nn

from peft_lora import LoftQConfig, LoraConfig
from peft_lora.loftq import NF4_CODE, quantize_dequantize

# whole 64-blocks per row: bitsandbytes' AVX512-BF16 CPU quantizer (the reference's, on such CPUs) is wrong otherwise
W = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
X = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))


def base() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 48), nn.Tanh(), nn.Linear(48, 8))
    with torch.no_grad():
        model[0].weight.copy_(W)
    return model


def loftq_model(bits: int = 4, iterations: int = 1, r: int = 4, alpha: int = 8) -> nn.Module:
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=["0"],
        init_lora_weights="loftq",
        loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=iterations),
    )
    return get_peft_model(base(), config)


def errors(model: nn.Module) -> tuple[float, float]:
    """(||W - (Q + scaling B A)||, ||W - Q||) for the first layer."""
    layer = model.base_model.model[0]
    with torch.no_grad():
        Q = layer.base_layer.weight
        return float((W - Q - layer.get_delta_weight("default")).norm()), float((W - Q).norm())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("alpha", [4, 16])  # scaling 1 and 4
def test_low_rank_part_reduces_the_quantization_error_more_with_iterations(bits, alpha):
    with_lora = []
    for iterations in (1, 2, 4):
        adapted, quantized_only = errors(loftq_model(bits, iterations, alpha=alpha))
        assert adapted < quantized_only
        with_lora.append(adapted)
    assert with_lora[0] >= with_lora[1] - 1e-5 >= with_lora[2] - 2e-5, with_lora


def test_base_holds_the_quantized_weight():
    model = loftq_model(bits=4, iterations=1)
    torch.testing.assert_close(model.base_model.model[0].base_layer.weight, quantize_dequantize(W, 4))


def test_nf4_levels_blocks_and_fixed_point():
    Q = quantize_dequantize(W, 4)
    blocks_W, blocks_Q = W.reshape(-1, 64), Q.reshape(-1, 64)
    absmax = blocks_W.abs().amax(dim=1, keepdim=True)
    levels = blocks_Q / absmax
    # every value is one of the 16 levels times its block's absmax, the nearest one
    nearest = NF4_CODE[(blocks_W / absmax).unsqueeze(-1).sub(NF4_CODE).abs().argmin(-1)]
    torch.testing.assert_close(levels, nearest)
    torch.testing.assert_close(quantize_dequantize(Q, 4), Q)  # re-quantizing changes nothing
    Q8 = quantize_dequantize(W, 8)
    assert (W - Q8).abs().max() <= W.abs().amax(dim=1).max() / 254 + 1e-6
    torch.testing.assert_close(quantize_dequantize(Q8, 8), Q8)


def test_save_and_load_reruns_the_init_and_gives_the_same_outputs(tmp_path):
    model = loftq_model()
    with torch.no_grad():
        model.base_model.model[0].lora_B["default"].weight.add_(0.1)
    model.eval()
    with torch.no_grad():
        expected = model(X)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), expected)


def test_refusals():
    with pytest.raises(ConfigError, match="loftq_config"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ConfigError, match="loftq_bits"):
        LoftQConfig(loftq_bits=3)
    with pytest.raises(ConfigError, match="loftq_iter"):
        LoftQConfig(loftq_iter=0)
    with pytest.warns(UserWarning, match="loftq_config is ignored"):
        assert LoraConfig(loftq_config=LoftQConfig()).loftq_config == {}


def test_bitsandbytes_is_never_imported():
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from peft_core import get_peft_model\n"
        "from peft_lora import LoraConfig, LoftQConfig\n"
        "get_peft_model(nn.Sequential(nn.Linear(16, 8)), LoraConfig(r=2, target_modules=['0'], "
        "init_lora_weights='loftq', loftq_config=LoftQConfig()))\n"
        "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- the reference library
@pytest.mark.compat
@pytest.mark.parametrize("bits", [4, 8])
def test_compat_quantizer_and_factors_match_the_reference_pipeline(bits):
    """The reference's LoftQ needs bitsandbytes on CUDA; on CPU its quantizers and SVD step are compared."""
    pytest.importorskip("peft")
    F = pytest.importorskip("bitsandbytes.functional")
    from peft.utils.loftq_utils import _low_rank_decomposition

    def reference_round_trip(matrix):
        if bits == 4:
            packed, state = F.quantize_4bit(matrix, blocksize=64, quant_type="nf4", compress_statistics=False)
            return F.dequantize_4bit(packed, state)
        q, scales, _ = F.int8_vectorwise_quant(matrix)
        return F.int8_vectorwise_dequant(q, scales)

    try:
        expected_Q = reference_round_trip(W)
    except Exception as error:  # a bitsandbytes build without CPU kernels
        pytest.skip(f"bitsandbytes cannot quantize on CPU here: {error}")
    torch.testing.assert_close(quantize_dequantize(W, bits), expected_Q, atol=1e-6, rtol=0)

    # The reference loop (loftq_iter=2) with the reference's own quantizer and decomposition.
    residual = W.clone()
    for step in range(2):
        Q = reference_round_trip(residual)
        parts = _low_rank_decomposition(W - Q, reduced_rank=4)
        if step == 0:
            residual = W - parts["L"] @ parts["R"]
    model = loftq_model(bits, iterations=2, r=4, alpha=4)  # scaling 1: the reference's factors
    layer = model.base_model.model[0]
    torch.testing.assert_close(layer.base_layer.weight, Q, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.lora_A["default"].weight, parts["R"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.lora_B["default"].weight, parts["L"], atol=1e-4, rtol=1e-4)


@pytest.mark.compat
def test_compat_adapter_loads_in_the_reference(tmp_path):
    """A LoftQ adapter saved as plain LoRA (init True) on the saved residual base loads in the reference."""
    peft = pytest.importorskip("peft")
    model = loftq_model()
    with torch.no_grad():
        model.base_model.model[0].lora_B["default"].weight.add_(0.1)
    model.eval()
    with torch.no_grad():
        expected = model(X)
    model.peft_config["default"].init_lora_weights = True  # the reference's LoftQ re-init needs CUDA + bnb
    model.save_pretrained(tmp_path)
    residual = base()
    with torch.no_grad():
        residual[0].weight.copy_(model.base_model.model[0].base_layer.weight)
    in_ref = peft.PeftModel.from_pretrained(residual, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(in_ref(X), expected, atol=1e-6, rtol=0)
