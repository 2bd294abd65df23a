"""Test setup for peft-prefix-tuning: the ``compat`` marker, hypothesis profiles, plugin registration."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings
from peft_core.plugins import get_registry, register_plugin

from peft_prefix_tuning import plugin

# Installed (pip install -e plugins/prompt_tuning), the entry point registers the plugin; from a plain
# checkout on PYTHONPATH, register the hooks module directly.
if not get_registry().has_method(plugin.PEFT_TYPE):
    register_plugin(plugin, name="peft-prefix-tuning")

try:
    from peft_core.testing import register_profiles
except ImportError:  # a core without the conformance kit: the same profiles, registered here
    settings.register_profile("dev", max_examples=10, deadline=None)
    settings.register_profile("ci", max_examples=25, deadline=None)
    settings.register_profile("derandomized", max_examples=25, deadline=None, derandomize=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
else:
    register_profiles()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "compat: compares against the reference `peft` library (needs `pip install peft==0.21.2`)"
    )


_MAX_DIFFS = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def max_abs_diffs(request: pytest.FixtureRequest) -> dict[str, float]:
    """Largest absolute differences seen by the compat checks, by check name."""
    return request.config.stash.setdefault(_MAX_DIFFS, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    diffs = config.stash.get(_MAX_DIFFS, {})
    if diffs:
        line = ", ".join(f"{name}: {value:.1e}" for name, value in sorted(diffs.items()))
        terminalreporter.write_line(f"peft-prefix-tuning vs peft, max abs diffs: {line}")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    """A word-level tokenizer built and saved locally (no downloads), for TEXT inits."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path
