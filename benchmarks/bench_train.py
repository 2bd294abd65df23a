"""One LoRA training step (forward, backward, AdamW) on a 4-layer Llama-style model: time and peak memory.

Time: the three models (ours, the reference, the floor) live in one process and take their
steps in turn, round after round, so that the machine's drifts hit each alike. Timing each
library in its own subprocess, one after another, gave ours/reference ratios from 0.95 to 1.28
over four runs of the same code on this machine.

Memory: each library runs in its own fresh subprocess, so the peak resident memory of one never
hides the other's: peak = max RSS during the steps minus the RSS before the first step.

The floor is the hand-written LoRA (:class:`common.FloorLoraLinear`) with the same dropout,
trained the same way.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Callable

import common
import torch

R = 16
DROPOUT = 0.05
ROUNDS = 5  # timed steps per library, interleaved
MEMORY_STEPS = 2  # the first step allocates the gradients and AdamW's state; the second shows no growth


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def make_step(which: str) -> Callable[[], None]:
    model = common.llama_model(layers=4, hidden=1024, intermediate=2816)
    if which == "floor":
        model = common.floor_inject(model, R, R, dropout=DROPOUT)
    else:
        lib = common.ours() if which == "ours" else common.reference()
        config = lib.LoraConfig(
            r=R, lora_alpha=R, target_modules=list(common.LINEAR_NAMES), lora_dropout=DROPOUT
        )
        model = lib.get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 1000, (2, 256), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def memory_child(which: str) -> None:
    step = make_step(which)
    before = _rss_bytes()
    for _ in range(MEMORY_STEPS):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"peak": peak}))


def _peak(which: str) -> int:
    out = subprocess.run(
        [sys.executable, __file__, which], check=True, capture_output=True, text=True, cwd=common.repo_root()
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"]


def main() -> None:
    have_ref = common.reference() is not None
    which = ("ours", "floor", *(["ref"] if have_ref else []))
    peaks = {w: _peak(w) for w in which}
    steps = {w: make_step(w) for w in which}
    times = common.measure_interleaved(steps, repeat=common.repeats(ROUNDS), warmup=1)
    minima = dict(common.LAST_MINIMA)
    common.emit(
        "train_step_lora[h1024 x4 layers, 2x256, dropout 0.05, AdamW]",
        ours=times["ours"],
        reference=times.get("ref"),
        floor=times["floor"],
        fastest_round={w: round(t, 4) for w, t in minima.items()},
        target="<= 0.95x reference",
        met=not have_ref or times["ours"] <= 0.95 * times["ref"],
    )
    common.emit(
        "train_step_peak_memory[h1024 x4 layers, 2x256, dropout 0.05, AdamW]",
        unit="bytes",
        ours=peaks["ours"],
        reference=peaks.get("ref"),
        floor=peaks["floor"],
        target="<= 1.0x reference",
        met=not have_ref or peaks["ours"] <= peaks["ref"],
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        memory_child(sys.argv[1])
    else:
        main()
