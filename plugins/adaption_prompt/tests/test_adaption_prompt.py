"""AdaptionPromptConfig, targeting, the adapted attention on Llama/Mistral/Qwen2, and what is refused."""

from __future__ import annotations

import copy
import json
from importlib.metadata import entry_points

import peft_core
import pytest
import torch
from adaption_prompt_models import PAD, padded_batch, tiny_lm
from peft_core import PeftConfig, PeftModel, get_peft_model
from peft_core.errors import ConfigError, TargetModulesError
from peft_core.plugins import get_registry
from safetensors.torch import load_file

from peft_adaption_prompt import AdaptionPromptConfig, plugin
from peft_adaption_prompt.layer import AdaptedAttention
from peft_adaption_prompt.model import AdaptionPromptModel


def _config(**options) -> AdaptionPromptConfig:
    return AdaptionPromptConfig(
        **{"task_type": "CAUSAL_LM", "adapter_len": 3, "adapter_layers": 2, **options}
    )


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _trained(model: PeftModel, seed: int = 1) -> PeftModel:
    """Perturb every trainable tensor (gates included), standing in for a training run."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator).to(param))
    return model


# ---------------------------------------------------------------------- config
def test_defaults_and_json_round_trip():
    config = AdaptionPromptConfig()
    data = config.to_dict()
    assert data["peft_type"] == "ADAPTION_PROMPT"
    assert (data["target_modules"], data["adapter_len"], data["adapter_layers"]) == (None, None, None)
    again = PeftConfig.from_dict(json.loads(_config().to_json_string()))
    assert type(again) is AdaptionPromptConfig and again.to_dict() == _config().to_dict()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"adapter_len": 0}, "adapter_len"),
        ({"adapter_layers": -1}, "adapter_layers"),
        ({"adapter_len": 2.5}, "adapter_len"),
        ({"target_modules": ["q_proj", "v_proj"]}, "target_modules"),
    ],
)
def test_invalid_configs_are_refused_naming_the_field(options, message):
    with pytest.raises(ConfigError, match=message):
        AdaptionPromptConfig(**options)


def test_a_one_name_list_is_stored_as_the_name():
    assert AdaptionPromptConfig(target_modules=["self_attn"]).target_modules == "self_attn"


@pytest.mark.parametrize("missing", ["adapter_len", "adapter_layers"])
def test_missing_sizes_are_an_error_when_used(missing):
    with pytest.raises(ConfigError, match=missing):
        get_peft_model(tiny_lm(), _config(**{missing: None}))


# ---------------------------------------------------------------------- targeting
def test_the_top_layers_are_adapted_and_target_modules_is_filled_in():
    model = get_peft_model(tiny_lm(layers=3), _config(adapter_layers=2))
    adapted = [k for k, m in model.base_model.model.named_modules() if isinstance(m, AdaptedAttention)]
    assert adapted == ["model.layers.1.self_attn", "model.layers.2.self_attn"]
    assert model.peft_config["default"].target_modules == "self_attn"
    assert isinstance(model.base_model, AdaptionPromptModel)


def test_more_adapter_layers_than_the_model_has_is_an_error():
    with pytest.raises(TargetModulesError, match="adapter_layers=4"):
        get_peft_model(tiny_lm(layers=3), _config(adapter_layers=4))


def test_an_unknown_model_type_needs_target_modules():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    with pytest.raises(ConfigError, match="gpt2"):
        get_peft_model(gpt2, _config(adapter_layers=1))
    with pytest.raises(TargetModulesError, match="cannot wrap"):
        get_peft_model(gpt2, _config(adapter_layers=1, target_modules="attn"))


# ---------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_fresh_adapter_is_the_identity_and_training_lowers_the_loss(family):
    base = tiny_lm(family)
    inputs = padded_batch(3)
    model = get_peft_model(copy.deepcopy(base), _config())
    assert torch.equal(_logits(model, inputs), _logits(base, inputs))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        f"base_model.model.model.layers.{i}.self_attn.{kind}.default"
        for i in (1, 2)
        for kind in ("adaption_gate", "adaption_prompt")
    ]
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    assert not torch.equal(_logits(model, inputs), _logits(base, inputs))
    with model.disable_adapter():
        assert torch.equal(_logits(model, inputs), _logits(base, inputs))


def test_a_zero_gate_adds_nothing_even_with_an_o_proj_bias():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    model = get_peft_model(copy.deepcopy(base), _config())
    inputs = padded_batch(1)
    torch.testing.assert_close(_logits(model, inputs), _logits(base, inputs), atol=1e-6, rtol=0)


def test_base_weights_do_not_change_in_training():
    base = tiny_lm()
    model = get_peft_model(copy.deepcopy(base), _config())
    inputs = padded_batch(0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
    plain = model.unload()
    for (key, value), expected in zip(plain.state_dict().items(), base.state_dict().values()):
        assert torch.equal(value, expected), key


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_left_padded_generation_matches_each_sequence_alone(family):
    model = _trained(get_peft_model(tiny_lm(family), _config())).eval()
    batch = padded_batch(5, (6, 3))
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": PAD}
    for beams in (1, 2):
        together = model.generate(**batch, num_beams=beams, **options)
        for row in range(2):
            keep = batch["attention_mask"][row].bool()
            alone = {k: v[row : row + 1, keep] for k, v in batch.items()}
            single = model.generate(**alone, num_beams=beams, **options)
            assert torch.equal(together[row, -4:], single[0, -4:]), (beams, row)
    # The prompt's keys carry no rotary embedding, so its share depends on absolute positions: a padded
    # forward needs the padding-aware position_ids that generate makes.
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    logits = _logits(model, {**batch, "position_ids": positions})
    alone = {k: v[1:, 3:] for k, v in batch.items()}
    torch.testing.assert_close(logits[1:, 3:], _logits(model, alone), atol=1e-5, rtol=1e-5)


def test_bfloat16_base_runs_with_float32_adapters():
    base = tiny_lm().to(torch.bfloat16)
    model = _trained(get_peft_model(base, _config()))
    prompt = model.base_model.model.model.layers[2].self_attn.adaption_prompt["default"]
    assert prompt.dtype == torch.float32
    logits = _logits(model, padded_batch(0))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    kept = get_peft_model(tiny_lm().to(torch.bfloat16), _config(), autocast_adapter_dtype=False)
    assert kept.base_model.model.model.layers[2].self_attn.adaption_gate["default"].dtype == torch.bfloat16


# ---------------------------------------------------------------------- several adapters, files
def test_several_adapters_switch_disable_save_and_load(tmp_path):
    base = tiny_lm()
    inputs = padded_batch(2)
    model = _trained(get_peft_model(copy.deepcopy(base), _config()))
    first = _logits(model, inputs)
    model.add_adapter("other", _config(adapter_len=2, adapter_layers=1))
    assert model.active_adapters == ["default"]
    assert torch.equal(_logits(model, inputs), first)
    model.set_adapter("other")
    _trained(model, seed=2)
    second = _logits(model, inputs)
    assert not torch.equal(second, first)
    with model.disable_adapter():
        assert torch.equal(_logits(model, inputs), _logits(base, inputs))
    assert torch.equal(_logits(model, inputs), second)

    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "other" / "adapter_model.safetensors")
    assert sorted(tensors) == [
        "base_model.model.model.layers.2.self_attn.adaption_gate",
        "base_model.model.model.layers.2.self_attn.adaption_prompt",
    ]
    assert tensors["base_model.model.model.layers.2.self_attn.adaption_prompt"].shape == (1, 2, 32)
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == 4

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert torch.equal(_logits(loaded, inputs), first)
    loaded.set_adapter("other")
    assert torch.equal(_logits(loaded, inputs), second)
    assert not any(p.requires_grad for p in loaded.parameters())

    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"]
    assert torch.equal(_logits(model, inputs), second)
    assert not any(".default" in n for n, _ in model.named_parameters())


# ---------------------------------------------------------------------- refused operations
def test_merging_is_refused_with_a_clear_error():
    model = get_peft_model(tiny_lm(), _config())
    for attempt in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(TypeError, match="cannot be merged"):
            attempt()
    layer = model.base_model.model.model.layers[2].self_attn
    with pytest.raises(TypeError, match="cannot be merged"):
        layer.merge()
    with pytest.raises(TypeError, match="add_weighted_adapter"):
        model.add_weighted_adapter(["default"], [1.0], "combined")


def test_mixing_with_other_methods_is_refused():
    with pytest.raises(ConfigError, match="mixable"):
        get_peft_model(tiny_lm(), _config(), mixed=True)


def test_mixed_adapter_batches_are_refused():
    model = get_peft_model(tiny_lm(), _config())
    with pytest.raises(TypeError, match="mixed-adapter batches"):
        model(**padded_batch(0), adapter_names=["default", "__base__"])


# ---------------------------------------------------------------------- registration
def test_registered_method_spec_and_public_names():
    spec = get_registry().method("ADAPTION_PROMPT")
    assert spec.config_cls is AdaptionPromptConfig and spec.model_cls is AdaptionPromptModel
    assert spec.prefix == "adaption_"
    caps = spec.capabilities
    assert caps.identity_init and not (
        caps.mergeable or caps.mixable or caps.prompt_learning or caps.mixed_batch
    )
    assert peft_core.AdaptionPromptConfig is AdaptionPromptConfig


def test_entry_point_is_declared():
    (entry,) = [ep for ep in entry_points(group="peft_core") if ep.name == "adaption_prompt"]
    assert entry.value == "peft_adaption_prompt.plugin" and entry.load() is plugin
