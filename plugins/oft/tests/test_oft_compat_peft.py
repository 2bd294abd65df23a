"""Equivalence with the reference library (``peft``): OFT adapter files move both ways, outputs agree.

On tiny models (an MLP, a conv net with an embedding, a tiny Llama built from a config; no
downloads) and with random (non-identity) rotations, so that no check is trivial:

* the same seed and config build the same parameters (the init draws in the same order);
* an adapter saved by ``peft`` loads here with the same outputs, and one saved here loads in
  ``peft`` with the same outputs; both write the same tensor keys and shapes; merging gives the
  same weights in both;
* where the reference is wrong, a test shows the difference and that peft-core is right: its
  Conv2d forward disagrees with its own merged weight once the output is larger than 1x1, and
  it merges several active adapters in an order that disagrees with its forward.

Float32 throughout; outputs agree within ``ATOL = 1e-5`` (the two libraries order the same float32
products differently; the measured differences are about 1e-7, printed at the end of the run).
The reference is imported inside a fixture, so this module is collected (and deselected with
``-m "not compat"``) in environments without it.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft_core import PeftModel as CorePeftModel
from peft_core import get_peft_model as core_get_peft_model
from peft_core import get_peft_model_state_dict as core_state_dict
from safetensors.torch import load_file
from torch import nn

from peft_oft import OFTConfig as CoreOFTConfig
from peft_oft.rotation import adjust_to_divisor

pytestmark = [
    pytest.mark.compat,
    # block sizes moved to a divisor (both libraries say so), and the reference's embedding-layer saving
    pytest.mark.filterwarnings("ignore:.*does not divide:UserWarning"),
    pytest.mark.filterwarnings("ignore:Invalid `(r|oft_block_size)`:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*match no model parameter and were ignored:UserWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

VOCAB = 64
ATOL = 1e-5
MAX_DIFFS: dict[str, float] = {}


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _record_diffs(max_abs_diffs):
    global MAX_DIFFS
    MAX_DIFFS = max_abs_diffs


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    diff = (
        (actual.detach().double() - expected.detach().double()).abs().max().item() if actual.numel() else 0.0
    )
    MAX_DIFFS[what] = max(MAX_DIFFS.get(what, 0.0), diff)
    assert actual.shape == expected.shape, f"{what}: shapes {actual.shape} vs {expected.shape}"
    assert diff <= atol, f"{what}: max abs diff {diff:.3e} > {atol:.0e}"


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
    """An embedding, 1x1 convs, and a 3x3 conv whose output is 1x1 (where the reference's conv
    forward is right; larger outputs are the subject of a separate test)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv1x1 = nn.Conv2d(6, 8, 1)
        self.conv1x1_b = nn.Conv2d(8, 4, 1, bias=False)
        self.conv3 = nn.Conv2d(4, 5, 3)
        self.lin = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids)  # (batch, 9, 6)
        image = e.transpose(1, 2).reshape(ids.shape[0], 6, 3, 3)
        h = self.conv1x1_b(torch.tanh(self.conv1x1(image)))  # (batch, 4, 3, 3)
        out = self.conv3(torch.tanh(h))  # (batch, 5, 1, 1)
        return torch.cat([h.flatten(1), self.lin(out.flatten(1))], dim=1)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        import transformers as tf

        config = tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
        )
        return tf.LlamaForCausalLM(config)
    return {"mlp": MLP, "convnet": ConvNet}[name]()


def _inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name == "llama":
        return {"input_ids": torch.randint(1, VOCAB, (2, 7), generator=g)}
    if name == "mlp":
        return {"x": torch.randn(3, 12, generator=g)}
    return {"ids": torch.randint(0, 10, (2, 9), generator=g)}


TARGETS = {
    "mlp": ["fc1", "fc2"],
    "convnet": ["emb", "conv1x1", "conv1x1_b", "conv3", "lin"],
    "llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
}

_BASES: dict[str, nn.Module] = {}


def base_model(name: str) -> nn.Module:
    if name not in _BASES:
        with torch.random.fork_rng():  # building draws random weights: leave the caller's stream alone
            _BASES[name] = _build(name).eval()
    return copy.deepcopy(_BASES[name])


def _output(model: nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**_inputs(name))
    return out.logits if hasattr(out, "logits") else out


VARIANTS: dict[str, dict[str, Any]] = {
    "block_size": {"oft_block_size": 4},
    "block_size_adjusted": {"oft_block_size": 5},  # divides none of the sizes: moved per layer
    "rank": {"r": 2, "oft_block_size": 0},
    "exact_cayley": {"oft_block_size": 4, "use_cayley_neumann": False},
    "neumann_3_terms": {"oft_block_size": 4, "num_cayley_neumann_terms": 3},
    "coft": {"oft_block_size": 4, "coft": True, "eps": 0.05},
    "block_share": {"oft_block_size": 4, "block_share": True},
}
CASES = [(m, v) for m in ("mlp", "convnet") for v in VARIANTS] + [("llama", "block_size"), ("llama", "coft")]


def _kwargs(model_name: str, variant: str) -> dict[str, Any]:
    return {"target_modules": TARGETS[model_name], "init_weights": False} | VARIANTS[variant]


def _pair(peft, model_name: str, variant: str, seed: int = 3) -> tuple[nn.Module, nn.Module]:
    """The same adapter built by both libraries from the same seed."""
    kwargs = _kwargs(model_name, variant)
    their_base, our_base = base_model(model_name), base_model(model_name)  # building seeds; build first
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(their_base, peft.OFTConfig(**kwargs)).eval()
    torch.manual_seed(seed)
    ours = core_get_peft_model(our_base, CoreOFTConfig(**kwargs)).eval()
    return theirs, ours


def _adapter_keys(state: dict[str, torch.Tensor]) -> set[str]:
    """Keys of adapter tensors. With an embedding layer among the targets, the reference also saves the
    base embedding weights (``...embed_tokens.base_layer.weight``, its ``save_embedding_layers="auto"``),
    which peft-core's core does not write; loading either way does not need them (the base has them)."""
    return {k for k in state if ".oft_" in k}


def _ids(case: tuple[str, str]) -> str:
    return "-".join(case)


# ---------------------------------------------------------------------- same init, same outputs
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_same_seed_builds_the_same_adapter_and_outputs(peft, case):
    model_name, variant = case
    theirs, ours = _pair(peft, model_name, variant)
    their_sd, our_sd = peft.get_peft_model_state_dict(theirs), core_state_dict(ours)
    assert _adapter_keys(their_sd) == set(our_sd)
    for key in our_sd:
        value = their_sd[key]
        assert our_sd[key].shape == value.shape, key
        assert torch.equal(our_sd[key], value), key
    _close(_output(ours, model_name), _output(theirs, model_name), "forward")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_peft_adapter_loads_here_with_equal_outputs(peft, case, tmp_path):
    model_name, variant = case
    theirs, _ = _pair(peft, model_name, variant, seed=11)
    expected = _output(theirs, model_name)
    theirs.save_pretrained(tmp_path)
    loaded = CorePeftModel.from_pretrained(base_model(model_name), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], CoreOFTConfig)
    _close(_output(loaded, model_name), expected, "peft -> peft-core")
    saved = load_file(tmp_path / "adapter_model.safetensors")
    ours = core_state_dict(loaded)
    assert set(ours) == _adapter_keys(saved)
    for key, value in ours.items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_adapter_saved_here_loads_in_peft_with_equal_outputs(peft, case, tmp_path):
    model_name, variant = case
    _, ours = _pair(peft, model_name, variant, seed=12)
    expected = _output(ours, model_name)
    ours.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "OFT" and "oft_block_size" in data
    loaded = peft.PeftModel.from_pretrained(base_model(model_name), tmp_path).eval()
    # before any forward: the reference's COFT forward overwrites the parameters with their projection
    their_sd = peft.get_peft_model_state_dict(loaded)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert _adapter_keys(their_sd) == set(saved)
    for key, value in saved.items():
        assert torch.equal(their_sd[key], value), key
    _close(_output(loaded, model_name), expected, "peft-core -> peft")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_merging_gives_the_references_weights_and_the_unmerged_outputs(peft, case):
    model_name, variant = case
    theirs, ours = _pair(peft, model_name, variant, seed=5)
    unmerged = _output(ours, model_name)
    their_merged = theirs.merge_and_unload()
    our_merged = ours.merge_and_unload()
    _close(_output(our_merged, model_name), unmerged, "merged vs unmerged")
    _close(_output(our_merged, model_name), _output(their_merged, model_name), "merged vs peft merged")
    their_state = their_merged.state_dict()
    for key, value in our_merged.state_dict().items():
        _close(value, their_state[key], "merged weights vs peft")


def test_adapters_trained_with_the_same_steps_stay_equal(peft):
    """Gradients agree, including through COFT's projection (projected gradient descent in both)."""
    theirs, ours = _pair(peft, "mlp", "coft", seed=21)
    x, target = torch.randn(16, 12), torch.randn(16, 4)
    for model in (theirs, ours):
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
        for _ in range(5):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x=x), target).backward()
            optimizer.step()
        model.eval()
    their_sd, our_sd = peft.get_peft_model_state_dict(theirs), core_state_dict(ours)
    for key in their_sd:
        # after the last step neither has projected yet; compare the rotations both will use
        _close(our_sd[key], their_sd[key], "trained parameters")
    _close(_output(ours, "mlp"), _output(theirs, "mlp"), "trained forward")


# ---------------------------------------------------------------------- where peft is wrong
def test_conv2d_forward_matches_its_merged_weight_for_outputs_larger_than_1x1(peft):
    """The reference's Conv2d forward rotates overlapping input patches and sums them back
    (``unfold``/``fold``), which is not the convolution with its merged kernel once the output is
    larger than 1x1. peft-core convolves with the rotated kernel: its forward equals its merge,
    and that merged kernel is the reference's."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    kwargs = {"target_modules": ["0"], "oft_block_size": 9, "init_weights": False}
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.OFTConfig(**kwargs)).eval()
    torch.manual_seed(1)
    ours = core_get_peft_model(copy.deepcopy(base), CoreOFTConfig(**kwargs)).eval()
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        their_unmerged, our_unmerged = theirs(x), ours(x)
        their_merged_model, our_merged_model = theirs.merge_and_unload(), ours.merge_and_unload()
        their_merged, our_merged = their_merged_model(x), our_merged_model(x)
    _close(our_merged_model[0].weight, their_merged_model[0].weight, "conv merged kernel vs peft")
    _close(our_unmerged, our_merged, "conv >1x1 unmerged vs merged")
    reference_gap = (their_unmerged - their_merged).abs().max().item()
    assert reference_gap > 1e-2, (
        f"the reference's conv forward now matches its merge (gap {reference_gap:.2e})"
    )
    _close(our_unmerged, their_merged, "conv >1x1 forward vs peft merged")


def test_several_active_adapters_merge_in_the_order_they_apply(peft):
    """With two active adapters the reference rotates the input by R1 then R2 but merges them as
    R2 then R1, so its merged output differs from its unmerged one; here both are R1 then R2."""
    kwargs = {"target_modules": ["fc1", "fc2"], "init_weights": False, "oft_block_size": 4}
    models = {}
    for lib, (get_model, config_cls) in {
        "theirs": (peft.get_peft_model, peft.OFTConfig),
        "ours": (core_get_peft_model, CoreOFTConfig),
    }.items():
        torch.manual_seed(2)
        model = get_model(base_model("mlp"), config_cls(**kwargs))
        torch.manual_seed(3)
        model.add_adapter("other", config_cls(**kwargs))
        model.base_model.set_adapter(["default", "other"])
        models[lib] = model.eval()
    theirs, ours = models["theirs"], models["ours"]
    their_unmerged, our_unmerged = _output(theirs, "mlp"), _output(ours, "mlp")
    _close(our_unmerged, their_unmerged, "two adapters unmerged vs peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.base_model.merge_adapter(["default", "other"])
        ours.base_model.merge_adapter(["default", "other"])
    their_gap = (_output(theirs, "mlp") - their_unmerged).abs().max().item()
    assert their_gap > 1e-3, f"the reference now merges several adapters consistently (gap {their_gap:.2e})"
    _close(_output(ours, "mlp"), our_unmerged, "two adapters merged vs unmerged")


def test_module_dropout_acts_in_training_here_but_not_in_the_reference(peft):
    """The reference builds its multiplicative dropout layer but never calls it, so its
    ``module_dropout`` has no effect; here it sets ``int(p * r)`` random blocks to the identity."""
    kwargs = {
        "target_modules": ["fc1", "fc2"],
        "init_weights": False,
        "oft_block_size": 2,
        "module_dropout": 0.5,
    }
    torch.manual_seed(4)
    theirs = peft.get_peft_model(base_model("mlp"), peft.OFTConfig(**kwargs))
    torch.manual_seed(4)
    ours = core_get_peft_model(base_model("mlp"), CoreOFTConfig(**kwargs))
    evaluated = _output(theirs.eval(), "mlp")
    _close(_output(ours.eval(), "mlp"), evaluated, "module dropout: eval outputs")
    torch.manual_seed(0)
    assert torch.equal(_output(theirs.train(), "mlp"), evaluated)
    torch.manual_seed(0)
    assert (_output(ours.train(), "mlp") - evaluated).abs().max() > 1e-3


def test_coft_evaluation_leaves_the_parameters_alone(peft):
    """The reference projects COFT parameters in place on every forward, even in evaluation;
    here only training forwards write them. Outputs agree either way."""
    theirs, ours = _pair(peft, "mlp", "coft", seed=8)
    their_before = {k: v.clone() for k, v in peft.get_peft_model_state_dict(theirs).items()}
    our_before = {k: v.clone() for k, v in core_state_dict(ours).items()}
    _close(_output(ours, "mlp"), _output(theirs, "mlp"), "coft forward")
    assert any(not torch.equal(v, their_before[k]) for k, v in peft.get_peft_model_state_dict(theirs).items())
    assert all(torch.equal(v, our_before[k]) for k, v in core_state_dict(ours).items())


# ---------------------------------------------------------------------- details of the format
def test_block_size_adjustment_follows_the_reference(peft):
    from peft.tuners.oft.layer import OFTLayer

    adjust = OFTLayer.adjust_oft_parameters
    for dim in range(1, 70):
        for value in range(1, 80):
            assert adjust_to_divisor(dim, value) == adjust(None, dim, value), (dim, value)


def test_conv_and_embedding_keys_and_shapes_are_the_references(peft):
    theirs, ours = _pair(peft, "convnet", "block_size")
    their_sd, our_sd = peft.get_peft_model_state_dict(theirs), core_state_dict(ours)
    # (blocks, b * (b - 1) / 2); block size 4 is moved to the nearest divisor of each rotated size
    expected = {
        "base_model.model.emb.oft_embedding_R.weight": (2, 3),  # 6 values: blocks of 3
        "base_model.model.conv1x1.oft_R.weight": (2, 3),  # 6 channels x 1x1
        "base_model.model.conv1x1_b.oft_R.weight": (2, 6),  # 8 channels: blocks of 4
        "base_model.model.conv3.oft_R.weight": (9, 6),  # 4 channels x 3x3 = 36: blocks of 4
        "base_model.model.lin.oft_R.weight": (1, 10),  # 5 inputs: one block of 5
    }
    assert {k: tuple(v.shape) for k, v in our_sd.items()} == expected
    assert {k: tuple(v.shape) for k, v in their_sd.items()} == expected


def test_reading_a_reference_directory_needs_no_conversion(peft, tmp_path: Path):
    theirs, _ = _pair(peft, "llama", "block_size")
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no unknown keys, no adjustment warnings
        CoreOFTConfig.from_dict(config)
