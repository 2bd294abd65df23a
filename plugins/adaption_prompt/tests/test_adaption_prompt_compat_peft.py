"""File and output equivalence with the reference ``peft`` (0.21.2), both ways (marker ``compat``).

On tiny Llama and Mistral models with grouped-query attention (the model types the reference
supports besides GPT-2): logits of a left-padded batch, greedy and beam-search generations, the
saved tensor keys and the ``adapter_config.json`` fields, for one adapter and for two.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import attrs
import pytest
import torch
from adaption_prompt_models import PAD, padded_batch, tiny_lm
from peft_core import PeftModel as CorePeftModel
from peft_core import get_peft_model as core_get_peft_model
from safetensors.torch import load_file

from peft_adaption_prompt import AdaptionPromptConfig

pytestmark = pytest.mark.compat

ATOL = 1e-5
OPTIONS = {"task_type": "CAUSAL_LM", "adapter_len": 3, "adapter_layers": 2}
OTHER = {"task_type": "CAUSAL_LM", "adapter_len": 2, "adapter_layers": 1}


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _perturb(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator).to(param))


def _outputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    batch = padded_batch(11, (6, 3))
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": PAD}
    with torch.no_grad():
        logits = model(**batch).logits
    return {
        "logits": logits,
        "greedy": model.generate(**batch, **options),
        "beam": model.generate(**batch, num_beams=2, **options),
    }


def _assert_same(label: str, ours: dict, theirs: dict, diffs: dict) -> None:
    for key, value in theirs.items():
        if value.is_floating_point():
            diffs[f"{label} {key}"] = max(
                (ours[key] - value).abs().max().item(), diffs.get(f"{label} {key}", 0.0)
            )
            torch.testing.assert_close(ours[key], value, atol=ATOL, rtol=ATOL, msg=f"{label} {key}")
        else:
            assert torch.equal(ours[key], value), f"{label} {key}: {ours[key]} != {value}"


def _saved(path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((path / "adapter_config.json").read_text())
    return config, load_file(path / "adapter_model.safetensors")


def _assert_same_files(ours_dir, theirs_dir) -> None:
    (our_config, our_tensors), (ref_config, ref_tensors) = _saved(ours_dir), _saved(theirs_dir)
    assert our_config == ref_config
    assert our_tensors.keys() == ref_tensors.keys()
    for key, value in ref_tensors.items():
        assert our_tensors[key].shape == value.shape and our_tensors[key].dtype == value.dtype, key
        torch.testing.assert_close(our_tensors[key], value, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_adapters_move_both_ways(peft, family, tmp_path, max_abs_diffs):
    # peft -> peft-core: two adapters, both trained (perturbed), the second in a subfolder.
    reference = _quiet(lambda: peft.get_peft_model(tiny_lm(family), peft.AdaptionPromptConfig(**OPTIONS)))
    _perturb(reference, 1)
    _quiet(lambda: reference.add_adapter("other", peft.AdaptionPromptConfig(**OTHER)))
    reference.set_adapter("other")
    _perturb(reference, 2)
    reference.set_adapter("default")
    ref_dir = tmp_path / "reference"
    _quiet(lambda: reference.save_pretrained(ref_dir))
    reference.eval()
    ref_default = _outputs(reference)
    reference.set_adapter("other")
    ref_other = _outputs(reference)

    ours = CorePeftModel.from_pretrained(tiny_lm(family), ref_dir)
    ours.load_adapter(ref_dir / "other", adapter_name="other")
    ours.eval()
    _assert_same("peft -> core", _outputs(ours), ref_default, max_abs_diffs)
    ours.set_adapter("other")
    _assert_same("peft -> core", _outputs(ours), ref_other, max_abs_diffs)

    # peft-core -> peft: the same files, and the same outputs in the reference.
    our_dir = tmp_path / "ours"
    ours.save_pretrained(our_dir)
    _assert_same_files(our_dir, ref_dir)
    _assert_same_files(our_dir / "other", ref_dir / "other")
    back = _quiet(lambda: peft.PeftModel.from_pretrained(tiny_lm(family), our_dir))
    _quiet(lambda: back.load_adapter(our_dir / "other", adapter_name="other"))
    back.eval()
    _assert_same("core -> peft", _outputs(back), ref_default, max_abs_diffs)
    back.set_adapter("other")
    _assert_same("core -> peft", _outputs(back), ref_other, max_abs_diffs)


def test_an_adapter_made_here_loads_in_peft(peft, tmp_path, max_abs_diffs):
    ours = core_get_peft_model(tiny_lm("llama"), AdaptionPromptConfig(**OPTIONS))
    _perturb(ours, 3)
    ours.save_pretrained(tmp_path)
    ours.eval()
    theirs = _quiet(lambda: peft.PeftModel.from_pretrained(tiny_lm("llama"), tmp_path)).eval()
    _assert_same("core -> peft", _outputs(theirs), _outputs(ours), max_abs_diffs)


def test_a_seeded_init_draws_the_references_prompts(peft):
    torch.manual_seed(7)
    reference = _quiet(lambda: peft.get_peft_model(tiny_lm(), peft.AdaptionPromptConfig(**OPTIONS)))
    torch.manual_seed(7)
    ours = core_get_peft_model(tiny_lm(), AdaptionPromptConfig(**OPTIONS))
    ref_tensors = peft.get_peft_model_state_dict(reference)
    from peft_core import get_peft_model_state_dict

    our_tensors = get_peft_model_state_dict(ours)
    assert our_tensors.keys() == ref_tensors.keys()
    for key, value in ref_tensors.items():
        assert torch.equal(our_tensors[key], value), key


def test_every_reference_config_field_exists_here_with_the_same_default(peft):
    ours = {a.name for a in attrs.fields(AdaptionPromptConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.AdaptionPromptConfig) if f.init}
    assert theirs == ours
    ref_defaults = peft.AdaptionPromptConfig().to_dict()
    our_defaults = AdaptionPromptConfig().to_dict()
    assert set(our_defaults) == set(ref_defaults)
    for key in set(ref_defaults) - {"peft_version", "peft_type"}:
        assert our_defaults[key] == ref_defaults[key], key
