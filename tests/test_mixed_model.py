"""Mixed-method models (LoRA, LoHa, LoKr, IA3 on one base), checked against a dense reference.

The reference recomputes every adapted weight from the adapters' raw tensors with the papers'
formulas (no adapter code runs), composes them along each module's stack in the model's
stacking order, and runs a plain MLP with the result.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

from peft_core import PeftMixedModel, PeftModel, get_peft_model
from peft_core.errors import ConfigError
from peft_core.layer import AdapterLayer
from peft_core.plugins import get_registry

lora = pytest.importorskip("peft_lora")
loha = pytest.importorskip("peft_loha")
lokr = pytest.importorskip("peft_lokr")
ia3 = pytest.importorskip("peft_ia3")

KEYS = ("0", "2", "4")
FEEDFORWARD = "2"  # IA3 scales this module's input, the others' outputs
ATOL = 1e-5


def make_base(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 5))


def make_config(method: str, targets: list[str], seed: int = 0):
    if method == "LORA":
        return lora.LoraConfig(r=2 + seed % 2, lora_alpha=3, target_modules=targets, init_lora_weights=False)
    if method == "LOHA":
        return loha.LoHaConfig(r=2, alpha=3, target_modules=targets, init_weights=False)
    if method == "LOKR":
        return lokr.LoKrConfig(r=2, alpha=4, target_modules=targets, init_weights=False)
    ff = [t for t in targets if t == FEEDFORWARD]
    return ia3.IA3Config(target_modules=targets, feedforward_modules=ff, init_ia3_weights=False)


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------------- the dense reference
def _layer_of(model: PeftMixedModel, key: str, method: str) -> AdapterLayer:
    module = model.get_base_model().get_submodule(key)
    while isinstance(module, AdapterLayer):
        if module.peft_type == method:
            return module
        module = module.base_layer
    raise AssertionError(f"no {method} layer at {key}")


def delta(model: PeftMixedModel, key: str, name: str) -> torch.Tensor:
    """The additive weight change of ``name`` at ``key``, from its raw tensors."""
    config = model.peft_config[name]
    layer = _layer_of(model, key, config.peft_type)
    if config.peft_type == "LORA":
        return layer.lora_B[name].weight @ layer.lora_A[name].weight * (config.lora_alpha / config.r)
    if config.peft_type == "LOHA":
        w1 = layer.hada_w1_a[name] @ layer.hada_w1_b[name]
        w2 = layer.hada_w2_a[name] @ layer.hada_w2_b[name]
        return w1 * w2 * (config.alpha / config.r)
    assert config.peft_type == "LOKR"

    def factor(i: int) -> torch.Tensor:
        full = getattr(layer, f"lokr_w{i}")
        if name in full:
            return full[name]
        return getattr(layer, f"lokr_w{i}_a")[name] @ getattr(layer, f"lokr_w{i}_b")[name]

    return torch.kron(factor(1), factor(2)) * (config.alpha / config.r)


def reference_output(model: PeftMixedModel, base_state: dict, plan: Plan) -> torch.Tensor:
    h = X
    with torch.no_grad():
        for key in KEYS:
            weight, bias = base_state[f"{key}.weight"].clone(), base_state[f"{key}.bias"].clone()
            if not plan.disabled:
                for method in plan.stack(key):
                    names = [n for n in plan.active if plan.method[n] == method and key in plan.targets[n]]
                    if method == "IA3":
                        for name in names:
                            vector = _layer_of(model, key, "IA3").ia3_l[name]
                            if key == FEEDFORWARD:  # input scaling: columns
                                weight = weight * vector.reshape(1, -1)
                            else:  # output scaling: rows and bias
                                weight = weight * vector.reshape(-1, 1)
                                bias = bias * vector.reshape(-1)
                    else:
                        for name in names:
                            weight = weight + delta(model, key, name)
            h = h @ weight.T + bias
            if key != KEYS[-1]:
                h = torch.tanh(h)
    return h


class Plan:
    """What the model should hold: adapters, their targets, which are active, the stacking order."""

    def __init__(self) -> None:
        self.method: dict[str, str] = {}
        self.targets: dict[str, list[str]] = {}
        self.active: list[str] = []
        self.order: list[str] = []
        self.disabled = False
        self.merged = False

    def add(self, name: str, method: str, targets: list[str]) -> None:
        self.method[name], self.targets[name] = method, targets
        if method not in self.order:
            self.order.append(method)
        if not self.active:
            self.active = [name]

    def delete(self, name: str) -> None:
        method = self.method.pop(name)
        del self.targets[name]
        if method not in self.method.values():
            self.order.remove(method)
        self.active = [n for n in self.active if n != name] or [next(iter(self.method))]

    def stack(self, key: str) -> list[str]:
        return [
            m for m in self.order if any(self.method[n] == m and key in self.targets[n] for n in self.method)
        ]


METHODS = st.sampled_from(["LORA", "LOHA", "LOKR", "IA3"])
TARGETS = st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True)


class MixedMachine(RuleBasedStateMachine):
    """Random add / activate / disable / merge / unmerge / save+load / delete sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.plan = Plan()
        self.base_state = {k: v.clone() for k, v in make_base().state_dict().items()}

    def _name(self) -> str:
        self.count += 1
        return f"a{self.count}"

    @initialize(method=METHODS, keys=TARGETS)
    def start(self, method, keys):
        name = self._name()
        self.model = get_peft_model(make_base(), make_config(method, keys, self.count), name, mixed=True)
        self.plan.add(name, method, keys)

    @precondition(lambda self: len(self.plan.method) < 5 and not self.plan.merged)
    @rule(method=METHODS, keys=TARGETS)
    def add(self, method, keys):
        name = self._name()
        self.model.add_adapter(name, make_config(method, keys, self.count))
        self.plan.add(name, method, keys)

    @rule(data=st.data())
    def set_active(self, data):
        names = data.draw(st.lists(st.sampled_from(list(self.plan.method)), min_size=1, unique=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "unmerging before switching" when merged
            self.model.set_adapter(names)
        self.plan.active, self.plan.merged = names, False

    @precondition(lambda self: not self.plan.merged)
    @rule()
    def toggle_disabled(self):
        self.plan.disabled = not self.plan.disabled
        if self.plan.disabled:
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.base_model.enable_adapter_layers()

    @precondition(lambda self: not self.plan.merged and not self.plan.disabled)
    @rule(safe=st.booleans())
    def merge(self, safe):
        self.model.merge_adapter(safe_merge=safe)
        self.plan.merged = True

    @precondition(lambda self: self.plan.merged)
    @rule()
    def unmerge(self):
        self.model.unmerge_adapter()
        self.plan.merged = False

    @precondition(lambda self: not self.plan.merged and not self.plan.disabled)
    @rule()
    def save_and_load(self):
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp)
            self.model = PeftMixedModel.from_pretrained(make_base(), tmp, is_trainable=True)
        assert self.model.active_adapters == self.plan.active
        assert self.model.stacking_order == self.plan.order

    @precondition(lambda self: len(self.plan.method) > 1 and not self.plan.merged)
    @rule(data=st.data())
    def delete(self, data):
        name = data.draw(st.sampled_from(list(self.plan.method)))
        self.model.delete_adapter(name)
        self.plan.delete(name)

    @invariant()
    def outputs_match_the_dense_reference(self):
        with torch.no_grad():
            got = self.model(X)
        expected = reference_output(self.model, self.base_state, self.plan)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)

    @invariant()
    def stacks_follow_the_stacking_order(self):
        assert self.model.stacking_order == self.plan.order
        for key in KEYS:
            chain, module = [], self.model.get_base_model().get_submodule(key)
            while isinstance(module, AdapterLayer):
                chain.append(module.peft_type)
                module = module.base_layer
            assert chain[::-1] == self.plan.stack(key), key


MixedMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestMixedMachine = MixedMachine.TestCase


# ---------------------------------------------------------------------- targeted cases
def mixed_model() -> PeftMixedModel:
    model = get_peft_model(make_base(), make_config("LORA", ["0", "2"]), "lo", mixed=True)
    model.add_adapter("ha", make_config("LOHA", ["0", "4"]))
    model.add_adapter("ia", make_config("IA3", list(KEYS)))
    model.set_adapter(["lo", "ha", "ia"])
    return model.eval()


def test_non_mixable_methods_are_refused_with_the_reason():
    refused = [t for t, spec in get_registry().methods.items() if not spec.capabilities.mixable]
    assert "ADALORA" in refused or "ADALORA" not in get_registry().methods
    vera = pytest.importorskip("peft_vera")
    with pytest.raises(ConfigError, match="mixable"):
        get_peft_model(make_base(), vera.VeraConfig(target_modules=["0"]), mixed=True)
    model = mixed_model()
    with pytest.raises(ConfigError, match="mixable"):
        model.add_adapter("v", vera.VeraConfig(target_modules=["0"]))
    assert "v" not in model.peft_config


def test_a_single_method_model_points_to_mixed_true():
    model = get_peft_model(make_base(), make_config("LORA", ["0"]))
    with pytest.raises(ConfigError, match="mixed=True"):
        model.add_adapter("ha", make_config("LOHA", ["0"]))


def test_stacking_order_does_not_depend_on_history():
    """LoRA joined first, so it stays innermost even after its first adapter is gone."""
    model = get_peft_model(make_base(), make_config("LORA", ["0"]), "lo1", mixed=True)
    model.add_adapter("ia", make_config("IA3", ["0"]))
    model.add_adapter("lo2", make_config("LORA", ["0"], seed=1))
    model.delete_adapter("lo1")
    model.set_adapter(["ia", "lo2"])
    assert model.stacking_order == ["LORA", "IA3"]
    layer = model.get_base_model()[0]
    assert layer.peft_type == "IA3" and layer.base_layer.peft_type == "LORA"
    with torch.no_grad():
        expected = model(X)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        manifest_path = os.path.join(tmp, "peft_mixed_model.json")
        manifest = json.load(open(manifest_path))
        assert [a["name"] for a in manifest["adapters"]] == ["ia", "lo2"]
        reloaded = PeftMixedModel.from_pretrained(make_base(), tmp)
        # The adapters listed in another order still stack as recorded.
        manifest["adapters"].reverse()
        with open(manifest_path, "w") as f:
            json.dump(manifest, f)
        reversed_load = PeftMixedModel.from_pretrained(make_base(), tmp)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(X), expected, atol=0, rtol=0)
        torch.testing.assert_close(reversed_load(X), expected, atol=0, rtol=0)
    assert reversed_load.stacking_order == ["LORA", "IA3"]


def test_each_saved_adapter_loads_alone_as_an_ordinary_adapter():
    model = mixed_model()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        assert sorted(os.listdir(tmp)) == ["ha", "ia", "lo", "peft_mixed_model.json"]
        for name in ("lo", "ha", "ia"):
            alone = PeftModel.from_pretrained(make_base(), os.path.join(tmp, name)).eval()
            model.set_adapter(name)
            with torch.no_grad():
                torch.testing.assert_close(alone(X), model(X), atol=ATOL, rtol=0)


@pytest.mark.compat
def test_the_reference_library_loads_each_saved_adapter():
    peft = pytest.importorskip("peft")
    model = mixed_model()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for name in ("lo", "ha", "ia"):
            theirs = peft.PeftModel.from_pretrained(make_base(), os.path.join(tmp, name)).eval()
            model.set_adapter(name)
            with torch.no_grad():
                torch.testing.assert_close(theirs(X), model(X), atol=ATOL, rtol=0)


def test_peft_model_points_a_mixed_directory_to_peft_mixed_model(tmp_path):
    mixed_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="PeftMixedModel.from_pretrained"):
        PeftModel.from_pretrained(make_base(), tmp_path)
    alone = PeftModel.from_pretrained(make_base(), tmp_path, subfolder="lo")
    assert list(alone.peft_config) == ["default"]


def test_merge_and_unload_and_unload():
    model = mixed_model()
    with torch.no_grad():
        adapted = model(X)
        base = make_base()(X)
    merged = mixed_model().merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert [type(m) for m in merged] == [type(m) for m in make_base()]
    with torch.no_grad():
        torch.testing.assert_close(merged(X), adapted, atol=ATOL, rtol=0)
    model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(X), base, atol=ATOL, rtol=0)


def test_a_merge_that_would_change_the_output_is_refused_before_anything_changes():
    """IA3 sits under LoRA here: merging LoRA alone would scale its delta by IA3's vectors."""
    model = get_peft_model(make_base(), make_config("IA3", ["0"]), "ia", mixed=True)
    model.add_adapter("lo", make_config("LORA", ["0"]))
    model.set_adapter(["ia", "lo"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer below"):
        model.merge_adapter(["lo"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        expected = model(X)
        model.merge_adapter()
        torch.testing.assert_close(model(X), expected, atol=ATOL, rtol=0)


def test_failed_load_leaves_the_model_as_it_was():
    model = mixed_model()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "ia", "adapter_model.safetensors"), "wb") as f:
            f.write(b"not a safetensors file")
        base = make_base()
        before = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(Exception):  # noqa: B017 - whichever error the corrupt file raises
            PeftMixedModel.from_pretrained(base, tmp)
    assert [type(m) for m in base] == [type(m) for m in make_base()]
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_only_active_adapters_train():
    model = get_peft_model(make_base(), make_config("LORA", ["0", "2"]), "lo", mixed=True)
    model.add_adapter("ha", make_config("LOHA", ["0"]))

    def owners():
        return [{"lo", "ha"} & set(n.split(".")) for n, p in model.named_parameters() if p.requires_grad]

    assert owners() and all(o == {"lo"} for o in owners())
    model.set_adapter(["lo", "ha"])
    assert {"ha"} in owners() and all(o in ({"lo"}, {"ha"}) for o in owners())


def test_mixed_batches_need_every_method_to_support_them():
    model = mixed_model()
    with pytest.raises(TypeError, match="mixed-adapter batches"):
        model(X, adapter_names=["lo", "lo", "ha", "__base__"])


@pytest.mark.parametrize("inner", ["LORA", "OFT"])
def test_oft_stacks_with_lora_in_either_order(inner):
    oft = pytest.importorskip("peft_oft")
    configs = {
        "LORA": make_config("LORA", ["0", "2"]),
        "OFT": oft.OFTConfig(target_modules=["0", "2"], r=2, oft_block_size=0, init_weights=False),
    }
    outer = "OFT" if inner == "LORA" else "LORA"
    model = get_peft_model(make_base(), configs[inner], inner.lower(), mixed=True)
    model.add_adapter(outer.lower(), configs[outer])
    model.set_adapter([inner.lower(), outer.lower()])
    assert model.stacking_order == [inner, outer]
    with torch.no_grad():
        both = model(X)
        model.merge_adapter()
        torch.testing.assert_close(model(X), both, atol=ATOL, rtol=0)
        model.unmerge_adapter()
        for alone in (inner, outer):
            model.set_adapter(alone.lower())
            assert not torch.allclose(model(X), both, atol=1e-3)
