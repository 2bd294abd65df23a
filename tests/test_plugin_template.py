"""The plugin template renders a package that imports, registers, runs and passes its own tests."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from torch import nn

from peft_core import PeftModel, get_peft_model
from peft_core import plugins as plugins_module

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "contrib" / "plugin-template"
NAME = "widget_net"  # an underscore exercises every derived name


def load_render():
    spec = importlib.util.spec_from_file_location("plugin_template_render", TEMPLATE / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load_render()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rendered") / "peft-widget-net"
    assert render.main([NAME, str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def package(rendered):
    """The rendered package, importable for this module only."""
    sys.path.insert(0, str(rendered))
    try:
        yield importlib.import_module("peft_widget_net")
    finally:
        sys.path.remove(str(rendered))
        for name in [m for m in sys.modules if m == "peft_widget_net" or m.startswith("peft_widget_net.")]:
            del sys.modules[name]


def tomllib():
    try:
        import tomllib as module
    except ImportError:  # Python 3.10
        module = pytest.importorskip("tomli")
    return module


# ----------------------------------------------------------------------------- rendering
def test_render_writes_a_complete_package(rendered):
    files = sorted(str(p.relative_to(rendered)) for p in rendered.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "peft_widget_net/__init__.py",
        "peft_widget_net/config.py",
        "peft_widget_net/layer.py",
        "peft_widget_net/plugin.py",
        "pyproject.toml",
        "tests/conftest.py",
        "tests/test_conformance.py",
        "tests/test_widget_net.py",
    ]
    for path in rendered.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            assert "${" not in text and "__package__" not in text, path
            if path.suffix == ".py":
                compile(text, str(path), "exec")


def test_derived_names():
    values = render.variables("widget_net")
    assert values["dist"] == "peft-widget-net"
    assert values["package"] == "peft_widget_net"
    assert values["peft_type"] == "WIDGET_NET"
    assert values["config_cls"] == "WidgetNetConfig" and values["layer_cls"] == "WidgetNetLayer"
    assert values["prefix"] == "widget_net_"


@pytest.mark.parametrize("bad", ["", "Widget", "1widget", "wid-get", "wid__get", "widget_", "class", "core"])
def test_render_refuses_a_bad_name(tmp_path, capsys, bad):
    assert render.main([bad, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert repr(bad) in err
    assert not (tmp_path / "out").exists()


def test_render_refuses_a_non_empty_directory(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert render.main(["widget", str(tmp_path)]) == 2
    assert "already exists and is not an empty directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_pyproject_declares_the_entry_point_and_a_range_the_core_satisfies(rendered):
    pyproject = tomllib().loads((rendered / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    assert project["name"] == "peft-widget-net"
    assert project["entry-points"][plugins_module.ENTRY_POINT_GROUP] == {
        "widget_net": "peft_widget_net.plugin"
    }
    (core,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "peft-core"]
    installed = Version(metadata.version("peft-core"))
    assert core.specifier.contains(installed)
    assert not core.specifier.contains(Version(f"{installed.major}.{installed.minor + 1}.0"))


def test_rendered_package_is_lint_clean(rendered):
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed in this environment")
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=rendered, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- the rendered plugin
@pytest.fixture
def registered(package, monkeypatch):
    manager = plugins_module.PluginManager(strict=True)
    info = manager.register_plugin(importlib.import_module("peft_widget_net.plugin"), name="widget_net")
    assert info.status == "loaded" and info.methods == ["WIDGET_NET"], info.reason
    monkeypatch.setattr(plugins_module, "_manager", manager)
    return manager


def test_rendered_plugin_registers_and_runs(package, registered, tmp_path):
    assert registered.registry.method("WIDGET_NET").config_cls is package.WidgetNetConfig
    assert registered.plugins[0].contributions["layer_factories"] == ["WIDGET_NET"]
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(4, 6)
    with torch.no_grad():
        base_out = base(x)

    identity = get_peft_model(copy.deepcopy(base), package.WidgetNetConfig(target_modules=["0", "2"]))
    with torch.no_grad():
        assert torch.equal(identity(x), base_out)

    model = get_peft_model(
        copy.deepcopy(base), package.WidgetNetConfig(r=2, target_modules=["0", "2"], init_weights=False)
    )
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"base_model.model.{i}.widget_net_{part}.default.weight" for i in (0, 2) for part in ("down", "up")
    }
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, base_out)
        model.merge_adapter()
        torch.testing.assert_close(model(x), adapted)
        model.unmerge_adapter()

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), adapted, rtol=0, atol=0)


def run_rendered_tests(rendered: Path, *paths: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(rendered), HYPOTHESIS_PROFILE="dev")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths],
        cwd=rendered,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_rendered_method_tests_pass(rendered):
    result = run_rendered_tests(rendered, "tests/test_widget_net.py")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "4 passed" in result.stdout


@pytest.mark.slow
def test_rendered_conformance_suite_passes(rendered):
    if importlib.util.find_spec("peft_core.testing") is None or not hasattr(
        importlib.import_module("peft_core.testing"), "MethodConformance"
    ):
        pytest.skip("peft_core.testing (the conformance kit) is not available in this checkout")
    result = run_rendered_tests(rendered, "tests/test_conformance.py")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
