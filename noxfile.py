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
TRAINER_DEPS = ("accelerate>=1.0",)  # transformers.Trainer needs it (tests/test_trainer.py)
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


@nox.session(tags=["ci"])
@nox.parametrize("plugin", PLUGINS)
def plugins(session: nox.Session, plugin: str) -> None:
    """One plugin alone: an environment with only the core and that plugin (no reference library)."""
    _install(session, "-e", ".", "-e", f"plugins/{plugin}", *TEST_DEPS, *HF_DEPS)
    session.run(
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
    _install(session, "-e", ".", "-e", "plugins/lora", "mkdocs>=1.6")
    session.run("mkdocs", "build", "--strict", "-f", "docs/mkdocs.yml", "-d", str(ROOT / "site"))


@nox.session
def bench(session: nox.Session) -> None:
    """Performance against the reference ``peft`` in one run: one JSON line per scenario (see benchmarks/)."""
    plugin_args = [a for p in PLUGINS for a in ("-e", f"plugins/{p}")]
    _install(session, "-e", ".", *plugin_args, *HF_DEPS, *REFERENCE)
    session.run("python", "benchmarks/run_all.py", *session.posargs, env={"HF_HUB_OFFLINE": "1"})
