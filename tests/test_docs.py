"""The docs cannot drift from the code: hook signatures, registry fields, environment knobs,
exported names, internal links, and the quickstart (which is run as written)."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import textwrap
import unicodedata
from pathlib import Path

import pytest

import peft_core
from peft_core import hookspecs, registry

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGE = ROOT / "peft_core"


def read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.S | re.M)


def def_line(fn) -> str:
    """``def name(params) -> ret`` as written in the source, joined onto one line.

    Taken from the source text (not ``inspect.signature``) so annotations read as written,
    unevaluated, with a line-wrapped signature folded the way ``ruff format`` would unfold it.
    """
    source = textwrap.dedent(inspect.getsource(fn))
    start = source.index(f"def {fn.__name__}(")
    depth, quote, end = 0, "", start
    for end in range(start, len(source)):
        char = source[end]
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == ":" and depth == 0:
            break
    header = re.sub(r"\s+", " ", source[start:end]).strip()
    return re.sub(r",? \)", ")", header.replace("( ", "("))


def hook_specs() -> dict[str, object]:
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    specs = {
        name: fn
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, marker) and fn.__module__ == hookspecs.__name__
    }
    assert specs, "found no hook specs in peft_core.hookspecs"
    return specs


def hook_section(doc: str, name: str) -> str:
    match = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## |\Z)", doc, flags=re.S | re.M)
    assert match, f"docs/hooks.md has no '## {name}' section"
    return match.group(1)


# ----------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_every_hook_spec_is_documented_with_its_exact_signature(name):
    fn = hook_specs()[name]
    doc = read("hooks.md")
    section = hook_section(doc, name)
    signature = def_line(fn)
    assert signature in section, f"docs/hooks.md section {name!r} must show the signature line:\n{signature}"
    opts = getattr(fn, f"{hookspecs.PROJECT_NAME}_spec")
    expected = "yes" if opts.get("firstresult") else "no"
    assert f"`firstresult`: {expected}" in section, (
        f"docs/hooks.md must say `firstresult`: {expected} for {name}"
    )
    assert not opts.get("historic"), "a historic hook needs its own paragraph in docs/hooks.md"


def test_hooks_page_documents_no_hook_that_does_not_exist():
    documented = set(re.findall(r"^## (peft_\w+)$", read("hooks.md"), flags=re.M))
    assert documented == set(hook_specs())


def test_hookspecs_module_exports_every_spec():
    assert set(hook_specs()) <= set(hookspecs.__all__)


@pytest.mark.parametrize(
    "method",
    [
        "register_method",
        "register_layer_factory",
        "register_combination_strategy",
        "register_state_dict_converter",
    ],
)
def test_registry_registration_calls_are_documented_with_their_signatures(method):
    signature = def_line(getattr(registry.Registry, method))
    assert signature in read("hooks.md"), f"docs/hooks.md must show:\n{signature}"


def test_every_public_registration_call_is_in_the_list_above():
    public = {n for n in vars(registry.Registry) if n.startswith("register_")}
    assert public == {
        "register_method",
        "register_layer_factory",
        "register_combination_strategy",
        "register_state_dict_converter",
        "register_quantization_backend",
    }, "a new Registry.register_* method must be added to docs/hooks.md and to this test"


@pytest.mark.parametrize("cls", [registry.MethodSpec, registry.Capabilities, registry.LayerContext])
def test_every_registry_record_field_is_documented(cls):
    import attrs

    doc = read("hooks.md")
    assert f"### {cls.__name__}" in doc
    for field in attrs.fields(cls):
        assert re.search(rf"^\| `{field.name}` \|", doc, flags=re.M), (
            f"docs/hooks.md must document {cls.__name__}.{field.name} in a table row"
        )


def test_capability_defaults_in_the_table_match_the_code():
    import attrs

    rows = dict(re.findall(r"^\| `(\w+)` \| `(True|False)` \|", read("hooks.md"), flags=re.M))
    for field in attrs.fields(registry.Capabilities):
        assert rows.get(field.name) == str(field.default), f"default of Capabilities.{field.name}"


def test_layer_factory_and_strategy_shapes_match_the_protocols():
    doc = read("hooks.md")
    for protocol, fn_name in [
        (registry.LayerFactory, "factory"),
        (registry.CombinationStrategy, "strategy"),
        (registry.StateDictConverter, "converter"),
    ]:
        line = def_line(protocol.__call__).replace("def __call__(self, ", f"def {fn_name}(")
        assert line in doc, f"docs/hooks.md must show the shape of a {fn_name}:\n{line}"


# ----------------------------------------------------------------------------- environment knobs
def knobs_in_code() -> set[str]:
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.fullmatch(r"PEFT_CORE_[A-Z0-9_]+", node.value):
                    found.add(node.value)
    return found


def knobs_in_table() -> set[str]:
    return set(re.findall(r"^\| `(PEFT_CORE_[A-Z0-9_]+)` \|", read("plugins.md"), flags=re.M))


def test_the_knobs_plugins_py_reads_were_found():
    source = (PACKAGE / "plugins.py").read_text(encoding="utf-8")
    read_there = set(re.findall(r"_env_(?:flag|list)\(\"(PEFT_CORE_[A-Z0-9_]+)\"\)", source))
    assert read_there, "plugins.py no longer reads knobs through _env_flag/_env_list; update this test"
    assert read_there <= knobs_in_code()


@pytest.mark.parametrize("knob", sorted(knobs_in_code()))
def test_every_environment_knob_is_in_the_table(knob):
    assert knob in knobs_in_table(), f"add a row for {knob} to the environment table in docs/plugins.md"


def test_the_table_lists_no_knob_the_code_does_not_read():
    assert knobs_in_table() <= knobs_in_code()


# ----------------------------------------------------------------------------- site structure
def nav_files() -> list[str]:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(read("mkdocs.yml"))
    files: list[str] = []

    def walk(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                walk(value)
            else:
                files.append(value)

    walk(config["nav"])
    return files


def pages() -> list[str]:
    """Every page of the site, as its path relative to docs/ (the form nav uses)."""
    return sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


def test_nav_lists_every_page_and_only_existing_ones():
    assert sorted(nav_files()) == pages()
    assert "index.md" in pages()


def slug(heading: str) -> str:
    """Python-Markdown's default toc slug."""
    value = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def anchors(markdown: str) -> set[str]:
    text = re.sub(r"^```.*?^```$", "", markdown, flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", pages())
def test_internal_links_resolve(page):
    text = re.sub(r"^```.*?^```$", "", read(page), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        name, _, anchor = target.partition("#")
        path = (DOCS / page).parent / name if name else DOCS / page
        assert path.is_file(), f"{page}: link to missing page {target!r}"
        if anchor:
            assert anchor in anchors(path.read_text(encoding="utf-8")), (
                f"{page}: link to missing heading {target!r}"
            )


# ----------------------------------------------------------------------------- migration table
def resolve(dotted: str) -> object:
    obj: object = peft_core
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def migration_rows() -> list[tuple[str, str]]:
    return re.findall(r"^\| `([\w.]+)` \| `peft_core\.([\w.]+)` \|$", read("migration.md"), flags=re.M)


def missing_names() -> list[str]:
    section = read("migration.md").split("### Not in this release", 1)[1].split("Also not supported", 1)[0]
    return re.findall(r"^\* `([\w.]+)`$", section, flags=re.M)


def test_migration_table_parses():
    assert len(migration_rows()) >= 20 and missing_names()


@pytest.mark.parametrize("peft_name, ours", migration_rows())
def test_every_name_the_migration_page_promises_exists(peft_name, ours):
    assert peft_name == ours
    resolve(ours)


@pytest.mark.parametrize("name", missing_names())
def test_names_listed_as_missing_are_really_missing(name):
    try:
        resolve(name)
    except (AttributeError, ImportError):
        return
    pytest.fail(
        f"peft_core now provides {name}: move it from 'Not in this release' to the table in docs/migration.md"
    )


def test_exported_public_api_is_in_the_migration_table():
    documented = {ours for _, ours in migration_rows()}
    exported = {n for n in peft_core.__all__ if not n.endswith("Error") and n not in {"PeftCoreError"}}
    assert exported <= documented, f"add to docs/migration.md: {sorted(exported - documented)}"


# ----------------------------------------------------------------------------- quickstart
@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft_lora", reason="the quickstart uses LoRA; install plugins/lora")
    blocks = python_blocks(read("quickstart.md"))
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "quickstart"}
    for index, block in enumerate(blocks):
        exec(compile(block, f"docs/quickstart.md[block {index}]", "exec"), namespace)
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    import torch

    assert not torch.equal(namespace["base_logits"], namespace["expected"])  # the adapter was trained


# ----------------------------------------------------------------------------- method catalogue
def catalogue_hook():
    spec = importlib.util.spec_from_file_location("method_catalogue", DOCS / "method_catalogue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_catalogue_hook_is_wired_into_the_site():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(read("mkdocs.yml"))
    assert "method_catalogue.py" in config["hooks"]
    hook = catalogue_hook()
    assert hook.MARKER in read(hook.PAGE)


def test_generated_catalogue_lists_every_installed_plugin():
    from peft_core.plugins import get_plugin_manager

    manager = get_plugin_manager()
    catalogue = catalogue_hook().render_catalogue(manager)
    methods_table = catalogue.split("## ", 1)[0]
    rows = {
        row.split(" | ")[0].strip("| `"): row for row in methods_table.splitlines() if row.startswith("| `")
    }
    loaded = [p for p in manager.plugins if p.status == "loaded" and p.methods]
    assert loaded, "no method plugin is installed; the catalogue would be empty"
    for plugin in loaded:
        for name in plugin.methods:
            spec = manager.registry.method(name)
            assert name in rows, f"the catalogue misses {name} of {plugin.distribution}"
            assert f"`{spec.config_cls.__name__}`" in rows[name] and f"`{plugin.distribution}`" in rows[name]
            flags = [cell.strip() for cell in rows[name].strip("|").split("|")][3:]
            expected = [
                ("✓" if getattr(spec.capabilities, f) else "–") for f in catalogue_hook().CAPABILITIES
            ]
            assert flags == expected, f"capabilities of {name}"
    listed = catalogue.split("## Installed plugins", 1)[1].split("## ", 1)[0]
    for plugin in manager.plugins:
        assert f"| `{plugin.name}` | `{plugin.distribution}` |" in listed, (
            f"the catalogue misses {plugin.name}"
        )
        if plugin.status != "loaded":
            assert f"`{plugin.name}`" in catalogue, (
                f"the catalogue must list {plugin.name}, which did not load"
            )


# ----------------------------------------------------------------------------- the site itself
def test_docstring_markup_is_rewritten_for_the_site():
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("griffe_rst", DOCS / "griffe_rst.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rst = "See :class:`~a.b.C` and :func:`f`::\n\n    x = 1\n\n====  ====\nkey   value\n====  ====\n``A``   one\n      more\n====  ====\n"
    assert module.markdown_from_rst(rst) == (
        "See `C` and `f`:\n\n    x = 1\n\n| key | value |\n|---|---|\n| ``A`` | one more |\n"
    )


@pytest.mark.slow
def test_site_builds_with_warnings_as_errors(tmp_path):
    """What the nox ``docs`` session runs; skipped where the docs toolchain is not installed."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    import subprocess
    import sys

    site = tmp_path / "site"
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "docs/mkdocs.yml", "-d", str(site)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    methods = (site / "methods" / "index.html").read_text(encoding="utf-8")
    assert "LoraConfig" in methods and "peft-lora" in methods
    assert "get_peft_model" in (site / "api" / "index.html").read_text(encoding="utf-8")
