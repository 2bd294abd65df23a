"""What every plugin's ``tests/conftest.py`` shares, so a conftest is three lines.

::

    from peft_core.testing.plugin_setup import *  # noqa: F403 - the shared pytest hooks and fixtures
    from peft_mymethod import plugin

    register_for_tests(plugin, "peft-mymethod")

It registers the plugin when it runs from a plain checkout (installed, its entry point already
did), loads the kit's hypothesis profiles, declares the ``compat`` marker, and gives the
``max_abs_diffs`` fixture whose figures are printed once at the end of the run, per plugin.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from peft_core.plugins import get_registry, register_plugin
from peft_core.testing.profiles import register_profiles

__all__ = [
    "max_abs_diffs",
    "pytest_configure",
    "pytest_terminal_summary",
    "register_for_tests",
    "tokenizer_dir",
]

_MAX_DIFFS = pytest.StashKey[dict[str, dict[str, float]]]()
_REPORTED = pytest.StashKey[bool]()


def register_for_tests(plugin: ModuleType, distribution: str) -> None:
    """Register ``plugin`` (its hooks module) unless its entry point did, and load the profiles."""
    if not get_registry().has_method(plugin.PEFT_TYPE):
        register_plugin(plugin, name=distribution)
    register_profiles()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "compat: compares against the reference `peft` library (needs `pip install peft==0.21.2`)"
    )


def _plugin_label(path: Path) -> str:
    parts = path.parts
    return f"peft-{parts[parts.index('tests') - 1].replace('_', '-')}" if "tests" in parts[1:] else path.stem


@pytest.fixture
def max_abs_diffs(request: pytest.FixtureRequest) -> dict[str, float]:
    """Largest absolute differences the compat checks saw, by check name, for the requesting plugin."""
    return request.config.stash.setdefault(_MAX_DIFFS, {}).setdefault(_plugin_label(request.path), {})


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    # Every plugin's conftest imports this hook; report once for all of them.
    if config.stash.get(_REPORTED, False):
        return
    config.stash[_REPORTED] = True
    for label, diffs in sorted(config.stash.get(_MAX_DIFFS, {}).items()):
        if diffs:
            line = ", ".join(f"{name}: {value:.1e}" for name, value in sorted(diffs.items()))
            terminalreporter.write_line(f"{label} vs peft, max abs diffs: {line}")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer built and saved locally (no downloads), e.g. for TEXT prompt inits."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path
