"""Shared test setup: the kit's hypothesis profiles and a registry-isolation fixture.

``HYPOTHESIS_PROFILE`` picks the profile: ``dev`` (default, 10 examples per check), ``ci``
(25) or ``derandomized`` (25, fixed seed). They are the profiles
:func:`peft_core.testing.register_profiles` gives every third-party plugin too.
"""

from __future__ import annotations

import importlib

import pytest

from peft_core.testing import register_profiles

register_profiles()


@pytest.fixture
def registry_with_only(monkeypatch):
    """Make the process-wide registry hold only the named plugin modules (whatever else is installed)."""
    import peft_core.plugins as plugins

    def build(*modules: str):
        manager = plugins.PluginManager()
        for name in modules:
            manager.register_plugin(importlib.import_module(name), name=name)
        monkeypatch.setattr(plugins, "_manager", manager)
        return manager.registry

    return build
