"""Run every benchmark script, each in its own interpreter, and print their JSON lines.

Usage: ``python benchmarks/run_all.py [--quick] [script-name ...]`` (names without ``bench_``
and ``.py``, e.g. ``forward``). ``--quick`` cuts the repeats for a smoke run; quote only full
runs. A final line summarises which targets were met.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ("import", "lifecycle", "forward", "mixed", "train", "qlora")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("only", nargs="*", help=f"scripts to run (default: all of {', '.join(SCRIPTS)})")
    args = parser.parse_args()
    unknown = sorted(set(args.only) - set(SCRIPTS))
    if unknown:
        parser.error(f"unknown scripts {unknown}; choose from {list(SCRIPTS)}")
    env = dict(os.environ, BENCH_QUICK="1" if args.quick else os.environ.get("BENCH_QUICK", "0"))
    # Users import from installed bytecode. Without a bytecode cache (PYTHONDONTWRITEBYTECODE on an
    # env installed with --no-compile) every fresh interpreter recompiles torch and transformers:
    # imports took 2-3x as long and the run 750 s instead of 548 s. The first import writes the cache.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    rows, failed, seconds = [], [], {}
    start = time.perf_counter()
    for name in args.only or SCRIPTS:
        script_start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(HERE / f"bench_{name}.py")],
            env=env,
            capture_output=True,
            text=True,
            cwd=HERE.parent,
        )
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                print(line, flush=True)
                rows.append(json.loads(line))
        seconds[name] = round(time.perf_counter() - script_start, 1)
        if proc.returncode:
            failed.append(name)
            sys.stderr.write(f"bench_{name}.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n")
    summary = {
        "summary": True,
        "seconds": round(time.perf_counter() - start, 1),
        "seconds_per_script": seconds,
        "met": [r["scenario"] for r in rows if r.get("met") is True],
        "not_met": [r["scenario"] for r in rows if r.get("met") is False],
        "failed_scripts": failed,
    }
    print(json.dumps(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
