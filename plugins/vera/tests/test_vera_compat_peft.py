"""Equivalence with the reference library (``peft``): VeRA adapter files move both ways, outputs agree.

On tiny models (an MLP, a tiny Llama and a tiny GPT-2 built from configs; no downloads), with
random lambdas (``init_weights=False``, then perturbed) so that no check is trivial, and with the
projections both saved and regenerated from their seed (``save_projection``):

* an adapter saved by ``peft`` loads in peft-core with the same outputs, and the adapter re-saved
  by peft-core loads in ``peft`` with the same outputs; both write the same tensor keys
  (including the model-level ``base_model.vera_A``/``vera_B``) and the same
  ``adapter_config.json`` fields; ``merge_and_unload`` gives the same model in both;
* the same seed and config build the same model state (projections and lambdas) in both.

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

from peft_vera import VeraConfig as CoreVeraConfig

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
    """Layers of different shapes, so that each uses its own block of the shared projections."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 20)
        self.fc2 = nn.Linear(20, 8, bias=False)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return MLP()
    import transformers as tf

    if name == "llama":
        config = tf.LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=VOCAB,
            attention_bias=True,  # so that the bias options have biases to train
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
    if name == "mlp":
        return {"x": torch.randn(3, 12, generator=g)}
    return {"input_ids": torch.randint(1, VOCAB, (2, 7), generator=g)}


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
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("mlp", "mlp", {"target_modules": ["fc1", "fc2", "head"], "r": 6}),
    ("mlp-regenerated", "mlp", {"target_modules": ["fc1", "fc2", "head"], "r": 6, "save_projection": False}),
    (
        "mlp-seed-d-initial",
        "mlp",
        {"target_modules": ["fc1", "head"], "r": 3, "projection_prng_key": 42, "d_initial": 0.7},
    ),
    ("llama-defaults", "llama", {"r": 8}),
    ("llama-regenerated", "llama", {"r": 8, "save_projection": False, "projection_prng_key": 3}),
    ("llama-all-linear", "llama", {"target_modules": "all-linear", "r": 4}),
    ("llama-bias-vera-only", "llama", {"target_modules": ["q_proj", "k_proj"], "r": 4, "bias": "vera_only"}),
    ("llama-bias-all", "llama", {"target_modules": ["v_proj"], "r": 4, "bias": "all"}),
    (
        "llama-layers-to-transform",
        "llama",
        {
            "target_modules": ["q_proj", "down_proj"],
            "r": 4,
            "layers_to_transform": [1],
            "layers_pattern": "layers",
        },
    ),
    (
        "llama-modules-to-save-dropout",
        "llama",
        {"target_modules": ["o_proj"], "r": 4, "modules_to_save": ["lm_head"], "vera_dropout": 0.2},
    ),
    ("gpt2-defaults", "gpt2", {"r": 8, "fan_in_fan_out": True}),
    (
        "gpt2-conv1d-all",
        "gpt2",
        {"target_modules": ["c_attn", "c_proj", "c_fc"], "r": 4, "save_projection": False},
    ),
]
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "mlp": None}


def _configs(peft, name: str, options: dict[str, Any]) -> tuple[Any, CoreVeraConfig]:
    options = {"task_type": TASK[name], "init_weights": False, **options}
    return (
        _quiet(lambda: peft.VeraConfig(**copy.deepcopy(options))),
        _quiet(lambda: CoreVeraConfig(**copy.deepcopy(options))),
    )


def _saved(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = json.loads((directory / "adapter_config.json").read_text())
    return config, load_file(directory / "adapter_model.safetensors")


# The reference writes its own version and module-name lists as (unordered) sets, and rewrites
# fan_in_fan_out to fit the layer type (peft-core corrects it per layer without touching the config).
_FREE_FIELDS = {"peft_version", "target_modules", "fan_in_fan_out"}


def _assert_same_config_files(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert set(ours) == set(theirs)
    for key in set(ours) - _FREE_FIELDS:
        assert ours[key] == theirs[key], key
    a, b = ours["target_modules"], theirs["target_modules"]
    assert (sorted(a) if isinstance(a, list) else a) == (sorted(b) if isinstance(b, list) else b)


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
    assert ("base_model.vera_A" in core_tensors) is core_config.save_projection
    for key, tensor in ref_tensors.items():
        torch.testing.assert_close(core_tensors[key], tensor, atol=0, rtol=0, msg=key)
    reloaded = _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "core")).eval()
    assert_close("core->peft", run(reloaded, name), expected)

    # merged models agree with each other and with the unmerged output
    ours_merged = _quiet(lambda: ours.merge_and_unload())
    ref_merged = _quiet(lambda: reference.merge_and_unload())
    assert type(ours_merged) is type(ref_merged)
    assert_close("merged core vs merged peft", run(ours_merged, name), run(ref_merged, name), atol=1e-4)
    assert_close("merged vs unmerged", run(ours_merged, name), expected, atol=1e-4)


@pytest.mark.parametrize("init_weights", [False, True])
@pytest.mark.parametrize("case", ["mlp", "mlp-seed-d-initial", "llama-defaults", "gpt2-conv1d-all"])
def test_the_same_seed_builds_the_same_projections_and_lambdas(peft, case, init_weights):
    _, name, options = next(c for c in CASES if c[0] == case)
    options = {**options, "init_weights": init_weights, "save_projection": True}
    ref_config, core_config = _configs(peft, name, options)
    torch.manual_seed(5)
    reference = _quiet(lambda: peft.get_peft_model(base_model(name), ref_config))
    torch.manual_seed(5)
    ours = _quiet(lambda: core_get_peft_model(base_model(name), core_config))
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert set(ref_state) == set(our_state)
    for key, value in ref_state.items():
        torch.testing.assert_close(our_state[key], value, atol=0, rtol=0, msg=key)


def test_several_adapters_move_both_ways(peft, tmp_path):
    name = "llama"
    first = {"target_modules": ["q_proj", "v_proj", "o_proj"], "r": 6, "init_weights": False}
    second = {"target_modules": ["v_proj", "q_proj"], "r": 6, "init_weights": False, "d_initial": 0.5}
    reference = _quiet(lambda: peft.get_peft_model(base_model(name), peft.VeraConfig(**first)))
    _quiet(lambda: reference.add_adapter("other", peft.VeraConfig(**second)))
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

    ours = {a.name for a in attrs.fields(CoreVeraConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.VeraConfig) if f.init}
    assert theirs == ours
    ref_defaults = peft.VeraConfig().to_dict()
    our_defaults = CoreVeraConfig().to_dict()
    assert set(our_defaults) == set(ref_defaults)
    for key in set(ref_defaults) - {"peft_version", "peft_type"}:
        assert our_defaults[key] == ref_defaults[key], key


def test_default_targets_are_the_references(peft):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING as reference

    from peft_vera.default_targets import DEFAULT_TARGET_MODULES, DEFAULT_TARGET_REGEXES

    ours: dict[str, Any] = {k: list(v) for k, v in DEFAULT_TARGET_MODULES.items()}
    ours.update(DEFAULT_TARGET_REGEXES)
    assert ours == reference
