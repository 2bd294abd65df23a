"""Test setup for peft-lora: the ``compat`` marker, hypothesis profiles, plugin registration."""

from __future__ import annotations

import pytest
from peft_core.plugins import get_registry, register_plugin
from peft_core.testing import register_profiles

from peft_lora import plugin

# Installed (pip install -e plugins/lora), the entry point registers the plugin; from a plain
# checkout on PYTHONPATH, register the hooks module directly.
if not get_registry().has_method(plugin.PEFT_TYPE):
    register_plugin(plugin, name="peft-lora")

# the kit's hypothesis profiles: dev (default), ci, derandomized; picked by $HYPOTHESIS_PROFILE
register_profiles()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "compat: compares against the reference `peft` library (needs `pip install peft==0.21.2`)"
    )
