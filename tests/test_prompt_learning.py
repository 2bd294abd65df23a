"""The core's prompt-learning strategy, driven by a third-party input-side method defined right here.

The toy method ("REVERSED_PROMPT") is registered without any core change: a config class, a
``VirtualTokenModel`` subclass with ``create_prompt_encoder``, and a ``MethodSpec``. The tests
also check that a prompt-learning adapter and a layer adapter refuse to share one model.
"""

from __future__ import annotations

import sys
from typing import ClassVar

import pytest
import torch
from attrs import define
from torch import nn

from peft_core import PeftModel, get_peft_model, inject_adapter_in_model
from peft_core.errors import ConfigError
from peft_core.hookspecs import hookimpl
from peft_core.prompt_learning import PromptLearningConfig, VirtualTokenModel
from peft_core.registry import Capabilities, MethodSpec

transformers = pytest.importorskip("transformers")

from peft_core.testing.prompt_learning import PAD, greedy_by_forward, padded_batch, tiny_llama  # noqa: E402


@define(kw_only=True)
class ReversedPromptConfig(PromptLearningConfig):
    PEFT_TYPE: ClassVar[str] = "REVERSED_PROMPT"
    scale: float = 1.0


class ReversedPrompt(nn.Module):
    """A table whose rows come out in reverse order, scaled: any module of indices -> embeddings works."""

    def __init__(self, config: ReversedPromptConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(
            config.num_virtual_tokens * config.num_transformer_submodules, config.token_dim
        )
        self.scale = config.scale

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices.flip(-1)) * self.scale


class ReversedPromptModel(VirtualTokenModel):
    def create_prompt_encoder(self, config: ReversedPromptConfig, word_embeddings: nn.Module) -> nn.Module:
        return ReversedPrompt(config)


@hookimpl
def peft_register_methods(registry) -> None:
    registry.register_method(
        MethodSpec(
            peft_type="REVERSED_PROMPT",
            config_cls=ReversedPromptConfig,
            model_cls=ReversedPromptModel,
            prefix="prompt_encoder.",
            capabilities=Capabilities(prompt_learning=True, mergeable=False, identity_init=False),
        )
    )


@pytest.fixture(scope="module", autouse=True)
def toy_method():
    """Installed plugins plus this module's method, in a registry of its own (restored afterwards)."""
    import peft_core.plugins as plugins

    saved = plugins._manager
    manager = plugins.PluginManager()
    manager.load_entry_points()
    manager.register_plugin(sys.modules[__name__], name="reversed-prompt")
    plugins._manager = manager
    yield
    plugins._manager = saved


def config(**options) -> ReversedPromptConfig:
    return ReversedPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, **options)


def test_a_third_party_method_drives_forward_generate_and_files(tmp_path):
    model = get_peft_model(tiny_llama(), config(scale=2.0)).eval()
    inputs = padded_batch(0)
    encoder = model.base_model.prompt_encoder["default"]
    with torch.no_grad():
        out = model(**inputs)
        expected = tiny_llama()(
            inputs_embeds=torch.cat(
                (
                    (2.0 * encoder.embedding.weight.flip(0)).expand(2, -1, -1),
                    model.get_base_model().get_input_embeddings()(inputs["input_ids"]),
                ),
                dim=1,
            ),
            attention_mask=torch.cat((torch.ones(2, 3, dtype=torch.long), inputs["attention_mask"]), dim=1),
        )
    torch.testing.assert_close(out.logits, expected.logits)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    assert torch.equal(generated, greedy_by_forward(model, inputs, 3))

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].scale == 2.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, out.logits, rtol=0, atol=0)


def test_disable_adapter_and_unload_give_the_base_model():
    model = get_peft_model(tiny_llama(), config()).eval()
    inputs = padded_batch(1)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(**inputs).logits, tiny_llama()(**inputs).logits, rtol=0, atol=0)
    base = model.unload()
    assert type(base).__name__ == "LlamaForCausalLM"


def test_only_the_prompt_trains():
    model = get_peft_model(tiny_llama(), config())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.prompt_encoder.default.embedding.weight"
    ]


def test_merging_and_weighted_combinations_are_refused():
    model = get_peft_model(tiny_llama(), config())
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.raises(TypeError, match="add_weighted_adapter"):
        model.add_weighted_adapter(["default"], [1.0], "x")


def test_inject_adapter_in_model_refuses_prompt_learning():
    with pytest.raises(TypeError, match="prompt-learning method"):
        inject_adapter_in_model(config(), tiny_llama())


# ---------------------------------------------------------------------- mixing with layer methods
def _lora_config():
    lora = pytest.importorskip("peft_lora")
    return lora.LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def test_a_layer_adapter_cannot_join_a_prompt_learning_model():
    model = get_peft_model(tiny_llama(), config())
    with pytest.raises(ConfigError, match=r"prompt-learning method \(mixable=False\)"):
        model.add_adapter("lora", _lora_config())
    assert list(model.peft_config) == ["default"]
    with pytest.raises(ConfigError, match="mixable=False"):
        get_peft_model(model, _lora_config())


def test_a_prompt_learning_adapter_cannot_join_a_layer_model():
    model = get_peft_model(tiny_llama(), _lora_config())
    with pytest.raises(ConfigError, match=r"prompt-learning method \(mixable=False\)"):
        model.add_adapter("prompt", config())
    assert list(model.peft_config) == ["default"]
    injected = inject_adapter_in_model(_lora_config(), tiny_llama())
    with pytest.raises(ConfigError, match="already holds other adapters"):
        get_peft_model(injected, config())
