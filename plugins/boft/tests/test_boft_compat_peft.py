"""Equivalence with the reference library (``peft``): BOFT adapter files move both ways, outputs agree.

On tiny models (an MLP, a conv net and a tiny Llama built from configs; no downloads) and with
random parameters (``init_weights=False``, then perturbed), so that no check is trivial.

The reference has two code paths, and both are checked:

* without its compiled CUDA extension (CPU machines, and GPU machines without ninja/nvcc) it
  silently trains with ONE butterfly factor whatever ``boft_n_butterfly_factor`` says;
* with the extension it runs the real butterfly. The extension only assembles block-diagonal
  matrices; :class:`PureTorchBlockDiag` stands in for it here (the same inputs and outputs, in
  PyTorch), so the reference's butterfly path runs on CPU.

Each test picks the path explicitly (fixtures ``reference_without_extension`` and
``reference_with_extension``), so results never depend on what the machine can compile.
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
from peft_core.errors import ConfigError
from safetensors.torch import load_file
from torch import nn

from peft_boft import BOFTConfig as CoreBOFTConfig

pytestmark = pytest.mark.compat

VOCAB = 64
ATOL = 1e-5


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


class PureTorchBlockDiag:
    """The reference's ``fbd_cuda`` extension API (``forward``/``backward``), in plain PyTorch."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        factors, num, size, _ = blocks.shape
        diagonal = [
            torch.stack([grad[f, d * size : (d + 1) * size, d * size : (d + 1) * size] for d in range(num)])
            for f in range(factors)
        ]
        return [torch.stack(diagonal)]


@pytest.fixture
def reference_without_extension(peft, monkeypatch):
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)
    return peft


@pytest.fixture
def reference_with_extension(peft, monkeypatch):
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", PureTorchBlockDiag())
    return peft


@pytest.fixture(autouse=True)
def _record_diffs(max_abs_diffs):
    global MAX_DIFFS
    MAX_DIFFS = max_abs_diffs


# ---------------------------------------------------------------------- tiny models
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16, bias=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class ConvNet(nn.Module):
    """Conv2d layers of the geometries the reference handles (square kernels, groups=1) and a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)  # rotated dimension 36
        self.conv_1x1 = nn.Conv2d(8, 8, 1)  # 8
        self.conv_strided = nn.Conv2d(8, 4, 3, stride=2)  # 72
        self.lin = nn.Linear(4, 5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.conv_strided(torch.tanh(self.conv_1x1(torch.tanh(self.conv(image)))))
        return torch.cat([h.flatten(1), self.lin(h.mean(dim=(2, 3)))], dim=1)


class OddConvs(nn.Module):
    """Conv2d geometries the reference's unmerged forward gets wrong (its merge is right)."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, **options)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return MLP()
    if name == "convnet":
        return ConvNet()
    import transformers as tf

    config = tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        attention_bias=True,  # biases in the adapted projections
    )
    return tf.LlamaForCausalLM(config)


def _inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name == "llama":
        return {"input_ids": torch.randint(1, VOCAB, (2, 7), generator=g)}
    if name == "mlp":
        return {"x": torch.randn(3, 16, generator=g)}
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
    """Stand-in for training on top of the random init: moves every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        if param.requires_grad:
            param.add_(0.1 * torch.randn(param.shape, generator=g))


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
CONV_TARGETS = ["conv", "conv_1x1", "conv_strided", "lin"]
SINGLE_FACTOR_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("mlp", "mlp", {"target_modules": ["fc1", "fc2"], "boft_block_size": 4}),
    (
        "mlp-block-num-bias-dropout",
        "mlp",
        {
            "target_modules": ["fc1", "fc2"],
            "boft_block_size": 0,
            "boft_block_num": 8,
            "bias": "boft_only",
            "boft_dropout": 0.1,
        },
    ),
    (
        "mlp-modules-to-save",
        "mlp",
        {"target_modules": ["fc1"], "boft_block_size": 8, "modules_to_save": ["head"]},
    ),
    ("conv", "convnet", {"target_modules": CONV_TARGETS, "boft_block_size": 0, "boft_block_num": 4}),
    ("llama", "llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "boft_block_size": 8}),
    ("llama-defaults", "llama", {}),
    (
        "llama-regex-exclude",
        "llama",
        {"target_modules": r".*self_attn\.\w_proj", "exclude_modules": ["o_proj"], "boft_block_size": 16},
    ),
    (
        "llama-layers-to-transform",
        "llama",
        {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    ),
]
BUTTERFLY_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("mlp-2-factors", "mlp", {"target_modules": ["fc1", "fc2"], "boft_n_butterfly_factor": 2}),
    (
        "mlp-3-factors",
        "mlp",
        {"target_modules": ["fc1", "fc2"], "boft_block_size": 2, "boft_n_butterfly_factor": 3},
    ),
    (
        "conv-2-factors",
        "convnet",
        {"target_modules": CONV_TARGETS, "boft_block_size": 2, "boft_n_butterfly_factor": 2},
    ),
    (
        "llama-3-factors",
        "llama",
        {"target_modules": ["q_proj", "v_proj", "down_proj"], "boft_n_butterfly_factor": 3},
    ),
    (
        "llama-block-num-4-factors",
        "llama",
        {
            "target_modules": ["k_proj", "up_proj"],
            "boft_block_size": 0,
            "boft_block_num": 8,
            "boft_n_butterfly_factor": 4,
        },
    ),
]
TASK = {"llama": "CAUSAL_LM", "mlp": None, "convnet": None}


def _configs(peft, name: str, options: dict[str, Any]) -> tuple[Any, CoreBOFTConfig]:
    options = {"task_type": TASK[name], "init_weights": False, **options}
    return peft.BOFTConfig(**copy.deepcopy(options)), CoreBOFTConfig(**copy.deepcopy(options))


def _saved(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = json.loads((directory / "adapter_config.json").read_text())
    return config, load_file(directory / "adapter_model.safetensors")


# The reference writes its own version and module-name lists as (unordered) sets.
_FREE_FIELDS = {"peft_version", "target_modules", "exclude_modules"}


def _assert_same_config_files(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert set(ours) == set(theirs)
    for key in set(ours) - _FREE_FIELDS:
        assert ours[key] == theirs[key], key
    for key in ("target_modules", "exclude_modules"):
        a, b = ours[key], theirs[key]
        assert (sorted(a) if isinstance(a, list) else a) == (sorted(b) if isinstance(b, list) else b), key


def _round_trip(peft, tmp_path: Path, name: str, options: dict[str, Any], label: str) -> None:
    """peft -> here -> peft with equal outputs, the same files, and merges that agree."""
    ref_config, core_config = _configs(peft, name, options)
    torch.manual_seed(3)
    reference = _quiet(lambda: peft.get_peft_model(base_model(name), ref_config)).eval()
    perturb_trainables(reference)
    expected = run(reference, name)
    assert not torch.allclose(expected, run(base_model(name), name), atol=1e-3), "the check would be trivial"

    # the same config builds the same model layout here, with the same parameter shapes
    ours_fresh = _quiet(lambda: core_get_peft_model(base_model(name), core_config))
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours_fresh.state_dict().items()} == ref_shapes

    # reference -> peft-core
    _quiet(lambda: reference.save_pretrained(tmp_path / "ref"))
    ours = _quiet(lambda: CorePeftModel.from_pretrained(base_model(name), tmp_path / "ref"))
    assert_close(f"{label}: peft->core", run(ours, name), expected)

    # peft-core -> reference
    _quiet(lambda: ours.save_pretrained(tmp_path / "core"))
    ref_json, ref_tensors = _saved(tmp_path / "ref")
    core_json, core_tensors = _saved(tmp_path / "core")
    _assert_same_config_files(core_json, ref_json)
    assert set(core_tensors) == set(ref_tensors)
    for key, value in ref_tensors.items():
        assert torch.equal(core_tensors[key], value), key
    reloaded = _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "core")).eval()
    assert_close(f"{label}: core->peft", run(reloaded, name), expected)

    # merged models agree with each other and with the unmerged output
    ours_merged = _quiet(lambda: ours.merge_and_unload())
    ref_merged = _quiet(lambda: reference.merge_and_unload())
    assert type(ours_merged) is type(ref_merged)
    assert_close(f"{label}: merged core vs merged peft", run(ours_merged, name), run(ref_merged, name))
    assert_close(f"{label}: merged vs unmerged", run(ours_merged, name), expected)


# ---------------------------------------------------------------------- files and outputs
@pytest.mark.parametrize(
    ("case", "name", "options"), SINGLE_FACTOR_CASES, ids=[c[0] for c in SINGLE_FACTOR_CASES]
)
def test_single_factor_adapters_move_both_ways(reference_without_extension, tmp_path, case, name, options):
    _round_trip(reference_without_extension, tmp_path, name, options, "1 factor")


@pytest.mark.parametrize(("case", "name", "options"), BUTTERFLY_CASES, ids=[c[0] for c in BUTTERFLY_CASES])
def test_butterfly_adapters_move_both_ways_with_the_references_extension_path(
    reference_with_extension, tmp_path, case, name, options
):
    _round_trip(reference_with_extension, tmp_path, name, options, "butterfly")


@pytest.mark.parametrize("name", ["mlp", "convnet", "llama"])
@pytest.mark.parametrize("factors", [1, 2])
def test_the_same_seed_builds_the_same_parameters(peft, monkeypatch, name, factors):
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", PureTorchBlockDiag())
    options = {
        "mlp": {"target_modules": ["fc1", "fc2"]},
        "convnet": {"target_modules": CONV_TARGETS, "boft_block_size": 2},
        "llama": {"target_modules": ["q_proj", "v_proj", "down_proj"]},
    }[name]
    ref_config, core_config = _configs(peft, name, {**options, "boft_n_butterfly_factor": factors})
    torch.manual_seed(5)
    reference = _quiet(lambda: peft.get_peft_model(base_model(name), ref_config))
    torch.manual_seed(5)
    ours = _quiet(lambda: core_get_peft_model(base_model(name), core_config))
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert set(ref_state) == set(our_state)
    for key, value in ref_state.items():
        torch.testing.assert_close(our_state[key], value, atol=0, rtol=0, msg=key)


def test_dropout_draws_the_references_blocks(reference_with_extension):
    """In training, the same seed drops the same blocks in both libraries: equal outputs."""
    peft = reference_with_extension
    options = {"target_modules": ["fc1", "fc2"], "boft_n_butterfly_factor": 2, "boft_dropout": 0.5}
    ref_config, core_config = _configs(peft, "mlp", options)
    torch.manual_seed(5)
    reference = _quiet(lambda: peft.get_peft_model(base_model("mlp"), ref_config)).train()
    torch.manual_seed(5)
    ours = _quiet(lambda: core_get_peft_model(base_model("mlp"), core_config)).train()
    for step in range(3):
        torch.manual_seed(10 + step)
        expected = run(reference, "mlp")
        torch.manual_seed(10 + step)
        assert_close("dropout in training", run(ours, "mlp"), expected)
    with torch.no_grad():
        ours.eval()
        assert not torch.allclose(run(ours, "mlp"), expected, atol=1e-4), "dropout had no effect"


# ---------------------------------------------------------------------- the reference without its extension
def test_reference_files_written_without_the_extension_load_with_its_outputs(peft, monkeypatch, tmp_path):
    """Without the extension the reference trains one factor, yet writes the configured factor count.

    Such a file loads here with the missing factors set to the identity (a warning says so): the
    outputs are the reference's. Re-saved here, it holds every factor; the reference reads that
    file only on its extension path (without the extension it builds one factor and refuses it).
    """
    import peft.tuners.boft.layer as boft_layer

    name = "mlp"
    options = {"target_modules": ["fc1", "fc2"], "boft_n_butterfly_factor": 2}
    ref_config, _ = _configs(peft, name, options)
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)
    reference = _quiet(lambda: peft.get_peft_model(base_model(name), ref_config)).eval()
    perturb_trainables(reference)
    expected = run(reference, name)
    _quiet(lambda: reference.save_pretrained(tmp_path / "ref"))
    ref_json, ref_tensors = _saved(tmp_path / "ref")
    assert ref_json["boft_n_butterfly_factor"] == 2
    assert ref_tensors["base_model.model.fc1.boft_R"].shape == (1, 4, 4, 4)  # one factor only

    with pytest.warns(UserWarning, match="without its CUDA extension"):
        ours = CorePeftModel.from_pretrained(base_model(name), tmp_path / "ref")
    assert ours.base_model.model.fc1.boft_R["default"].shape == (2, 4, 4, 4)
    assert_close("peft (no extension) -> core", run(ours, name), expected)

    ours.save_pretrained(tmp_path / "core")
    with pytest.raises(RuntimeError, match="size mismatch"):
        _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "core"))
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: PureTorchBlockDiag())
    monkeypatch.setattr(boft_layer, "_FBD_CUDA", PureTorchBlockDiag())
    reloaded = _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "core")).eval()
    assert_close("core -> peft (extension)", run(reloaded, name), expected)


def test_reference_files_without_the_extension_and_an_invalid_butterfly_say_how_to_load_them(
    reference_without_extension, tmp_path
):
    """Without the extension, the reference never checks the butterfly geometry: it saves adapters
    whose config is invalid for more than one factor (here 16 features in blocks of 8 cannot take 3
    factors). Loading one here fails with an error that says what to change; with that change,
    the outputs are the reference's."""
    peft = reference_without_extension
    name = "mlp"
    ref_config, _ = _configs(
        peft, name, {"target_modules": ["fc1"], "boft_block_size": 8, "boft_n_butterfly_factor": 3}
    )
    reference = _quiet(lambda: peft.get_peft_model(base_model(name), ref_config)).eval()
    perturb_trainables(reference)
    expected = run(reference, name)
    _quiet(lambda: reference.save_pretrained(tmp_path))
    with pytest.raises(ConfigError, match="set boft_n_butterfly_factor to 1 in its adapter_config.json"):
        CorePeftModel.from_pretrained(base_model(name), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "boft_n_butterfly_factor": 1}))
    ours = CorePeftModel.from_pretrained(base_model(name), tmp_path)
    assert_close("peft (no extension, invalid butterfly) -> core", run(ours, name), expected)


# ---------------------------------------------------------------------- known reference bugs
@pytest.mark.parametrize(
    "geometry",
    [
        {"padding": 2, "dilation": 2},
        {"padding": 1, "padding_mode": "reflect"},
        {"stride": (1, 2), "padding": (1, 0)},
    ],
    ids=["dilation", "padding-mode", "uneven-stride-padding"],
)
def test_reference_conv_forward_disagrees_with_its_own_merge_and_ours_does_not(
    reference_without_extension, tmp_path, geometry
):
    """The reference's unmerged Conv2d forward re-implements the convolution with only
    ``stride[0]`` and ``padding[0]``, dropping dilation, padding mode and per-axis values; its merge
    keeps the base convolution. Here both use the base convolution, so they agree, and agree with
    the reference's merged model."""
    peft = reference_without_extension
    torch.manual_seed(0)
    base = OddConvs(**geometry).eval()
    image = torch.randn(2, 4, 9, 8, generator=torch.Generator().manual_seed(1))
    options = {"target_modules": ["conv"], "boft_block_size": 4, "init_weights": False}
    reference = _quiet(lambda: peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(**options))).eval()
    perturb_trainables(reference)
    with torch.no_grad():
        ref_unmerged = reference(image)
        _quiet(lambda: reference.save_pretrained(tmp_path / "ref"))
        ref_merged = _quiet(lambda: reference.merge_and_unload())(image)
    # the reference's bug: another output size (dilation, per-axis stride/padding) or other values (padding mode)
    assert ref_unmerged.shape != ref_merged.shape or not torch.allclose(ref_unmerged, ref_merged, atol=1e-3)

    ours = _quiet(lambda: CorePeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ref")).eval()
    with torch.no_grad():
        ours_unmerged = ours(image)
        assert_close("conv geometry: core unmerged vs peft merged", ours_unmerged, ref_merged)
        ours.merge_adapter()
        assert_close("conv geometry: core merged vs unmerged", ours(image), ours_unmerged)


def test_reference_refuses_non_square_kernels_and_grouped_convs_that_work_here(reference_without_extension):
    peft = reference_without_extension
    options = {"target_modules": ["conv"], "boft_block_size": 2, "init_weights": False}
    image = torch.randn(1, 4, 6, 6)
    for conv in (nn.Conv2d(4, 4, (1, 3), padding=(0, 1)), nn.Conv2d(4, 4, 3, groups=2, padding=1)):
        model = nn.Sequential()
        model.add_module("conv", conv)
        with pytest.raises((RuntimeError, NotImplementedError)):
            reference = _quiet(
                lambda m=model: peft.get_peft_model(copy.deepcopy(m), peft.BOFTConfig(**options))
            )
            reference(image)
        ours = _quiet(lambda m=model: core_get_peft_model(copy.deepcopy(m), CoreBOFTConfig(**options))).eval()
        with torch.no_grad():
            unmerged = ours(image)
            ours.merge_adapter()
            assert_close("non-square / grouped conv: merged vs unmerged", ours(image), unmerged)


def test_reference_conv_safe_merge_lets_nan_through_and_ours_refuses(reference_without_extension):
    """The reference's Conv2d ``safe_merge`` never checks the merged filters; here it raises and
    leaves the base weights untouched."""
    peft = reference_without_extension
    options = {"target_modules": ["conv"], "boft_block_size": 4, "init_weights": False}
    torch.manual_seed(0)
    base = OddConvs(padding=1).eval()
    reference = _quiet(lambda: peft.get_peft_model(copy.deepcopy(base), peft.BOFTConfig(**options)))
    ours = _quiet(lambda: core_get_peft_model(copy.deepcopy(base), CoreBOFTConfig(**options)))
    for model in (reference, ours):
        with torch.no_grad():
            model.base_model.model.conv.boft_R["default"].view(-1)[0] = float("nan")
    _quiet(lambda: reference.merge_adapter(safe_merge=True))  # the reference's bug: no error
    assert torch.isnan(reference.base_model.model.conv.get_base_layer().weight).any()
    with pytest.raises(ValueError, match="NaN"):
        ours.merge_adapter(safe_merge=True)
    assert torch.equal(ours.base_model.model.conv.get_base_layer().weight, base.conv.weight)


def test_reference_shares_one_permutation_buffer_per_layer_and_ours_keeps_one_per_adapter(
    reference_with_extension,
):
    """The reference keeps the butterfly permutations in one ``boft_P`` buffer per layer, which
    every new adapter overwrites: adding an adapter of another block size changes the output of
    the first. Here each adapter keeps its own geometry."""
    peft = reference_with_extension
    first = {"target_modules": ["fc1", "fc2"], "boft_block_size": 2, "boft_n_butterfly_factor": 2}
    second = {**first, "boft_block_size": 4}
    ref_first, core_first = _configs(peft, "mlp", first)
    ref_second, core_second = _configs(peft, "mlp", second)
    torch.manual_seed(5)
    reference = _quiet(lambda: peft.get_peft_model(base_model("mlp"), ref_first)).eval()
    torch.manual_seed(5)
    ours = _quiet(lambda: core_get_peft_model(base_model("mlp"), core_first)).eval()
    before = run(reference, "mlp")
    assert_close("first adapter", run(ours, "mlp"), before)
    _quiet(lambda: reference.add_adapter("second", ref_second))
    _quiet(lambda: ours.add_adapter("second", core_second))
    assert not torch.allclose(run(reference, "mlp"), before, atol=1e-4)  # the reference's bug
    assert_close("first adapter after adding a second", run(ours, "mlp"), before)


# ---------------------------------------------------------------------- fields and constants
def test_config_fields_and_defaults_are_the_references(peft):
    ref_defaults = peft.BOFTConfig().to_dict()
    our_defaults = CoreBOFTConfig().to_dict()
    assert set(our_defaults) == set(ref_defaults)
    for key in set(ref_defaults) - {"peft_version", "peft_type"}:
        assert our_defaults[key] == ref_defaults[key], key
    assert our_defaults["peft_type"] == "BOFT"


@pytest.mark.parametrize(
    "options",
    [
        {"boft_block_size": 0, "boft_block_num": 0},
        {"boft_block_size": 4, "boft_block_num": 2},
        {"layers_pattern": "layers"},
    ],
)
def test_configs_the_reference_refuses_are_refused(peft, options):
    with pytest.raises(ValueError):
        peft.BOFTConfig(**options)
    with pytest.raises(ValueError):
        CoreBOFTConfig(**options)


def test_default_targets_are_the_references(peft):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_BOFT_TARGET_MODULES_MAPPING as reference
    from peft_core.plugins import get_registry

    registered = get_registry().method("BOFT").default_target_modules
    ours = {k: v if isinstance(v, str) else list(v) for k, v in registered.items()}
    assert ours == reference


def test_permutations_and_cayley_blocks_are_the_references(peft):
    from peft.tuners.boft.layer import BOFTLayer as RefLayer

    from peft_boft.butterfly import butterfly_permutation, cayley

    for n, size, factors in [(8, 2, 2), (16, 2, 4), (32, 4, 3), (24, 2, 3), (72, 2, 2)]:
        num = n // size
        for i in range(1, factors):
            expected = RefLayer.block_butterfly_perm(None, n, num // 2**i, size // 2, factors - 1)
            assert torch.equal(butterfly_permutation(n, num // 2**i, size // 2), expected)
        data = torch.randn(factors * num, size, size)
        assert torch.equal(cayley(data), RefLayer.cayley_batch(None, data))
