"""Equivalence with the reference library (``peft``): LoHa adapter files move both ways, outputs agree.

On tiny models (an MLP, a small conv net, a tiny Llama built from a config; no downloads) and
with random (non-identity) factors, so that no check is trivial:

* an adapter saved by ``peft`` loads in peft-core with the same outputs, and the adapter re-saved
  by peft-core loads in ``peft`` with the same outputs; both write the same tensor keys and the
  same ``adapter_config.json`` fields; ``merge_and_unload`` gives the same model in both;
* the same seed and config build the same factors (the init draws in the same order);
* in training mode, with the same seed, module and rank dropout drop the same things, and the
  gradients agree.

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

from peft_loha import LoHaConfig as CoreLoHaConfig

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
    """Every layer type LoHa adapts: convs with kernels > 1 and of size 1, grouped, strided."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 6, 3, padding=1)
        self.conv1_k1 = nn.Conv1d(6, 8, 1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.conv2_1x1 = nn.Conv2d(6, 8, 1)
        self.conv2_grouped = nn.Conv2d(8, 6, 3, stride=2, groups=2)
        self.lin = nn.Linear(6, 5)

    def forward(self, seq: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        a = self.conv1_k1(self.conv1(seq))
        b = self.conv2_grouped(self.conv2_1x1(self.conv2(image)))
        c = self.lin(b.mean(dim=(2, 3)))
        return torch.cat([a.flatten(1), b.flatten(1), c], dim=1)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        import transformers as tf

        config = tf.LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=VOCAB,
        )
        return tf.LlamaForCausalLM(config)
    if name == "mlp":
        return MLP()
    if name == "convnet":
        return ConvNet()
    raise ValueError(name)


def _inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name == "llama":
        return {"input_ids": torch.randint(1, VOCAB, (2, 7), generator=g)}
    if name == "mlp":
        return {"x": torch.randn(3, 12, generator=g)}
    return {"seq": torch.randn(2, 4, 9, generator=g), "image": torch.randn(2, 4, 7, 7, generator=g)}


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
CONV_TARGETS = ["conv1", "conv1_k1", "conv2", "conv2_1x1", "conv2_grouped", "lin"]
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("mlp", "mlp", {"target_modules": ["fc1", "fc2"], "r": 4}),
    (
        "mlp-patterns-dropouts",
        "mlp",
        {
            "target_modules": ["fc1", "fc2", "head"],
            "r": 2,
            "alpha": 5,
            "rank_pattern": {"fc2": 3},
            "alpha_pattern": {"head": 1.5},
            "rank_dropout": 0.3,
            "module_dropout": 0.2,
        },
    ),
    ("conv-flattened", "convnet", {"target_modules": CONV_TARGETS, "r": 2, "alpha": 4}),
    (
        "conv-effective",
        "convnet",
        {"target_modules": CONV_TARGETS, "r": 3, "use_effective_conv2d": True, "rank_pattern": {"conv1": 2}},
    ),
    ("llama-defaults", "llama", {}),
    ("llama-all-linear", "llama", {"target_modules": "all-linear", "r": 2, "alpha_pattern": {"o_proj": 16}}),
    (
        "llama-layers-to-transform",
        "llama",
        {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    ),
    ("llama-modules-to-save", "llama", {"target_modules": ["k_proj"], "modules_to_save": ["lm_head"]}),
    ("llama-regex-exclude", "llama", {"target_modules": r".*mlp\..*_proj", "exclude_modules": ["gate_proj"]}),
]
TASK = {"llama": "CAUSAL_LM", "mlp": None, "convnet": None}


def _configs(peft, name: str, options: dict[str, Any]) -> tuple[Any, CoreLoHaConfig]:
    options = {"task_type": TASK[name], "init_weights": False, **options}
    return peft.LoHaConfig(**copy.deepcopy(options)), CoreLoHaConfig(**copy.deepcopy(options))


def _saved(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = json.loads((directory / "adapter_config.json").read_text())
    return config, load_file(directory / "adapter_model.safetensors")


# The reference writes its own version, and module-name lists as (unordered) sets.
_FREE_FIELDS = {"peft_version", "target_modules", "exclude_modules"}


def _assert_same_config_files(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert set(ours) == set(theirs)
    for key in set(ours) - _FREE_FIELDS:
        assert ours[key] == theirs[key], key
    for key in ("target_modules", "exclude_modules"):
        a, b = ours[key], theirs[key]
        assert (sorted(a) if isinstance(a, list) else a) == (sorted(b) if isinstance(b, list) else b), key


# ---------------------------------------------------------------------- files both ways
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
    assert_close("peft -> peft-core", run(ours, name), expected)

    # peft-core -> reference
    _quiet(lambda: ours.save_pretrained(tmp_path / "core"))
    ref_json, ref_tensors = _saved(tmp_path / "ref")
    core_json, core_tensors = _saved(tmp_path / "core")
    _assert_same_config_files(core_json, ref_json)
    assert set(core_tensors) == set(ref_tensors)
    for key, tensor in ref_tensors.items():
        torch.testing.assert_close(core_tensors[key], tensor, atol=0, rtol=0)
    reloaded = _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "core")).eval()
    assert_close("peft-core -> peft", run(reloaded, name), expected)

    # merged models agree with each other and with the unmerged output
    ours_merged = _quiet(lambda: ours.merge_and_unload())
    ref_merged = _quiet(lambda: reference.merge_and_unload())
    assert type(ours_merged) is type(ref_merged)
    assert_close("merged", run(ours_merged, name), run(ref_merged, name))
    assert_close("merged vs unmerged", run(ours_merged, name), expected, atol=1e-4)


def test_several_adapters_move_both_ways(peft, tmp_path):
    name = "llama"
    reference = _quiet(
        lambda: peft.get_peft_model(
            base_model(name), peft.LoHaConfig(target_modules=["q_proj"], init_weights=False)
        )
    )
    reference.add_adapter(
        "other", peft.LoHaConfig(target_modules=["v_proj", "q_proj"], r=2, init_weights=False)
    )
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
        assert_close("peft -> peft-core", run(ours, name), expected[adapter])

    _quiet(lambda: ours.save_pretrained(tmp_path / "core"))
    back = _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "core"))
    _quiet(lambda: back.load_adapter(tmp_path / "core" / "other", adapter_name="other"))
    back.eval()
    for adapter in ("default", "other"):
        back.set_adapter(adapter)
        assert_close("peft-core -> peft", run(back, name), expected[adapter])


# ---------------------------------------------------------------------- same seed, same model
@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("name", ["convnet", "llama"])
@pytest.mark.parametrize("effective", [False, True])
def test_same_seed_builds_the_same_factors(peft, name, init, effective):
    options = {"target_modules": CONV_TARGETS if name == "convnet" else "all-linear", "r": 3, "alpha": 6}
    ref_config, core_config = _configs(
        peft, name, {**options, "init_weights": init, "use_effective_conv2d": effective}
    )
    ref_base, our_base = base_model(name), base_model(name)  # building a base reseeds: build first
    torch.manual_seed(5)
    reference = _quiet(lambda: peft.get_peft_model(ref_base, ref_config)).eval()
    torch.manual_seed(5)
    ours = _quiet(lambda: core_get_peft_model(our_base, core_config)).eval()
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert set(ref_state) == set(our_state)
    for key, value in ref_state.items():
        torch.testing.assert_close(our_state[key], value, atol=0, rtol=0, msg=key)
    assert_close("same seed", run(ours, name), run(reference, name))


# ---------------------------------------------------------------------- training mode
@pytest.mark.parametrize("name", ["mlp", "convnet"])
def test_training_mode_dropouts_and_gradients_agree(peft, name):
    """Same seed, same random draws: rank/module dropout drop the same rows and steps."""
    targets = ["fc1", "fc2", "head"] if name == "mlp" else CONV_TARGETS
    options = {"target_modules": targets, "r": 2, "rank_dropout": 0.3, "module_dropout": 0.3}
    ref_config, core_config = _configs(peft, name, options)
    ref_base, our_base = base_model(name), base_model(name)  # building a base reseeds: build first
    torch.manual_seed(7)
    reference = _quiet(lambda: peft.get_peft_model(ref_base, ref_config)).train()
    torch.manual_seed(7)
    ours = _quiet(lambda: core_get_peft_model(our_base, core_config)).train()
    outputs_differ_between_steps = False
    previous = None
    for step in range(4):
        torch.manual_seed(100 + step)
        ref_out = reference(**_inputs(name))
        torch.manual_seed(100 + step)
        our_out = ours(**_inputs(name))
        assert_close("training forward", our_out.detach(), ref_out.detach())
        outputs_differ_between_steps |= previous is not None and not torch.equal(previous, our_out.detach())
        previous = our_out.detach()
        ref_out.square().sum().backward()
        our_out.square().sum().backward()
    assert outputs_differ_between_steps, "dropout had no effect; the check would be trivial"
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ref_grads) == set(our_grads)
    for key, grad in ref_grads.items():
        # LoHa in the reference has a hand-written backward; any difference is rounding.
        scale = max(grad.abs().max().item(), 1.0)
        MAX_DIFFS["training gradients (relative)"] = max(
            MAX_DIFFS.get("training gradients (relative)", 0.0),
            (our_grads[key] - grad).abs().max().item() / scale,
        )
        torch.testing.assert_close(our_grads[key], grad, atol=1e-4, rtol=1e-4, msg=key)


# ---------------------------------------------------------------------- config parity
def test_every_reference_config_field_exists_here_with_the_same_default(peft):
    import dataclasses

    import attrs

    ours = {a.name for a in attrs.fields(CoreLoHaConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.LoHaConfig) if f.init}
    assert theirs <= ours, theirs - ours
    ref_defaults = peft.LoHaConfig().to_dict()
    our_defaults = CoreLoHaConfig().to_dict()
    assert set(our_defaults) == set(ref_defaults)
    for key in set(ref_defaults) - {"peft_version"}:
        assert our_defaults[key] == ref_defaults[key], key
