"""Adapter lifecycle on a 32-layer Llama-style model: inject, merge/unload, load from disk.

Rows: ``get_peft_model`` (224 modules and ~2000 modules, the latter also with the garbage
collector on, as users run it), ``merge_and_unload``, ``unload``, ``from_pretrained`` of a
5M-parameter adapter. Floors are hand-written swap loops
(:func:`common.floor_inject`) and a bare safetensors load copied into the parameters.
"""

from __future__ import annotations

import tempfile

import common
import torch
from safetensors.torch import load_file

R = 16
PREFIX = "base_model.model."


def _lora_config(lib, **kw):
    return lib.LoraConfig(r=R, lora_alpha=R, target_modules="all-linear", **kw)


def _rounds(variants: dict, repeat: int, *, collector: bool = False) -> dict[str, float]:
    """Round-robin medians (see :func:`common.measure_rounds`); None-valued variants are left out."""
    return common.measure_rounds(
        {k: v for k, v in variants.items() if v is not None}, repeat=repeat, collector=collector
    )


def bench_inject(label: str, pool: common.ModelPool, repeat: int, *, collector: bool = False) -> None:
    """``collector``: with the garbage collector on, as in a user's process (an extra, informational row)."""
    ours, ref = common.ours(), common.reference()
    n_modules = len(common.linear_keys(pool.template))
    times = _rounds(
        {
            "ours": (lambda m: ours.get_peft_model(m, _lora_config(ours)), pool.fresh),
            "ref": (lambda m: ref.get_peft_model(m, _lora_config(ref)), pool.fresh) if ref else None,
            "floor": (lambda m: common.floor_inject(m, R, R), pool.fresh),
        },
        repeat,
        collector=collector,
    )
    t_ours, t_ref, t_floor = times["ours"], times.get("ref"), times["floor"]
    met = t_ours <= 1.5 * t_floor and (t_ref is None or t_ours <= 0.33 * t_ref)
    common.emit(
        f"get_peft_model[{label}{', collector on' if collector else ''}]",
        ours=t_ours,
        reference=t_ref,
        floor=t_floor,
        modules=n_modules,
        fastest_round_vs_floor=round(common.LAST_MINIMA["ours"] / common.LAST_MINIMA["floor"], 3),
        target="<= 1.5x floor and <= 0.33x reference" + (" (informational)" if collector else ""),
        met=None if collector else met,
        **({"would_meet": met} if collector else {}),
    )


def bench_unload(pool: common.ModelPool, repeat: int) -> None:
    ours, ref = common.ours(), common.reference()

    def wrapped(lib):
        def make():
            return lib.get_peft_model(pool.fresh(), _lora_config(lib, init_lora_weights="gaussian"))

        return make

    def floor_make():
        return common.floor_inject(pool.fresh(), R, R)

    for op, target_ratio, floor_fn in (
        ("merge_and_unload", 1.3, common.floor_merge_and_unload),
        ("unload", 2.0, common.floor_unload),
    ):
        times = _rounds(
            {
                "ours": (lambda m, op=op: getattr(m, op)(), wrapped(ours)),
                "ref": (lambda m, op=op: getattr(m, op)(), wrapped(ref)) if ref else None,
                "floor": (floor_fn, floor_make),
            },
            repeat,
        )
        t_ours, t_ref, t_floor = times["ours"], times.get("ref"), times["floor"]
        common.emit(
            f"{op}[224 modules]",
            ours=t_ours,
            reference=t_ref,
            floor=t_floor,
            fastest_round_vs_floor=round(common.LAST_MINIMA["ours"] / common.LAST_MINIMA["floor"], 3),
            target=f"<= {target_ratio}x floor",
            met=t_ours <= target_ratio * t_floor,
        )


def bench_from_pretrained(pool: common.ModelPool, repeat: int) -> None:
    ours, ref = common.ours(), common.reference()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        saved = ours.get_peft_model(pool.fresh(), _lora_config(ours, init_lora_weights="gaussian"))
        saved.save_pretrained(tmp)
        n_params = sum(p.numel() for p in saved.parameters() if p.requires_grad)
        del saved
        path = f"{tmp}/adapter_model.safetensors"

        def floor(model):
            common.floor_inject(model, R, R)
            params = dict(model.named_parameters())
            with torch.no_grad():
                for key, value in load_file(path).items():
                    params[key[len(PREFIX) :]].copy_(value)
            return model

        times = _rounds(
            {
                "ours": (lambda m: ours.PeftModel.from_pretrained(m, tmp), pool.fresh),
                "ref": (lambda m: ref.PeftModel.from_pretrained(m, tmp), pool.fresh) if ref else None,
                "floor": (floor, pool.fresh),
            },
            repeat,
        )
    t_ours, t_ref, t_floor = times["ours"], times.get("ref"), times["floor"]
    common.emit(
        "from_pretrained[5M-param adapter, 224 modules]",
        ours=t_ours,
        reference=t_ref,
        floor=t_floor,
        adapter_params=n_params,
        fastest_round_vs_floor=round(common.LAST_MINIMA["ours"] / common.LAST_MINIMA["floor"], 3),
        target="<= 1.5x floor",
        met=t_ours <= 1.5 * t_floor,
    )


def main() -> None:
    # intermediate 1376 makes r=16 on all 224 linears exactly ~5M adapter parameters.
    pool = common.ModelPool(lambda: common.llama_model(layers=32, hidden=512, intermediate=1376))
    repeat = common.repeats(5)
    bench_inject("224 modules", pool, repeat)
    bench_unload(pool, repeat)
    bench_from_pretrained(pool, repeat)
    del pool
    big = common.ModelPool(lambda: common.llama_model(layers=286, hidden=64, intermediate=128))
    bench_inject("2002 modules", big, common.repeats(5))
    bench_inject("2002 modules", big, common.repeats(3), collector=True)


if __name__ == "__main__":
    main()
