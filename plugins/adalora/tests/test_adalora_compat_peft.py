"""Equivalence with the reference library (``peft``): AdaLoRA files move both ways, training agrees.

On tiny models (an MLP, a conv net, a tiny Llama and a tiny GPT-2 built from configs; no
downloads), so that no check is trivial:

* the same seed and config build the same factors (the init draws in the same order);
* an adapter saved by ``peft`` (perturbed, non-identity weights) loads here with the same outputs,
  and the adapter re-saved here loads in ``peft`` with the same outputs; both write the same
  tensor keys and ``adapter_config.json`` fields; merged outputs equal unmerged ones in both;
* the same training run (seed, data, Adam, ``update_and_allocate`` every step) gives the same
  budget schedule, the same rank pattern at every step and the same parameters, including the
  orthogonality penalty in the loss; the pruned adapter files then load both ways.

Outputs are compared with ``atol=1e-5`` (float32); the implementations use the same operations in
the same order, so the measured differences are 0 (printed in the summary).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from peft_core import PeftModel as CorePeftModel
from peft_core import get_peft_model as core_get_peft_model
from safetensors.torch import load_file
from torch import nn

from peft_adalora import AdaLoraConfig as CoreAdaLoraConfig

pytestmark = pytest.mark.compat

VOCAB = 48
ATOL = 1e-5


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _record_diffs(max_abs_diffs):
    global MAX_DIFFS
    MAX_DIFFS = max_abs_diffs


MAX_DIFFS: dict[str, float] = {}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    """``assert_close`` that records the largest difference per check (printed in the summary)."""
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    MAX_DIFFS[name] = max(MAX_DIFFS.get(name, 0.0), diff)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


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
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_s = nn.Conv2d(6, 4, 2, stride=2)
        self.lin = nn.Linear(4, 5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.conv_s(torch.tanh(self.conv(image)))).mean(dim=(2, 3)))


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return MLP()
    if name == "convnet":
        return ConvNet()
    import transformers as tf

    if name == "llama":
        config = tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
        )
        return tf.LlamaForCausalLM(config)
    if name == "gpt2":
        config = tf.GPT2Config(
            n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        return tf.GPT2LMHeadModel(config)
    raise ValueError(name)


def _inputs(name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name in ("llama", "gpt2"):
        return {"input_ids": torch.randint(1, VOCAB, (2, 7), generator=g)}
    if name == "mlp":
        return {"x": torch.randn(3, 12, generator=g)}
    return {"image": torch.randn(2, 3, 6, 6, generator=g)}


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
    """Stand-in for training on top of the identity init: moves every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        if param.requires_grad:
            param.add_(0.3 * torch.randn(param.shape, generator=g))


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _saved(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = json.loads((directory / "adapter_config.json").read_text())
    return config, load_file(directory / "adapter_model.safetensors")


# The reference writes its own version, writes module-name lists as (unordered) sets, and rewrites
# fan_in_fan_out to fit the layer type (peft-core corrects it per layer without touching the config).
_FREE_FIELDS = {"peft_version", "target_modules", "exclude_modules", "fan_in_fan_out"}


def _assert_same_config_files(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert set(ours) == set(theirs)
    for key in set(ours) - _FREE_FIELDS:
        assert ours[key] == theirs[key], key
    for key in ("target_modules", "exclude_modules"):
        a, b = ours[key], theirs[key]
        assert (sorted(a) if isinstance(a, list) else a) == (sorted(b) if isinstance(b, list) else b), key


# ---------------------------------------------------------------------- the configurations
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("mlp", "mlp", {"target_modules": ["fc1", "fc2"], "init_r": 6, "lora_alpha": 16}),
    ("mlp-dropout-regex", "mlp", {"target_modules": r"fc\d", "lora_dropout": 0.1, "init_r": 3}),
    (
        "mlp-alpha-0-bias",
        "mlp",
        {"target_modules": ["fc1", "head"], "lora_alpha": 0, "init_r": 4, "bias": "lora_only"},
    ),
    ("convnet", "convnet", {"target_modules": ["conv", "conv_s"], "init_r": 5}),
    ("llama-defaults", "llama", {"init_r": 4}),
    (
        "llama-modules-to-save",
        "llama",
        {
            "target_modules": ["q_proj", "down_proj"],
            "modules_to_save": ["lm_head"],
            "init_r": 8,
            "bias": "lora_only",
        },
    ),
    ("gpt2-defaults", "gpt2", {"fan_in_fan_out": True, "init_r": 4}),
    ("gpt2-conv1d", "gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "init_r": 3}),
]
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "mlp": None, "convnet": None}


def _configs(peft, name: str, options: dict[str, Any]) -> tuple[Any, CoreAdaLoraConfig]:
    options = {"task_type": TASK[name], "total_step": 50, "target_r": 2, **options}
    return (
        _quiet(lambda: peft.AdaLoraConfig(**copy.deepcopy(options))),
        _quiet(lambda: CoreAdaLoraConfig(**copy.deepcopy(options))),
    )


# ---------------------------------------------------------------------- building and files
@pytest.mark.parametrize(("case", "name", "options"), CASES, ids=[c[0] for c in CASES])
def test_the_same_seed_builds_the_same_factors(peft, case, name, options):
    ref_config, core_config = _configs(peft, name, {**options, "init_lora_weights": False})
    ref_base, our_base = base_model(name), base_model(name)  # built before seeding: building draws too
    torch.manual_seed(5)
    reference = _quiet(lambda: peft.get_peft_model(ref_base, ref_config))
    torch.manual_seed(5)
    ours = _quiet(lambda: core_get_peft_model(our_base, core_config))
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert set(ref_state) == set(our_state)
    for key, value in ref_state.items():
        torch.testing.assert_close(our_state[key], value, atol=0, rtol=0, msg=key)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in reference.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize(("case", "name", "options"), CASES, ids=[c[0] for c in CASES])
def test_adapter_files_move_both_ways_with_equal_outputs(peft, tmp_path, case, name, options):
    ref_config, core_config = _configs(peft, name, options)
    ref_base = base_model(name)
    torch.manual_seed(3)
    reference = _quiet(lambda: peft.get_peft_model(ref_base, ref_config)).eval()
    perturb_trainables(reference)
    expected = run(reference, name)
    assert not torch.allclose(expected, run(base_model(name), name), atol=1e-3), "the check would be trivial"

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


def test_a_second_inference_adapter_moves_both_ways(peft, tmp_path):
    name = "llama"
    first = {"target_modules": ["q_proj", "v_proj"], "init_r": 4}
    second = {"target_modules": ["k_proj", "up_proj"], "init_r": 3, "inference_mode": True}
    ref_first, _ = _configs(peft, name, first)
    ref_second, _ = _configs(peft, name, second)
    torch.manual_seed(4)
    reference = _quiet(lambda: peft.get_peft_model(base_model(name), ref_first))
    reference.add_adapter("other", ref_second)
    for param in reference.parameters():  # let perturb_trainables reach the inference-mode adapter too
        param.requires_grad_(False)
    for n, param in reference.named_parameters():
        param.requires_grad_("lora_" in n)
    perturb_trainables(reference, seed=6)
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
        assert_close("two adapters peft->core", run(ours, name), expected[adapter])
    _quiet(lambda: ours.save_pretrained(tmp_path / "core"))
    back = _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "core"))
    _quiet(lambda: back.load_adapter(tmp_path / "core" / "other", adapter_name="other"))
    back.eval()
    for adapter in ("default", "other"):
        back.set_adapter(adapter)
        assert_close("two adapters core->peft", run(back, name), expected[adapter])


# ---------------------------------------------------------------------- training with rank allocation
SCHEDULE = {"init_r": 6, "target_r": 2, "tinit": 3, "tfinal": 4, "total_step": 16, "deltaT": 2}


def _train(make_model: Callable[[], Any], name: str, steps: int) -> tuple[Any, list, list]:
    """Adam with update_and_allocate every step; the budget and rank pattern after each step."""
    torch.manual_seed(11)
    model = make_model()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    g = torch.Generator().manual_seed(12)
    budgets, patterns = [], []
    for step in range(steps):
        if name == "llama":
            ids = torch.randint(1, VOCAB, (4, 8), generator=g)
            loss = model(input_ids=ids, labels=ids).loss  # with the orthogonality penalty
        else:
            x = torch.randn(16, 12, generator=g)
            loss = (model(x=x) - torch.sin(x[:, :4])).pow(2).mean()
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        budgets.append(model.base_model.rankallocator.budget_schedule(step))
        pattern = model.peft_config["default"].rank_pattern
        patterns.append(
            None if pattern is None else {k.replace(".default", ""): list(v) for k, v in pattern.items()}
        )
    return model.eval(), budgets, patterns


@pytest.mark.parametrize(
    ("name", "targets"),
    [("mlp", ["fc1", "fc2", "head"]), ("llama", ["q_proj", "v_proj", "down_proj"])],
)
def test_the_same_training_run_allocates_the_same_ranks(peft, tmp_path, name, targets):
    options = {**SCHEDULE, "target_modules": targets, "task_type": TASK[name]}
    ref_config = _quiet(lambda: peft.AdaLoraConfig(**options))
    core_config = _quiet(lambda: CoreAdaLoraConfig(**options))
    steps = SCHEDULE["total_step"]
    ref_base, our_base = base_model(name), base_model(name)
    reference, ref_budgets, ref_patterns = _train(
        lambda: _quiet(lambda: peft.get_peft_model(ref_base, ref_config)), name, steps
    )
    ours, budgets, patterns = _train(
        lambda: _quiet(lambda: core_get_peft_model(our_base, core_config)), name, steps
    )
    assert budgets == ref_budgets
    assert patterns == ref_patterns
    final = patterns[-1]
    assert any(not all(mask) for mask in final.values()), "the run pruned nothing; the check would be trivial"
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert set(ref_state) == set(our_state)
    for key, value in ref_state.items():
        assert_close("trained parameters", our_state[key], value)
    expected = run(reference, name)
    assert_close("trained outputs", run(ours, name), expected)

    # the pruned adapter files: same shapes, and each library reads the other's
    _quiet(lambda: reference.save_pretrained(tmp_path / "ref"))
    _quiet(lambda: ours.save_pretrained(tmp_path / "core"))
    ref_json, ref_tensors = _saved(tmp_path / "ref")
    core_json, core_tensors = _saved(tmp_path / "core")
    _assert_same_config_files(core_json, ref_json)
    assert core_json["rank_pattern"] == final
    assert {k: tuple(v.shape) for k, v in core_tensors.items()} == {
        k: tuple(v.shape) for k, v in ref_tensors.items()
    }
    for key, value in ref_tensors.items():
        assert_close("pruned tensors", core_tensors[key], value)
    into_core = _quiet(lambda: CorePeftModel.from_pretrained(base_model(name), tmp_path / "ref"))
    assert_close("pruned peft->core", run(into_core, name), expected)
    into_peft = _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "core")).eval()
    assert_close("pruned core->peft", run(into_peft, name), expected)
    assert_close(
        "pruned merged vs unmerged", run(_quiet(lambda: into_core.merge_and_unload()), name), expected, 1e-4
    )


def test_the_orthogonality_penalty_is_the_references(peft):
    # With a task type: the reference's plain PeftModel (task_type=None) calls the base model directly and so
    # never adds the penalty, while peft-core adds it for every task class (a documented difference).
    name = "llama"
    options = {
        "target_modules": ["q_proj", "v_proj"],
        "init_r": 4,
        "total_step": 10,
        "orth_reg_weight": 0.3,
        "task_type": "CAUSAL_LM",
    }
    ref_base, our_base = base_model(name), base_model(name)
    torch.manual_seed(9)
    reference = _quiet(lambda: peft.get_peft_model(ref_base, peft.AdaLoraConfig(**options)))
    torch.manual_seed(9)
    ours = _quiet(lambda: core_get_peft_model(our_base, CoreAdaLoraConfig(**options)))
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(input_ids=ids, labels=ids).loss
        plain = base_model(name)(input_ids=ids, labels=ids).loss
    assert expected > plain + 0.1, "the penalty would not be checked"
    assert_close("loss with the penalty", ours(input_ids=ids, labels=ids).loss.detach(), expected)


# ---------------------------------------------------------------------- the config
def test_every_reference_config_field_exists_here_with_the_same_default(peft):
    ours = {a.name for a in attrs.fields(CoreAdaLoraConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.AdaLoraConfig) if f.init}
    assert theirs == ours
    ref_defaults = peft.AdaLoraConfig(total_step=10).to_dict()
    our_defaults = CoreAdaLoraConfig(total_step=10).to_dict()
    assert set(our_defaults) == set(ref_defaults)
    for key in set(ref_defaults) - {"peft_version", "peft_type"}:
        assert our_defaults[key] == ref_defaults[key], key


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"total_step": 0},
        {"total_step": 10, "tinit": 5, "tfinal": 5},
        {"total_step": 10, "use_dora": True},
        {"total_step": 10, "orth_reg_weight": -1.0},
    ],
)
def test_configs_the_reference_refuses_are_refused_here(peft, options):
    with pytest.raises(ValueError):
        peft.AdaLoraConfig(**options)
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        CoreAdaLoraConfig(**options)


def test_default_targets_are_the_references(peft):
    from peft.utils import TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING as reference

    from peft_adalora.default_targets import DEFAULT_TARGET_MODULES, DEFAULT_TARGET_REGEXES

    ours: dict[str, Any] = {k: list(v) for k, v in DEFAULT_TARGET_MODULES.items()}
    ours.update(DEFAULT_TARGET_REGEXES)
    assert ours == reference
