"""``add_weighted_adapter`` for LoRA: every combination type of the reference, exactness, refusals."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft_core import PeftModel, get_peft_model
from peft_core.hookspecs import hookimpl
from peft_core.plugins import get_registry, register_plugin
from torch import nn

from peft_lora import LoraConfig

TARGETS = ["lin", "out", "emb", "conv"]


class Net(nn.Module):
    """A Linear, an Embedding and a Conv2d (all adapted), and an unadapted head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.lin = nn.Linear(6, 8)
        self.out = nn.Linear(8, 5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        text = self.out(torch.relu(self.lin(self.emb(ids)))).mean(dim=1)
        return text + self.conv(image).mean(dim=(2, 3)).sum(dim=1, keepdim=True)


IDS = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(0))
IMAGE = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def _base() -> Net:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Net().eval()


def _random_factors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {
        k: torch.randn(v.shape, generator=generator) * 0.3 if "lora_" in k else v for k, v in state.items()
    }


def _two_adapters(ranks=(4, 4), alphas=(8, 4), **options) -> PeftModel:
    model = get_peft_model(
        _base(), LoraConfig(target_modules=TARGETS, r=ranks[0], lora_alpha=alphas[0], **options), "one"
    )
    model.add_adapter("two", LoraConfig(target_modules=TARGETS, r=ranks[1], lora_alpha=alphas[1], **options))
    model.load_state_dict(_random_factors(model.state_dict()))
    return model


def _layers(model: PeftModel):
    inner = model.base_model.model
    return [inner.lin, inner.out, inner.emb, inner.conv]


def _rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("rslora", [False, True])
def test_cat_is_exactly_the_weighted_sum_of_deltas_for_any_ranks(rslora):
    model = _two_adapters(ranks=(3, 5), alphas=(6, 2), use_rslora=rslora)
    model.add_weighted_adapter(["one", "two"], [0.7, -1.3], "mix", combination_type="cat")
    for layer in _layers(model):
        expected = 0.7 * layer.get_delta_weight("one") - 1.3 * layer.get_delta_weight("two")
        assert layer.r["mix"] == 8 and layer.scaling["mix"] == 1.0
        assert _rel_error(layer.get_delta_weight("mix"), expected) < 1e-5


def test_svd_with_enough_rank_is_exact_and_truncates_otherwise():
    model = _two_adapters(ranks=(2, 3))
    model.add_weighted_adapter(["one", "two"], [1.0, 0.5], "full", combination_type="svd", svd_rank=5)
    model.add_weighted_adapter(["one", "two"], [1.0, 0.5], "low", combination_type="svd", svd_rank=1)
    for layer in _layers(model):
        expected = layer.get_delta_weight("one") + 0.5 * layer.get_delta_weight("two")
        assert _rel_error(layer.get_delta_weight("full"), expected) < 1e-5
        matrix = layer.delta_as_matrix(layer.get_delta_weight("low"))
        assert torch.linalg.matrix_rank(matrix).item() <= 1
        best = torch.linalg.svdvals(layer.delta_as_matrix(expected))
        # Eckart-Young: the rank-1 SVD truncation is the best rank-1 approximation.
        error = (layer.delta_as_matrix(expected) - matrix).norm()
        torch.testing.assert_close(error, best[1:].norm(), rtol=1e-4, atol=1e-5)


def test_the_combined_adapter_is_a_plain_lora_that_reloads(tmp_path):
    model = _two_adapters(use_rslora=True)
    model.add_weighted_adapter(["one", "two"], [0.5, 0.5], "mix", combination_type="cat")
    config = model.peft_config["mix"]
    assert (config.r, config.lora_alpha, config.use_rslora, config.init_lora_weights) == (8, 8, False, True)
    model.set_adapter("mix")
    with torch.no_grad():
        expected = model(IDS, IMAGE)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    reloaded = PeftModel.from_pretrained(_base(), tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS, IMAGE), expected, rtol=0, atol=0)


def test_one_source_is_copied_with_its_weight_whatever_the_type():
    model = _two_adapters()
    model.add_weighted_adapter(["two"], [-2.0], "neg", combination_type="ties", density=0.1)
    for layer in _layers(model):
        torch.testing.assert_close(
            layer.get_delta_weight("neg"), -2.0 * layer.get_delta_weight("two"), rtol=1e-5, atol=1e-6
        )


def test_pissa_sources_do_not_rewrite_the_base_when_combined():
    model = get_peft_model(_base(), LoraConfig(target_modules=["lin"], r=2, init_lora_weights="pissa"), "one")
    base_weight = model.base_model.model.lin.get_base_layer().weight.detach().clone()
    model.add_weighted_adapter(["one"], [1.0], "copy_of_one")
    assert torch.equal(model.base_model.model.lin.get_base_layer().weight, base_weight)


def test_refusals_name_the_problem_and_change_nothing():
    model = _two_adapters(ranks=(2, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="needs the same rank on every layer"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix", combination_type="linear")
    with pytest.raises(TypeError, match="only apply to the SVD combination types"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix", combination_type="cat", svd_rank=2)
    with pytest.raises(ValueError, match="Unknown combination_type 'average'.*'cat', 'svd'"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix", combination_type="average")
    with pytest.raises(TypeError, match="needs density="):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix", combination_type="ties_svd")
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "two", combination_type="cat")
    assert list(model.peft_config) == ["one", "two"]
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)

    dora = get_peft_model(_base(), LoraConfig(target_modules=["lin"], use_dora=True), "one")
    dora.add_adapter("two", LoraConfig(target_modules=["lin"]))
    with pytest.raises(ValueError, match="'one' has use_dora=True"):
        dora.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix", combination_type="cat")


def test_a_registered_strategy_works_on_factors_and_through_svd():
    class Mean:
        @hookimpl
        def peft_register_combination_strategies(self, registry):
            registry.register_combination_strategy(
                "test-lora-mean",
                lambda deltas, weights, **kw: sum(w * d for d, w in zip(deltas, weights)) / 2,
            )

    if "test-lora-mean" not in get_registry().combination_strategies:
        register_plugin(Mean(), name="test-lora-strategies")
    model = _two_adapters(ranks=(3, 3))
    model.add_weighted_adapter(
        ["one", "two"], [1.0, 1.0], "averaged", combination_type="test-lora-mean_svd", svd_rank=6
    )
    model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "factors", combination_type="test-lora-mean")
    for layer in _layers(model):
        expected = (layer.get_delta_weight("one") + layer.get_delta_weight("two")) / 2
        assert _rel_error(layer.get_delta_weight("averaged"), expected) < 1e-5
        assert layer.r["factors"] == 3


# ---------------------------------------------------------------------- against the reference library
CASES = [
    ("svd", {}),
    ("cat", {}),
    ("linear", {}),
    ("ties", {"density": 0.5}),
    ("ties_svd", {"density": 0.5}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.6}),
    ("dare_linear_svd", {"density": 0.5}),
    ("dare_ties_svd", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.5}),
    ("magnitude_prune_svd", {"density": 0.4}),
    ("svd", {"svd_rank": 2, "svd_clamp": 0.9}),
]


def _reference_twin(peft, ours: PeftModel, ranks, alphas, **options):
    theirs = peft.get_peft_model(
        _base(),
        peft.LoraConfig(target_modules=TARGETS, r=ranks[0], lora_alpha=alphas[0], **options),
        adapter_name="one",
    )
    theirs.add_adapter(
        "two", peft.LoraConfig(target_modules=TARGETS, r=ranks[1], lora_alpha=alphas[1], **options)
    )
    theirs.load_state_dict(ours.state_dict())  # the same module layout and keys in both libraries
    return theirs


@pytest.mark.compat
@pytest.mark.parametrize(("combination_type", "options"), CASES, ids=[f"{c}-{sorted(o)}" for c, o in CASES])
def test_every_combination_type_gives_the_references_adapter(combination_type, options):
    peft = pytest.importorskip("peft")
    ours = _two_adapters()
    theirs = _reference_twin(peft, ours, (4, 4), (8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Both new adapters are built with the default init (the same draws), so DARE's random masks,
        # drawn after them from the global generator, are the same in both libraries.
        torch.manual_seed(1)
        ours.add_weighted_adapter(
            ["one", "two"], [0.7, -0.4], "mix", combination_type=combination_type, **options
        )
        torch.manual_seed(1)
        theirs.add_weighted_adapter(
            ["one", "two"], [0.7, -0.4], "mix", combination_type=combination_type, **options
        )
    mine = {k: v for k, v in ours.state_dict().items() if ".mix" in k}
    reference = {k: v for k, v in theirs.state_dict().items() if ".mix" in k}
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=1e-6, msg=key)
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS, IMAGE), theirs(IDS, IMAGE), rtol=0, atol=1e-5)


@pytest.mark.compat
def test_rslora_sources_are_not_inflated_as_in_the_reference(tmp_path):
    peft = pytest.importorskip("peft")
    ours = _two_adapters(use_rslora=True)
    theirs = _reference_twin(peft, ours, (4, 4), (8, 4), use_rslora=True)
    ours.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix", combination_type="cat")
    theirs.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix", combination_type="cat")
    lin_ours, lin_theirs = ours.base_model.model.lin, theirs.base_model.model.lin
    expected = lin_ours.get_delta_weight("one") + lin_ours.get_delta_weight("two")
    assert _rel_error(lin_ours.get_delta_weight("mix"), expected) < 1e-5
    # The reference keeps use_rslora with lora_alpha = r = 8 for the result: scaling sqrt(8) instead of 1.
    inflated = lin_theirs.get_delta_weight("mix")
    assert _rel_error(inflated, math.sqrt(8) * expected) < 1e-5
    # The combined file is a plain LoRA adapter, which the reference reads with our outputs.
    ours.set_adapter("mix")
    with torch.no_grad():
        mine = ours(IDS, IMAGE)
    ours.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = peft.PeftModel.from_pretrained(_base(), tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS, IMAGE), mine, rtol=0, atol=1e-6)
