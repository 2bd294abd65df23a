"""``import peft_core`` stays light: neither the reference library nor transformers is imported."""

from __future__ import annotations

import subprocess
import sys


def test_import_does_not_pull_heavy_or_reference_packages():
    code = (
        "import sys, peft_core, peft_core.cli; "
        "bad = [m for m in ('peft', 'transformers', 'safetensors', 'huggingface_hub') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_loading_plugins_does_not_import_transformers():
    code = (
        "import sys; from peft_core.plugins import get_registry; get_registry(); "
        "print('transformers' in sys.modules, 'peft' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
