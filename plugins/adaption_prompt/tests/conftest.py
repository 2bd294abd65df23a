"""Test setup for peft-adaption-prompt: the kit's shared plugin-test setup (profiles, compat marker, max-diff report)."""

from __future__ import annotations

import sys
from pathlib import Path

from peft_core.testing.plugin_setup import *  # noqa: F403 - the shared pytest hooks and fixtures
from peft_core.testing.plugin_setup import register_for_tests

from peft_adaption_prompt import plugin

register_for_tests(plugin, "peft-adaption-prompt")

# The test modules share tiny models from this folder; under --import-mode=importlib (the
# repository's setting) a test folder is not put on sys.path by pytest.
sys.path.insert(0, str(Path(__file__).parent))
