"""Test setup for peft-oft: the ``compat`` marker, hypothesis profiles, plugin registration."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings
from peft_core.plugins import get_registry, register_plugin

from peft_oft import plugin

# Installed (pip install -e plugins/ia3), the entry point registers the plugin; from a plain
# checkout on PYTHONPATH, register the hooks module directly.
if not get_registry().has_method(plugin.PEFT_TYPE):
    register_plugin(plugin, name="peft-oft")

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
        terminalreporter.write_line(f"peft-oft vs peft, max abs diffs: {line}")
