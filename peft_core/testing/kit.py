"""The contract every layer-wrapping PEFT method keeps, as one test class to subclass.

A plugin subclasses :class:`MethodConformance` as ``Test<Method>Conformance``, names its
``peft_type`` and the standard layer kinds it supports, and writes ``config_strategy``. pytest then
collects one ``test_<check>`` per entry of :data:`CHECKS`; each draws, with hypothesis, a tiny
model of a supported kind (with generated sizes), a dtype, a seed and a config.

* A check that the method's registered :class:`~peft_core.registry.Capabilities` rule out (merge
  checks for a method that is not ``mergeable``, ...) is skipped, saying which capability.
* A prompt-learning method (``Capabilities(prompt_learning=True)``) runs the checks in
  :data:`PROMPT_LEARNING_CHECKS` (files, disabling, trainable parameters, training, several
  adapters); its per-task checks (labels, generation, encoders) are
  :class:`peft_core.testing.prompt_learning.PromptLearningTaskChecks`.
* A check the method deviates from on purpose is listed in ``deviations`` with a written reason;
  it is skipped with that reason (``test_declared_deviations_are_known_checks`` keeps the list
  honest). Deviations are data, never edited tests.

Tolerances are in :mod:`peft_core.testing.tolerances`: exact where outputs must be identical,
the dtype's rounding tolerance where a merge legitimately rounds. A method whose identity init
rounds (e.g. DoRA) says so through :meth:`MethodConformance.identity_is_exact`.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch
from attrs import frozen
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from peft_core import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft_core.layer import AdapterLayer
from peft_core.modules_to_save import ModulesToSaveWrapper
from peft_core.plugins import get_registry
from peft_core.registry import Capabilities, MethodSpec
from peft_core.testing import strategies
from peft_core.testing.models import ModelCase, model_output
from peft_core.testing.profiles import quiet_health_checks
from peft_core.testing.tolerances import assert_identical, assert_outputs_close

__all__ = ["CHECKS", "PROMPT_LEARNING_CHECKS", "MethodConformance"]

CHECKS: dict[str, str | None] = {
    "identity_init_gives_base_output": "identity_init",
    "non_identity_init_changes_output": None,
    "merged_forward_equals_unmerged": "mergeable",
    "unmerge_restores_base_weights": "mergeable",
    "merging_twice_warns_and_applies_once": "mergeable",
    "safe_merge_catches_nan_and_changes_nothing": "mergeable",
    "merge_and_unload_keeps_base_architecture_and_outputs": "mergeable",
    "unload_returns_base_model_and_outputs": None,
    "disable_adapter_gives_base_output_and_keeps_adapter": None,
    "save_load_round_trip": None,
    "config_json_round_trip": None,
    "only_adapter_parameters_are_trainable": None,
    "optimizer_step_changes_only_adapter_parameters": None,
    "training_steps_lower_the_loss": None,
    "multiple_adapters_add_switch_delete": None,
    "state_machine_matches_dense_reference": None,
}
"""Every check, by name (its test is ``test_<name>``), with the capability it needs (or None)."""

PROMPT_LEARNING_CHECKS = frozenset(
    {
        "non_identity_init_changes_output",
        "unload_returns_base_model_and_outputs",
        "disable_adapter_gives_base_output_and_keeps_adapter",
        "save_load_round_trip",
        "config_json_round_trip",
        "only_adapter_parameters_are_trainable",
        "optimizer_step_changes_only_adapter_parameters",
        "training_steps_lower_the_loss",
        "multiple_adapters_add_switch_delete",
    }
)
"""The checks that apply to prompt-learning methods (``Capabilities(prompt_learning=True)``): those
about the model's layers (merging, the dense state machine) do not, as such methods add none."""


_TRAINING_STEPS = 20


def _forward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model_output(model(**inputs))


def _snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def _base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """Every tensor of the wrapped base model that is not an adapter's (base layers, originals)."""
    adapter_ids = {id(t) for t in _adapter_tensors(model)}
    return {
        k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if id(v) not in adapter_ids
    }


def _adapter_tensors(model: PeftModel) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            for attr in module.adapter_layer_names:
                container = getattr(module, attr, None)
                if isinstance(container, nn.Module):
                    tensors += list(container.parameters()) + list(container.buffers())
        elif isinstance(module, ModulesToSaveWrapper):
            tensors += list(module.modules_to_save.parameters()) + list(module.modules_to_save.buffers())
    return tensors


def _adapter_parameters(layer: AdapterLayer, adapter_name: str) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if container is None or adapter_name not in container:
            continue
        item = container[adapter_name]
        params += [item] if isinstance(item, nn.Parameter) else list(item.parameters())
    return params


# Fields the library fills in when saving (provenance), not chosen by the user.
_BOOKKEEPING_FIELDS = {
    "inference_mode",
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "peft_version",
}


def _method_fields(config: PeftConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in _BOOKKEEPING_FIELDS}


def _architecture(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


def _assert_plain(model: nn.Module, base: nn.Module, what: str) -> None:
    leftovers = [n for n, m in model.named_modules() if isinstance(m, (AdapterLayer, ModulesToSaveWrapper))]
    assert not leftovers, f"{what}: adapter modules left in the model: {leftovers}"
    assert type(model) is type(base), (
        f"{what}: returned a {type(model).__name__}, not the base {type(base).__name__}"
    )
    assert _architecture(model) == _architecture(base), f"{what}: module tree differs from the base model's"
    assert list(model.state_dict()) == list(base.state_dict()), (
        f"{what}: state-dict keys differ from the base's"
    )


@frozen
class _Setup:
    case: ModelCase
    dtype: torch.dtype
    seed: int
    config: PeftConfig
    base: nn.Module
    model: PeftModel
    inputs: dict[str, torch.Tensor]


def _hypothesis_check(body: Callable[..., None]) -> Callable[[Any], None]:
    """Turn ``test_<check>(self, data)`` into a pytest test of ``self`` alone, run by hypothesis.

    Settings are read when the test runs, so the profile loaded by the project's conftest (see
    :func:`peft_core.testing.register_profiles`) applies whatever the import order; only the
    deadline and the too-slow health checks are turned off (the first forward of a model is slow).
    The capability and deviation gate runs first, so a skipped check draws nothing.
    """
    check = body.__name__.removeprefix("test_")
    if check not in CHECKS:
        raise KeyError(f"{body.__name__} is not test_<one of CHECKS>")

    def test(self: MethodConformance) -> None:
        self._gate(check)
        current = settings.default
        run_settings = settings(
            current,
            deadline=None,
            suppress_health_check=[*current.suppress_health_check, *quiet_health_checks()],
        )

        def run(data: st.DataObject) -> None:
            body(self, data)

        key = f"{type(self).__module__}.{type(self).__qualname__}.{body.__name__}"
        run.__name__, run.__qualname__ = body.__name__, key
        run._hypothesis_internal_add_digest = key.encode()  # type: ignore[attr-defined]  # one database key per class
        run_settings(given(data=st.data())(run))()

    # No functools.wraps: pytest would follow __wrapped__ and take ``data`` for a fixture.
    test.__name__, test.__qualname__, test.__doc__ = body.__name__, body.__qualname__, body.__doc__
    test.__module__ = body.__module__
    return test


class MethodConformance:
    """Subclass as ``Test<Method>Conformance``; set ``peft_type``, ``layer_kinds``, ``config_strategy``.

    >>> class TestToyConformance(MethodConformance):  # doctest: +SKIP
    ...     peft_type = "TOY"
    ...     layer_kinds = ("linear", "llama")
    ...     def config_strategy(self, case, *, identity):
    ...         return st.builds(ToyConfig, target_modules=st.just(list(case.target_modules)),
    ...                          init_weights=st.just(identity))
    """

    peft_type: ClassVar[str] = ""
    """The method's registered ``peft_type`` (e.g. ``"LORA"``)."""
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear",)
    """Layer kinds of the standard models (:data:`peft_core.testing.models.LAYER_KINDS`) to test."""
    dtypes: ClassVar[tuple[torch.dtype, ...]] = strategies.DTYPES
    """Dtypes to build base models in."""
    deviations: ClassVar[dict[str, str]] = {}
    """``{"<check>": "why this method deviates"}``: the check is skipped with that reason."""
    additive_adapters: ClassVar[bool] = True
    """Several active adapters act as the sum of their separate weight updates (LoRA and most
    delta methods). Set False for methods that compose otherwise (IA3 multiplies its scalings);
    the state machine then checks multi-adapter states against a freshly rebuilt model instead."""
    training_lr: ClassVar[float] = 5e-3
    """Adam's learning rate in ``training_steps_lower_the_loss``. Adam moves every parameter by about
    this much per step whatever its scale, so a method whose trainable factors start small (e.g.
    0.02-std products) needs a smaller one, or a step overshoots and the loss goes up for no fault."""

    # ------------------------------------------------------------------ to provide / override
    def config_strategy(self, case: ModelCase, *, identity: bool) -> st.SearchStrategy[PeftConfig]:
        """Configs targeting ``case.target_modules``.

        ``identity=True``: the method's default, identity init. ``identity=False``: an init that
        changes the output (e.g. ``init_lora_weights=False``), so merge and save checks are not
        vacuous. Configs may use ``case.modules_to_save``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement config_strategy(case, *, identity)")

    def identity_is_exact(self, config: PeftConfig) -> bool:
        """Whether ``config``'s identity init reproduces the base output bit for bit (default: yes).

        Return False for inits that are the identity only mathematically, e.g. DoRA's weight-norm
        rescaling, which rounds; those outputs are compared within the dtype's rounding tolerance
        (:mod:`peft_core.testing.tolerances`) instead.
        """
        return True

    def case_strategy(self) -> st.SearchStrategy[ModelCase]:
        """Models to draw: by default the standard kinds in ``layer_kinds``, with generated sizes."""
        return strategies.model_cases(*self.layer_kinds)

    # ------------------------------------------------------------------ helpers
    @property
    def spec(self) -> MethodSpec:
        if not self.peft_type:
            raise TypeError(f"{type(self).__name__} must set peft_type (e.g. peft_type = 'LORA').")
        return get_registry().method(self.peft_type)

    @property
    def capabilities(self) -> Capabilities:
        return self.spec.capabilities

    def _gate(self, check: str) -> None:
        for key in (check, f"test_{check}"):
            if key in self.deviations:
                pytest.skip(f"{self.peft_type} deviates from {check!r}: {self.deviations[key]}")
        if self.capabilities.prompt_learning and check not in PROMPT_LEARNING_CHECKS:
            pytest.skip(f"{self.peft_type} is prompt learning; {check!r} checks layer-wrapping methods")
        needed = CHECKS[check]
        if needed is not None and not getattr(self.capabilities, needed):
            pytest.skip(f"{self.peft_type} does not declare Capabilities({needed}=True)")

    def _setup(
        self, data: st.DataObject, *, identity: bool = False, dtype: torch.dtype | None = None
    ) -> _Setup:
        case = data.draw(self.case_strategy(), label="case")
        if dtype is None:
            dtype = data.draw(strategies.dtypes(self.dtypes), label="dtype")
        seed = data.draw(strategies.seeds(), label="seed")
        config = data.draw(self.config_strategy(case, identity=identity), label="config")
        base = case.build(dtype, seed=seed)
        model = self._adapt(copy.deepcopy(base), config, seed)
        return _Setup(case, dtype, seed, config, base, model, case.make_inputs(seed, dtype))

    @staticmethod
    def _adapt(model: nn.Module, config: PeftConfig, seed: int) -> PeftModel:
        with torch.random.fork_rng():  # random inits must replay identically when hypothesis shrinks
            torch.manual_seed(seed)
            return get_peft_model(model, config).eval()

    @staticmethod
    def _add_adapter(model: PeftModel, name: str, config: PeftConfig, seed: int) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model.add_adapter(name, config)
        # New submodules (e.g. dropout) start in training mode, as in the reference library.
        model.eval()

    # ------------------------------------------------------------------ checks: init
    @_hypothesis_check
    def test_identity_init_gives_base_output(self, data: st.DataObject) -> None:
        """A fresh adapter with the default (identity) init gives exactly the base output."""
        s = self._setup(data, identity=True)
        adapted, plain = _forward(s.model, s.inputs), _forward(s.base, s.inputs)
        if self.identity_is_exact(s.config):
            assert_identical(adapted, plain, "identity-init output vs base")
        else:
            assert_outputs_close(adapted, plain, s.dtype, "identity-init output vs base")

    @_hypothesis_check
    def test_non_identity_init_changes_output(self, data: st.DataObject) -> None:
        """``config_strategy(identity=False)`` really changes outputs (else other checks are vacuous)."""
        s = self._setup(data, identity=False, dtype=torch.float32)
        adapted, plain = _forward(s.model, s.inputs), _forward(s.base, s.inputs)
        assert not torch.equal(adapted, plain), (
            f"config_strategy(case, identity=False) gave {s.config!r}, which leaves the output of {s.case} "
            "unchanged; return a config with a non-identity init."
        )

    # ------------------------------------------------------------------ checks: merging
    @_hypothesis_check
    def test_merged_forward_equals_unmerged(self, data: st.DataObject) -> None:
        """Merging the adapter into the base weights does not change the output."""
        s = self._setup(data)
        unmerged = _forward(s.model, s.inputs)
        s.model.merge_adapter()
        assert all(layer.merged for layer in s.model.base_model.adapter_layers()), (
            "merge_adapter left layers unmerged"
        )
        assert_outputs_close(_forward(s.model, s.inputs), unmerged, s.dtype, "merged vs unmerged output")

    @_hypothesis_check
    def test_unmerge_restores_base_weights(self, data: st.DataObject) -> None:
        """``unmerge_adapter`` after ``merge_adapter`` gives back the base weights and output."""
        s = self._setup(data)
        before = _base_weights(s.model)
        s.model.merge_adapter()
        s.model.unmerge_adapter()
        assert not any(layer.merged for layer in s.model.base_model.adapter_layers()), "layers still merged"
        after = _base_weights(s.model)
        assert after.keys() == before.keys()
        for key, value in before.items():
            assert_outputs_close(after[key], value, s.dtype, f"base tensor {key} after merge + unmerge")
        with s.model.disable_adapter():
            assert_outputs_close(
                _forward(s.model, s.inputs), _forward(s.base, s.inputs), s.dtype, "base output after unmerge"
            )

    @_hypothesis_check
    def test_merging_twice_warns_and_applies_once(self, data: st.DataObject) -> None:
        """A second ``merge_adapter`` warns and changes nothing (no double application)."""
        s = self._setup(data)
        s.model.merge_adapter()
        once, weights = _forward(s.model, s.inputs), _base_weights(s.model)
        with pytest.warns(UserWarning, match="(?i)merged"):
            s.model.merge_adapter()
        assert_identical(_forward(s.model, s.inputs), once, "output after merging twice")
        for key, value in _base_weights(s.model).items():
            assert_identical(value, weights[key], f"base tensor {key} after merging twice")

    @_hypothesis_check
    def test_safe_merge_catches_nan_and_changes_nothing(self, data: st.DataObject) -> None:
        """``safe_merge=True`` raises on a NaN adapter and leaves every base weight untouched.

        The NaN goes into a drawn layer, so layers merged before it must be rolled back too.
        """
        s = self._setup(data)
        layers = list(s.model.base_model.adapter_layers())
        layer = layers[data.draw(st.integers(0, len(layers) - 1), label="layer with NaN")]
        params = _adapter_parameters(layer, "default")
        assert params, f"{type(layer).__name__} holds no parameters for adapter 'default'"
        with torch.no_grad():
            for param in params:
                param.data[(0,) * param.dim()] = float("nan")
        before = _base_weights(s.model)
        with pytest.raises(ValueError, match="(?i)nan"):
            s.model.merge_adapter(safe_merge=True)
        for key, value in _base_weights(s.model).items():
            assert_identical(value, before[key], f"base tensor {key} after a failed safe merge")
        assert not any(lay.merged for lay in layers), "a failed safe merge left layers marked merged"
        with s.model.disable_adapter():
            assert_identical(_forward(s.model, s.inputs), _forward(s.base, s.inputs), "base output")

    @_hypothesis_check
    def test_merge_and_unload_keeps_base_architecture_and_outputs(self, data: st.DataObject) -> None:
        """``merge_and_unload`` returns the base architecture computing the adapted output."""
        s = self._setup(data)
        adapted = _forward(s.model, s.inputs)
        merged = s.model.merge_and_unload()
        _assert_plain(merged, s.base, "merge_and_unload")
        assert_outputs_close(
            _forward(merged, s.inputs), adapted, s.dtype, "merge_and_unload output vs adapted"
        )

    @_hypothesis_check
    def test_unload_returns_base_model_and_outputs(self, data: st.DataObject) -> None:
        """``unload`` (after a merge, too) returns the base architecture with the base weights."""
        s = self._setup(data)
        merge_first = self.capabilities.mergeable and data.draw(st.booleans(), label="merge first")
        if merge_first:
            s.model.merge_adapter()
        plain = s.model.unload()
        _assert_plain(plain, s.base, "unload")
        expected_state = s.base.state_dict()
        for key, value in plain.state_dict().items():
            if merge_first:
                assert_outputs_close(value, expected_state[key], s.dtype, f"{key} after merge + unload")
            else:
                assert_identical(value, expected_state[key], f"{key} after unload")
        output, base_output = _forward(plain, s.inputs), _forward(s.base, s.inputs)
        if merge_first:
            assert_outputs_close(output, base_output, s.dtype, "output after merge + unload")
        else:
            assert_identical(output, base_output, "output after unload")

    # ------------------------------------------------------------------ checks: disabling
    @_hypothesis_check
    def test_disable_adapter_gives_base_output_and_keeps_adapter(self, data: st.DataObject) -> None:
        """Inside ``disable_adapter()`` the output is the base's; afterwards the adapter is intact."""
        s = self._setup(data)
        adapted = _forward(s.model, s.inputs)
        tensors = _snapshot(get_peft_model_state_dict(s.model))
        trainable = {n for n, p in s.model.named_parameters() if p.requires_grad}
        with s.model.disable_adapter():
            assert_identical(
                _forward(s.model, s.inputs), _forward(s.base, s.inputs), "output with adapter disabled"
            )
        assert_identical(_forward(s.model, s.inputs), adapted, "output after disable_adapter()")
        after = get_peft_model_state_dict(s.model)
        assert after.keys() == tensors.keys()
        for key, value in tensors.items():
            assert_identical(after[key], value, f"adapter tensor {key} after disable_adapter()")
        assert {n for n, p in s.model.named_parameters() if p.requires_grad} == trainable
        assert s.model.active_adapters == ["default"]

    # ------------------------------------------------------------------ checks: files
    @_hypothesis_check
    def test_save_load_round_trip(self, data: st.DataObject) -> None:
        """``save_pretrained`` -> ``PeftModel.from_pretrained`` gives identical outputs, tensors, config."""
        s = self._setup(data)
        # A prompt-learning file may hold only the materialised prompt (P-tuning), not a trainable encoder.
        loads_trainable = getattr(self.spec.model_cls, "loads_trainable", True)
        is_trainable = loads_trainable and data.draw(st.booleans(), label="is_trainable")
        expected = _forward(s.model, s.inputs)
        with tempfile.TemporaryDirectory() as tmp:
            s.model.save_pretrained(tmp)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                assert os.path.isfile(os.path.join(tmp, name)), f"save_pretrained wrote no {name}"
            loaded = PeftModel.from_pretrained(copy.deepcopy(s.base), tmp, is_trainable=is_trainable).eval()
        assert_identical(_forward(loaded, s.inputs), expected, "output after save -> load")
        ours, theirs = get_peft_model_state_dict(s.model), get_peft_model_state_dict(loaded)
        assert ours.keys() == theirs.keys(), f"checkpoint keys differ: {sorted(ours.keys() ^ theirs.keys())}"
        for key, value in ours.items():
            assert theirs[key].dtype == value.dtype, f"{key}: saved {value.dtype}, loaded {theirs[key].dtype}"
            assert_identical(theirs[key], value, f"adapter tensor {key} after save -> load")
        ours_config, theirs_config = (_method_fields(m.peft_config["default"]) for m in (s.model, loaded))
        assert theirs_config == ours_config, f"config after save -> load: {theirs_config} != {ours_config}"
        assert loaded.peft_config["default"].inference_mode is not is_trainable
        trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
        if is_trainable:
            assert trainable == {n for n, p in s.model.named_parameters() if p.requires_grad}
        else:
            assert not trainable, f"loaded with is_trainable=False, yet trainable: {sorted(trainable)[:5]}"

    @_hypothesis_check
    def test_config_json_round_trip(self, data: st.DataObject) -> None:
        """``to_dict`` -> JSON -> ``from_dict`` (and save_pretrained -> from_pretrained) is lossless."""
        case = data.draw(self.case_strategy(), label="case")
        config = data.draw(self.config_strategy(case, identity=data.draw(st.booleans(), label="identity")))
        as_dict = config.to_dict()
        assert as_dict["peft_type"] == self.spec.peft_type
        again = PeftConfig.from_dict(json.loads(json.dumps(as_dict)))
        assert type(again) is type(config)
        assert again.to_dict() == as_dict
        assert type(config).from_dict(json.loads(config.to_json_string())).to_dict() == as_dict
        with tempfile.TemporaryDirectory() as tmp:
            config.save_pretrained(tmp)
            from_file = PeftConfig.from_pretrained(tmp)
        assert type(from_file) is type(config) and from_file.to_dict() == as_dict

    # ------------------------------------------------------------------ checks: training
    @_hypothesis_check
    def test_only_adapter_parameters_are_trainable(self, data: st.DataObject) -> None:
        """Exactly the active adapter's parameters (and its ``modules_to_save`` copies) train."""
        s = self._setup(data)
        prefix = self.spec.prefix
        config = s.model.peft_config["default"]
        bias_mode = getattr(config, "bias", "none") or "none"
        trainable = {n for n, p in s.model.named_parameters() if p.requires_grad}
        assert trainable, "a new adapter has no trainable parameters"
        for name in trainable:
            ok = (prefix in name and ".default" in name) or ".modules_to_save.default." in name
            ok = ok or (bias_mode != "none" and name.endswith("bias"))
            assert ok, (
                f"{name} is trainable but is no adapter parameter (prefix {prefix!r}) or modules_to_save copy"
            )
        names = {id(p): n for n, p in s.model.named_parameters()}
        for layer in s.model.base_model.adapter_layers():
            for param in _adapter_parameters(layer, "default"):
                assert param.requires_grad, f"adapter parameter {names[id(param)]} is frozen"
        for module in s.model.modules():
            if isinstance(module, ModulesToSaveWrapper) and "default" in module.modules_to_save:
                assert all(p.requires_grad for p in module.modules_to_save["default"].parameters())
                assert not any(p.requires_grad for p in module.original_module.parameters())

    @_hypothesis_check
    def test_optimizer_step_changes_only_adapter_parameters(self, data: st.DataObject) -> None:
        """One SGD step (lr 0.1) on a loss changes adapter parameters and nothing else."""
        s = self._setup(data)
        trainable = {n for n, p in s.model.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in s.model.named_parameters()}
        optimizer = torch.optim.SGD([p for p in s.model.parameters() if p.requires_grad], lr=0.1)
        s.model.train()
        with torch.random.fork_rng():
            torch.manual_seed(s.seed)  # dropout, if any, replays identically
            loss = model_output(s.model(**s.inputs)).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        frozen_with_grad = [
            n for n, p in s.model.named_parameters() if not p.requires_grad and p.grad is not None
        ]
        assert not frozen_with_grad, f"frozen parameters received gradients: {frozen_with_grad[:5]}"
        changed = {n for n, p in s.model.named_parameters() if not torch.equal(p.detach(), before[n])}
        assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
        prefix = self.spec.prefix
        assert any(prefix in n for n in changed), f"one optimizer step changed no {prefix}* parameter"

    @_hypothesis_check
    def test_training_steps_lower_the_loss(self, data: st.DataObject) -> None:
        """A few Adam steps from the default init lower a reachable regression loss, training only the adapter."""
        s = self._setup(data, identity=True, dtype=torch.float32)
        # The target is what the same adapter gives with perturbed parameters, so the method can reach
        # it: a loss it cannot lower then means broken gradients, not a target outside its reach.
        teacher = copy.deepcopy(s.model)
        # A prompt table's random init is randn under s.seed, the very noise a same-seeded generator
        # would add: the teacher would be the student scaled by 2, which normalising models cannot tell apart.
        offset = 7919 if self.capabilities.prompt_learning else 0
        generator = torch.Generator().manual_seed(s.seed + offset)
        with torch.no_grad():
            for param in teacher.parameters():
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=generator).to(param))
        target = _forward(teacher.eval(), s.inputs).float()

        def loss_of(model: nn.Module) -> torch.Tensor:
            return (model_output(model(**s.inputs)).float() - target).pow(2).mean()

        frozen = {n: p.detach().clone() for n, p in s.model.named_parameters() if not p.requires_grad}
        with torch.no_grad():
            initial = loss_of(s.model.eval()).item()
        # A teacher within ~3% (RMS) of the student leaves too little to learn for Adam's fixed step
        # (constrained methods such as COFT can barely move): such draws are not checked.
        assume(initial > 1e-3 * target.pow(2).mean().item())
        optimizer = torch.optim.Adam(
            [p for p in s.model.parameters() if p.requires_grad], lr=self.training_lr
        )
        # Steps in eval mode: this checks that gradients reach the adapter and descend; dropout's noise
        # (up to half the modules dropped per step) could hide that in 20 steps.
        with torch.random.fork_rng():
            torch.manual_seed(s.seed)
            for _ in range(_TRAINING_STEPS):
                optimizer.zero_grad()
                loss_of(s.model).backward()
                optimizer.step()
        with torch.no_grad():
            final = loss_of(s.model.eval()).item()
        assert final < initial, (
            f"{_TRAINING_STEPS} Adam steps (lr {self.training_lr:g}) did not lower the loss: "
            f"{initial:.6g} -> {final:.6g}"
        )
        changed = [
            n for n, value in frozen.items() if not torch.equal(s.model.get_parameter(n).detach(), value)
        ]
        assert not changed, f"training changed frozen parameters: {changed[:5]}"

    # ------------------------------------------------------------------ checks: several adapters
    @_hypothesis_check
    def test_multiple_adapters_add_switch_delete(self, data: st.DataObject) -> None:
        """Adding, switching and deleting adapters never disturbs the other adapters' outputs."""
        s = self._setup(data)
        first = _forward(s.model, s.inputs)
        other = data.draw(self.config_strategy(s.case, identity=False), label="config 'other'")
        self._add_adapter(s.model, "other", other, s.seed + 1)
        assert s.model.active_adapters == ["default"], "add_adapter must not activate the new adapter"
        assert_identical(_forward(s.model, s.inputs), first, "'default' output after adding 'other'")
        other_tensors = _snapshot(get_peft_model_state_dict(s.model, adapter_name="other"))

        s.model.set_adapter("other")
        second = _forward(s.model, s.inputs)
        s.model.set_adapter("default")
        assert_identical(_forward(s.model, s.inputs), first, "'default' output after switching back")

        third = data.draw(self.config_strategy(s.case, identity=False), label="config 'third'")
        self._add_adapter(s.model, "third", third, s.seed + 2)
        s.model.set_adapter("other")
        s.model.delete_adapter("default")  # the active one goes: 'other' must stay untouched
        assert s.model.active_adapters == ["other"]
        assert_identical(_forward(s.model, s.inputs), second, "'other' output after deleting 'default'")
        s.model.delete_adapter("third")  # an inactive one goes
        assert list(s.model.peft_config) == ["other"]
        assert_identical(_forward(s.model, s.inputs), second, "'other' output after deleting 'third'")
        leftovers = [n for n, _ in s.model.named_parameters() if ".default." in n or ".third." in n]
        assert not leftovers, f"parameters of deleted adapters remain: {leftovers[:5]}"
        tensors = get_peft_model_state_dict(s.model, adapter_name="other")
        assert tensors.keys() == other_tensors.keys()
        for key, value in other_tensors.items():
            assert_identical(tensors[key], value, f"'other' tensor {key}")

    # ------------------------------------------------------------------ the state machine
    def test_state_machine_matches_dense_reference(self) -> None:
        """Random sequences of add/set/disable/merge/unmerge/save+load/delete against a dense reference."""
        self._gate("state_machine_matches_dense_reference")
        from peft_core.testing.state_machine import run_state_machine

        run_state_machine(self)

    # ------------------------------------------------------------------ the subclass itself
    def test_declared_deviations_are_known_checks(self) -> None:
        """Each declared deviation names a real check and gives a reason."""
        unknown = [k for k in self.deviations if k.removeprefix("test_") not in CHECKS]
        assert not unknown, f"deviations {unknown} name no check; the checks are {sorted(CHECKS)}"
        unexplained = [k for k, reason in self.deviations.items() if not str(reason).strip()]
        assert not unexplained, f"deviations {unexplained} need a written reason"
        assert self.spec.peft_type == self.peft_type.upper()


_missing = [c for c in CHECKS if not hasattr(MethodConformance, f"test_{c}")]
if _missing:  # pragma: no cover - guards edits of this module
    raise RuntimeError(f"checks without a test: {_missing}")
