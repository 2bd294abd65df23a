"""One LoRA training step (forward, backward, AdamW) on a 4-layer Llama-style model: time and peak memory.

Each library runs in its own fresh subprocess, so the peak resident memory of one never hides
the other's: peak = max RSS during the steps minus the RSS before the first step. The floor is
the hand-written LoRA (:class:`common.FloorLoraLinear`) trained the same way.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import common
import torch

R = 16
STEPS = 6  # timed steps per library; with 3, the median moved by 30% between runs on this machine


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def child(which: str) -> None:
    model = common.llama_model(layers=4, hidden=1024, intermediate=2816)
    if which == "floor":
        model = common.floor_inject(model, R, R)
    else:
        lib = common.ours() if which == "ours" else common.reference()
        config = lib.LoraConfig(
            r=R, lora_alpha=R, target_modules=list(common.LINEAR_NAMES), lora_dropout=0.05
        )
        model = lib.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 1000, (2, 256), generator=torch.Generator().manual_seed(0))
    before = _rss_bytes()
    times = []
    for step in range(1 + common.repeats(STEPS)):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"time": statistics.median(times), "peak": peak}))


def _run(which: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, which], check=True, capture_output=True, text=True, cwd=common.repo_root()
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    have_ref = common.reference() is not None
    results = {w: _run(w) for w in ("ours", "floor", *(["ref"] if have_ref else []))}
    ours, ref, floor = results["ours"], results.get("ref"), results["floor"]
    common.emit(
        "train_step_lora[h1024 x4 layers, 2x256, AdamW]",
        ours=ours["time"],
        reference=ref["time"] if ref else None,
        floor=floor["time"],
        target="<= 0.95x reference",
        met=ref is None or ours["time"] <= 0.95 * ref["time"],
    )
    common.emit(
        "train_step_peak_memory[h1024 x4 layers, 2x256, AdamW]",
        unit="bytes",
        ours=ours["peak"],
        reference=ref["peak"] if ref else None,
        floor=floor["peak"],
        target="<= 1.0x reference",
        met=ref is None or ours["peak"] <= ref["peak"],
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(sys.argv[1])
    else:
        main()
