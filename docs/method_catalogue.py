"""mkdocs hook: render the method catalogue (docs/methods.md) from the installed plugins.

The table is built from the plugin registry of the environment that builds the site, at build
time, so it lists exactly what is installed and cannot drift from the plugins' own metadata.
``tests/test_docs.py`` checks it against the registry too.
"""

from __future__ import annotations

from collections import Counter

import attrs

MARKER = "<!-- method-catalogue -->"
PAGE = "methods.md"

# Capability columns, in the order shown, with the short header each gets.
CAPABILITIES = {
    "mergeable": "merge",
    "mixable": "mixable",
    "mixed_batch": "mixed batch",
    "weighted_combination": "weighted",
    "quantized_bases": "quantized",
    "prompt_learning": "prompt learning",
    "identity_init": "identity init",
}


def _yes(flag: bool) -> str:
    return "✓" if flag else "–"


def render_catalogue(manager) -> str:
    """The catalogue as Markdown, for the plugins ``manager`` (a ``PluginManager``) loaded."""
    from peft_core.registry import Capabilities

    missing = {f.name for f in attrs.fields(Capabilities)} - set(CAPABILITIES)
    if missing:  # a new capability must get a column, or the catalogue would hide it
        raise RuntimeError(f"docs/method_catalogue.py has no column for capabilities {sorted(missing)}")
    registry = manager.registry
    versions = {p.distribution: p.version for p in manager.plugins}
    header = ["method", "config class", "distribution", *CAPABILITIES.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, spec in sorted(registry.methods.items()):
        caps = [_yes(getattr(spec.capabilities, flag)) for flag in CAPABILITIES]
        dist = f"`{spec.plugin}` {versions.get(spec.plugin, '')}".strip()
        lines.append("| " + " | ".join([f"`{name}`", f"`{spec.config_cls.__name__}`", dist, *caps]) + " |")
    if not registry.methods:
        lines.append("| (no method plugin is installed) |" + " |" * (len(header) - 1))

    strategies = ["| combination type | provided by |", "|---|---|"]
    strategies += [f"| `{n}` | `{p}` |" for n, p in sorted(registry.combination_strategies.items())]

    factories = ["| method | layer factories (highest priority first) |", "|---|---|"]
    for name in sorted(registry.methods):
        counts = Counter(registry.layer_factory_origins(name))  # ordered, highest priority first
        origins = ", ".join(
            f"`{plugin}` ({priority})" + (f" ×{n}" if n > 1 else "")
            for (plugin, priority), n in counts.items()
        )
        factories.append(f"| `{name}` | {origins or '–'} |")

    plugins = ["| plugin | distribution | version | status | contributes |", "|---|---|---|---|---|"]
    for info in sorted(manager.plugins, key=lambda p: p.name):
        parts = [
            f"{kind.replace('_', ' ')}: {', '.join(names)}"
            for kind, names in info.contributions.items()
            if names
        ]
        plugins.append(
            f"| `{info.name}` | `{info.distribution}` | {info.version} | {info.status} | {'; '.join(parts) or '–'} |"
        )

    skipped = [p for p in manager.plugins if p.status != "loaded"]
    notes = [f"* `{p.name}` ({p.distribution} {p.version}): {p.status}: {p.reason}" for p in skipped]
    return "\n".join(
        [
            *lines,
            "",
            "## Installed plugins",
            "",
            "Every plugin found in the `peft_core` entry-point group, including those that add no",
            "method of their own (a quantization backend, a combination strategy, ...).",
            "",
            *plugins,
            "",
            "## Combination strategies",
            "",
            "The `combination_type` values `add_weighted_adapter` accepts, and who registered each.",
            "",
            *strategies,
            "",
            "## Layer factories",
            "",
            "Which plugins create each method's layers (a quantization backend adds its own factory",
            "to an existing method), with the priority each registered at and how many factories it added.",
            "",
            *factories,
            "",
            "## Plugins that did not load",
            "",
            *(notes or ["None: every installed plugin loaded."]),
        ]
    )


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise RuntimeError(f"docs/{PAGE} lost its {MARKER} placeholder")
    from peft_core.plugins import get_plugin_manager

    return markdown.replace(MARKER, render_catalogue(get_plugin_manager()))
