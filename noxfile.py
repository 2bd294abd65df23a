"""Sessions: each creates its own environment, with torch pinned to the local CPU wheel.

``./dev tests`` (what CI runs) = lint + the full suite + every plugin alone.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests", "plugins"]

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
PLUGINS = sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists())
TEST_DEPS = ("pytest>=8", "hypothesis>=6.100", "pytest-xdist>=3")
HF_DEPS = ("transformers==5.23.0",)
TRAINER_DEPS = ("accelerate>=1.0", "trl==1.16.0")  # tests/test_trainer.py, tests/test_trl.py
REFERENCE = ("peft==0.21.2",)  # the oracle for equivalence tests; never imported by library code
PYTEST = ("pytest", "-p", "no:cacheprovider")


def _install(session: nox.Session, *args: str) -> None:
    # No bytecode compilation at install: compiling all of torch and transformers doubles the install
    # time of every environment, while tests import a small part of them (compiled on first import).
    session.install("--no-compile", *CONSTRAINTS, *args)


def _workers(session: nox.Session) -> tuple[str, ...]:
    return ("-n", "2") if "-n" not in session.posargs else ()


@nox.session(tags=["ci"])
def lint(session: nox.Session) -> None:
    """ruff lint and format check over the whole repository."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(tags=["ci"])
def tests(session: nox.Session) -> None:
    """Core, toy-method, every plugin and the equivalence checks against the reference library."""
    plugin_args = [a for p in PLUGINS for a in ("-e", f"plugins/{p}")]
    _install(
        session,
        "-e",
        ".",
        *plugin_args,
        "-e",
        "tests/toy_plugin",
        *TEST_DEPS,
        *HF_DEPS,
        *TRAINER_DEPS,
        *REFERENCE,
    )
    env = {"HYPOTHESIS_PROFILE": "ci", "HF_HUB_OFFLINE": "1"}
    paths = ["tests", *[f"plugins/{p}/tests" for p in PLUGINS]]
    session.run(*PYTEST, *_workers(session), *paths, *session.posargs, env=env)


# The plugin sessions share one environment of the heavy dependencies (torch, transformers, the test
# tools and the core, but no plugin), linked into each plugin's own small environment through a .pth
# file. Installing torch and transformers fourteen times was most of CI's time; the isolation that
# matters (only the core and this one plugin register, no reference library) is unchanged.
_PLUGIN_BASE = ROOT / ".nox" / "_plugin-base"


def _site_packages(session: nox.Session, python: str) -> str:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return session.run(python, "-c", code, silent=True, external=True).strip().splitlines()[-1]


def _plugin_base(session: nox.Session) -> str:
    """The shared environment's site-packages, built on first use (and reused while it is complete)."""
    python = str(_PLUGIN_BASE / "bin" / "python")
    ready = _PLUGIN_BASE / ".complete"
    if not ready.exists():
        session.run("python", "-m", "venv", "--clear", str(_PLUGIN_BASE))
        session.run(
            python, "-m", "pip", "install", "-q", "--no-compile", *CONSTRAINTS,
            "-e", ".", *TEST_DEPS, *HF_DEPS, external=True,
        )  # fmt: skip
        ready.write_text("ok\n")
    return _site_packages(session, python)


@nox.session(tags=["ci"])
@nox.parametrize("plugin", PLUGINS)
def plugins(session: nox.Session, plugin: str) -> None:
    """One plugin alone: an environment with only the core and that plugin (no reference library)."""
    base = _plugin_base(session)
    own = Path(_site_packages(session, "python"))
    # site.addsitedir also runs the base's own .pth files (the core's editable install).
    (own / "_peft_core_plugin_base.pth").write_text(f"import site; site.addsitedir({base!r})\n")
    # The plugin's own dependencies beyond the base (e.g. bitsandbytes) are installed here.
    _install(session, "-e", f"plugins/{plugin}")
    session.run(
        "python",
        "-m",
        *PYTEST,
        *_workers(session),
        f"plugins/{plugin}/tests",
        "-m",
        "not compat",
        *session.posargs,
        env={"HYPOTHESIS_PROFILE": "ci", "HF_HUB_OFFLINE": "1"},
    )


@nox.session
def compat(session: nox.Session) -> None:
    """Equivalence with the reference ``peft``: files both ways, equal outputs."""
    plugin_args = [a for p in PLUGINS for a in ("-e", f"plugins/{p}")]
    _install(session, "-e", ".", *plugin_args, *TEST_DEPS, *HF_DEPS, *REFERENCE)
    paths = [f"plugins/{p}/tests" for p in PLUGINS]
    session.run(
        *PYTEST, *_workers(session), *paths, "-m", "compat", *session.posargs, env={"HF_HUB_OFFLINE": "1"}
    )


@nox.session
def demo(session: nox.Session) -> None:
    """LoRA fine-tuning of the real all-MiniLM-L6-v2 on a real text-classification task, offline."""
    _install(session, "-e", ".", "-e", "plugins/lora", "-r", "demo/requirements.txt")
    session.run("python", "demo/train.py", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with warnings as errors."""
    # Every plugin, so the method catalogue (rendered from the installed plugins) lists them all.
    plugin_args = [a for p in PLUGINS for a in ("-e", f"plugins/{p}")]
    # The generator and the API-reference renderer are pinned: a new release may add warnings.
    docs_deps = ("mkdocs==1.6.1", "mkdocstrings==1.0.8", "mkdocstrings-python==2.0.11")
    _install(session, "-e", ".", *plugin_args, *docs_deps)
    # Strict plugin loading: a plugin that fails to load fails the build instead of leaving the catalogue.
    env = {"PEFT_CORE_STRICT": "1", "HF_HUB_OFFLINE": "1"}
    session.run("mkdocs", "build", "--strict", "-f", "docs/mkdocs.yml", "-d", str(ROOT / "site"), env=env)


@nox.session
def bench(session: nox.Session) -> None:
    """Performance against the reference ``peft`` in one run: one JSON line per scenario (see benchmarks/)."""
    plugin_args = [a for p in PLUGINS for a in ("-e", f"plugins/{p}")]
    # accelerate: transformers loads bitsandbytes-quantized models through it (bench_qlora.py)
    _install(session, "-e", ".", *plugin_args, *HF_DEPS, *TRAINER_DEPS[:1], *REFERENCE)
    session.run("python", "benchmarks/run_all.py", *session.posargs, env={"HF_HUB_OFFLINE": "1"})
