"""Import time in fresh interpreters: ``import peft_core`` + one plugin against ``import torch``.

Each figure is the median over fresh subprocesses of the time the import statement itself takes
(interpreter start-up excluded), from bytecode caches as in an installed package: a first,
untimed round writes them. ``first use`` adds resolving ``peft_core.LoraConfig``, which
loads the plugins' entry points.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

import common

SNIPPETS = {
    "torch": "import torch",
    "ours": "import peft_core, peft_lora",
    "ours_first_use": "import peft_core, peft_lora; peft_core.LoraConfig",
    "reference": "import peft",
}


def _time(snippet: str) -> float:
    code = f"import time; t = time.perf_counter(); {snippet}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    have_ref = common.reference() is not None
    names = [n for n in SNIPPETS if have_ref or n != "reference"]
    samples: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # untimed: writes the bytecode caches an installed package has
        _time(SNIPPETS[name])
    # Three rounds: the reference's import alone is ~6 s a sample, and the margin is wide.
    for _ in range(common.repeats(3)):
        for name in names:  # round-robin: load drifts hit every snippet alike
            samples[name].append(_time(SNIPPETS[name]))
    t = {n: statistics.median(s) for n, s in samples.items()}
    common.emit(
        "import[peft_core + peft_lora vs torch]",
        ours=t["ours"],
        reference=t.get("reference"),
        floor=t["torch"],
        ours_first_use=t["ours_first_use"],
        ours_first_use_vs_torch=round(t["ours_first_use"] / t["torch"], 3),
        target="<= 1.3x import torch",
        met=t["ours"] <= 1.3 * t["torch"],
    )


if __name__ == "__main__":
    main()
