"""Test setup for peft-bnb: the kit's shared plugin-test setup, with this plugin's backends registered."""

from __future__ import annotations

from peft_core.plugins import get_registry, register_plugin
from peft_core.testing.plugin_setup import *  # noqa: F403 - the shared pytest hooks and fixtures
from peft_core.testing.profiles import register_profiles

from peft_bnb import plugin

if not all(b.name in get_registry().quantization_backends for b in plugin.BACKENDS):
    register_plugin(plugin, name="peft-bnb")
register_profiles()
