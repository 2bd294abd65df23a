"""Test setup for peft-hra: the kit's shared plugin-test setup (profiles, compat marker, max-diff report)."""

from __future__ import annotations

from peft_core.testing.plugin_setup import *  # noqa: F403 - the shared pytest hooks and fixtures
from peft_core.testing.plugin_setup import register_for_tests

from peft_hra import plugin

register_for_tests(plugin, "peft-hra")
