"""Registration, layer dispatch and LoraModel's LoRA-specific rules."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from peft_core import PeftModel, get_peft_model
from peft_core.default_targets import LORA_STYLE_DEFAULT_TARGETS as DEFAULT_TARGET_MODULES
from peft_core.errors import ConfigError, TargetModulesError
from peft_core.layer import AdapterLayer
from peft_core.plugins import get_registry
from peft_core.registry import LayerContext
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_lora import LoraConfig, plugin
from peft_lora.layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer
from peft_lora.model import LoraModel


class Tiny(nn.Module):
    """A small non-transformers model: two linears, an embedding and a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        hidden = self.conv(hidden.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(self.proj(hidden)))


def test_registered_method_spec():
    spec = get_registry().method("LORA")
    assert spec.config_cls is LoraConfig and spec.model_cls is LoraModel
    assert spec.prefix == "lora_" and spec.plugin
    caps = spec.capabilities
    assert caps.mergeable and caps.mixable and caps.identity_init and not caps.prompt_learning
    required = [
        "llama",
        "mistral",
        "gpt2",
        "gpt_neox",
        "bert",
        "roberta",
        "t5",
        "mt5",
        "bart",
        "opt",
        "falcon",
    ]
    required += ["phi", "qwen2", "gemma", "gemma2"]
    assert all(spec.default_target_modules[m] == DEFAULT_TARGET_MODULES[m] for m in required)
    assert spec.default_target_modules["gpt2"] == ("c_attn",)


FACTORIES = {
    plugin.linear_factory: (Linear, lambda: nn.Linear(4, 4)),
    plugin.embedding_factory: (Embedding, lambda: nn.Embedding(4, 4)),
    plugin.conv1d_factory: (Conv1d, lambda: nn.Conv1d(4, 4, 1)),
    plugin.conv2d_factory: (Conv2d, lambda: nn.Conv2d(4, 4, 1)),
    plugin.conv3d_factory: (Conv3d, lambda: nn.Conv3d(4, 4, 1)),
    plugin.transformers_conv1d_factory: (Linear, lambda: Conv1D(4, 4)),
}


@pytest.mark.parametrize("factory", list(FACTORIES), ids=lambda f: f.__name__)
def test_each_factory_handles_exactly_its_base_type(factory):
    config = LoraConfig(
        target_modules=["m"], r=2, fan_in_fan_out=factory is plugin.transformers_conv1d_factory
    )
    context = LayerContext(key="m")
    for other, (layer_type, build) in FACTORIES.items():
        layer = factory(build(), "default", config, context)
        if other is factory:
            assert isinstance(layer, layer_type)
        else:
            assert layer is None
    assert factory(nn.LayerNorm(4), "default", config, context) is None
    assert len(get_registry().layer_factories("LORA")) >= 6


class Int8Linear(nn.Linear):
    """Stands in for a quantized linear: an nn.Linear subclass with an integer weight."""

    def __init__(self) -> None:
        super().__init__(4, 4)
        self.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)


def test_quantized_linears_are_left_to_backend_plugins():
    config = LoraConfig(target_modules=["m"])
    assert plugin.linear_factory(Int8Linear(), "default", config, LayerContext(key="m")) is None

    model = nn.Sequential()
    model.add_module("m", Int8Linear())
    with pytest.raises(TargetModulesError, match="cannot wrap"):
        get_peft_model(model, LoraConfig(target_modules=["m"]))


class Scale(AdapterLayer):
    """Another method's layer: multiplies the base output by (1 + s)."""

    adapter_layer_names = ("scale_s",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.scale_s = nn.ParameterDict({"other": nn.Parameter(torch.full((), 0.5))})
        self._active_adapters = ["other"]

    def update_layer(self, adapter_name, config, *, key="", **kwargs):
        raise NotImplementedError

    def forward(self, x):
        return self.base_layer(x) * (1 + self.scale_s["other"])

    def merge_one(self, adapter_name, *, safe_merge=False):
        self.get_base_layer().weight.data *= 1 + self.scale_s[adapter_name]
        self.get_base_layer().bias.data *= 1 + self.scale_s[adapter_name]

    def unmerge_one(self, adapter_name):
        self.get_base_layer().weight.data /= 1 + self.scale_s[adapter_name]
        self.get_base_layer().bias.data /= 1 + self.scale_s[adapter_name]


def test_lora_stacks_on_another_methods_layer():
    base = nn.Linear(4, 3)
    inner = Scale(base)
    layer = plugin.linear_factory(
        inner, "default", LoraConfig(target_modules=["m"], init_lora_weights=False), LayerContext(key="m")
    )
    assert layer.base_layer is inner and layer.get_base_layer() is base
    x = torch.randn(2, 4)
    expected = 1.5 * base(x) + x @ layer.get_delta_weight("default").T
    torch.testing.assert_close(layer(x), expected)


def test_importing_the_plugin_does_not_import_transformers():
    code = (
        "import sys, peft_lora, peft_lora.plugin, peft_lora.layer, peft_lora.model; "
        "assert 'transformers' not in sys.modules, 'transformers was imported'; "
        "assert 'peft' not in sys.modules, 'the reference library was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- LoraModel
def test_get_peft_model_wraps_every_supported_type_and_trains_only_lora():
    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(target_modules=["embed", "conv", "proj"], r=2))
    wrapped = {name: type(m) for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {
        "base_model.model.embed": Embedding,
        "base_model.model.conv": Conv1d,
        "base_model.model.proj": Linear,
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_lora_only_bias_trains_the_biases_of_adapted_layers():
    model = get_peft_model(Tiny(), LoraConfig(target_modules=["proj"], bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.model.proj.base_layer.bias" in trainable
    assert "base_model.model.head.bias" not in trainable


def test_only_one_adapter_may_train_biases():
    model = get_peft_model(Tiny(), LoraConfig(target_modules=["proj"], bias="all"))
    model.add_adapter("plain", LoraConfig(target_modules=["proj"]))
    with pytest.raises(ConfigError, match="only one LoRA adapter per model may use bias"):
        model.add_adapter("second", LoraConfig(target_modules=["proj"], bias="lora_only"))
    assert set(model.peft_config) == {"default", "plain"}


def test_adding_next_to_a_pissa_adapter_warns():
    model = get_peft_model(Tiny(), LoraConfig(target_modules=["proj"], init_lora_weights="pissa", r=2))
    with pytest.warns(UserWarning, match="PiSSA/OLoRA"):
        model.add_adapter("other", LoraConfig(target_modules=["proj"]))


@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian", False])
def test_loading_reruns_only_base_dependent_inits(init, tmp_path):
    """A random init is skipped on load; PiSSA/OLoRA run again to rebuild the residual base."""
    torch.manual_seed(0)
    trained = get_peft_model(Tiny(), LoraConfig(target_modules=["proj"], init_lora_weights=init, r=2))
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_" in name:
                param.add_(0.1)
    trained.save_pretrained(tmp_path)
    torch.manual_seed(0)
    fresh = Tiny()
    original_weight = fresh.proj.weight.detach().clone()
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert loaded.peft_config["default"].init_lora_weights == init  # the config is kept as written
    proj = loaded.base_model.model.proj
    if init in ("pissa", "olora"):
        # the same residual as when the adapter was created, so the trained model comes back
        torch.testing.assert_close(proj.base_layer.weight, trained.base_model.model.proj.base_layer.weight)
    else:
        torch.testing.assert_close(proj.base_layer.weight, original_weight)
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(
            getattr(proj, name)["default"].weight,
            getattr(trained.base_model.model.proj, name)["default"].weight,
        )
    ids = torch.randint(0, 10, (2, 5))
    torch.testing.assert_close(loaded(ids), trained.eval()(ids))


class FakeConfig(dict):
    def to_dict(self):
        return dict(self)


def test_default_targets_by_model_type_including_regex_defaults():
    class Gemma4Like(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = FakeConfig(model_type="gemma4")
            self.language_model = nn.ModuleDict({"layer": nn.ModuleDict({"q_proj": nn.Linear(4, 4)})})
            self.vision_tower = nn.ModuleDict({"q_proj": nn.Linear(4, 4)})

    model = get_peft_model(Gemma4Like(), LoraConfig())
    assert model.peft_config["default"].target_modules == r".*language_model\..*\.(q_proj|v_proj)"
    assert isinstance(model.base_model.model.language_model.layer.q_proj, LoraLayer)
    assert not isinstance(model.base_model.model.vision_tower.q_proj, LoraLayer)

    class OptLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = FakeConfig(model_type="opt")
            self.attn = nn.ModuleDict(
                {"q_proj": nn.Linear(4, 4), "k_proj": nn.Linear(4, 4), "v_proj": nn.Linear(4, 4)}
            )

    model = get_peft_model(OptLike(), LoraConfig())
    assert sorted(model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
    assert not isinstance(model.base_model.model.attn.k_proj, LoraLayer)
