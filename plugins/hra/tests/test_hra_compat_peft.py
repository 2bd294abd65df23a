"""Equivalence with the reference library (``peft``): HRA adapter files move both ways, outputs agree.

On tiny models (an MLP, a conv net and a tiny Llama built from configs; no downloads) with
non-identity vectors (``init_weights=False``, or the identity init, then perturbed), so that no
check is trivial:

* an adapter saved by ``peft`` loads in peft-core with the same outputs, and the adapter re-saved
  by peft-core loads in ``peft`` with the same outputs; both write the same tensor keys and the
  same ``adapter_config.json`` fields; ``merge_and_unload`` gives the same model in both;
* the same seed and config build bit-identical vectors (the init draws in the same order);
* where ``peft`` 0.21.2 is wrong, a test shows the difference: its Conv2d forward ignores
  dilation, uneven stride/padding and padding modes (so it disagrees with its own merge), fails
  on ``padding="same"`` and non-square kernels, refuses grouped convolutions, and reflects along
  rounding noise (or NaN) for ``apply_GS=True`` with the default init.

All comparisons are float32 with ``atol=1e-5``: the two libraries evaluate the same chain of
reflections in a different order (the reference builds the ``d x d`` matrix, peft-core reflects
the rows it needs), which differs by a few float32 ulps per layer.

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

from peft_hra import HRAConfig as CoreHRAConfig

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
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class ConvNet(nn.Module):
    """Conv2d geometries on which the reference's forward is right (square, symmetric, no dilation)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(4, 6, 3, padding=1)
        self.conv1x1 = nn.Conv2d(6, 8, 1, bias=False)
        self.conv_strided = nn.Conv2d(8, 6, 3, stride=2)
        self.lin = nn.Linear(6, 5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.conv_strided(torch.tanh(self.conv1x1(torch.tanh(self.conv3(image)))))
        return torch.cat([h.flatten(1), self.lin(h.mean(dim=(2, 3)))], dim=1)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return MLP()
    if name == "convnet":
        return ConvNet()
    if name == "llama":
        import transformers as tf

        config = tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            attention_bias=True,  # biases for the bias option to train and save
        )
        return tf.LlamaForCausalLM(config)
    raise ValueError(name)


def _inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name == "llama":
        return {"input_ids": torch.randint(1, VOCAB, (2, 7), generator=g)}
    if name == "mlp":
        return {"x": torch.randn(3, 12, generator=g)}
    return {"image": torch.randn(2, 4, 7, 7, generator=g)}


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
    """Stand-in for training: moves every trainable tensor (the vectors, and biases if trained)."""
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
CONV_TARGETS = ["conv3", "conv1x1", "conv_strided", "lin"]
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("mlp", "mlp", {"target_modules": ["fc1", "fc2", "head"], "r": 4}),
    ("mlp-odd-r", "mlp", {"target_modules": ["fc1", "fc2", "head"], "r": 5}),
    ("mlp-gram-schmidt", "mlp", {"target_modules": ["fc1", "fc2", "head"], "r": 3, "apply_GS": True}),
    ("mlp-identity-init-trained", "mlp", {"target_modules": r"fc\d", "r": 6, "init_weights": True}),
    ("mlp-bias-all", "mlp", {"target_modules": ["fc1", "fc2"], "r": 2, "bias": "all"}),
    ("conv", "convnet", {"target_modules": CONV_TARGETS, "r": 4}),
    ("conv-gram-schmidt", "convnet", {"target_modules": CONV_TARGETS, "r": 5, "apply_GS": True}),
    ("llama-defaults", "llama", {"r": 4}),
    (
        "llama-gram-schmidt-modules-to-save",
        "llama",
        {
            "target_modules": ["q_proj", "o_proj", "down_proj"],
            "r": 6,
            "apply_GS": True,
            "modules_to_save": ["lm_head"],
        },
    ),
    (
        "llama-layers-bias-hra-only",
        "llama",
        {
            "target_modules": ["q_proj", "k_proj", "up_proj"],
            "layers_to_transform": [1],
            "layers_pattern": "layers",
            "r": 8,
            "init_weights": True,
            "bias": "hra_only",
        },
    ),
    (
        "llama-regex-exclude",
        "llama",
        {
            "target_modules": r".*(self_attn|mlp)\.\w+_proj",
            "exclude_modules": ["o_proj", "gate_proj"],
            "r": 2,
        },
    ),
    ("llama-all-linear", "llama", {"target_modules": "all-linear", "r": 2}),
]
TASK = {"llama": "CAUSAL_LM", "mlp": None, "convnet": None}


def _configs(peft, name: str, options: dict[str, Any]) -> tuple[Any, CoreHRAConfig]:
    options = {"task_type": TASK[name], "init_weights": False, **options}
    return peft.HRAConfig(**copy.deepcopy(options)), CoreHRAConfig(**copy.deepcopy(options))


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
    for key, value in ours_fresh.state_dict().items():
        assert value.shape == reference.state_dict()[key].shape, key

    # reference -> peft-core
    _quiet(lambda: reference.save_pretrained(tmp_path / "ref"))
    ours = _quiet(lambda: CorePeftModel.from_pretrained(base_model(name), tmp_path / "ref")).eval()
    assert_close("peft->core", run(ours, name), expected)

    # peft-core -> reference
    _quiet(lambda: ours.save_pretrained(tmp_path / "core"))
    ref_json, ref_tensors = _saved(tmp_path / "ref")
    core_json, core_tensors = _saved(tmp_path / "core")
    _assert_same_config_files(core_json, ref_json)
    assert set(core_tensors) == set(ref_tensors)
    assert any(".hra_u" in key for key in core_tensors)
    for key, tensor in ref_tensors.items():
        assert torch.equal(core_tensors[key], tensor), key
    reloaded = _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "core")).eval()
    assert_close("core->peft", run(reloaded, name), expected)

    # merged models agree with each other and with the unmerged output
    ours_merged = _quiet(lambda: ours.merge_and_unload())
    ref_merged = _quiet(lambda: reference.merge_and_unload())
    assert type(ours_merged) is type(ref_merged)
    assert_close("merged core vs merged peft", run(ours_merged, name), run(ref_merged, name))
    assert_close("merged vs unmerged", run(ours_merged, name), expected)


@pytest.mark.parametrize(
    "case", ["mlp", "mlp-identity-init-trained", "conv", "llama-defaults", "llama-layers-bias-hra-only"]
)
def test_the_same_seed_builds_the_same_vectors(peft, case):
    _, name, options = next(c for c in CASES if c[0] == case)
    ref_config, core_config = _configs(peft, name, options)
    torch.manual_seed(5)
    reference = _quiet(lambda: peft.get_peft_model(base_model(name), ref_config))
    torch.manual_seed(5)
    ours = _quiet(lambda: core_get_peft_model(base_model(name), core_config))
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert set(ref_state) == set(our_state)
    for key, value in ref_state.items():
        torch.testing.assert_close(our_state[key], value, atol=0, rtol=0, msg=key)
    # and the identity init is the identity in both
    if options.get("init_weights"):
        assert_close("identity init vs base", run(ours, name), run(base_model(name), name))


def test_several_adapters_move_both_ways_and_compose_like_the_reference(peft, tmp_path):
    name = "llama"
    first = {"target_modules": ["q_proj", "down_proj"], "r": 4, "init_weights": False}
    second = {"target_modules": ["q_proj", "v_proj"], "r": 3, "apply_GS": True, "init_weights": False}
    reference = _quiet(lambda: peft.get_peft_model(base_model(name), peft.HRAConfig(**first)))
    reference.add_adapter("other", peft.HRAConfig(**second))
    reference.set_adapter("other")
    perturb_trainables(reference, seed=3)
    reference.set_adapter("default")
    perturb_trainables(reference, seed=4)
    reference.eval()
    expected = {}
    for adapter in ("default", "other"):
        reference.set_adapter(adapter)
        expected[adapter] = run(reference, name)
    # both active: q_proj uses W @ R_default @ R_other
    reference.base_model.set_adapter(["default", "other"])
    expected["both"] = run(reference, name)
    _quiet(lambda: reference.save_pretrained(tmp_path / "ref"))

    ours = _quiet(lambda: CorePeftModel.from_pretrained(base_model(name), tmp_path / "ref"))
    _quiet(lambda: ours.load_adapter(tmp_path / "ref" / "other", adapter_name="other"))
    ours.eval()
    for adapter in ("default", "other"):
        ours.set_adapter(adapter)
        assert_close("several adapters peft->core", run(ours, name), expected[adapter])
    ours.set_adapter(["default", "other"])
    assert_close("two active adapters", run(ours, name), expected["both"])
    _quiet(lambda: ours.merge_adapter())
    assert_close("two active adapters merged", run(ours, name), expected["both"])
    _quiet(lambda: ours.unmerge_adapter())

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

    ours = {a.name for a in attrs.fields(CoreHRAConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.HRAConfig) if f.init}
    assert theirs == ours
    ref_defaults = peft.HRAConfig().to_dict()
    our_defaults = CoreHRAConfig().to_dict()
    assert set(our_defaults) == set(ref_defaults)
    for key in set(ref_defaults) - {"peft_version", "peft_type"}:
        assert our_defaults[key] == ref_defaults[key], key


def test_the_same_configs_are_refused(peft):
    """The reference's config checks, and its layer-time check of r, are config errors here."""
    from peft_core.errors import ConfigError

    for options in (
        {"target_modules": r".*q_proj", "layers_to_transform": [0]},
        {"target_modules": r".*q_proj", "layers_pattern": "layers"},
        {"target_modules": ["q_proj"], "layers_pattern": "layers"},
    ):
        with pytest.raises(ValueError):
            peft.HRAConfig(**options)
        with pytest.raises(ConfigError):
            CoreHRAConfig(**options)
    with pytest.raises(ValueError, match="positive integer"):
        peft.get_peft_model(MLP(), peft.HRAConfig(r=0, target_modules=["fc1"]))
    with pytest.raises(ConfigError, match="positive integer"):
        CoreHRAConfig(r=0, target_modules=["fc1"])


def test_odd_r_warns_in_both(peft):
    with pytest.warns(UserWarning, match="odd"):
        peft.get_peft_model(MLP(), peft.HRAConfig(r=3, target_modules=["fc1"]))
    with pytest.warns(UserWarning, match="even r; with r=3"):
        core_get_peft_model(MLP(), CoreHRAConfig(r=3, target_modules=["fc1"]))


def test_default_targets_are_the_references(peft):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_HRA_TARGET_MODULES_MAPPING as reference
    from peft_core.plugins import get_registry

    registered = get_registry().method("HRA").default_target_modules
    ours: dict[str, Any] = {k: v if isinstance(v, str) else list(v) for k, v in registered.items()}
    assert ours == {k: (v if isinstance(v, str) else list(v)) for k, v in reference.items()}


# ---------------------------------------------------------------------- where the reference is wrong
class OneConv(nn.Module):
    def __init__(self, **geometry: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, **geometry)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image)


def _one_conv(geometry: dict[str, Any]) -> OneConv:
    torch.manual_seed(0)
    return OneConv(**geometry).eval()


IMAGE = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(3))

WRONG_IN_REFERENCE = {
    "uneven-padding": {"kernel_size": 3, "padding": (1, 0)},
    "dilation": {"kernel_size": 3, "dilation": 2},
    "uneven-stride": {"kernel_size": 3, "stride": (1, 2)},
    "reflect-padding": {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
}


@pytest.mark.parametrize("geometry", list(WRONG_IN_REFERENCE.values()), ids=list(WRONG_IN_REFERENCE))
def test_reference_conv_forward_disagrees_with_its_own_merge_and_ours_does_not(peft, tmp_path, geometry):
    """peft's unmerged Conv2d forward passes only ``padding[0]`` and ``stride[0]`` to ``F.conv2d``
    (no dilation, no padding mode); its merge is right. Ours convolves like the base layer both ways."""
    config = {"target_modules": ["conv"], "r": 4, "init_weights": False}
    reference = _quiet(lambda: peft.get_peft_model(_one_conv(geometry), peft.HRAConfig(**config))).eval()
    with torch.no_grad():
        ref_unmerged = reference(IMAGE)
    _quiet(lambda: reference.save_pretrained(tmp_path))
    ref_merged = _quiet(lambda: reference.merge_and_unload())(IMAGE).detach()
    assert ref_unmerged.shape != ref_merged.shape or not torch.allclose(ref_unmerged, ref_merged, atol=1e-3)

    ours = _quiet(lambda: CorePeftModel.from_pretrained(_one_conv(geometry), tmp_path)).eval()
    with torch.no_grad():
        our_unmerged = ours(IMAGE)
    assert_close("conv geometry: core unmerged vs peft merged", our_unmerged, ref_merged)
    our_merged = _quiet(lambda: ours.merge_and_unload())(IMAGE).detach()
    assert_close("conv geometry: core merged vs unmerged", our_merged, our_unmerged)


def test_same_padding_fails_in_the_reference_and_works_here(peft, tmp_path):
    geometry = {"kernel_size": 3, "padding": "same"}
    config = {"target_modules": ["conv"], "r": 2, "init_weights": False}
    reference = _quiet(lambda: peft.get_peft_model(_one_conv(geometry), peft.HRAConfig(**config))).eval()
    with pytest.raises(RuntimeError, match="padding"):
        reference(IMAGE)
    _quiet(lambda: reference.save_pretrained(tmp_path))
    ref_merged = _quiet(lambda: reference.merge_and_unload())(IMAGE).detach()
    ours = _quiet(lambda: CorePeftModel.from_pretrained(_one_conv(geometry), tmp_path)).eval()
    with torch.no_grad():
        out = ours(IMAGE)
    assert out.shape == IMAGE.shape[:1] + (4,) + IMAGE.shape[2:]
    assert_close("same padding: core unmerged vs peft merged", out, ref_merged)


def test_non_square_kernels_fail_in_the_reference_and_work_here(peft):
    """peft sizes ``hra_u`` as ``in * k[0] * k[0]``, which does not fit a (3, 1) kernel's filters;
    peft-core sizes it ``in * kh * kw`` (the same as peft's for every square kernel)."""
    geometry = {"kernel_size": (3, 1), "padding": (1, 0)}
    config = {"target_modules": ["conv"], "r": 2, "init_weights": False}
    reference = _quiet(lambda: peft.get_peft_model(_one_conv(geometry), peft.HRAConfig(**config))).eval()
    assert reference.base_model.model.conv.hra_u["default"].shape == (27, 2)
    with pytest.raises(RuntimeError):
        reference(IMAGE)
    ours = _quiet(lambda: core_get_peft_model(_one_conv(geometry), CoreHRAConfig(**config))).eval()
    assert ours.base_model.model.conv.hra_u["default"].shape == (9, 2)
    unmerged = run_image(ours)
    merged = run_image(_quiet(lambda: ours.merge_and_unload()))
    assert_close("non-square kernel: merged vs unmerged", merged, unmerged)


def run_image(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IMAGE)


def test_grouped_convs_are_refused_by_the_reference_and_work_here(peft):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)).eval()
    config = {"target_modules": ["0"], "r": 4, "init_weights": False}
    with pytest.raises(NotImplementedError, match="groups"):
        peft.get_peft_model(copy.deepcopy(model), peft.HRAConfig(**config))
    ours = core_get_peft_model(copy.deepcopy(model), CoreHRAConfig(**config)).eval()
    assert ours.base_model.model[0].hra_u["default"].shape == (2 * 9, 4)
    image = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        unmerged = ours(image)
        assert not torch.allclose(unmerged, model(image), atol=1e-3)
        merged = ours.merge_and_unload()(image)
    assert_close("grouped conv: merged vs unmerged", merged, unmerged)


def test_gram_schmidt_with_the_default_init_is_noise_in_the_reference_and_refused_here(peft):
    """GS cannot orthogonalise the identity init's equal pairs: the second vector of each pair is left
    as a rounding residual, which peft normalises into a direction made of noise (or NaN, 0/0). So its
    transform is far from the identity and changes with the precision it is evaluated in."""
    for seed in range(3):
        torch.manual_seed(seed)
        reference = _quiet(
            lambda: peft.get_peft_model(MLP(), peft.HRAConfig(r=4, apply_GS=True, target_modules=["fc1"]))
        )
        layer = reference.base_model.model.fc1
        in_float32 = layer.get_delta_weight("default").double()
        in_float64 = copy.deepcopy(layer).double().get_delta_weight("default")
        assert not torch.allclose(in_float32, torch.eye(12, dtype=torch.float64), atol=0.1), (
            "not the identity"
        )
        assert not torch.allclose(in_float32, in_float64, atol=0.1), "decided by rounding"
    with pytest.raises(
        ValueError, match="apply_GS=True cannot start from HRA's identity init.*init_weights=False"
    ):
        core_get_peft_model(MLP(), CoreHRAConfig(r=4, apply_GS=True, target_modules=["fc1"]))


def test_biases_of_an_adapter_loaded_for_inference_stay_frozen_here(peft, tmp_path):
    """peft marks biases trainable for bias != "none" even when loading with is_trainable=False."""
    options = {"target_modules": ["fc1", "head"], "r": 2, "bias": "hra_only", "init_weights": False}
    reference = _quiet(lambda: peft.get_peft_model(base_model("mlp"), peft.HRAConfig(**options)))
    perturb_trainables(reference)
    _quiet(lambda: reference.save_pretrained(tmp_path))
    theirs = _quiet(lambda: peft.PeftModel.from_pretrained(base_model("mlp"), tmp_path))
    assert sorted(n for n, p in theirs.named_parameters() if p.requires_grad) == [
        "base_model.model.fc1.base_layer.bias",
        "base_model.model.head.base_layer.bias",
    ]
    ours = _quiet(lambda: CorePeftModel.from_pretrained(base_model("mlp"), tmp_path))
    assert not [n for n, p in ours.named_parameters() if p.requires_grad]
    assert_close("peft->core", run(ours.eval(), "mlp"), run(theirs.eval(), "mlp"))
    trainable = _quiet(lambda: CorePeftModel.from_pretrained(base_model("mlp"), tmp_path, is_trainable=True))
    assert sorted(n for n, p in trainable.named_parameters() if p.requires_grad and n.endswith("bias")) == [
        "base_model.model.fc1.base_layer.bias",
        "base_model.model.head.base_layer.bias",
    ]
