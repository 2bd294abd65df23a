"""The shared default-target table is the reference's, for every method that uses it there."""

from __future__ import annotations

import pytest

from peft_core.default_targets import LORA_STYLE_DEFAULT_TARGETS

# Methods whose reference mapping is a copy of its LoRA mapping, and whose plugins here register the shared table.
SHARING = ("LORA", "LOHA", "LOKR", "OFT", "BOFT", "HRA")


@pytest.mark.parametrize("method", SHARING)
def test_the_table_equals_the_references_mapping_for(method):
    constants = pytest.importorskip("peft.utils.constants")
    reference = getattr(constants, f"TRANSFORMERS_MODELS_TO_{method}_TARGET_MODULES_MAPPING")
    ours = {k: v if isinstance(v, str) else list(v) for k, v in LORA_STYLE_DEFAULT_TARGETS.items()}
    assert ours == {k: v if isinstance(v, str) else list(v) for k, v in reference.items()}


@pytest.mark.parametrize("method", SHARING)
def test_installed_plugins_register_the_shared_table(method):
    from peft_core.plugins import get_registry

    if not get_registry().has_method(method):
        pytest.skip(f"the {method} plugin is not installed in this environment")
    assert get_registry().method(method).default_target_modules is LORA_STYLE_DEFAULT_TARGETS
