"""The task guides and the migration scripts run as written.

Every ```python block of a guide runs, in order, in one namespace, in a fresh directory. A block
fenced as ```{.python data-requires="pkg"} runs only where ``pkg`` is importable. The migration
page shows each script for ``peft`` and for peft-core: they must differ only in imports, the
peft-core one always runs, and where ``peft`` is installed both run and must agree.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDES = sorted(p.name for p in (DOCS / "guides").glob("*.md"))

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

_BLOCK = re.compile(
    r"^```(?:python|\{\.python(?P<attrs>[^}\n]*)\})[ \t]*\n(?P<code>.*?)^```[ \t]*$", flags=re.S | re.M
)


def code_blocks(markdown: str) -> list[tuple[str, list[str]]]:
    """``(code, requirements)`` for every Python block, in page order."""
    return [
        (m.group("code"), re.findall(r'data-requires="([^"]+)"', m.group("attrs") or ""))
        for m in _BLOCK.finditer(markdown)
    ]


def run_blocks(blocks: list[str], where: Path, label: str, monkeypatch) -> dict[str, object]:
    monkeypatch.chdir(where)
    namespace: dict[str, object] = {"__name__": label}
    for index, code in enumerate(blocks):
        exec(compile(code, f"{label}[block {index}]", "exec"), namespace)
    return namespace


def test_the_block_parser_sees_requirements():
    page = 'a\n\n```python\nx = 1\n```\n\n```{.python data-requires="bitsandbytes"}\ny = 2\n```\n'
    assert code_blocks(page) == [("x = 1\n", []), ("y = 2\n", ["bitsandbytes"])]


def test_there_are_the_four_task_guides():
    assert set(GUIDES) >= {
        "causal-lm.md",
        "sequence-classification.md",
        "qlora.md",
        "multi-adapter-serving.md",
    }


@pytest.mark.parametrize("guide", GUIDES)
def test_guide_runs_as_written(guide, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft_lora", reason="the guides use LoRA; install plugins/lora")
    blocks = code_blocks((DOCS / "guides" / guide).read_text(encoding="utf-8"))
    assert blocks, f"docs/guides/{guide} has no python blocks"
    missing = sorted({r for _, reqs in blocks for r in reqs if importlib.util.find_spec(r) is None})
    runnable = [code for code, reqs in blocks if not set(reqs) & set(missing)]
    run_blocks(runnable, tmp_path, f"docs/guides/{guide}", monkeypatch)
    if missing:
        pytest.skip(f"ran {len(runnable)} of {len(blocks)} blocks; the others need {', '.join(missing)}")


# ----------------------------------------------------------------------------- migration scripts
def migration_scripts() -> tuple[str, list[tuple[str, str]]]:
    """The setup block and the (peft, peft-core) script pairs of 'Porting a script'."""
    page = (DOCS / "migration.md").read_text(encoding="utf-8")
    section = page.split("## 4. Porting a script", 1)[1]
    blocks = [code for code, _ in code_blocks(section)]
    setup, scripts = blocks[0], blocks[1:]
    assert len(scripts) >= 4 and len(scripts) % 2 == 0, "each script is shown for peft, then for peft-core"
    pairs = list(zip(scripts[::2], scripts[1::2]))
    for reference, ours in pairs:
        assert "from peft import" in reference and "peft_core" not in reference
        assert "from peft_core import" in ours
    return setup, pairs


def test_migration_scripts_differ_only_in_imports():
    _, pairs = migration_scripts()
    for reference, ours in pairs:
        ref_lines, our_lines = reference.splitlines(), ours.splitlines()
        assert len(ref_lines) == len(our_lines)
        for ref, our in zip(ref_lines, our_lines):
            if ref != our:
                assert ref.startswith("from peft import") and our == ref.replace(
                    "from peft ", "from peft_core ", 1
                ), f"the scripts differ outside the imports:\n  peft:      {ref}\n  peft-core: {our}"


def run_scripts(scripts: list[str], where: Path, monkeypatch) -> list[dict[str, object]]:
    """The setup, then each script in a fresh namespace, all in ``where`` (they share files)."""
    setup, _ = migration_scripts()
    where.mkdir()
    run_blocks([setup], where, "docs/migration.md[setup]", monkeypatch)
    return [
        run_blocks([s], where, f"docs/migration.md[script {i}]", monkeypatch) for i, s in enumerate(scripts)
    ]


@pytest.fixture
def ours(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft_lora", reason="the scripts use LoRA; install plugins/lora")
    _, pairs = migration_scripts()
    return tmp_path / "ours", run_scripts([o for _, o in pairs], tmp_path / "ours", monkeypatch)


def test_migration_scripts_run_with_peft_core(ours):
    where, results = ours
    assert results[0]["losses"][-1] < results[0]["losses"][0]
    assert (where / "lora-adapter" / "adapter_model.safetensors").is_file()
    assert (where / "merged-model" / "config.json").is_file()
    assert (where / "two-adapters" / "random" / "adapter_config.json").is_file()
    assert (where / "two-adapters" / "trained" / "adapter_config.json").is_file()


@pytest.mark.compat
def test_migration_scripts_give_the_same_results_with_peft(ours, tmp_path, monkeypatch):
    pytest.importorskip("peft")
    import torch
    from safetensors.torch import load_file

    _, pairs = migration_scripts()
    where, results = ours
    ref_where = tmp_path / "reference"
    reference = run_scripts([r for r, _ in pairs], ref_where, monkeypatch)

    torch.testing.assert_close(torch.tensor(results[0]["losses"]), torch.tensor(reference[0]["losses"]))
    torch.testing.assert_close(results[1]["merged_logits"], reference[1]["merged_logits"])
    for name in reference[2]["outputs"]:
        torch.testing.assert_close(results[2]["outputs"][name], reference[2]["outputs"][name])
    for adapter in ["lora-adapter", "two-adapters/trained", "two-adapters/random"]:
        ref_tensors = load_file(ref_where / adapter / "adapter_model.safetensors")
        our_tensors = load_file(where / adapter / "adapter_model.safetensors")
        assert sorted(our_tensors) == sorted(ref_tensors), adapter
        for key, value in ref_tensors.items():
            torch.testing.assert_close(our_tensors[key], value)

    # Each library reads the other's files and computes what the other did.
    import peft
    from transformers import AutoModelForCausalLM

    import peft_core

    input_ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    for library, adapters_from in [(peft_core, ref_where), (peft, where)]:
        base = AutoModelForCausalLM.from_pretrained(ref_where / "tiny-llama")
        model = library.PeftModel.from_pretrained(
            base, adapters_from / "two-adapters" / "trained", adapter_name="trained"
        )
        model.load_adapter(adapters_from / "two-adapters" / "random", adapter_name="random")
        with torch.no_grad():
            for name in ["trained", "random"]:
                model.set_adapter(name)
                torch.testing.assert_close(model(input_ids=input_ids).logits, reference[2]["outputs"][name])
