"""``peft-core plugins``: the table, the JSON, and every plugin state the loader can produce."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
from attrs import define

from peft_core import cli, plugins
from peft_core.config import PeftConfig
from peft_core.hookspecs import hookimpl
from peft_core.registry import Capabilities, MethodSpec
from peft_core.tuner import AdapterModel

ROOT = Path(__file__).resolve().parents[1]
KNOBS = (
    "PEFT_CORE_DISABLE_PLUGINS",
    "PEFT_CORE_PLUGINS",
    "PEFT_CORE_DISABLE_PLUGIN_AUTOLOAD",
    "PEFT_CORE_STRICT",
    "PEFT_CORE_DEBUG_PLUGINS",
)


@define(kw_only=True)
class CliFakeConfig(PeftConfig):
    PEFT_TYPE = "CLIFAKE"


def plugin_module(
    name: str,
    peft_type: str = "CLIFAKE",
    *,
    factories: tuple[str, ...] = (),
    strategies: tuple[str, ...] = (),
    converters: tuple[str, ...] = (),
) -> types.ModuleType:
    """A plugin module registering one method and, optionally, more contributions."""
    module = types.ModuleType(name)

    @hookimpl
    def peft_register_methods(registry):
        registry.register_method(
            MethodSpec(
                peft_type=peft_type,
                config_cls=CliFakeConfig,
                model_cls=AdapterModel,
                prefix="fake_",
                capabilities=Capabilities(mixed_batch=True),
            )
        )

    module.peft_register_methods = peft_register_methods
    if factories:

        @hookimpl
        def peft_register_layer_factories(registry):
            for method in factories:
                registry.register_layer_factory(method, lambda *args: None)

        module.peft_register_layer_factories = peft_register_layer_factories
    if strategies:

        @hookimpl
        def peft_register_combination_strategies(registry):
            for strategy in strategies:
                registry.register_combination_strategy(strategy, lambda deltas, weights, **kw: deltas[0])

        module.peft_register_combination_strategies = peft_register_combination_strategies
    if converters:

        @hookimpl
        def peft_register_state_dict_converters(registry):
            for converter in converters:
                registry.register_state_dict_converter(converter, lambda state_dict, config: None)

        module.peft_register_state_dict_converters = peft_register_state_dict_converters
    return module


class FakeDist:
    def __init__(self, name: str, version: str = "1.0", requires: list[str] | None = None) -> None:
        self.name, self.version, self.requires = name, version, requires or []


class FakeEntryPoint:
    def __init__(self, name: str, loader, dist: FakeDist, value: str | None = None) -> None:
        self.name, self.dist, self._loader = name, dist, loader
        self.value = value or f"{dist.name.replace('-', '_')}.plugin"

    def load(self):
        return self._loader()


def missing_triton():
    raise ImportError("No module named 'triton'")


@pytest.fixture
def entry_points(monkeypatch):
    """Replace the installed entry points with a list the test fills."""
    eps: list[FakeEntryPoint] = []
    monkeypatch.setattr(
        plugins.metadata,
        "entry_points",
        lambda group: list(eps) if group == plugins.ENTRY_POINT_GROUP else [],
    )
    for knob in KNOBS:
        monkeypatch.delenv(knob, raising=False)
    return eps


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> dict:
    code, out, err = run(capsys, "plugins", "--json", *argv)
    assert code == 0, err
    return json.loads(out)


def by_name(data: dict) -> dict[str, dict]:
    return {p["name"]: p for p in data["plugins"]}


# ----------------------------------------------------------------------------- basics
def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"peft-core {metadata.version('peft-core')}"


def test_no_command_prints_usage_and_fails(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "plugins" in err


def test_unknown_command_is_a_usage_error(capsys):
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice: 'frobnicate'" in err


def test_json_reports_each_plugin_with_its_contributions_and_hooks(entry_points, capsys):
    entry_points.append(
        FakeEntryPoint(
            "fake",
            lambda: plugin_module(
                "fake_mod", factories=("CLIFAKE",), strategies=("breadcrumbs",), converters=("kohya",)
            ),
            FakeDist("peft-fake", "2.1"),
        )
    )
    data = run_json(capsys)
    assert data["peft_core_version"] == metadata.version("peft-core")
    assert data["autoload"] is True and data["strict"] is False and data["debug"] is False
    assert data["warnings"] == []
    (entry,) = data["plugins"]
    assert entry == {
        "name": "fake",
        "distribution": "peft-fake",
        "version": "2.1",
        "module": "peft_fake.plugin",
        "status": "loaded",
        "reason": "",
        "methods": ["CLIFAKE"],
        "contributions": {
            "methods": ["CLIFAKE"],
            "layer_factories": ["CLIFAKE"],
            "combination_strategies": ["breadcrumbs"],
            "state_dict_converters": ["kohya"],
            "quantization_backends": [],
        },
        "hooks": [
            "peft_register_combination_strategies",
            "peft_register_layer_factories",
            "peft_register_methods",
            "peft_register_state_dict_converters",
        ],
    }
    method = data["methods"]["CLIFAKE"]
    assert method["plugin"] == "peft-fake"
    assert method["config_class"] == f"{__name__}.CliFakeConfig"
    assert method["model_class"] == "peft_core.tuner.AdapterModel"
    assert method["prefix"] == "fake_"
    assert (
        method["capabilities"]["mixed_batch"] is True and method["capabilities"]["prompt_learning"] is False
    )


def test_human_table_matches_the_example_in_the_docs(entry_points, capsys):
    """docs/plugins.md shows a sample output; reproduce it exactly so it cannot drift."""
    entry_points += [
        FakeEntryPoint(
            "lora",
            lambda: plugin_module("lora_mod", "LORA", factories=("LORA",)),
            FakeDist("peft-lora", "0.1.0"),
        ),
        FakeEntryPoint("sparse", missing_triton, FakeDist("peft-sparse", "0.3.0")),
    ]
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    doc = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    example = re.search(r"```console\n\$ peft-core plugins\n(.*?)```", doc, flags=re.S).group(1)
    version_line = f"peft-core {metadata.version('peft-core')}:"
    assert out == example.replace("peft-core 0.1.0:", version_line, 1)


def test_no_plugins_installed_says_what_to_install(entry_points, capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    assert "0 plugin(s)" in out and "pip install peft-lora" in out
    assert run_json(capsys)["plugins"] == []


# ----------------------------------------------------------------------------- failures
def test_broken_plugin_is_listed_as_failed_with_its_reason(entry_points, capsys):
    entry_points += [
        FakeEntryPoint("sparse", missing_triton, FakeDist("peft-sparse", "0.3.0")),
        FakeEntryPoint("good", lambda: plugin_module("good_mod"), FakeDist("peft-good")),
    ]
    data = run_json(capsys)
    plugins_ = by_name(data)
    assert plugins_["sparse"]["status"] == "failed"
    assert plugins_["sparse"]["reason"] == "ImportError: No module named 'triton'"
    assert plugins_["sparse"]["hooks"] == [] and plugins_["sparse"]["methods"] == []
    assert plugins_["good"]["status"] == "loaded" and plugins_["good"]["methods"] == ["CLIFAKE"]
    # The load warning is reported as data, not lost.
    (warning,) = data["warnings"]
    assert warning["category"] == "RuntimeWarning"
    assert "'sparse' (peft-sparse 0.3.0) was skipped: ImportError" in warning["message"]

    code, out, _ = run(capsys, "plugins")
    assert code == 0
    assert re.search(r"^sparse\s+peft-sparse\s+0\.3\.0\s+failed\s+-$", out, flags=re.M)
    failed = out.split("Failed to load:\n", 1)[1]
    assert "  sparse (peft-sparse 0.3.0): ImportError: No module named 'triton'" in failed
    assert "Warnings:" not in out  # the reason is listed once, not repeated as a warning


def test_debug_knob_shows_the_traceback_of_a_failed_load(entry_points, capsys, monkeypatch):
    entry_points.append(FakeEntryPoint("sparse", missing_triton, FakeDist("peft-sparse", "0.3.0")))
    monkeypatch.setenv("PEFT_CORE_DEBUG_PLUGINS", "1")
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    warnings_section = out.split("Warnings:\n", 1)[1]
    assert "Traceback (most recent call last)" in warnings_section
    assert "in missing_triton" in warnings_section


def test_plugin_requiring_another_core_version_is_failed_with_the_range(entry_points, capsys):
    entry_points.append(
        FakeEntryPoint(
            "future", lambda: plugin_module("future_mod"), FakeDist("peft-future", requires=["peft-core>=99"])
        )
    )
    entry = by_name(run_json(capsys))["future"]
    assert entry["status"] == "failed" and "requires peft-core>=99" in entry["reason"]


def test_strict_mode_fails_with_the_reason(entry_points, capsys, monkeypatch):
    entry_points.append(FakeEntryPoint("sparse", missing_triton, FakeDist("peft-sparse", "0.3.0")))
    code, out, err = run(capsys, "plugins", "--strict")
    assert code == 1 and out == ""
    assert "'sparse' (peft-sparse 0.3.0) was skipped: ImportError: No module named 'triton'" in err
    monkeypatch.setenv("PEFT_CORE_STRICT", "1")
    code, _, err = run(capsys, "plugins", "--json")
    assert code == 1 and "peft-sparse" in err
    monkeypatch.setenv("PEFT_CORE_STRICT", "0")
    assert by_name(run_json(capsys))["sparse"]["status"] == "failed"


def test_duplicate_method_warns_naming_both_plugins(entry_points, capsys):
    entry_points += [
        FakeEntryPoint("first", lambda: plugin_module("first_mod"), FakeDist("peft-first")),
        FakeEntryPoint("second", lambda: plugin_module("second_mod"), FakeDist("peft-second")),
    ]
    data = run_json(capsys)
    (warning,) = data["warnings"]
    assert warning["category"] == "UserWarning"
    assert "'CLIFAKE' is provided by both 'peft-first' and 'peft-second'" in warning["message"]
    assert data["methods"]["CLIFAKE"]["plugin"] == "peft-first"
    assert by_name(data)["second"]["methods"] == []

    code, out, _ = run(capsys, "plugins")
    assert code == 0
    assert "Warnings:\n  PEFT method 'CLIFAKE' is provided by both 'peft-first' and 'peft-second'" in out

    code, _, err = run(capsys, "plugins", "--strict")
    assert code == 1 and "provided by both 'peft-first' and 'peft-second'" in err


# ----------------------------------------------------------------------------- environment knobs
def two_plugins(entry_points) -> None:
    entry_points += [
        FakeEntryPoint("a", lambda: plugin_module("a_mod", "CLI_A"), FakeDist("peft-a")),
        FakeEntryPoint("b", lambda: plugin_module("b_mod", "CLI_B"), FakeDist("peft-b")),
    ]


@pytest.mark.parametrize("listed", ["a", "peft-a", " peft-a , nothing"])
def test_disabled_plugins_show_as_disabled(entry_points, capsys, monkeypatch, listed):
    two_plugins(entry_points)
    monkeypatch.setenv("PEFT_CORE_DISABLE_PLUGINS", listed)
    data = run_json(capsys)
    a, b = by_name(data)["a"], by_name(data)["b"]
    assert a["status"] == "disabled" and a["reason"] == "listed in PEFT_CORE_DISABLE_PLUGINS"
    assert b["status"] == "loaded"
    assert set(data["methods"]) == {"CLI_B"}
    code, out, _ = run(capsys, "plugins")
    assert "Disabled:\n  a (peft-a 1.0): listed in PEFT_CORE_DISABLE_PLUGINS" in out
    assert "(1 loaded, 0 failed, 1 disabled)" in out


def test_allow_list_loads_only_the_listed_plugins(entry_points, capsys, monkeypatch):
    two_plugins(entry_points)
    monkeypatch.setenv("PEFT_CORE_PLUGINS", "peft-b")
    data = run_json(capsys)
    assert by_name(data)["a"]["status"] == "disabled"
    assert by_name(data)["a"]["reason"] == "not listed in PEFT_CORE_PLUGINS"
    assert by_name(data)["b"]["status"] == "loaded"
    assert set(data["methods"]) == {"CLI_B"}


def test_autoload_off_lists_nothing_and_says_why(entry_points, capsys, monkeypatch):
    two_plugins(entry_points)
    monkeypatch.setenv("PEFT_CORE_DISABLE_PLUGIN_AUTOLOAD", "1")
    data = run_json(capsys)
    assert data["autoload"] is False and data["plugins"] == [] and data["methods"] == {}
    _, out, _ = run(capsys, "plugins")
    assert "Plugin autoload is off (PEFT_CORE_DISABLE_PLUGIN_AUTOLOAD)" in out


def test_the_process_wide_registry_is_left_alone(entry_points, capsys, monkeypatch):
    sentinel = plugins.PluginManager()
    monkeypatch.setattr(plugins, "_manager", sentinel)
    two_plugins(entry_points)
    run_json(capsys)
    assert plugins._manager is sentinel and sentinel.registry.methods == {}


# ----------------------------------------------------------------------------- the real environment
def installed_entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=plugins.ENTRY_POINT_GROUP), key=lambda e: e.name)


def test_every_installed_plugin_is_listed_and_loads(capsys, monkeypatch):
    for knob in KNOBS:
        monkeypatch.delenv(knob, raising=False)
    data = run_json(capsys)
    listed = by_name(data)
    for ep in installed_entry_points():
        entry = listed[ep.name]
        assert entry["status"] == "loaded", entry["reason"]
        assert entry["distribution"] == ep.dist.name and entry["version"] == ep.dist.version
        # a plugin contributes methods, or (like peft-bnb) only other registrations
        assert entry["methods"] or any(entry["contributions"].values()), entry
        assert not entry["methods"] or "peft_register_methods" in entry["hooks"]


@pytest.mark.parametrize(("package", "peft_type"), [("peft_lora", "LORA"), ("peft_toy", "TOY")])
def test_first_party_and_toy_plugins_appear_when_installed(capsys, monkeypatch, package, peft_type):
    pytest.importorskip(package, reason=f"{package} is not installed in this environment")
    for knob in KNOBS:
        monkeypatch.delenv(knob, raising=False)
    data = run_json(capsys)
    assert peft_type in data["methods"]
    owner = data["methods"][peft_type]["plugin"]
    (entry,) = [p for p in data["plugins"] if p["distribution"] == owner]
    assert entry["status"] == "loaded" and peft_type in entry["methods"]
    code, out, _ = run(capsys, "plugins")
    assert re.search(
        rf"^{re.escape(entry['name'])}\s+{re.escape(owner)}\s+\S+\s+loaded\s+.*{peft_type}", out, re.M
    )


def fresh_process(*args: str, **env_changes: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in KNOBS} | env_changes
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_module_entry_point_lists_the_installed_plugins():
    result = fresh_process("-m", "peft_core.cli", "plugins", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {p["name"] for p in data["plugins"]} == {ep.name for ep in installed_entry_points()}


def test_the_cli_itself_imports_nothing_heavy():
    """With no plugins to load, the command must not pull in transformers (plugins may, if they need it)."""
    code = (
        "import sys; from peft_core.cli import main; rc = main(['plugins']); "
        "sys.exit(rc or 3 * ('transformers' in sys.modules))"
    )
    result = fresh_process("-c", code, PEFT_CORE_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Plugin autoload is off" in result.stdout


def test_console_script_is_declared():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["scripts"]["peft-core"] == "peft_core.cli:main"
