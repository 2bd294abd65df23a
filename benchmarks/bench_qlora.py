"""One QLoRA training step (forward, backward, AdamW) on a bitsandbytes-quantized Llama-style model.

The float model (4 layers, hidden 256, intermediate 688, random weights) is saved once to a
temporary directory; every implementation then loads it with ``from_pretrained`` and a
``BitsAndBytesConfig`` (NF4 4-bit with float32 compute, or LLM.int8()), so all get identical
quantized bases. Ours (``peft_core`` with the ``peft-bnb`` plugin) and the reference ``peft``
each run ``prepare_model_for_kbit_training`` (gradient checkpointing on) and ``get_peft_model``
with LoRA r=16 on all linears; the floor is the same quantized model with a hand-written LoRA
(:class:`common.FloorLoraLinear`) and the same checkpointing, trained the same way.

Time: the three step functions run round-robin in one process (median of repeats).

Peak memory: each implementation in its own fresh subprocess (one thread each, run side by side
before the timing so they cost little wall time). bitsandbytes compiles its CPU kernels
(``torch.compile``) on first use, so a child first runs one throwaway step, drops the AdamW
state, then measures: peak = high-water RSS over two steps (reset through
``/proc/self/clear_refs``) minus the RSS before them. glibc is told to hand freed memory back
(``MALLOC_TRIM_THRESHOLD_``/``MALLOC_MMAP_THRESHOLD_``) so that RSS follows live memory.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import common
import torch
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()

R = 16
BATCH, SEQ = 4, 128
LAYERS, HIDDEN, INTERMEDIATE = 4, 256, 688
QUANTS = ("4bit", "8bit")
IMPLS = ("ours", "ref", "floor")
SHAPE = f"h{HIDDEN} x{LAYERS} layers, {BATCH}x{SEQ}, r{R} all-linear, AdamW"


def _quant_config(quant: str) -> Any:
    from transformers import BitsAndBytesConfig

    if quant == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4"
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def save_float_model(path: str) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(common.llama_config(LAYERS, HIDDEN, INTERMEDIATE)).save_pretrained(path)


def build(which: str, quant: str, path: str) -> torch.nn.Module:
    """Load the quantized base from ``path`` and make it trainable the way ``which`` does."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=_quant_config(quant), device_map="cpu"
    )
    torch.manual_seed(1)
    if which == "floor":
        # What prepare_model_for_kbit_training amounts to here (the base is already float32):
        # freeze, checkpoint the decoder layers, let the inputs carry grad; then the bare swap.
        for param in model.parameters():
            param.requires_grad_(False)
        model.enable_input_require_grads()
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={})
        model = common.floor_inject(model, R, R)
    else:
        lib = common.ours() if which == "ours" else common.reference()
        model = lib.prepare_model_for_kbit_training(model)
        model = lib.get_peft_model(model, lib.LoraConfig(r=R, lora_alpha=R, target_modules="all-linear"))
    return model.train()


def step_fn(model: torch.nn.Module) -> tuple[Callable[[], None], torch.optim.Optimizer]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


# ---------------------------------------------------------------------- peak memory (child)
def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(reset: bool) -> int:
    if reset:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(which: str, quant: str, path: str) -> None:
    step, optimizer = step_fn(build(which, quant, path))
    step()  # compiles the bitsandbytes kernels; its AdamW state is dropped again
    optimizer.state.clear()
    gc.collect()
    before = _rss_bytes()
    reset = _reset_peak()
    for _ in range(2):
        step()
    print(json.dumps({"peak": _peak_bytes(reset) - before}))


def _start_peaks(quant: str, path: str, impls: list[str]) -> dict[str, subprocess.Popen]:
    env = dict(
        os.environ,
        BENCH_THREADS="1",
        OMP_NUM_THREADS="1",
        MALLOC_TRIM_THRESHOLD_="0",
        MALLOC_MMAP_THRESHOLD_="65536",
    )
    return {
        w: subprocess.Popen(
            [sys.executable, __file__, w, quant, path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=common.repo_root(),
            env=env,
        )
        for w in impls
    }


def _collect(proc: subprocess.Popen) -> int:
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"peak-memory child failed ({proc.returncode}):\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1])["peak"]


# ---------------------------------------------------------------------- parent
def main() -> None:
    import importlib.util

    missing = [m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:  # transformers' bitsandbytes loading needs both; nothing to measure without them
        sys.stderr.write(f"bench_qlora.py: skipped, {' and '.join(missing)} not installed\n")
        return
    have_ref = common.reference() is not None
    impls = [w for w in IMPLS if have_ref or w != "ref"]
    with tempfile.TemporaryDirectory() as path:
        save_float_model(path)
        # All memory children side by side first (mostly single-threaded import and compile work),
        # then the timing alone, so that the children cannot disturb it.
        running = {quant: _start_peaks(quant, path, impls) for quant in QUANTS}
        all_peaks = {q: {w: _collect(p) for w, p in procs.items()} for q, procs in running.items()}
        for quant in QUANTS:
            steps = {w: step_fn(build(w, quant, path))[0] for w in impls}
            times = common.measure_interleaved(steps, repeat=common.repeats(7), warmup=1)
            minima = dict(common.LAST_MINIMA)
            del steps
            peaks = all_peaks[quant]
            label = "nf4" if quant == "4bit" else "int8"
            common.emit(
                f"qlora_train_step[{label}, {SHAPE}]",
                ours=times["ours"],
                reference=times.get("ref"),
                floor=times["floor"],
                target="<= 1.05x reference",
                met=not have_ref or times["ours"] <= 1.05 * times["ref"],
                ours_min=minima["ours"],
                reference_min=minima.get("ref"),
                floor_min=minima["floor"],
            )
            common.emit(
                f"qlora_train_step_peak_memory[{label}, {SHAPE}]",
                unit="bytes",
                ours=peaks["ours"],
                reference=peaks.get("ref"),
                floor=peaks["floor"],
                target="<= 1.0x reference",
                met=not have_ref or peaks["ours"] <= peaks["ref"],
            )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(*sys.argv[1:4])
    else:
        main()
