"""CorDA initialisation: covariance-weighted decomposition, residual base, conversion to plain LoRA."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft_core import PeftModel, get_peft_model
from peft_core.errors import ConfigError
from torch import nn

from peft_lora import CordaConfig, LoraConfig, preprocess_corda

X = torch.randn(6, 12, generator=torch.Generator().manual_seed(3))


def base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))


def samples(n: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(32, 12, generator=gen) for _ in range(n)]


def corda_config(method: str = "ipm", **options) -> LoraConfig:
    return LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=["0", "2"],
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=method, **options),
    )


def corda_model(method: str = "ipm", model: nn.Module | None = None, **options) -> nn.Module:
    model = base() if model is None else model
    config = corda_config(method, **options)
    preprocess_corda(model, config, run_model=lambda: [model(x) for x in samples()])
    return get_peft_model(model, config)


def train_a_little(model: nn.Module) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(X).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_output_unchanged_and_residual_plus_BA_is_W(method):
    original = base()
    with torch.no_grad():
        expected = original(X)
    model = corda_model(method)
    with torch.no_grad():
        torch.testing.assert_close(model(X), expected, atol=1e-5, rtol=0)
    for index, ref in ((0, original[0]), (2, original[2])):
        layer = model.base_model.model[index]
        torch.testing.assert_close(
            layer.base_layer.weight + layer.get_delta_weight("default"), ref.weight, atol=1e-5, rtol=0
        )
        assert not hasattr(layer.base_layer, "eigens")  # consumed by the init


def _covariance(inputs: list[torch.Tensor]) -> torch.Tensor:
    scaled = [x / x.max().abs() for x in inputs]
    return sum(x.T @ x for x in scaled) / len(scaled)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_factors_are_the_covariance_weighted_decomposition(method):
    model = base()
    weight = model[0].weight.detach().clone()
    config = corda_config(method)
    preprocess_corda(model, config, run_model=lambda: [model(x) for x in samples()])
    eigens = model[0].eigens
    covariance = _covariance(samples())
    damped = covariance + torch.eye(12) * covariance.diagonal().mean() * 0.01
    S_all = torch.linalg.svdvals(weight @ damped)
    expected_S = S_all[:3] if method == "ipm" else S_all[-3:]
    torch.testing.assert_close(eigens.S_WC, expected_S, atol=1e-4, rtol=1e-5)
    # W C = U S V^T, stored V is C^-1 V: so W = U S V_stored^T exactly on the full decomposition
    torch.testing.assert_close(eigens.U_WC.T @ eigens.U_WC, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        (eigens.U_WC * eigens.S_WC) @ (damped @ eigens.V_WC).T,
        eigens.U_WC @ eigens.U_WC.T @ weight @ damped,
        atol=1e-4,
        rtol=1e-4,
    )


def test_cache_and_covariance_files_are_reused(tmp_path):
    cache, covariance = str(tmp_path / "c" / "cache.pt"), str(tmp_path / "c" / "cov.pt")
    first = base()
    config = corda_config(cache_file=cache, covariance_file=covariance)
    preprocess_corda(first, config, run_model=lambda: [first(x) for x in samples()])
    second = base()
    preprocess_corda(second, config)  # from the cache, no run_model
    only_covariance = base()
    preprocess_corda(only_covariance, corda_config(covariance_file=covariance))
    for other in (second, only_covariance):
        for part in ("S_WC", "U_WC", "V_WC"):
            torch.testing.assert_close(getattr(other[2].eigens, part), getattr(first[2].eigens, part))


def test_conversion_to_plain_lora_loads_on_the_untouched_base(tmp_path):
    model = corda_model()
    model.peft_config["default"].init_lora_weights = True  # saved as-is: the init must not rerun on load
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = "corda"
    train_a_little(model)
    model.eval()
    with torch.no_grad():
        trained = model(X)
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "initial")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = PeftModel.from_pretrained(base(), tmp_path / "plain").eval()
    assert plain.peft_config["default"].r == 6 and plain.peft_config["default"].init_lora_weights is True
    with torch.no_grad():
        torch.testing.assert_close(plain(X), trained, atol=1e-5, rtol=0)


def test_saved_corda_adapter_loads_on_the_residual_base(tmp_path):
    model = corda_model()
    train_a_little(model)
    model.eval()
    with torch.no_grad():
        trained = model(X)
    model.save_pretrained(tmp_path)
    residual = copy.deepcopy(model.get_base_model())
    for index in (0, 2):
        setattr(residual, str(index), copy.deepcopy(model.base_model.model[index].base_layer))
    loaded = PeftModel.from_pretrained(residual, tmp_path).eval()  # no eigens needed: the init is skipped
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), trained, atol=1e-6, rtol=0)


def test_gpt2_conv1d_layers():
    transformers = pytest.importorskip("transformers")
    GPT2Config, GPT2Model = transformers.GPT2Config, transformers.GPT2Model

    torch.manual_seed(0)
    gpt = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16)).eval()
    ids = torch.randint(0, 40, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = gpt(ids).last_hidden_state
    config = LoraConfig(
        r=2, target_modules=["c_attn", "c_fc"], init_lora_weights="corda", fan_in_fan_out=True
    )
    preprocess_corda(gpt, config, run_model=lambda: [gpt(ids), gpt(ids.flip(1))])
    model = get_peft_model(gpt, config)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, expected, atol=1e-4, rtol=0)


def test_refusals():
    with pytest.raises(ConfigError, match="'ipm' or 'kpm'"):
        CordaConfig(corda_method="xyz")
    with pytest.raises(ConfigError, match="preprocess_corda"):
        get_peft_model(base(), corda_config())
    model = base()
    with pytest.raises(ValueError, match="run_model"):
        preprocess_corda(model, corda_config())
    big = LoraConfig(r=11, target_modules=["0"], init_lora_weights="corda")
    with pytest.raises(ConfigError, match="min\\(out, in\\)"):
        preprocess_corda(model, big, run_model=lambda: model(X))


# ---------------------------------------------------------------------- the reference library
@pytest.mark.compat
@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_compat_same_decomposition_factors_and_residual_as_the_reference(method, tmp_path):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.config import CordaConfig as RefCordaConfig
    from peft.tuners.lora.corda import preprocess_corda as ref_preprocess

    ours = corda_model(method)
    ref_base = base()
    ref_config = peft.LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=["0", "2"],
        init_lora_weights="corda",
        corda_config=RefCordaConfig(corda_method=method),
    )
    ref_preprocess(ref_base, ref_config, run_model=lambda: [ref_base(x) for x in samples()])
    ref = peft.get_peft_model(ref_base, ref_config)
    for index in (0, 2):
        mine, theirs = ours.base_model.model[index], ref.base_model.model[index]
        for attr in ("lora_A", "lora_B"):
            torch.testing.assert_close(
                getattr(mine, attr)["default"].weight,
                getattr(theirs, attr)["default"].weight,
                atol=1e-6,
                rtol=0,
            )
        torch.testing.assert_close(mine.base_layer.weight, theirs.base_layer.weight, atol=1e-6, rtol=0)

    # The plain-LoRA conversion loads in the reference on the untouched base, with the trained outputs.
    ours.peft_config["default"].init_lora_weights = True
    ours.save_pretrained(tmp_path / "initial")
    ours.peft_config["default"].init_lora_weights = "corda"
    train_a_little(ours)
    ours.eval()
    with torch.no_grad():
        trained = ours(X)
    ours.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "initial")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_ref = peft.PeftModel.from_pretrained(base(), tmp_path / "plain").eval()
    with torch.no_grad():
        torch.testing.assert_close(in_ref(X), trained, atol=1e-5, rtol=0)
