"""Registration, layer dispatch and LoHaModel, through the public API."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from peft_core import PeftModel, get_peft_model
from peft_core.default_targets import LORA_STYLE_DEFAULT_TARGETS as DEFAULT_TARGET_MODULES
from peft_core.errors import TargetModulesError
from peft_core.layer import AdapterLayer
from peft_core.plugins import get_registry
from peft_core.registry import LayerContext
from torch import nn

from peft_loha import LoHaConfig, plugin
from peft_loha.layer import Conv1d, Conv2d, Linear, LoHaLayer
from peft_loha.model import LoHaModel


class Tiny(nn.Module):
    """A small non-transformers model with every layer type LoHa adapts, and one it does not."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 1, 3, padding=1)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        hidden = self.conv(hidden.transpose(1, 2)).transpose(1, 2)
        hidden = self.conv2(hidden.unsqueeze(1)).squeeze(1)
        return self.head(torch.relu(self.proj(hidden)))


IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def test_registered_method_spec():
    spec = get_registry().method("LOHA")
    assert spec.config_cls is LoHaConfig and spec.model_cls is LoHaModel
    assert spec.prefix == "hada_" and spec.plugin
    caps = spec.capabilities
    assert caps.mergeable and caps.mixable and caps.identity_init and not caps.prompt_learning
    assert spec.default_target_modules["llama"] == ("q_proj", "v_proj")
    assert spec.default_target_modules["bert"] == ("query", "value")
    assert dict(spec.default_target_modules) == DEFAULT_TARGET_MODULES


def test_entry_point_is_declared():
    (entry,) = [ep for ep in entry_points(group="peft_core") if ep.name == "loha"]
    assert entry.value == "peft_loha.plugin"
    assert entry.load() is plugin


FACTORIES = {
    plugin.linear_factory: (Linear, lambda: nn.Linear(4, 4)),
    plugin.conv1d_factory: (Conv1d, lambda: nn.Conv1d(4, 4, 1)),
    plugin.conv2d_factory: (Conv2d, lambda: nn.Conv2d(4, 4, 1)),
}


class Int8Linear(nn.Linear):
    """Stands in for a quantized linear: an nn.Linear subclass with an integer weight."""

    def __init__(self) -> None:
        super().__init__(4, 4)
        self.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)


@pytest.mark.parametrize("factory", list(FACTORIES), ids=lambda f: f.__name__)
def test_each_factory_handles_exactly_its_base_type(factory):
    from transformers.pytorch_utils import Conv1D

    config = LoHaConfig(target_modules=["m"], r=2)
    context = LayerContext(key="m")
    for other, (layer_type, build) in FACTORIES.items():
        layer = factory(build(), "default", config, context)
        assert isinstance(layer, layer_type) if other is factory else layer is None
    for unsupported in (nn.Embedding(4, 4), nn.Conv3d(4, 4, 1), Conv1D(4, 4), nn.LayerNorm(4), Int8Linear()):
        assert factory(unsupported, "default", config, context) is None


@pytest.mark.parametrize("target", ["embed", "head"])
def test_unsupported_targets_are_refused_with_the_module_type(target):
    model = Tiny()
    if target == "head":
        model.head = Int8Linear()
    with pytest.raises(TargetModulesError, match="cannot wrap"):
        get_peft_model(model, LoHaConfig(target_modules=[target]))


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


def test_loha_stacks_on_another_methods_layer():
    base = nn.Linear(4, 3)
    inner = Scale(base)
    layer = plugin.linear_factory(
        inner, "default", LoHaConfig(target_modules=["m"], init_weights=False), LayerContext(key="m")
    )
    assert layer.base_layer is inner and layer.get_base_layer() is base
    x = torch.randn(2, 4)
    expected = 1.5 * base(x) + x @ layer.get_delta_weight("default").T
    torch.testing.assert_close(layer(x), expected)


def test_importing_the_plugin_imports_neither_transformers_nor_the_reference():
    code = (
        "import sys, peft_loha, peft_loha.plugin, peft_loha.layer, peft_loha.model; "
        "assert 'transformers' not in sys.modules, 'transformers was imported'; "
        "assert 'peft' not in sys.modules, 'the reference library was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- through the public API
def test_get_peft_model_wraps_every_supported_type_and_trains_only_loha():
    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoHaConfig(target_modules=["conv", "conv2", "proj"], r=2))
    wrapped = {name: type(m) for name, m in model.named_modules() if isinstance(m, LoHaLayer)}
    assert wrapped == {
        "base_model.model.conv": Conv1d,
        "base_model.model.conv2": Conv2d,
        "base_model.model.proj": Linear,
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".hada_" in n for n in trainable)
    torch.testing.assert_close(model(IDS), model.get_base_model()(IDS))  # identity init


def test_save_load_add_switch_delete(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoHaConfig(target_modules=["conv", "proj"], init_weights=False)).eval()
    model.add_adapter(
        "eff", LoHaConfig(target_modules=["conv", "conv2"], use_effective_conv2d=True, init_weights=False)
    )
    outputs = {}
    for name in ("default", "eff"):
        model.set_adapter(name)
        outputs[name] = model(IDS).detach()
    assert not torch.allclose(outputs["default"], outputs["eff"])
    model.save_pretrained(tmp_path)

    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Tiny(), tmp_path).eval()
    loaded.load_adapter(tmp_path / "eff", adapter_name="eff")
    for name in ("default", "eff"):
        loaded.set_adapter(name)
        torch.testing.assert_close(loaded(IDS), outputs[name], atol=1e-6, rtol=0)
    assert "base_model.model.conv2.hada_t1.eff" in loaded.state_dict()

    loaded.delete_adapter("eff")
    assert list(loaded.peft_config) == ["default"]
    torch.testing.assert_close(loaded(IDS), outputs["default"], atol=1e-6, rtol=0)
    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, LoHaLayer) for m in merged.modules())
    torch.testing.assert_close(merged(IDS), outputs["default"], atol=1e-5, rtol=0)


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

    model = get_peft_model(Gemma4Like(), LoHaConfig())
    assert model.peft_config["default"].target_modules == r".*language_model\..*\.(q_proj|v_proj)"
    assert isinstance(model.base_model.model.language_model.layer.q_proj, LoHaLayer)
    assert not isinstance(model.base_model.model.vision_tower.q_proj, LoHaLayer)

    class OptLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = FakeConfig(model_type="opt")
            self.attn = nn.ModuleDict({n: nn.Linear(4, 4) for n in ("q_proj", "k_proj", "v_proj")})

    model = get_peft_model(OptLike(), LoHaConfig())
    assert sorted(model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
    assert not isinstance(model.base_model.model.attn.k_proj, LoHaLayer)


@pytest.mark.parametrize("train_mode", [True, False])
def test_eval_cache_follows_optimizer_steps(train_mode):
    """Steps taken in eval mode (no train() call to clear the cache) are seen through version counters."""
    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoHaConfig(target_modules=["proj"], init_weights=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.eval()
    with torch.no_grad():
        before = model(IDS)
    if train_mode:
        model.train()
    model(IDS).square().sum().backward()
    optimizer.step()
    if train_mode:
        model.eval()
    else:
        assert model.base_model.model.proj._delta_cache, "the cache from the first forward is still there"
    with torch.no_grad():
        after = model(IDS)
        model.base_model.model.proj.cache_delta = False
        torch.testing.assert_close(model(IDS), after, atol=0, rtol=0)
    assert not torch.allclose(before, after)
