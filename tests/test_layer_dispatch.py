"""Layer creation dispatch: another plugin teaches an existing method a new base-layer type."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from peft_core import PeftModel, get_peft_model
from peft_core.hookspecs import hookimpl
from peft_core.layer import AdapterLayer
from peft_core.plugins import PluginManager

peft_toy = pytest.importorskip("peft_toy")


class ScaledLinear(nn.Module):
    """A user's custom layer that is not an nn.Linear: y = 2 * (x W^T)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x @ self.weight.T


class ToyOnScaledLinear(AdapterLayer):
    """The toy method's math on ScaledLinear: a per-output scale of the base output."""

    adapter_layer_names = ("toy_scale",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.toy_scale = nn.ParameterDict()

    def update_layer(self, adapter_name, config, *, key="", **kwargs):
        init = torch.zeros if config.init_weights else torch.randn
        self.toy_scale[adapter_name] = nn.Parameter(init(self.base_layer.weight.shape[0]))
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def merge_one(self, adapter_name, *, safe_merge=False):
        self.base_layer.weight.data *= (1 + self.toy_scale[adapter_name])[:, None]

    def unmerge_one(self, adapter_name):
        self.base_layer.weight.data /= (1 + self.toy_scale[adapter_name])[:, None]

    def forward(self, x):
        out = self.base_layer(x)
        if self.disable_adapters or self.merged:
            return out
        for name in self.active_adapters:
            out = out * (1 + self.toy_scale[name])
        return out


class ExtensionPlugin:
    @hookimpl
    def peft_register_layer_factories(self, registry):
        def factory(target, adapter_name, config, context):
            if not isinstance(target, ScaledLinear):
                return None
            layer = ToyOnScaledLinear(target)
            layer.update_layer(adapter_name, config, key=context.key)
            return layer

        registry.register_layer_factory("TOY", factory, priority=10)


@pytest.fixture
def registry_with_extension(monkeypatch):
    import peft_core.plugins as plugins

    manager = PluginManager()
    manager.load_entry_points()
    manager.register_plugin(ExtensionPlugin(), name="scaled-linear-support")
    monkeypatch.setattr(plugins, "_manager", manager)
    return manager.registry


def model():
    torch.manual_seed(0)
    return nn.Sequential(ScaledLinear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def test_a_second_plugin_extends_the_toy_method(registry_with_extension, tmp_path):
    assert registry_with_extension.layer_factory_origins("TOY")[0] == ("scaled-linear-support", 10)
    x = torch.randn(3, 4)
    base = model()
    peft_model = get_peft_model(
        copy.deepcopy(base), peft_toy.ToyConfig(target_modules=["0", "2"], init_weights=False)
    )
    assert isinstance(peft_model.base_model.model[0], ToyOnScaledLinear)
    assert isinstance(
        peft_model.base_model.model[2], AdapterLayer
    )  # the toy's own factory still serves nn.Linear
    out = peft_model(x)
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(reloaded(x), out)
    merged = peft_model.merge_and_unload()
    assert type(merged[0]) is ScaledLinear
    torch.testing.assert_close(merged(x), out, atol=1e-5, rtol=1e-5)


def test_without_the_extension_the_error_names_the_type():
    from peft_core.errors import TargetModulesError

    with pytest.raises(TargetModulesError, match="ScaledLinear, which TOY cannot wrap"):
        get_peft_model(model(), peft_toy.ToyConfig(target_modules=["0"]))
