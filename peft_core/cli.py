"""The ``peft-core`` command line.

* ``plugins`` - what is installed and why not;
* ``inspect PATH_OR_ID`` - what an adapter directory holds, and which plugin it needs;
* ``merge ADAPTER OUT [--base BASE]`` - write the merged transformers model;
* ``convert INITIAL TRAINED OUT`` - a PiSSA/OLoRA/CorDA adapter as the plain adapter for the original base.

Every command takes ``--json`` for scripts.

``peft-core plugins`` loads the entry points of the ``peft_core`` group into a fresh plugin
manager (honouring the same environment knobs as the library), so what it prints is exactly
what ``import peft_core`` would see in a new process: each plugin's distribution, version and
status, what it contributed to the registry, its hook implementations, the reasons of failed
loads, and the warnings (e.g. two plugins claiming one method) raised while loading.

Exit status: 0 on success, 1 when loading fails in strict mode (``PEFT_CORE_STRICT=1`` or
``--strict``), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from importlib import metadata
from typing import Any, TextIO

__all__ = ["main"]

# Registry contribution keys (``Registry.contributions``) and how the table labels them.
_CONTRIBUTION_LABELS = {
    "methods": "methods",
    "layer_factories": "layer factories",
    "combination_strategies": "combination strategies",
    "state_dict_converters": "state-dict converters",
    "quantization_backends": "quantization backends",
}


def _core_version() -> str:
    try:
        return metadata.version("peft-core")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        from peft_core import __version__

        return __version__


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-core",
        description="Parameter-efficient fine-tuning with methods as plugins.",
    )
    parser.add_argument("--version", action="version", version=f"peft-core {_core_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    plugins = sub.add_parser(
        "plugins",
        help="list installed plugins, what they provide, and failed loads",
        description=(
            "List the plugins found in the 'peft_core' entry-point group: version, status "
            "(loaded/failed/disabled), the methods, layer factories, combination strategies and "
            "state-dict converters each registered, and the reason of every failed load. "
            "Honours PEFT_CORE_DISABLE_PLUGINS, PEFT_CORE_PLUGINS, "
            "PEFT_CORE_DISABLE_PLUGIN_AUTOLOAD and PEFT_CORE_STRICT."
        ),
    )
    plugins.add_argument("--json", action="store_true", help="print machine-readable JSON")
    plugins.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit status 1) on the first plugin that cannot load or conflicts, like PEFT_CORE_STRICT=1",
    )
    inspect = sub.add_parser(
        "inspect",
        help="describe an adapter: method, base model, targets, ranks, size, plugin needed",
        description="Read an adapter directory (or Hub repo) without loading any model.",
    )
    inspect.add_argument("path", help="adapter directory or Hub repo id")
    inspect.add_argument("--json", action="store_true", help="print machine-readable JSON")
    merge = sub.add_parser(
        "merge",
        help="merge an adapter into its base and save the result as a plain transformers model",
        description="Load the base model (the adapter's base_model_name_or_path unless --base is given), apply the "
        "adapter, merge it into the weights and save the model (and the adapter's tokenizer) to OUT.",
    )
    merge.add_argument("adapter", help="adapter directory or Hub repo id")
    merge.add_argument("out", help="directory to write the merged model to")
    merge.add_argument("--base", help="base model path or Hub id (default: the one the adapter names)")
    merge.add_argument("--json", action="store_true", help="print machine-readable JSON")
    convert = sub.add_parser(
        "convert",
        help="turn a PiSSA/OLoRA/CorDA adapter into a plain one for the original base",
        description="INITIAL is the adapter saved right after its initialisation, TRAINED the one after training; "
        "OUT receives the equivalent adapter that loads on the original, unmodified base model.",
    )
    convert.add_argument("initial")
    convert.add_argument("trained")
    convert.add_argument("out")
    convert.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parser


# ---------------------------------------------------------------------------- data


def _hooks_of(manager: Any, name: str) -> list[str]:
    """Names of the hooks the plugin registered under ``name`` implements."""
    # The facade does not expose per-plugin hook callers, so ask pluggy directly.
    pm = manager._pm
    plugin = pm.get_plugin(name)
    if plugin is None:
        return []
    return sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])


def _method_entry(spec: Any) -> dict[str, Any]:
    import attrs

    return {
        "plugin": spec.plugin,
        "config_class": f"{spec.config_cls.__module__}.{spec.config_cls.__qualname__}",
        "model_class": f"{spec.model_cls.__module__}.{spec.model_cls.__qualname__}",
        "prefix": spec.prefix,
        "capabilities": attrs.asdict(spec.capabilities),
    }


def collect(*, strict: bool | None = None) -> dict[str, Any]:
    """Load the installed plugins into a fresh manager and describe the result as plain data.

    A fresh manager (rather than the process-wide one) reflects the environment at call time;
    warnings raised while loading are captured and reported instead of printed.
    """
    from peft_core.plugins import PluginManager, _env_flag

    manager = PluginManager(strict=strict)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manager.load_entry_points()
    plugins = []
    for info in manager.plugins:
        entry = info.to_dict()
        entry["contributions"] = {key: list(info.contributions.get(key, [])) for key in _CONTRIBUTION_LABELS}
        entry["hooks"] = _hooks_of(manager, info.name) if info.status == "loaded" else []
        plugins.append(entry)
    return {
        "peft_core_version": _core_version(),
        "autoload": not _env_flag("PEFT_CORE_DISABLE_PLUGIN_AUTOLOAD"),
        "strict": manager.strict,
        "plugins": plugins,
        "methods": {name: _method_entry(spec) for name, spec in sorted(manager.registry.methods.items())},
        "debug": _env_flag("PEFT_CORE_DEBUG_PLUGINS"),
        "warnings": [{"category": w.category.__name__, "message": str(w.message)} for w in caught],
    }


# ---------------------------------------------------------------------------- rendering


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return lines


def _join(items: Sequence[str]) -> str:
    return ", ".join(items) if items else "-"


def render_text(data: dict[str, Any]) -> str:
    """The human-readable report ``peft-core plugins`` prints."""
    plugins = data["plugins"]
    counts = {
        status: sum(p["status"] == status for p in plugins) for status in ("loaded", "failed", "disabled")
    }
    lines = [
        f"peft-core {data['peft_core_version']}: {len(plugins)} plugin(s) "
        f"({counts['loaded']} loaded, {counts['failed']} failed, {counts['disabled']} disabled)"
    ]
    if not data["autoload"]:
        lines.append(
            "Plugin autoload is off (PEFT_CORE_DISABLE_PLUGIN_AUTOLOAD); only plugins registered in code "
            "with peft_core.plugins.register_plugin() are active."
        )
    elif not plugins:
        lines.append(
            "No plugins are installed in the 'peft_core' entry-point group. Install a method, "
            "e.g. `pip install peft-lora`."
        )
    if plugins:
        lines.append("")
        rows = [
            [p["name"], p["distribution"], p["version"] or "-", p["status"], _join(p["methods"])]
            for p in plugins
        ]
        lines += _table(rows, ["NAME", "DISTRIBUTION", "VERSION", "STATUS", "METHODS"])
    width = max(len(label) for label in _CONTRIBUTION_LABELS.values()) + 1
    for p in plugins:
        if p["status"] != "loaded":
            continue
        lines += ["", f"{p['name']} ({p['distribution']} {p['version'] or '-'}, module {p['module']})"]
        for key, label in _CONTRIBUTION_LABELS.items():
            lines.append(f"  {(label + ':').ljust(width)} {_join(p['contributions'].get(key, []))}")
        lines.append(f"  {'hooks:'.ljust(width)} {_join(p['hooks'])}")
    for status, title in (("failed", "Failed to load"), ("disabled", "Disabled")):
        selected = [p for p in plugins if p["status"] == status]
        if selected:
            lines += ["", f"{title}:"]
            lines += [
                f"  {p['name']} ({p['distribution']} {p['version'] or '-'}): {p['reason']}" for p in selected
            ]
    # A failed load's warning repeats the reason listed above, unless PEFT_CORE_DEBUG_PLUGINS
    # added its traceback.
    shown = [w["message"] for w in data["warnings"] if data["debug"] or w["category"] != "RuntimeWarning"]
    if shown:
        lines += ["", "Warnings:"]
        lines += ["  " + message.replace("\n", "\n  ") for message in shown]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- entry point


def _plugins_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from peft_core.errors import PluginConflictError, PluginLoadError

    try:
        data = collect(strict=True if args.strict else None)
    except (PluginLoadError, PluginConflictError) as exc:
        print(f"peft-core: error: {exc}", file=err)
        print("Strict mode is on (PEFT_CORE_STRICT=1 or --strict); fix or disable that plugin.", file=err)
        return 1
    if args.json:
        json.dump(data, out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        out.write(render_text(data))
    return 0


def _render_inspection(data: dict[str, Any]) -> str:
    lines = [
        f"{data['path']}"
        + (
            "  (mixed model, stacking order: " + ", ".join(data["stacking_order"] or []) + ")"
            if data["mixed_model"]
            else ""
        )
    ]
    for adapter in data["adapters"]:
        title = adapter["subfolder"] or "(root)"
        plugin = adapter["plugin"] + (
            "" if adapter["plugin_installed"] else "  NOT INSTALLED: pip install " + adapter["plugin"]
        )
        size = adapter["file_size_bytes"]
        ranks = adapter["ranks"]
        rank_text = str(adapter["r"]) if not ranks else ", ".join(sorted({str(r) for r in ranks.values()}))
        lines += [
            f"  adapter {title}",
            f"    method          {adapter['method']}  (plugin {plugin})",
            f"    task type       {adapter['task_type']}",
            f"    base model      {adapter['base_model']}",
            f"    target modules  {adapter['target_modules']}",
            f"    rank            {rank_text}",
            f"    parameters      {adapter['parameters']:,d} in {adapter['tensors']} tensors",
            f"    weights file    {adapter['weights_file']} ({size:,d} bytes)"
            if size is not None
            else "    weights file    none",
        ]
    return "\n".join(lines) + "\n"


def _emit(data: dict[str, Any], as_json: bool, text: str, out: TextIO) -> None:
    if as_json:
        json.dump(data, out, indent=2, sort_keys=True, default=str)
        out.write("\n")
    else:
        out.write(text)


def _file_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """inspect / merge / convert: errors become a one-line message and exit status 1."""
    try:
        if args.command == "inspect":
            from peft_core.inspection import inspect_adapter

            data = inspect_adapter(args.path)
            _emit(data, args.json, _render_inspection(data), out)
        elif args.command == "merge":
            from peft_core.export import merge_adapter_into_base

            data = merge_adapter_into_base(args.base, args.adapter, args.out, progressbar=not args.json)
            _emit(
                data,
                args.json,
                f"merged {data['method']} adapter into {data['base']} -> {data['out']} "
                f"({data['model_class']}, {data['parameters']:,d} parameters)\n",
                out,
            )
        else:
            from peft_core.export import convert_mutated_init_adapter

            data = convert_mutated_init_adapter(args.initial, args.trained, args.out)
            _emit(
                data,
                args.json,
                f"wrote plain {data['method']} adapter (r={data['r']}) to {data['out']}\n",
                out,
            )
    except Exception as exc:  # noqa: BLE001 - the CLI reports any failure as one line
        print(f"peft-core {args.command}: error: {type(exc).__name__}: {exc}", file=err)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peft-core`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors; keep main() callable from code
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "plugins":
        return _plugins_command(args, sys.stdout, sys.stderr)
    if args.command in ("inspect", "merge", "convert"):
        return _file_command(args, sys.stdout, sys.stderr)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
