"""Both-ways file compatibility of a prompt-learning method with the reference ``peft``, per task.

Used by the plugins' ``compat`` tests. The reference library is passed in as a module (the
tests import it); nothing here imports it, so it stays an oracle, never a dependency.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from peft_core import PeftModel as CorePeftModel
from peft_core import get_peft_model as core_get_peft_model
from peft_core.testing.prompt_learning import PAD, padded_batch, tiny_bert, tiny_llama, tiny_t5

BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "CAUSAL_LM": tiny_llama,
    "SEQ_2_SEQ_LM": tiny_t5,
    "SEQ_CLS": lambda: tiny_bert("seq_cls"),
}


def quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=generator).to(param))


def outputs(
    model: torch.nn.Module, task: str, skip: int, extra: dict | None = None
) -> dict[str, torch.Tensor]:
    """Logits on the real tokens, and the greedy (and, for causal LMs, beam) generations."""
    inputs = {**padded_batch(11, left=task == "CAUSAL_LM"), **(extra or {})}
    with torch.no_grad():
        if task == "SEQ_2_SEQ_LM":
            decoder = torch.tensor([[PAD, 5, 6], [PAD, 7, 8]])
            result = {"logits": model(**inputs, decoder_input_ids=decoder).logits}
        else:
            result = {"logits": model(**inputs).logits}
    if task == "CAUSAL_LM":
        result["logits"] = result["logits"][:, skip:]
        result["greedy"] = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
        result["beam"] = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=PAD
        )
    elif task == "SEQ_2_SEQ_LM":
        result["greedy"] = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return result


def assert_same(
    label: str, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], diffs: dict
) -> None:
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if value.is_floating_point():
            diff = (ours[key] - value).abs().max().item()
            diffs[f"{label} {key}"] = max(diff, diffs.get(f"{label} {key}", 0.0))
            torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=1e-5, msg=f"{label} {key}")
        else:
            assert torch.equal(ours[key], value), f"{label} {key}: {ours[key]} != {value}"


def both_ways(
    peft,
    task: str,
    ref_config: Any,
    core_config: Any,
    tmp_path,
    diffs: dict,
    skip: int,
    extra: dict | None = None,
) -> None:
    """A reference adapter loads here with the same outputs, and one made here loads there likewise."""
    build = BUILDERS[task]
    torch.manual_seed(3)
    reference = quiet(lambda: peft.get_peft_model(build(), ref_config))
    perturb(reference)
    reference.eval()
    expected = quiet(lambda: outputs(reference, task, skip, extra))
    quiet(lambda: reference.save_pretrained(tmp_path / "ref"))
    ours = quiet(lambda: CorePeftModel.from_pretrained(build(), tmp_path / "ref"))
    assert_same(f"{task} peft->core", quiet(lambda: outputs(ours, task, skip, extra)), expected, diffs)

    torch.manual_seed(4)
    mine = quiet(lambda: core_get_peft_model(build(), core_config))
    perturb(mine, seed=1)
    mine.eval()
    ours_expected = quiet(lambda: outputs(mine, task, skip, extra))
    quiet(lambda: mine.save_pretrained(tmp_path / "core"))
    back = quiet(lambda: peft.PeftModel.from_pretrained(build(), tmp_path / "core")).eval()
    assert_same(f"{task} core->peft", quiet(lambda: outputs(back, task, skip, extra)), ours_expected, diffs)
    reloaded = quiet(lambda: CorePeftModel.from_pretrained(build(), tmp_path / "core"))
    assert_same(
        f"{task} core reloaded", quiet(lambda: outputs(reloaded, task, skip, extra)), ours_expected, diffs
    )
