"""Timing helpers and the shared models of the benchmarks.

Every scenario prints one JSON line (see :func:`emit`): our median time, the reference
library's, their ratio, and both against a plain-PyTorch floor (the least work the scenario
needs, written by hand), so a reader sees at once who is ahead and by how much is left.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The figures are specified for 2 CPU cores; set before torch is imported by any script.
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(THREADS)
warnings.filterwarnings("ignore")

# BENCH_QUICK=1 cuts repeats (a smoke run); the figures to quote come from a full run.
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")


def repeats(full: int) -> int:
    return max(2, full // 4) if QUICK else full


def measure_rounds(
    variants: dict[str, tuple[Callable[[Any], Any], Callable[[], Any]]],
    *,
    repeat: int = 7,
    warmup: int = 1,
    collector: bool = False,
) -> dict[str, float]:
    """Median wall time of each ``fn(setup())`` in ``variants``, one call of each per round.

    Round-robin, so that load drifts and the allocator's state (what the previous variant
    freed) hit every variant alike; measuring one variant's repeats after another's gave
    ratios that moved by 30% between runs on this machine. The garbage collector is off
    during each call, as ``timeit`` keeps it, unless ``collector``: then each call runs as in
    a user's process, paying for the collections its allocations trigger.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + repeat):
        for name, (fn, setup) in variants.items():
            arg = setup()
            gc.collect()
            if not collector:
                gc.disable()
            try:
                start = time.perf_counter()
                fn(arg)
                elapsed = time.perf_counter() - start
            finally:
                gc.enable()
            del arg
            if i >= warmup:
                times[name].append(elapsed)
    LAST_MINIMA.clear()
    LAST_MINIMA.update({name: min(ts) for name, ts in times.items()})
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure_interleaved(
    fns: dict[str, Callable[[], Any]], *, repeat: int = 15, warmup: int = 2, inner: int = 1
) -> dict[str, float]:
    """Median time per call of each of ``fns``, run round-robin so that load drifts hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            elapsed = (time.perf_counter() - start) / inner
            if i >= warmup:
                times[name].append(elapsed)
    LAST_MINIMA.clear()
    LAST_MINIMA.update({name: min(ts) for name, ts in times.items()})
    return {name: statistics.median(ts) for name, ts in times.items()}


# The fastest round of each function in the last measure_interleaved call: on a shared machine the
# least disturbed figure, printed next to the medians so a reader can tell load from cost.
LAST_MINIMA: dict[str, float] = {}


def emit(
    scenario: str,
    *,
    ours: float,
    reference: float | None,
    floor: float | None,
    target: str,
    met: bool | None,
    unit: str = "s",
    **extra: Any,
) -> dict[str, Any]:
    """Print (and return) one scenario's JSON line."""
    row: dict[str, Any] = {
        "scenario": scenario,
        "unit": unit,
        "ours": _round(ours),
        "reference": _round(reference),
        "floor": _round(floor),
        "ours_vs_reference": _ratio(ours, reference),
        "ours_vs_floor": _ratio(ours, floor),
        "reference_vs_floor": _ratio(reference, floor),
        "target": target,
        "met": met,
    }
    row.update({k: _round(v) if isinstance(v, float) else v for k, v in extra.items()})
    print(json.dumps(row), flush=True)
    return row


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 3)


# ---------------------------------------------------------------------- models
def llama_config(
    layers: int = 32, hidden: int = 512, intermediate: int | None = None, vocab: int = 1000
) -> Any:
    """A Llama-style config (no download): 7 linear layers per decoder block."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def llama_model(
    layers: int = 32, hidden: int = 512, intermediate: int | None = None, seed: int = 0
) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(layers, hidden, intermediate))
    return model.eval()


class ModelPool:
    """Fresh copies of one base model: building it each time would dominate the untimed setup."""

    def __init__(self, factory: Callable[[], nn.Module]) -> None:
        self.template = factory()

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.template)


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_keys(model: nn.Module) -> list[str]:
    return [
        k for k, m in model.named_modules() if isinstance(m, nn.Linear) and k.split(".")[-1] in LINEAR_NAMES
    ]


# ---------------------------------------------------------------------- libraries
def ours() -> Any:
    import peft_core

    return peft_core


def reference() -> Any:
    """The reference ``peft``, or None when it is not installed (rows then carry no reference)."""
    try:
        import peft
    except ImportError:
        return None
    return peft


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def python() -> str:
    return sys.executable


# ---------------------------------------------------------------------- plain-PyTorch floors
class FloorLoraLinear(nn.Module):
    """The least a LoRA linear needs: the base layer and two factors, no bookkeeping."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def floor_inject(
    model: nn.Module,
    r: int = 16,
    alpha: float = 16,
    names: tuple[str, ...] = LINEAR_NAMES,
    dropout: float = 0.0,
) -> nn.Module:
    """A bare module swap loop: find the targets, wrap each, freeze the base."""
    for param in model.parameters():
        param.requires_grad_(False)
    for key, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and key.rpartition(".")[2] in names:
            parent_key, _, name = key.rpartition(".")
            setattr(model.get_submodule(parent_key), name, FloorLoraLinear(module, r, alpha, dropout))
    return model


def floor_layers(model: nn.Module) -> list[tuple[nn.Module, str, FloorLoraLinear]]:
    found = []
    for key, module in model.named_modules():
        if isinstance(module, FloorLoraLinear):
            parent_key, _, name = key.rpartition(".")
            found.append((model.get_submodule(parent_key), name, module))
    return found


@torch.no_grad()
def floor_merge_and_unload(model: nn.Module) -> nn.Module:
    """One GEMM accumulating into each weight: less work than ``weight += scaling * B @ A``,
    which allocates and walks two weight-sized temporaries per layer."""
    for parent, name, layer in floor_layers(model):
        layer.base_layer.weight.addmm_(layer.lora_B.weight, layer.lora_A.weight, alpha=layer.scaling)
        setattr(parent, name, layer.base_layer)
    return model


def floor_unload(model: nn.Module) -> nn.Module:
    for parent, name, layer in floor_layers(model):
        setattr(parent, name, layer.base_layer)
    return model
