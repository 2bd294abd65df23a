"""Plugin loading: one entry point at a time, failures isolated, conflicts explicit, knobs honoured."""

from __future__ import annotations

import types
import warnings

import pytest
from attrs import define

from peft_core import plugins
from peft_core.config import PeftConfig
from peft_core.errors import PluginLoadError, UnknownMethodError
from peft_core.hookspecs import hookimpl
from peft_core.registry import MethodSpec
from peft_core.tuner import AdapterModel


@define(kw_only=True)
class FakeConfig(PeftConfig):
    PEFT_TYPE = "FAKE"


def method_module(name: str, peft_type: str = "FAKE", calls: list | None = None) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def peft_register_methods(registry):
        if calls is not None:
            calls.append(name)
        registry.register_method(
            MethodSpec(peft_type=peft_type, config_cls=FakeConfig, model_cls=AdapterModel, prefix="fake_")
        )

    module.peft_register_methods = peft_register_methods
    return module


class FakeDist:
    def __init__(self, name, version="1.0", requires=None):
        self.name, self.version, self.requires = name, version, requires or []


class FakeEntryPoint:
    def __init__(self, name, loader, dist):
        self.name, self.value, self.dist, self._loader = name, f"{name}_pkg.plugin", dist, loader

    def load(self):
        return self._loader()


def broken():
    raise ImportError("No module named 'missing_dependency'")


@pytest.fixture
def entry_points(monkeypatch):
    eps: list[FakeEntryPoint] = []
    monkeypatch.setattr(
        plugins.metadata, "entry_points", lambda group: list(eps) if group == "peft_core" else []
    )
    for knob in (
        "PEFT_CORE_DISABLE_PLUGINS",
        "PEFT_CORE_PLUGINS",
        "PEFT_CORE_DISABLE_PLUGIN_AUTOLOAD",
        "PEFT_CORE_STRICT",
    ):
        monkeypatch.delenv(knob, raising=False)
    return eps


def manager(strict=False):
    pm = plugins.PluginManager(strict=strict)
    pm.load_entry_points()
    return pm


def test_broken_plugin_is_skipped_with_a_warning_naming_it(entry_points):
    entry_points += [
        FakeEntryPoint("bad", broken, FakeDist("peft-bad", "0.3")),
        FakeEntryPoint("good", lambda: method_module("good"), FakeDist("peft-good")),
    ]
    with pytest.warns(
        RuntimeWarning, match=r"'bad' \(peft-bad 0.3\) was skipped: ImportError: No module named"
    ):
        pm = manager()
    assert pm.registry.method("FAKE").plugin == "peft-good"
    assert [p.name for p in pm.failed] == ["bad"]


def test_strict_mode_turns_a_failure_into_an_error(entry_points):
    entry_points.append(FakeEntryPoint("bad", broken, FakeDist("peft-bad")))
    with pytest.raises(PluginLoadError, match="peft-bad"):
        manager(strict=True)


def test_incompatible_core_range_is_refused_before_import(entry_points):
    loaded = []
    entry_points.append(
        FakeEntryPoint(
            "old",
            lambda: loaded.append(1) or method_module("old"),
            FakeDist("peft-old", requires=["peft-core<0.1"]),
        )
    )
    with pytest.warns(RuntimeWarning, match=r"requires peft-core<0.1"):
        pm = manager()
    assert not loaded and pm.failed[0].name == "old"


def test_two_plugins_claiming_one_method_warn_naming_both(entry_points):
    entry_points += [
        FakeEntryPoint("a", lambda: method_module("a"), FakeDist("peft-a")),
        FakeEntryPoint("b", lambda: method_module("b"), FakeDist("peft-b")),
    ]
    with pytest.warns(UserWarning, match=r"'FAKE' is provided by both 'peft-a' and 'peft-b'"):
        pm = manager()
    assert pm.registry.method("FAKE").plugin == "peft-a"
    with pytest.raises(PluginLoadError, match="provided by both"):
        manager(strict=True)


def test_each_plugin_hook_runs_once(entry_points):
    calls: list[str] = []
    entry_points += [
        FakeEntryPoint("a", lambda: method_module("a", "FAKE_A", calls), FakeDist("peft-a")),
        FakeEntryPoint("b", lambda: method_module("b", "FAKE_B", calls), FakeDist("peft-b")),
    ]
    pm = manager()
    assert calls == ["a", "b"]
    assert set(pm.registry.methods) == {"FAKE_A", "FAKE_B"}


def test_disable_allow_list_and_autoload_knobs(entry_points, monkeypatch):
    entry_points += [
        FakeEntryPoint("a", lambda: method_module("a", "FAKE_A"), FakeDist("peft-a")),
        FakeEntryPoint("b", lambda: method_module("b", "FAKE_B"), FakeDist("peft-b")),
    ]
    monkeypatch.setenv("PEFT_CORE_DISABLE_PLUGINS", "peft-a")
    pm = manager()
    assert set(pm.registry.methods) == {"FAKE_B"}
    assert {p.name: p.status for p in pm.plugins} == {"a": "disabled", "b": "loaded"}
    monkeypatch.delenv("PEFT_CORE_DISABLE_PLUGINS")
    monkeypatch.setenv("PEFT_CORE_PLUGINS", "a")
    assert set(manager().registry.methods) == {"FAKE_A"}
    monkeypatch.setenv("PEFT_CORE_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = manager()
    assert pm.registry.methods == {} and pm.plugins == []
    pm.register_plugin(method_module("manual", "FAKE_M"), name="manual")
    assert pm.registry.method("FAKE_M").plugin == "manual"


def test_a_plugin_whose_hook_raises_is_isolated(entry_points):
    module = types.ModuleType("explodes")

    @hookimpl
    def peft_register_methods(registry):
        raise RuntimeError("boom")

    module.peft_register_methods = peft_register_methods
    entry_points += [
        FakeEntryPoint("x", lambda: module, FakeDist("peft-x")),
        FakeEntryPoint("y", lambda: method_module("y"), FakeDist("peft-y")),
    ]
    with pytest.warns(RuntimeWarning, match="boom"):
        pm = manager()
    assert pm.registry.has_method("FAKE")


def test_unknown_method_lists_installed_ones(entry_points):
    entry_points.append(FakeEntryPoint("a", lambda: method_module("a"), FakeDist("peft-a")))
    pm = manager()
    with pytest.raises(UnknownMethodError, match=r"pip install peft-ia3.*installed methods: FAKE"):
        pm.registry.method("IA3")


def test_installed_entry_points_load_cleanly():
    """The real environment: every installed plugin loads without warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm = plugins.PluginManager(strict=True)
        pm.load_entry_points()
    assert all(p.status == "loaded" for p in pm.plugins)


def test_a_misspelled_hook_implementation_fails_the_load(entry_points):
    module = types.ModuleType("typo")

    @hookimpl
    def peft_register_method(registry):  # missing the final "s"
        raise AssertionError("never called")

    module.peft_register_method = peft_register_method
    entry_points.append(FakeEntryPoint("typo", lambda: module, FakeDist("peft-typo")))
    with pytest.warns(RuntimeWarning, match=r"'typo' \(peft-typo 1.0\) was skipped.*peft_register_method"):
        pm = manager()
    assert [p.name for p in pm.failed] == ["typo"]
