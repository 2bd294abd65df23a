"""Mixed-adapter batches: each sample runs with its own LoRA adapter.

Rows: 4 adapters in a batch of 8 against the same batch with one active adapter (target
<= 1.05x), and 4/16/64 adapters (one sample each) with the number of aten ops the forward
launches, which should grow slower than the adapter count.
"""

from __future__ import annotations

from collections import Counter

import common
import torch
from torch.utils._python_dispatch import TorchDispatchMode

R = 16
TARGETS = list(common.LINEAR_NAMES)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops (kernel launches on an accelerator) a block dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def build(lib, template, n_adapters: int):
    import copy

    model = None
    torch.manual_seed(0)
    for i in range(n_adapters):
        config = lib.LoraConfig(r=R, lora_alpha=R, target_modules=TARGETS, init_lora_weights=False)
        if model is None:
            model = lib.get_peft_model(copy.deepcopy(template), config, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", config)
    model.set_adapter("a0")
    return model.eval()


def mixed_call(model, ids, names):
    """``model(input_ids=ids, adapter_names=names)``; hooks pass the names to the layers if the model cannot."""
    with torch.no_grad():
        plain = model(input_ids=ids[:1]).logits
        routed = model(input_ids=ids[:1], adapter_names=["a1"]).logits
    if not torch.equal(plain, routed):
        return lambda: model(input_ids=ids, adapter_names=names), "model"
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "_mixed_batch_forward")]

    def call():
        handles = [
            m.register_forward_pre_hook(lambda _m, a, k: (a, {**k, "adapter_names": names}), with_kwargs=True)
            for m in layers
        ]
        try:
            return model(input_ids=ids)
        finally:
            for handle in handles:
                handle.remove()

    return call, "layer hooks"


def main() -> None:
    ours, ref = common.ours(), common.reference()
    libs = {"ours": ours} | ({"ref": ref} if ref else {})
    template = common.llama_model(layers=4, hidden=1024, intermediate=2816)

    # 4 adapters, batch 8, against one active adapter
    ids = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    names = [f"a{i % 4}" for i in range(8)]
    fns, how = {}, {}
    for label, lib in libs.items():
        model = build(lib, template, 4)
        fns[f"{label}_mixed"], how[label] = mixed_call(model, ids, names)
        fns[f"{label}_single"] = lambda model=model: model(input_ids=ids)
    with torch.no_grad():
        times = common.measure_interleaved(fns, repeat=common.repeats(5), warmup=1)
    t_ours = times["ours_mixed"] / times["ours_single"]
    t_ref = times["ref_mixed"] / times["ref_single"] if ref else None
    common.emit(
        "mixed_batch[4 adapters, batch 8x128]",
        ours=times["ours_mixed"],
        reference=times.get("ref_mixed"),
        floor=times["ours_single"],
        ours_vs_single_adapter=round(t_ours, 4),
        reference_vs_single_adapter=round(t_ref, 4) if t_ref else None,
        routed_by=how,
        target="ours mixed / ours single adapter <= 1.05",
        met=t_ours <= 1.05,
    )
    del fns

    # launches as the adapter count grows: one sample per adapter
    small = common.llama_model(layers=2, hidden=256, intermediate=512)
    first_ops = None
    for n in (4, 16, 64):
        ids = torch.randint(0, 1000, (n, 16), generator=torch.Generator().manual_seed(0))
        names = [f"a{i}" for i in range(n)]
        ops, fns = {}, {}
        for label, lib in libs.items():
            model = build(lib, small, n)
            call, _ = mixed_call(model, ids, names)
            with torch.no_grad(), OpCounter() as counter:
                call()
            ops[label] = sum(counter.ops.values())
            fns[label] = call
        with torch.no_grad():
            times = common.measure_interleaved(fns, repeat=common.repeats(5), warmup=1)
        first_ops = first_ops or (n, ops["ours"])
        grows = (ops["ours"] / first_ops[1]) / (n / first_ops[0])
        common.emit(
            f"mixed_batch_launches[{n} adapters, batch {n}x16]",
            ours=times["ours"],
            reference=times.get("ref"),
            floor=None,
            ours_ops=ops["ours"],
            reference_ops=ops.get("ref"),
            # ops growth relative to the adapter count's, from the 4-adapter row (1.0: in step)
            ours_ops_growth_vs_count=round(grows, 3),
            target="ops grow slower than the adapter count",
            met=None if n == first_ops[0] else grows < 1.0,
        )


if __name__ == "__main__":
    main()
