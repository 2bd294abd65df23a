"""Equivalence with the reference library (``peft``): adapter files move both ways, outputs agree.

For each configuration, on tiny transformers models built from configs (no downloads) and a
small conv model:

* an adapter trained (perturbed) and saved by ``peft`` loads in peft-core with the same outputs;
* the adapter re-saved by peft-core loads in ``peft`` with the same outputs, and both write the
  same tensor keys and the same ``adapter_config.json`` fields;
* ``merge_and_unload`` gives the same model in both libraries.

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

from peft_lora import LoraConfig as CoreLoraConfig

pytestmark = pytest.mark.compat

VOCAB = 64
ATOL = 1e-5


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


# ---------------------------------------------------------------------- tiny models
class ConvNet(nn.Module):
    """Every non-transformers layer type LoRA supports, in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.lin = nn.Linear(8, 6)
        self.conv1 = nn.Conv1d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2_1x1 = nn.Conv2d(4, 5, 1)
        self.conv3 = nn.Conv3d(2, 4, (1, 2, 2))

    def forward(self, ids, seq, image, volume):
        parts = [
            self.lin(self.emb(ids)),
            self.conv1(seq),
            self.conv2_1x1(self.conv2(image)),
            self.conv3(volume),
        ]
        return torch.cat([p.flatten(1) for p in parts], dim=1)


def _build(name: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if name == "llama":
        config = tf.LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=VOCAB,
            attention_bias=True,  # so that lora_bias and the bias modes have biases to work on
        )
        return tf.LlamaForCausalLM(config)
    if name == "gpt2":
        config = tf.GPT2Config(
            n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        return tf.GPT2LMHeadModel(config)
    if name == "bert":
        config = tf.BertConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=VOCAB,
            num_labels=3,
        )
        return tf.BertForSequenceClassification(config)
    if name == "t5":
        config = tf.T5Config(
            d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2, vocab_size=VOCAB, decoder_start_token_id=0
        )
        return tf.T5ForConditionalGeneration(config)
    if name == "convnet":
        return ConvNet()
    raise ValueError(name)


def _inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 7), generator=g)
    if name in ("llama", "gpt2"):
        return {"input_ids": ids}
    if name == "bert":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, VOCAB, (2, 5), generator=g)}
    return {
        "ids": ids,
        "seq": torch.randn(2, 3, 7, generator=g),
        "image": torch.randn(2, 3, 6, 6, generator=g),
        "volume": torch.randn(2, 2, 3, 4, 4, generator=g),
    }


_BASES: dict[str, nn.Module] = {}


def base_model(name: str) -> nn.Module:
    """A fresh copy of the (cached) tiny model ``name``, in eval mode."""
    if name not in _BASES:
        with torch.random.fork_rng():  # building draws random weights: leave the caller's stream alone
            _BASES[name] = _build(name).eval()
    return copy.deepcopy(_BASES[name])


@torch.no_grad()
def run(model: nn.Module, name: str) -> torch.Tensor:
    out = model(**_inputs(name))
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def perturb_trainables(model: nn.Module, seed: int = 2) -> None:
    """Stand-in for training: move every trainable tensor, so no check is trivial."""
    g = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        if param.requires_grad:
            param.add_(0.1 * torch.randn(param.shape, generator=g))


# ---------------------------------------------------------------------- the configurations
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM", "convnet": None}
CONV_TARGETS = ["emb", "lin", "conv1", "conv2", "conv2_1x1", "conv3"]

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("llama-defaults", "llama", {}),
    ("llama-all-linear", "llama", {"target_modules": "all-linear", "init_lora_weights": False}),
    ("llama-dropout", "llama", {"target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.2}),
    (
        "llama-rslora",
        "llama",
        {"target_modules": ["q_proj", "down_proj"], "use_rslora": True, "r": 4, "lora_alpha": 7},
    ),
    ("llama-dora", "llama", {"target_modules": ["q_proj", "k_proj", "up_proj"], "use_dora": True}),
    ("llama-lora-bias", "llama", {"target_modules": ["q_proj", "v_proj"], "lora_bias": True}),
    (
        "llama-bias-all",
        "llama",
        {"target_modules": ["q_proj"], "bias": "all", "init_lora_weights": "gaussian"},
    ),
    ("llama-bias-lora-only", "llama", {"target_modules": ["q_proj"], "bias": "lora_only"}),
    (
        "llama-rank-alpha-pattern",
        "llama",
        {
            "target_modules": ["q_proj", "v_proj", "o_proj"],
            "r": 4,
            "rank_pattern": {r"layers\.0\.self_attn\.q_proj": 2, "o_proj": 6},
            "alpha_pattern": {"v_proj": 3},
        },
    ),
    ("llama-modules-to-save", "llama", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    (
        "llama-layers-to-transform",
        "llama",
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    ),
    ("llama-exclude", "llama", {"target_modules": "all-linear", "exclude_modules": ["gate_proj", "k_proj"]}),
    ("llama-regex", "llama", {"target_modules": r".*layers\.1\.mlp\.(up|down)_proj"}),
    ("llama-embedding", "llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    ("llama-embedding-dora", "llama", {"target_modules": ["embed_tokens", "v_proj"], "use_dora": True}),
    ("gpt2-conv1d", "gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    ("gpt2-defaults", "gpt2", {"fan_in_fan_out": True, "init_lora_weights": False}),
    (
        "gpt2-conv1d-dora",
        "gpt2",
        {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "use_dora": True},
    ),
    (
        "gpt2-conv1d-lora-bias",
        "gpt2",
        {"target_modules": ["c_attn"], "fan_in_fan_out": True, "lora_bias": True},
    ),
    ("gpt2-tied-embedding", "gpt2", {"target_modules": ["wte", "c_attn"], "fan_in_fan_out": True}),
    ("bert-seq-cls", "bert", {}),
    ("bert-dora-bias", "bert", {"target_modules": ["query", "dense"], "use_dora": True, "bias": "lora_only"}),
    ("t5-seq2seq", "t5", {}),
    (
        "t5-dora-rslora",
        "t5",
        {"target_modules": ["q", "k", "wi", "wo"], "use_dora": True, "use_rslora": True},
    ),
    ("conv-plain", "convnet", {"target_modules": CONV_TARGETS}),
    ("conv-dora", "convnet", {"target_modules": CONV_TARGETS, "use_dora": True, "r": 4}),
    (
        "conv-lora-bias",
        "convnet",
        {"target_modules": ["lin", "conv1", "conv2", "conv2_1x1", "conv3"], "lora_bias": True},
    ),
    (
        "conv-rslora-gaussian",
        "convnet",
        {"target_modules": CONV_TARGETS, "use_rslora": True, "init_lora_weights": "gaussian"},
    ),
]


def _configs(peft, name: str, options: dict[str, Any]) -> tuple[Any, CoreLoraConfig]:
    options = {"task_type": TASK[name], **options}
    return peft.LoraConfig(**copy.deepcopy(options)), CoreLoraConfig(**copy.deepcopy(options))


def _quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _saved(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = json.loads((directory / "adapter_config.json").read_text())
    return config, load_file(directory / "adapter_model.safetensors")


# Fields whose written value may legitimately differ: the reference writes the library version,
# stores module-name lists as (unordered) sets, and rewrites fan_in_fan_out to fit the layers.
_FREE_FIELDS = {"peft_version", "target_modules", "exclude_modules", "fan_in_fan_out"}


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

    # reference -> peft-core
    _quiet(lambda: reference.save_pretrained(tmp_path / "ref"))
    ours = _quiet(lambda: CorePeftModel.from_pretrained(base_model(name), tmp_path / "ref"))
    torch.testing.assert_close(run(ours, name), expected, atol=ATOL, rtol=0)

    # peft-core -> reference
    _quiet(lambda: ours.save_pretrained(tmp_path / "core"))
    ref_json, ref_tensors = _saved(tmp_path / "ref")
    core_json, core_tensors = _saved(tmp_path / "core")
    _assert_same_config_files(core_json, ref_json)
    # the reference also stores the base embedding when an embedding is targeted; peft-core does not
    extra = {k for k in ref_tensors if k.endswith(".base_layer.weight") and "emb" in k.lower()}
    assert set(core_tensors) == set(ref_tensors) - extra
    reloaded = _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "core")).eval()
    torch.testing.assert_close(run(reloaded, name), expected, atol=ATOL, rtol=0)

    # merged models agree (for tied weights the merged model differs from the unmerged one in
    # both libraries alike, so compare the two merged models)
    ours_merged = _quiet(lambda: ours.merge_and_unload())
    ref_merged = _quiet(lambda: reference.merge_and_unload())
    assert type(ours_merged) is type(ref_merged)
    torch.testing.assert_close(run(ours_merged, name), run(ref_merged, name), atol=1e-4, rtol=1e-4)
    if name != "gpt2" or "wte" not in str(options.get("target_modules")):
        torch.testing.assert_close(run(ours_merged, name), expected, atol=1e-4, rtol=1e-4)


def test_several_adapters_move_both_ways(peft, tmp_path):
    name = "llama"
    reference = _quiet(
        lambda: peft.get_peft_model(base_model(name), peft.LoraConfig(target_modules=["q_proj"]))
    )
    reference.add_adapter("other", peft.LoraConfig(target_modules=["v_proj", "q_proj"], use_dora=True, r=4))
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
    assert (tmp_path / "ref" / "other" / "adapter_config.json").exists()

    ours = _quiet(lambda: CorePeftModel.from_pretrained(base_model(name), tmp_path / "ref"))
    _quiet(lambda: ours.load_adapter(tmp_path / "ref" / "other", adapter_name="other"))
    for adapter in ("default", "other"):
        ours.set_adapter(adapter)
        torch.testing.assert_close(run(ours, name), expected[adapter], atol=ATOL, rtol=0)

    _quiet(lambda: ours.save_pretrained(tmp_path / "core"))
    back = _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "core"))
    _quiet(lambda: back.load_adapter(tmp_path / "core" / "other", adapter_name="other"))
    back.eval()
    for adapter in ("default", "other"):
        back.set_adapter(adapter)
        torch.testing.assert_close(run(back, name), expected[adapter], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- base-dependent inits
INITS = [
    ("pissa", "llama"),
    ("pissa", "gpt2"),
    ("pissa_niter_3", "llama"),
    ("olora", "llama"),
]


@pytest.mark.parametrize(("init", "name"), INITS, ids=[f"{i}-{n}" for i, n in INITS])
def test_base_dependent_inits_build_the_same_model(peft, init, name):
    """Same seed, same config: identical factors and residual base weights in both libraries."""
    options = {
        "target_modules": ["q_proj", "o_proj"] if name == "llama" else ["c_attn"],
        "r": 4,
        "lora_alpha": 8,
    }
    if name == "gpt2":
        options["fan_in_fan_out"] = True
    ref_config, core_config = _configs(peft, name, {**options, "init_lora_weights": init})
    base = base_model(name)
    torch.manual_seed(5)
    reference = _quiet(lambda: peft.get_peft_model(copy.deepcopy(base), ref_config)).eval()
    torch.manual_seed(5)
    ours = _quiet(lambda: core_get_peft_model(copy.deepcopy(base), core_config)).eval()
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert set(ref_state) == set(our_state)
    for key, value in ref_state.items():
        torch.testing.assert_close(our_state[key], value, atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(run(ours, name), run(base, name), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_dependent_adapters_move_with_their_residual_model(peft, tmp_path, init):
    """The reference's documented flow: save the factors with init_lora_weights=True plus the residual base."""
    name = "llama"
    ref_config, _ = _configs(
        peft, name, {"target_modules": ["q_proj", "o_proj"], "r": 4, "init_lora_weights": init}
    )
    reference = _quiet(lambda: peft.get_peft_model(base_model(name), ref_config)).eval()
    perturb_trainables(reference)
    expected = run(reference, name)
    reference.peft_config["default"].init_lora_weights = True
    _quiet(lambda: reference.save_pretrained(tmp_path / "ref"))
    residual = copy.deepcopy(reference).unload()

    ours = _quiet(lambda: CorePeftModel.from_pretrained(copy.deepcopy(residual), tmp_path / "ref"))
    torch.testing.assert_close(run(ours, name), expected, atol=ATOL, rtol=0)
    _quiet(lambda: ours.save_pretrained(tmp_path / "core"))
    back = _quiet(lambda: peft.PeftModel.from_pretrained(copy.deepcopy(residual), tmp_path / "core")).eval()
    torch.testing.assert_close(run(back, name), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_dependent_adapter_with_its_init_in_the_config_onto_the_original_base(peft, tmp_path, init):
    """Saved with init_lora_weights="pissa"/"olora": both libraries re-run the init on load, so
    loading onto the original base reproduces the trained model."""
    name = "llama"
    ref_config, _ = _configs(
        peft, name, {"target_modules": ["q_proj", "o_proj"], "r": 4, "init_lora_weights": init}
    )
    reference = _quiet(lambda: peft.get_peft_model(base_model(name), ref_config)).eval()
    perturb_trainables(reference)
    _quiet(lambda: reference.save_pretrained(tmp_path / "ref"))
    expected = run(reference, name)
    reloaded = _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "ref")).eval()
    torch.testing.assert_close(run(reloaded, name), expected, atol=ATOL, rtol=0)
    ours = _quiet(lambda: CorePeftModel.from_pretrained(base_model(name), tmp_path / "ref"))
    torch.testing.assert_close(run(ours, name), expected, atol=ATOL, rtol=0)
    _quiet(lambda: ours.save_pretrained(tmp_path / "core"))
    back = _quiet(lambda: peft.PeftModel.from_pretrained(base_model(name), tmp_path / "core")).eval()
    torch.testing.assert_close(run(back, name), expected, atol=ATOL, rtol=0)


def test_every_reference_config_field_exists_here_with_the_same_default(peft):
    import dataclasses

    import attrs

    ours = {a.name: a for a in attrs.fields(CoreLoraConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.LoraConfig) if f.init}
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    ref_defaults = peft.LoraConfig().to_dict()
    our_defaults = CoreLoraConfig().to_dict()
    for key in set(ref_defaults) - {"peft_version", "peft_type"}:
        assert our_defaults[key] == ref_defaults[key], key
    assert set(our_defaults) == set(ref_defaults)
