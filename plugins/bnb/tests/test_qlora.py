"""QLoRA end to end on a tiny Llama quantized by transformers' bitsandbytes integration, on CPU.

Load 4-bit (NF4) or 8-bit, prepare for k-bit training, add LoRA on every linear, train a few
steps, save, reload on a freshly quantized base, merge. Compat tests (marked) check files and
outputs against the reference ``peft`` on the same quantized base, both ways.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' bitsandbytes loading needs accelerate")
pytest.importorskip("peft_lora", reason="QLoRA needs the LoRA plugin (plugins/lora)")

from peft_core import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from peft_core.quantization import backend_for  # noqa: E402

from peft_bnb.backend import BNB_4BIT  # noqa: E402

BITS = ("4bit", "8bit")
VOCAB = 64


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


def load_quantized(path, bits: str):
    if bits == "4bit":
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    else:
        quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )


def standard_kernels(model):
    """The reference's bases on the kernel ours use: peft-bnb keeps adapted 4-bit layers out of
    bitsandbytes' AVX512-BF16 repacking (bfloat16 scales); the reference lets it happen."""
    for module in model.modules():
        if BNB_4BIT.handles(module):
            BNB_4BIT.prepare(module)
    return model


def batch():
    ids = torch.randint(1, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def qlora(path, bits: str):
    model = prepare_model_for_kbit_training(load_quantized(path, bits), use_gradient_checkpointing=False)
    torch.manual_seed(1)
    return get_peft_model(
        model, LoraConfig(target_modules="all-linear", r=8, lora_alpha=16, lora_dropout=0.0)
    )


@pytest.mark.parametrize("bits", BITS)
def test_qlora_trains_saves_reloads_and_merges(float_dir, tmp_path, bits):
    model = qlora(float_dir, bits)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert len(layers) == 2 * 7  # q k v o gate up down per decoder layer (lm_head is left out)
    assert all(backend_for(layer.get_base_layer()) is not None for layer in layers)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if not p.dtype.is_floating_point}
    assert packed, "the base must hold quantized weights"

    inputs = batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for name, tensor in packed.items():
        assert torch.equal(dict(model.named_parameters())[name], tensor), f"{name} changed in training"

    model.eval()
    with torch.no_grad():
        trained = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_quantized(float_dir, bits), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained, rtol=0, atol=0)

    # The exact float merge of every layer, to hold the re-quantized result to the backend's bound.
    exact = {}
    for name, layer in reloaded.named_modules():
        if hasattr(layer, "lora_A"):
            base = layer.get_base_layer()
            exact[name] = (
                backend_for(base),
                base,
                backend_for(base).dequantize(base) + layer.get_delta_weight("default"),
            )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = reloaded.merge_and_unload()
    assert any("re-quantizes" in str(w.message) for w in caught)
    quantized_layers = [m for m in merged.modules() if backend_for(m) is not None]
    assert len(quantized_layers) == 14, "merge_and_unload must return a model with quantized layers"
    for name, (backend, base, weight) in exact.items():
        error = (backend.dequantize(base) - weight).abs()
        assert bool((error <= backend.weight_error_bound(base, weight)).all()), name
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
    # Reported, not asserted: the per-weight bound above is the contract; this is what it means
    # for the logits of this model (printed with -rA / in the junit properties).
    record = (merged_logits - trained).abs().max().item(), _quantization_effect(float_dir, bits, inputs)
    print(
        f"{bits}: merged-vs-unmerged max |logit diff| {record[0]:.4f}; quantizing the base moves logits {record[1]:.4f}"
    )


def _quantization_effect(path, bits, inputs) -> float:
    """How far quantizing the base at all moves the logits: the scale merge errors are judged on."""
    float_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return (load_quantized(path, bits)(**inputs).logits - float_model(**inputs).logits).abs().max().item()


def test_without_the_backend_a_bitsandbytes_layer_names_peft_bnb(float_dir, monkeypatch):
    from peft_core.errors import TargetModulesError
    from peft_core.plugins import get_registry

    model = load_quantized(float_dir, "4bit")
    monkeypatch.setattr(get_registry(), "_backends", {})
    with pytest.raises(TargetModulesError, match=r"pip install peft-bnb"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"]))


def test_methods_without_quantized_bases_are_refused_by_name(float_dir):
    pytest.importorskip("peft_oft", reason="needs the OFT plugin")
    from peft_core import OFTConfig
    from peft_core.errors import TargetModulesError

    model = load_quantized(float_dir, "4bit")
    with pytest.raises(
        TargetModulesError, match=r"OFT does not declare support for quantized base layers.*LORA"
    ):
        get_peft_model(model, OFTConfig(target_modules=["q_proj"], r=4, oft_block_size=0))


@pytest.mark.parametrize(
    ("init", "fix"),
    [
        ("pissa", "quantize the residual model"),
        ("olora", "quantize the residual model"),
        ("loftq", "replace_lora_weights_loftq"),
    ],
)
def test_weight_derived_inits_refuse_a_quantized_base_and_name_the_fix(float_dir, init, fix):
    from peft_core import LoftQConfig
    from peft_core.errors import ConfigError

    model = load_quantized(float_dir, "4bit")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    options = {"loftq_config": LoftQConfig()} if init == "loftq" else {}
    with pytest.raises(
        ConfigError, match=rf"init_lora_weights='{init}' needs a float32.*torch\.uint8.*{fix}"
    ):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights=init, **options))
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


# ---------------------------------------------------------------------- against the reference
@pytest.mark.compat
@pytest.mark.parametrize("bits", BITS)
def test_adapters_move_both_ways_with_the_reference_on_the_same_quantized_base(float_dir, tmp_path, bits):
    peft = pytest.importorskip("peft")
    inputs = batch()
    ours = qlora(float_dir, bits)
    with torch.no_grad():  # a non-trivial adapter
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    ours.eval()
    with torch.no_grad():
        expected = ours(**inputs).logits
    ours.save_pretrained(tmp_path / "ours")

    theirs = peft.PeftModel.from_pretrained(
        standard_kernels(load_quantized(float_dir, bits)), tmp_path / "ours"
    )
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, expected, rtol=0, atol=1e-5)
        theirs_merged_input = theirs(**inputs).logits
    theirs.save_pretrained(tmp_path / "theirs")
    back = PeftModel.from_pretrained(load_quantized(float_dir, bits), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, theirs_merged_input, rtol=0, atol=1e-5)

    # Merging re-quantizes the same float sum with the same settings: the same packed weights.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_merged = theirs.merge_and_unload()
        our_merged = back.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(
            our_merged(**inputs).logits, their_merged(**inputs).logits, rtol=0, atol=1e-5
        )


def test_replace_lora_weights_loftq_brings_the_quantized_model_closer_to_the_float_one(float_dir):
    from peft_core import replace_lora_weights_loftq

    inputs = batch()
    float_model = transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32)
    model = get_peft_model(
        load_quantized(float_dir, "4bit"), LoraConfig(target_modules="all-linear", r=16, lora_alpha=32)
    )
    model.eval()
    with torch.no_grad():
        target = float_model(**inputs).logits
        before = (model(**inputs).logits - target).abs().mean().item()
        replace_lora_weights_loftq(model, model_path=str(float_dir))
        after = (model(**inputs).logits - target).abs().mean().item()
    assert after < 0.8 * before, (before, after)

    calls = []
    replace_lora_weights_loftq(
        model, model_path=str(float_dir), callback=lambda m, name: calls.append(name) or False
    )
    assert len(calls) == 14
    with torch.no_grad():  # every replacement was rolled back: the same model as after the first call
        assert (model(**inputs).logits - target).abs().mean().item() == pytest.approx(after)
