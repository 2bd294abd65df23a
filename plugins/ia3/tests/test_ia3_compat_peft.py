"""Equivalence with the reference library (``peft``): (IA)³ adapter files move both ways, outputs agree.

On tiny models (an MLP, a conv net, a tiny Llama and a tiny GPT-2 built from configs; no
downloads) and with random vectors (``init_ia3_weights=False``, then perturbed), so that no check
is trivial:

* an adapter saved by ``peft`` loads in peft-core with the same outputs, and the adapter re-saved
  by peft-core loads in ``peft`` with the same outputs; both write the same tensor keys and the
  same ``adapter_config.json`` fields; ``merge_and_unload`` gives the same model in both;
* the same seed and config build the same vectors (the init draws in the same order).

The reference is imported inside a fixture, so this module is collected (and deselected with
``-m "not compat"``) in environments without it.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft_core import PeftModel as CorePeftModel
from peft_core import get_peft_model as core_get_peft_model
from safetensors.torch import load_file
from torch import nn

from peft_ia3 import IA3Config as CoreIA3Config

pytestmark = pytest.mark.compat

VOCAB = 64
ATOL = 1e-5


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _record_diffs(max_abs_diffs):
    global MAX_DIFFS
    MAX_DIFFS = max_abs_diffs


# ---------------------------------------------------------------------- tiny models
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 8, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    """Every non-linear layer type (IA)³ adapts: Conv2d (3x3, 1x1, grouped) and Conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.conv2_1x1 = nn.Conv2d(6, 8, 1)
        self.conv2_grouped = nn.Conv2d(8, 6, 3, stride=2, groups=2)
        self.conv3 = nn.Conv3d(2, 4, (1, 2, 2))
        self.lin = nn.Linear(6, 5)

    def forward(self, image: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
        b = self.conv2_grouped(self.conv2_1x1(self.conv2(image)))
        c = self.lin(b.mean(dim=(2, 3)))
        return torch.cat([b.flatten(1), c, self.conv3(volume).flatten(1)], dim=1)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return MLP()
    if name == "convnet":
        return ConvNet()
    import transformers as tf

    if name == "llama":
        config = tf.LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=VOCAB,
            attention_bias=True,  # so that merging has biases to scale
        )
        return tf.LlamaForCausalLM(config)
    if name == "gpt2":
        config = tf.GPT2Config(
            n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        return tf.GPT2LMHeadModel(config)
    raise ValueError(name)


def _inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name in ("llama", "gpt2"):
        return {"input_ids": torch.randint(1, VOCAB, (2, 7), generator=g)}
    if name == "mlp":
        return {"x": torch.randn(3, 12, generator=g)}
    return {"image": torch.randn(2, 4, 7, 7, generator=g), "volume": torch.randn(2, 2, 3, 4, 4, generator=g)}


_BASES: dict[str, nn.Module] = {}


def base_model(name: str) -> nn.Module:
    """A fresh copy of the (cached) tiny model ``name``, in eval mode."""
    if name not in _BASES:
        with torch.random.fork_rng():  # building draws random weights: leave the caller's stream alone
            _BASES[name] = _build(name).eval()
    return copy.deepcopy(_BASES[name])


def run(model: nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**_inputs(name))
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def perturb_trainables(model: nn.Module, seed: int = 2) -> None:
    """Stand-in for training on top of the random init: moves every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        if param.requires_grad:
            param.add_(0.3 * torch.randn(param.shape, generator=g))


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


MAX_DIFFS: dict[str, float] = {}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    """``assert_close`` that records the largest difference per check (printed in the summary)."""
    diff = (actual - expected).abs().max().item()
    MAX_DIFFS[name] = max(MAX_DIFFS.get(name, 0.0), diff)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---------------------------------------------------------------------- the configurations
CONV_TARGETS = ["conv2", "conv2_1x1", "conv2_grouped", "conv3", "lin"]
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("mlp", "mlp", {"target_modules": ["fc1", "fc2", "head"], "feedforward_modules": ["fc2"]}),
    ("mlp-outputs-only", "mlp", {"target_modules": ["fc1", "fc2", "head"], "feedforward_modules": []}),
    ("mlp-regex", "mlp", {"target_modules": r"(fc\d|head)", "feedforward_modules": r"fc1|head"}),
    ("conv-outputs", "convnet", {"target_modules": CONV_TARGETS, "feedforward_modules": []}),
    (
        "conv-feedforward",
        "convnet",
        {"target_modules": CONV_TARGETS, "feedforward_modules": ["conv2_1x1", "conv2_grouped", "conv3"]},
    ),
    ("llama-defaults", "llama", {}),
    (
        "llama-modules-to-save",
        "llama",
        {
            "target_modules": ["q_proj", "down_proj"],
            "feedforward_modules": ["down_proj"],
            "modules_to_save": ["lm_head"],
        },
    ),
    (
        "llama-regex-exclude",
        "llama",
        {
            "target_modules": r".*(self_attn|mlp)\.\w+_proj",
            "exclude_modules": ["o_proj", "gate_proj"],
            "feedforward_modules": r".*mlp\.(up|down)_proj",
        },
    ),
    ("gpt2-defaults", "gpt2", {"fan_in_fan_out": True}),
    (
        "gpt2-conv1d-all",
        "gpt2",
        {"target_modules": ["c_attn", "c_proj", "c_fc"], "feedforward_modules": ["c_fc"]},
    ),
]
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "mlp": None, "convnet": None}


def _configs(peft, name: str, options: dict[str, Any]) -> tuple[Any, CoreIA3Config]:
    options = {"task_type": TASK[name], "init_ia3_weights": False, **options}
    return peft.IA3Config(**copy.deepcopy(options)), CoreIA3Config(**copy.deepcopy(options))


def _saved(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = json.loads((directory / "adapter_config.json").read_text())
    return config, load_file(directory / "adapter_model.safetensors")


# The reference writes its own version and module-name lists as (unordered) sets, and rewrites
# fan_in_fan_out to fit the layer type (peft-core corrects it per layer without touching the config).
_FREE_FIELDS = {"peft_version", "target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out"}


def _assert_same_config_files(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert set(ours) == set(theirs)
    for key in set(ours) - _FREE_FIELDS:
        assert ours[key] == theirs[key], key
    for key in ("target_modules", "exclude_modules", "feedforward_modules"):
        a, b = ours[key], theirs[key]
        assert (sorted(a) if isinstance(a, list) else a) == (sorted(b) if isinstance(b, list) else b), key


# ---------------------------------------------------------------------- the checks
@pytest.mark.parametrize(("case", "name", "options"), CASES, ids=[c[0] for c in CASES])
def test_adapter_files_move_both_ways_with_equal_outputs(peft, tmp_path, case, name, options):
    ref_config, core_config = _configs(peft, name, options)
    reference = _quiet(lambda: peft.get_peft_model(base_model(name), ref_config)).eval()
    perturb_trainables(reference)
    expected = run(reference, name)
    assert not torch.allclose(expected, run(base_model(name), name), atol=1e-3), "the check would be trivial"

    # the same config builds the same model layout here
    ours_fresh = _quiet(lambda: core_get_peft_model(base_model(name), core_config))
    assert set(ours_fresh.state_dict()) == set(reference.state_dict())
    ref_layers = {n: m.is_feedforward for n, m in reference.named_modules() if hasattr(m, "ia3_l")}
    our_layers = {
        n: m.is_feedforward["default"] for n, m in ours_fresh.named_modules() if hasattr(m, "ia3_l")
    }
    assert our_layers == ref_layers

    # reference -> peft-core
    _quiet(lambda: reference.save_pretrained(tmp_path / "ref"))
    ours = _quiet(lambda: CorePeftModel.from_pretrained(base_model(name), tmp_path / "ref"))
    assert_close("peft->core", run(ours, name), expected)

    # peft-core -> reference
    _quiet(lambda: ours.save_pretrained(tmp_path / "core"))
    ref_json, ref_tensors = _saved(tmp_path / "ref")
    core_json, core_tensors = _saved(tmp_path / "core")
    _assert_same_config_files(core_json, ref_json)
    assert set(core_tensors) == set(ref_tensors)
    reloaded = _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "core")).eval()
    assert_close("core->peft", run(reloaded, name), expected)

    # merged models agree with each other and with the unmerged output
    ours_merged = _quiet(lambda: ours.merge_and_unload())
    ref_merged = _quiet(lambda: reference.merge_and_unload())
    assert type(ours_merged) is type(ref_merged)
    assert_close("merged core vs merged peft", run(ours_merged, name), run(ref_merged, name), atol=1e-4)
    assert_close("merged vs unmerged", run(ours_merged, name), expected, atol=1e-4)


@pytest.mark.parametrize("name", ["mlp", "convnet", "llama", "gpt2"])
def test_the_same_seed_builds_the_same_vectors(peft, name):
    options = {"llama": {}, "gpt2": {}, "mlp": CASES[0][2], "convnet": CASES[4][2]}[name]
    ref_config, core_config = _configs(peft, name, options)
    torch.manual_seed(5)
    reference = _quiet(lambda: peft.get_peft_model(base_model(name), ref_config))
    torch.manual_seed(5)
    ours = _quiet(lambda: core_get_peft_model(base_model(name), core_config))
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert set(ref_state) == set(our_state)
    for key, value in ref_state.items():
        torch.testing.assert_close(our_state[key], value, atol=0, rtol=0, msg=key)


def test_all_linear_adapters_move_both_ways(peft, tmp_path):
    """The reference saves "all-linear" targets as full module names next to short feedforward names, and
    its own subset check then refuses to read the file back; peft-core reads it (an entry that ends a target
    name counts), and writes "all-linear" adapters with short names that the reference can read."""
    name = "llama"
    options = {"target_modules": "all-linear", "feedforward_modules": ["down_proj", "o_proj"]}
    ref_config, core_config = _configs(peft, name, options)
    reference = _quiet(lambda: peft.get_peft_model(base_model(name), ref_config)).eval()
    perturb_trainables(reference)
    expected = run(reference, name)
    _quiet(lambda: reference.save_pretrained(tmp_path / "ref"))
    with pytest.raises(ValueError, match="subset"):
        _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "ref"))
    ours = _quiet(lambda: CorePeftModel.from_pretrained(base_model(name), tmp_path / "ref"))
    assert_close("peft->core", run(ours, name), expected)

    # an adapter made here: the same modules, and the reference reads it
    torch.manual_seed(5)
    mine = _quiet(lambda: core_get_peft_model(base_model(name), core_config)).eval()
    assert set(mine.state_dict()) == set(reference.state_dict())
    perturb_trainables(mine)
    ours_expected = run(mine, name)
    _quiet(lambda: mine.save_pretrained(tmp_path / "core"))
    reloaded = _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "core")).eval()
    assert_close("core->peft", run(reloaded, name), ours_expected)
    assert_close(
        "merged core vs merged peft",
        run(_quiet(lambda: mine.merge_and_unload()), name),
        run(_quiet(lambda: reloaded.merge_and_unload()), name),
        atol=1e-4,
    )


def test_several_adapters_move_both_ways(peft, tmp_path):
    name = "llama"
    first = {
        "target_modules": ["k_proj", "down_proj"],
        "feedforward_modules": ["down_proj"],
        "init_ia3_weights": False,
    }
    second = {
        "target_modules": ["v_proj", "up_proj"],
        "feedforward_modules": ["up_proj"],
        "init_ia3_weights": False,
    }
    reference = _quiet(lambda: peft.get_peft_model(base_model(name), peft.IA3Config(**first)))
    reference.add_adapter("other", peft.IA3Config(**second))
    reference.set_adapter("other")
    perturb_trainables(reference, seed=3)
    reference.set_adapter("default")
    perturb_trainables(reference, seed=4)
    reference.eval()
    expected = {}
    for adapter in ("default", "other"):
        reference.set_adapter(adapter)
        expected[adapter] = run(reference, name)
    _quiet(lambda: reference.save_pretrained(tmp_path / "ref"))

    ours = _quiet(lambda: CorePeftModel.from_pretrained(base_model(name), tmp_path / "ref"))
    _quiet(lambda: ours.load_adapter(tmp_path / "ref" / "other", adapter_name="other"))
    for adapter in ("default", "other"):
        ours.set_adapter(adapter)
        assert_close("several adapters peft->core", run(ours, name), expected[adapter])

    _quiet(lambda: ours.save_pretrained(tmp_path / "core"))
    back = _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "core"))
    _quiet(lambda: back.load_adapter(tmp_path / "core" / "other", adapter_name="other"))
    back.eval()
    for adapter in ("default", "other"):
        back.set_adapter(adapter)
        assert_close("several adapters core->peft", run(back, name), expected[adapter])


def test_every_reference_config_field_exists_here_with_the_same_default(peft):
    import dataclasses

    import attrs

    ours = {a.name for a in attrs.fields(CoreIA3Config)}
    theirs = {f.name for f in dataclasses.fields(peft.IA3Config) if f.init}
    assert theirs == ours
    ref_defaults = peft.IA3Config().to_dict()
    our_defaults = CoreIA3Config().to_dict()
    assert set(our_defaults) == set(ref_defaults)
    for key in set(ref_defaults) - {"peft_version", "peft_type"}:
        assert our_defaults[key] == ref_defaults[key], key


def test_default_targets_are_the_references(peft):
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    )

    from peft_ia3.default_targets import DEFAULT_FEEDFORWARD_MODULES, DEFAULT_TARGET_MODULES

    assert {
        k: list(v) for k, v in DEFAULT_TARGET_MODULES.items()
    } == TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    assert {
        k: list(v) for k, v in DEFAULT_FEEDFORWARD_MODULES.items()
    } == TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
