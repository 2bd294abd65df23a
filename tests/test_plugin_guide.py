"""The plugin-author guide cannot rot: its code is extracted, registered and checked here.

``docs/plugin-author-guide.md`` marks its code blocks with HTML comments
(``<!-- guide:plugin-module peft_diag.py -->``, ``<!-- guide:usage -->``, ...). The plugin module
is written to a temporary file and imported as ``peft_diag``; the tests below register it and
check the method for real, and the guide's own conformance-kit subclass is executed in this
module so pytest collects and runs it.
"""

from __future__ import annotations

import atexit
import copy
import importlib.util
import json
import re
import shutil
import sys
import tempfile
import types
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from safetensors import safe_open
from torch import nn

from peft_core import PeftModel, TargetModulesError, get_peft_model
from peft_core import plugins as plugins_module
from peft_core.layer import AdapterLayer

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugin-author-guide.md"
TEXT = GUIDE.read_text(encoding="utf-8")


def guide_block(marker: str, language: str) -> str:
    """The fenced block right after ``<!-- guide:<marker> ... -->``; exactly one must exist."""
    pattern = rf"^<!-- guide:{re.escape(marker)}\b[^>]*-->\n```{language}\n(.*?)^```$"
    found = re.findall(pattern, TEXT, flags=re.S | re.M)
    assert len(found) == 1, f"docs/plugin-author-guide.md needs exactly one '{marker}' {language} block"
    return found[0]


def _import_guide_module() -> types.ModuleType:
    source = guide_block("plugin-module", "python")
    directory = Path(tempfile.mkdtemp(prefix="peft-guide-"))
    atexit.register(shutil.rmtree, directory, True)
    path = directory / "peft_diag.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("peft_diag", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["peft_diag"] = module  # the guide's other blocks import it by this name
    spec.loader.exec_module(module)
    return module


peft_diag = _import_guide_module()
DiagConfig = peft_diag.DiagConfig


def fresh_manager(*, with_diag: bool) -> plugins_module.PluginManager:
    """A manager holding only the guide's plugin: no installed entry points take part."""
    manager = plugins_module.PluginManager(strict=True)
    if with_diag:
        info = manager.register_plugin(peft_diag)
        assert info.status == "loaded", info.reason
    return manager


@pytest.fixture(scope="module", autouse=True)
def diag_registry():
    """Make DIAG the process-wide registry's method for this module (restored afterwards)."""
    manager = fresh_manager(with_diag=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plugins_module, "_manager", manager)
        yield manager.registry


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3))


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
TARGETS = ["0", "2", "4"]


def diag_model(base: nn.Module, *, init_weights: bool, **kw) -> PeftModel:
    return get_peft_model(base, DiagConfig(target_modules=TARGETS, init_weights=init_weights, **kw))


def dense_reference(base: nn.Sequential, vectors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """DIAG as the guide defines it, computed without the plugin: each W becomes W + diag(d), padded."""
    out = x
    for index, module in enumerate(base):
        if isinstance(module, nn.Linear) and str(index) in vectors:
            d = vectors[str(index)]
            weight = module.weight.detach().clone()
            k = d.shape[0]
            weight[:k, :k] += torch.diag(d)
            out = out @ weight.T + module.bias
        else:
            out = module(out)
    return out


# ----------------------------------------------------------------------------- registration
def test_the_module_registers_as_a_plugin():
    manager = fresh_manager(with_diag=True)
    (info,) = manager.plugins
    assert info.methods == ["DIAG"]
    assert info.contributions["layer_factories"] == ["DIAG"]
    spec = manager.registry.method("diag")
    assert spec.config_cls is DiagConfig and spec.prefix == "diag_"
    assert spec.capabilities.mergeable and spec.capabilities.identity_init


def test_config_is_importable_from_peft_core_and_round_trips():
    from peft_core import DiagConfig as FromCore

    assert FromCore is DiagConfig
    config = DiagConfig(target_modules=["0"], init_weights=False, modules_to_save=["4"])
    assert config.peft_type == "DIAG"
    data = json.loads(config.to_json_string())
    assert data["peft_type"] == "DIAG" and data["init_weights"] is False
    assert DiagConfig.from_dict(data) == config
    from peft_core import PeftConfig

    assert PeftConfig.from_dict(data) == config  # resolved through the registry by peft_type


# ----------------------------------------------------------------------------- behaviour
def test_identity_init_gives_exactly_the_base_output_and_only_diag_trains():
    base = mlp()
    with torch.no_grad():
        expected = base(X)
    model = diag_model(copy.deepcopy(base), init_weights=True)
    with torch.no_grad():
        assert torch.equal(model(X), expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{t}.diag_vector.default" for t in TARGETS}
    assert model.get_nb_trainable_parameters()[0] == 6 + 10 + 3


def test_forward_is_the_documented_formula():
    base = mlp()
    model = diag_model(copy.deepcopy(base), init_weights=False)
    vectors = {t: model.base_model.model[int(t)].diag_vector["default"].detach() for t in TARGETS}
    assert all(v.abs().sum() > 0 for v in vectors.values())
    with torch.no_grad():
        torch.testing.assert_close(model(X), dense_reference(base, vectors, X))


def test_merge_unmerge_and_unload():
    base = mlp()
    model = diag_model(copy.deepcopy(base), init_weights=False)
    with torch.no_grad():
        unmerged = model(X)
        base_out = base(X)
    model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(X), unmerged)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(model(X), unmerged)  # not applied twice
    model.unmerge_adapter()
    for index in (0, 2, 4):
        torch.testing.assert_close(model.base_model.model[index].get_base_layer().weight, base[index].weight)

    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(X), base_out)
    with torch.no_grad():
        torch.testing.assert_close(model(X), unmerged)  # intact after disabling

    merged = copy.deepcopy(model).merge_and_unload()
    assert type(merged) is nn.Sequential and not any(isinstance(m, AdapterLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(X), unmerged)
    unloaded = model.unload()
    with torch.no_grad():
        torch.testing.assert_close(unloaded(X), base_out)


def test_safe_merge_refuses_nan_and_leaves_the_weights():
    base = mlp()
    model = diag_model(copy.deepcopy(base), init_weights=False)
    with torch.no_grad():
        model.base_model.model[2].diag_vector["default"][0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], equal_nan=True)


def test_one_optimizer_step_changes_only_the_adapter():
    model = diag_model(mlp(), init_weights=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(X).pow(2).sum().backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"base_model.model.{t}.diag_vector.default" for t in TARGETS}


def test_save_load_round_trip(tmp_path):
    base = mlp()
    model = diag_model(copy.deepcopy(base), init_weights=False, modules_to_save=["4"])
    model.add_adapter("second", DiagConfig(target_modules=["2"], init_weights=False))
    with torch.no_grad():
        expected = model(X)
    model.save_pretrained(tmp_path)

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as fh:
        assert set(fh.keys()) == {
            "base_model.model.0.diag_vector",
            "base_model.model.2.diag_vector",
            "base_model.model.4.weight",
            "base_model.model.4.bias",
        }
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "DIAG" and config["target_modules"] == TARGETS

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), expected, rtol=0, atol=0)
    saved = {k: v for k, v in model.state_dict().items() if ".second." not in k}
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)

    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    model.set_adapter("second")
    loaded.set_adapter("second")
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X), rtol=0, atol=0)


def test_a_module_the_factory_declines_is_reported():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1))
    with pytest.raises(TargetModulesError, match=r"'1' is a torch\.nn\.modules\.conv\.Conv1d"):
        get_peft_model(model, DiagConfig(target_modules=["0", "1"]))


# ----------------------------------------------------------------------------- the guide's other blocks
def test_usage_block_runs_as_written(tmp_path, monkeypatch):
    # The block registers the plugin itself, so give it a registry that does not have it yet.
    monkeypatch.setattr(plugins_module, "_manager", fresh_manager(with_diag=False))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "guide_usage"}
    exec(compile(guide_block("usage", "python"), "docs/plugin-author-guide.md[usage]", "exec"), namespace)
    assert (tmp_path / "diag-adapter" / "adapter_model.safetensors").is_file()
    assert type(namespace["merged"]) is nn.Sequential
    assert plugins_module.get_registry().has_method("DIAG")


def test_pyproject_block_declares_the_entry_point_and_a_compatible_core_range():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads(guide_block("pyproject", "toml"))
    project = pyproject["project"]
    entry_points = project["entry-points"][plugins_module.ENTRY_POINT_GROUP]
    assert entry_points == {"diag": "peft_diag.plugin"}
    assert project["name"] == "peft-diag"
    (core,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "peft-core"]
    assert core.specifier.contains(Version(metadata.version("peft-core")))
    assert pyproject["tool"]["setuptools"]["packages"]["find"]["include"] == ["peft_diag*"]


def test_extension_hooks_block_registers_a_strategy_and_a_converter():
    module = types.ModuleType("guide_extensions")
    exec(
        compile(guide_block("extensions", "python"), "docs/plugin-author-guide.md[extensions]", "exec"),
        module.__dict__,
    )
    manager = fresh_manager(with_diag=False)
    info = manager.register_plugin(module)
    assert info.contributions["combination_strategies"] == ["mean"]
    assert info.contributions["state_dict_converters"] == ["other-trainer"]
    mean = manager.registry.combination_strategy("mean")
    torch.testing.assert_close(mean([torch.ones(2), 3 * torch.ones(2)], [1.0, 1.0]), 2 * torch.ones(2))
    ((_, convert),) = manager.registry.state_dict_converters()
    assert convert({"x.diag_vector": torch.ones(1)}, DiagConfig()) is None
    converted = convert({"other_trainer.0.diag_vector": torch.ones(1)}, DiagConfig())
    assert list(converted) == ["base_model.model.0.diag_vector"]


# ----------------------------------------------------------------------------- the conformance kit
try:
    from peft_core.testing import MethodConformance as _Kit  # noqa: F401
except ImportError:
    _KIT_MISSING = True
else:
    _KIT_MISSING = False
    # The guide's test file, executed here so that pytest collects its TestDiagConformance.
    exec(
        compile(guide_block("conformance", "python"), "docs/plugin-author-guide.md[conformance]", "exec"),
        globals(),
    )


def test_conformance_block_is_collected_when_the_kit_is_installed():
    if _KIT_MISSING:
        pytest.skip("peft_core.testing (the conformance kit) is not available in this checkout")
    cls = globals()["TestDiagConformance"]
    assert issubclass(cls, _Kit) and cls.peft_type == "DIAG"
