"""Render the peft-core plugin template into a new, working plugin package.

Usage::

    python contrib/plugin-template/render.py NAME OUTDIR

``NAME`` is the method's short name in lower case (``mymethod`` or ``my_method``). It gives the
distribution ``peft-my-method``, the package ``peft_my_method``, the ``peft_type``
``MY_METHOD``, the config class ``MyMethodConfig`` and the parameter prefix ``my_method_``.
``OUTDIR`` must not exist or be empty. Only the standard library is used (``string.Template``):
files under ``template/`` ending in ``.tmpl`` are substituted, and the path parts
``__package__`` and ``__name__`` are replaced by the package and method names.
"""

from __future__ import annotations

import argparse
import keyword
import re
import sys
from importlib import metadata
from pathlib import Path
from string import Template

TEMPLATE_DIR = Path(__file__).resolve().parent / "template"
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
# "core" would render a package named peft_core, shadowing peft-core itself.
RESERVED = {"core"}


def _core_version() -> str:
    try:
        return metadata.version("peft-core")
    except metadata.PackageNotFoundError:  # rendering from a checkout without peft-core installed
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        match = re.search(r'^version = "([^"]+)"', pyproject.read_text(encoding="utf-8"), flags=re.M)
        if match is None:
            raise RuntimeError(f"cannot find the peft-core version in {pyproject}") from None
        return match.group(1)


def _compatible_range(version: str) -> tuple[str, str]:
    """``(minimum, next_breaking)`` for the installed core, e.g. ``0.1.0 -> ("0.1", "0.2")``."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]] + [0, 0]
    major, minor = parts[0], parts[1]
    if major == 0:
        return f"0.{minor}", f"0.{minor + 1}"
    return f"{major}.{minor}", str(major + 1)


def variables(name: str) -> dict[str, str]:
    """Every name the template uses, derived from the method's short ``name``."""
    if not NAME_PATTERN.fullmatch(name) or keyword.iskeyword(name):
        raise ValueError(
            f"Invalid plugin name {name!r}: use lower-case letters, digits and single underscores, starting "
            "with a letter (e.g. 'mymethod' or 'my_method')."
        )
    if name in RESERVED:
        raise ValueError(f"Plugin name {name!r} is reserved by peft-core; pick another name.")
    camel = "".join(part.capitalize() for part in name.split("_"))
    core_min, core_next = _compatible_range(_core_version())
    return {
        "name": name,
        "dist": "peft-" + name.replace("_", "-"),
        "package": "peft_" + name,
        "peft_type": name.upper(),
        "camel": camel,
        "config_cls": f"{camel}Config",
        "layer_cls": f"{camel}Layer",
        "prefix": f"{name}_",
        "core_min": core_min,
        "core_next": core_next,
    }


def render(name: str, outdir: str | Path) -> list[Path]:
    """Write the plugin package for ``name`` into ``outdir``; returns the files written."""
    values = variables(name)
    out = Path(outdir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{str(out)!r} already exists and is not an empty directory; choose a new OUTDIR."
        )
    written = []
    for source in sorted(TEMPLATE_DIR.rglob("*.tmpl")):
        relative = source.relative_to(TEMPLATE_DIR).with_suffix("")  # drop ".tmpl"
        parts = [
            part.replace("__package__", values["package"]).replace("__name__", values["name"])
            for part in relative.parts
        ]
        target = out.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        # substitute (not safe_substitute): a misspelt placeholder must fail here, not ship.
        text = Template(source.read_text(encoding="utf-8")).substitute(values)
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="render.py", description="Render a new peft-core plugin package from the template."
    )
    parser.add_argument("name", help="the method's short name, lower case (e.g. 'mymethod')")
    parser.add_argument("outdir", help="directory to create (must not exist, or be empty)")
    args = parser.parse_args(argv)
    try:
        files = render(args.name, args.outdir)
    except (ValueError, FileExistsError) as exc:
        print(f"render.py: error: {exc}", file=sys.stderr)
        return 2
    values = variables(args.name)
    print(f"Rendered {values['dist']} ({len(files)} files) into {args.outdir}. Next:")
    print(f'  cd {args.outdir} && pip install -e ".[testing]" && pytest')
    return 0


if __name__ == "__main__":
    sys.exit(main())
