"""EVA initialisation: lora_A from the principal directions of the layer inputs, ranks redistributed."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft_core import PeftModel, get_peft_model
from peft_core.errors import ConfigError
from torch import nn

from peft_lora import EvaConfig, LoraConfig, get_eva_state_dict, initialize_lora_eva_weights

PLAIN = {"forward_fn": lambda m, x: m(x), "prepare_model_inputs_fn": None, "prepare_layer_inputs_fn": None}


class TwoStreams(nn.Module):
    """``a`` reads the first 16 features, ``b`` the last 16, ``c`` the sum of their outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 12)
        self.b = nn.Linear(16, 12)
        self.c = nn.Linear(12, 6)

    def forward(self, x):
        first, second = x[:, :16].contiguous(), x[:, 16:].contiguous()
        return self.c(torch.tanh(self.a(first) + self.b(second)))


def streams(n_batches: int = 12, rows: int = 64, seed: int = 0, b_rank: int = 16) -> list[torch.Tensor]:
    """Stream a: one dominant direction; stream b: a geometric spectrum (so b deserves more rank).

    With ``b_rank`` < 16, stream b lies in a ``b_rank``-dimensional subspace.
    """
    gen = torch.Generator().manual_seed(seed)
    rot_a = torch.linalg.qr(torch.randn(16, 16, generator=gen))[0]
    rot_b = torch.linalg.qr(torch.randn(16, 16, generator=gen))[0]
    scale_a = torch.cat([torch.tensor([10.0]), 0.3 * 0.8 ** torch.arange(15.0)])
    scale_b = 3.0 * 0.8 ** torch.arange(16.0)
    scale_b[b_rank:] = 0.0
    out = []
    for _ in range(n_batches):
        a = (torch.randn(rows, 16, generator=gen) * scale_a) @ rot_a
        b = (torch.randn(rows, 16, generator=gen) * scale_b) @ rot_b
        out.append(torch.cat([a, b], dim=1))
    return out


def eva_model(rho: float = 2.0, **options) -> nn.Module:
    torch.manual_seed(0)
    config = LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=["a", "b", "c"],
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=rho, tau=0.95),
        **options,
    )
    return get_peft_model(TwoStreams(), config)


def layer(model, name):
    return model.base_model.model.get_submodule(name)


def test_lora_A_spans_the_top_principal_directions_of_the_inputs():
    model = eva_model(rho=1.0)
    data = streams(b_rank=3)  # the top-3 subspace is then exact, whichever batches EVA used
    initialize_lora_eva_weights(model, data, show_progress_bar=False, **PLAIN)
    inputs = torch.cat(data)[:, 16:]  # what layer b saw
    _, _, Vh = torch.linalg.svd(inputs - inputs.mean(0), full_matrices=False)
    A = layer(model, "b").lora_A["default"].weight.detach().double()
    # rows orthonormal, and the same subspace as the top right-singular vectors
    torch.testing.assert_close(A @ A.T, torch.eye(3, dtype=A.dtype), atol=1e-5, rtol=0)
    overlap = torch.linalg.svdvals(A @ Vh[:3].double().T)
    assert overlap.min() > 1 - 1e-5, overlap
    # the leading direction itself, up to sign (estimated from the batches seen until convergence, tau=0.95)
    assert abs(float(A[0] @ Vh[0].double())) > 0.95


def test_ranks_are_redistributed_with_their_sum_kept():
    model = eva_model(rho=2.0)
    x = streams(1, 8, seed=5)[0]
    with torch.no_grad():
        before = model(x)
    initialize_lora_eva_weights(model, streams(), show_progress_bar=False, **PLAIN)
    ranks = {n: layer(model, n).r["default"] for n in ("a", "b", "c")}
    assert sum(ranks.values()) == 3 * 3
    assert all(1 <= r <= 6 for r in ranks.values())
    assert ranks["b"] > ranks["a"]  # b's inputs spread over more directions
    config = model.peft_config["default"]
    assert config.rank_pattern == {n: r for n, r in ranks.items() if r != 3}
    # alpha follows the rank (adjust_scaling_factors), so alpha / r is the same everywhere
    assert config.alpha_pattern == {n: 6 * r / 3 for n, r in ranks.items() if r != 3}
    assert {layer(model, n).scaling["default"] for n in ranks} == {2.0}
    assert sorted(config.target_modules) == ["a", "b", "c"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)  # B is still zero


def test_saved_adapter_has_the_rank_pattern_and_reloads(tmp_path):
    model = eva_model(rho=2.0)
    initialize_lora_eva_weights(model, streams(), show_progress_bar=False, **PLAIN)
    with torch.no_grad():
        for name in ("a", "b", "c"):
            layer(model, name).lora_B["default"].weight.normal_()
    model.eval()
    x = streams(1, 8, seed=5)[0]
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["rank_pattern"]
    assert saved["eva_config"]["rho"] == 2.0 and saved["eva_config"]["tau"] == 0.95
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TwoStreams(), tmp_path).eval()
    for name in ("a", "b", "c"):
        assert layer(loaded, name).r["default"] == layer(model, name).r["default"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)


def test_state_dict_can_be_computed_on_the_plain_model_and_loaded():
    torch.manual_seed(0)
    plain = TwoStreams()
    config = LoraConfig(r=3, target_modules=["a", "b"], init_lora_weights="eva", eva_config={"rho": 1.0})
    state = get_eva_state_dict(plain, streams(), peft_config=config, show_progress_bar=False, **PLAIN)
    assert sorted(state) == ["a", "b"] and all(v.shape[0] == 3 for v in state.values())
    model = get_peft_model(plain, config)
    computed = get_eva_state_dict(model, streams(), show_progress_bar=False, **PLAIN)
    torch.testing.assert_close(computed["base_model.model.a"], state["a"])
    initialize_lora_eva_weights(model, eva_state_dict={f"base_model.model.{k}": v for k, v in state.items()})
    torch.testing.assert_close(layer(model, "a").lora_A["default"].weight, state["a"].float())


def test_whiten_divides_by_the_root_singular_values():
    base_state = get_eva_state_dict(eva_model(rho=1.0), streams(), show_progress_bar=False, **PLAIN)
    model = eva_model(rho=1.0)
    model.peft_config["default"].eva_config = {**model.peft_config["default"].eva_config, "whiten": True}
    whitened = get_eva_state_dict(model, streams(), show_progress_bar=False, **PLAIN)
    for key, components in base_state.items():
        ratio = components.norm(dim=1) / whitened[key].norm(dim=1)
        assert torch.all(ratio > 0) and not torch.allclose(ratio, torch.ones_like(ratio))


def test_rank_zero_unwraps_the_layer():
    model = eva_model(rho=2.0)
    state = get_eva_state_dict(model, streams(), show_progress_bar=False, **PLAIN)
    state["base_model.model.c"] = state["base_model.model.c"][:0]
    initialize_lora_eva_weights(model, eva_state_dict=state)
    assert type(model.base_model.model.c) is nn.Linear
    assert sorted(model.peft_config["default"].target_modules) == ["a", "b"]


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
    )
    return LlamaForCausalLM(config)


def token_batches(n: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 50, (4, 16), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 12:] = 0
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def test_language_model_with_the_default_input_functions():
    pytest.importorskip("transformers")
    config = LoraConfig(
        r=2,
        target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        init_lora_weights="eva",
        eva_config={"tau": 0.9},
    )
    model = get_peft_model(tiny_llama(), config)
    initialize_lora_eva_weights(model, token_batches(), show_progress_bar=False)
    attn = model.base_model.model.model.layers[0].self_attn
    ranks = [m.r["default"] for m in model.base_model.model.modules() if hasattr(m, "r") and "default" in m.r]
    assert sum(ranks) == 2 * 8
    # q, k and v read the same input: their components come from one PCA
    shared = min(attn.q_proj.r["default"], attn.k_proj.r["default"])
    torch.testing.assert_close(
        attn.q_proj.lora_A["default"].weight[:shared], attn.k_proj.lora_A["default"].weight[:shared]
    )


def test_refusals():
    with pytest.raises(ConfigError, match="rho"):
        EvaConfig(rho=0.5)
    with pytest.raises(ConfigError, match="tau"):
        LoraConfig(init_lora_weights="eva", eva_config={"tau": 2.0})
    with pytest.raises(ConfigError, match="unknown field"):
        LoraConfig(init_lora_weights="eva", eva_config={"rhoo": 2.0})
    model = get_peft_model(TwoStreams(), LoraConfig(r=2, target_modules=["a"]))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        initialize_lora_eva_weights(model, streams())
    model = eva_model()
    with pytest.raises(ValueError, match="dataloader"):
        initialize_lora_eva_weights(model)
    with pytest.raises(ValueError, match="empty"):
        initialize_lora_eva_weights(model, [], **PLAIN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="not EVA targets"):
            get_eva_state_dict(
                model, streams(), **{**PLAIN, "prepare_layer_inputs_fn": {"nope": lambda *a: a}}
            )


# ---------------------------------------------------------------------- the reference library
def _reference_model(peft, rho: float):
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=["a", "b", "c"],
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=rho, tau=0.95),
    )
    return peft.get_peft_model(TwoStreams(), config)


@pytest.mark.compat
@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_compat_same_state_dict_ranks_and_config_as_the_reference(rho, tmp_path):
    peft = pytest.importorskip("peft")
    ours, ref = eva_model(rho=rho), _reference_model(peft, rho)
    ours_state = get_eva_state_dict(ours, streams(), show_progress_bar=False, **PLAIN)
    ref_state = peft.get_eva_state_dict(ref, streams(), show_progress_bar=False, **PLAIN)
    assert list(ours_state) == list(ref_state)
    for key in ref_state:
        torch.testing.assert_close(ours_state[key], ref_state[key], atol=1e-6, rtol=0)
    initialize_lora_eva_weights(ours, eva_state_dict=ours_state)
    peft.initialize_lora_eva_weights(ref, eva_state_dict=ref_state)
    ours_config, ref_config = ours.peft_config["default"], ref.peft_config["default"]
    assert ours_config.rank_pattern == ref_config.rank_pattern
    assert ours_config.alpha_pattern == ref_config.alpha_pattern
    assert sorted(ours_config.target_modules) == sorted(ref_config.target_modules)

    # Our saved adapter loads in the reference with the same outputs (and the other way round).
    with torch.no_grad():
        for name in ("a", "b", "c"):
            layer(ours, name).lora_B["default"].weight.normal_()
    ours.eval()
    x = streams(1, 8, seed=5)[0]
    with torch.no_grad():
        expected = ours(x)
    ours.save_pretrained(tmp_path / "ours")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_ref = peft.PeftModel.from_pretrained(TwoStreams(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(in_ref(x), expected, atol=1e-6, rtol=0)
    ref.save_pretrained(tmp_path / "ref")
    torch.manual_seed(0)
    back = PeftModel.from_pretrained(TwoStreams(), tmp_path / "ref").eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), ref(x), atol=1e-6, rtol=0)


@pytest.mark.compat
def test_compat_language_model_state_dict_matches_the_reference():
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    ours = get_peft_model(
        tiny_llama(),
        LoraConfig(r=2, target_modules=targets, init_lora_weights="eva", eva_config={"tau": 0.9}),
    )
    ref = peft.get_peft_model(
        tiny_llama(),
        peft.LoraConfig(
            r=2, target_modules=targets, init_lora_weights="eva", eva_config=peft.EvaConfig(tau=0.9)
        ),
    )
    ours_state = get_eva_state_dict(ours, token_batches(), show_progress_bar=False)
    ref_state = peft.get_eva_state_dict(ref, token_batches(), show_progress_bar=False)
    assert {k: v.shape for k, v in ours_state.items()} == {k: v.shape for k, v in ref_state.items()}
    for key in ref_state:
        torch.testing.assert_close(ours_state[key], ref_state[key], atol=1e-5, rtol=0)
