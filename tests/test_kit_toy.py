"""The conformance kit run on TOY, a method defined in this repository.

TOY (``tests/toy_plugin``, distribution ``peft-toy``) is the smallest delta-merging method. It
proves the kit and the core without any real plugin, and it reaches the core only through the
public entry-point path: install it with ``pip install -e tests/toy_plugin``.
"""

from __future__ import annotations

import re
from types import ModuleType

import attrs
import pytest
import torch
from hypothesis import Phase, settings
from hypothesis import strategies as st
from torch import nn

from peft_core.hookspecs import hookimpl
from peft_core.plugins import get_plugin_manager, get_registry, register_plugin
from peft_core.registry import Capabilities, MethodSpec
from peft_core.testing import MethodConformance, ModelCase
from peft_core.tuner import AdapterModel

try:
    from peft_toy import ToyConfig, ToyLayer
except ImportError as exc:  # pragma: no cover - a setup error, reported as such
    raise ImportError(
        "The toy plugin is not installed; run `pip install -e tests/toy_plugin --no-deps` (nox does)."
    ) from exc


def test_toy_is_registered_through_its_entry_point():
    (info,) = [p for p in get_plugin_manager().plugins if p.name == "toy"]
    assert (info.distribution, info.module, info.status) == ("peft-toy", "peft_toy.plugin", "loaded")
    spec = get_registry().method("TOY")
    assert spec.plugin == "peft-toy" and spec.config_cls is ToyConfig
    assert spec.capabilities.mergeable and spec.capabilities.identity_init


class TestToyConformance(MethodConformance):
    peft_type = "TOY"
    layer_kinds = ("linear", "llama")

    def config_strategy(self, case: ModelCase, *, identity: bool) -> st.SearchStrategy[ToyConfig]:
        names = list(case.target_modules)
        # The same targets written as a list of names or as a full-match regex.
        targets = st.sampled_from([names, r".*\b(" + "|".join(map(re.escape, names)) + r")"])
        saved = st.sampled_from([None, list(case.modules_to_save)]) if case.modules_to_save else st.none()
        return st.builds(
            ToyConfig,
            target_modules=targets,
            modules_to_save=saved,
            init_weights=st.just(identity),
        )


@pytest.mark.parametrize("check", ["merged_forward_equals_unmerged", "test_merged_forward_equals_unmerged"])
def test_a_declared_deviation_skips_its_check_with_the_reason(check):
    class Deviating(TestToyConformance):
        deviations = {check: "TOY cannot merge on Tuesdays"}

    with pytest.raises(pytest.skip.Exception, match="Tuesdays"):
        Deviating().test_merged_forward_equals_unmerged()
    Deviating().test_declared_deviations_are_known_checks()


def test_a_deviation_naming_no_check_is_refused():
    class Misspelt(TestToyConformance):
        deviations = {"merged_forward_equals_unmerge": "typo"}

    with pytest.raises(AssertionError, match="name no check"):
        Misspelt().test_declared_deviations_are_known_checks()


def test_a_capability_the_method_lacks_skips_the_checks_that_need_it():
    class Unmergeable(TestToyConformance):
        @property
        def capabilities(self):
            return attrs.evolve(super().capabilities, mergeable=False)

    with pytest.raises(pytest.skip.Exception, match="mergeable"):
        Unmergeable().test_safe_merge_catches_nan_and_changes_nothing()


# ---------------------------------------------------------------------- the kit catches bugs
# Each mutant is TOY with one contract broken; the matching check must fail on it.


@attrs.define(kw_only=True)
class DoubleMergeConfig(ToyConfig):
    PEFT_TYPE = "TOY_DOUBLE_MERGE"


class DoubleMergeLayer(ToyLayer):
    """Merges twice the update it applies unmerged."""

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return 2 * super().get_delta_weight(adapter_name)


@attrs.define(kw_only=True)
class LeakyDisableConfig(ToyConfig):
    PEFT_TYPE = "TOY_LEAKY_DISABLE"


class LeakyDisableLayer(ToyLayer):
    """Keeps adapting while disabled."""

    @property
    def disable_adapters(self) -> bool:
        return False


MUTANTS = {
    "TOY_DOUBLE_MERGE": (DoubleMergeConfig, DoubleMergeLayer),
    "TOY_LEAKY_DISABLE": (LeakyDisableConfig, LeakyDisableLayer),
}


def _mutant_plugin() -> ModuleType:
    @hookimpl
    def peft_register_methods(registry):
        for peft_type, (config_cls, _) in MUTANTS.items():
            registry.register_method(
                MethodSpec(
                    peft_type=peft_type,
                    config_cls=config_cls,
                    model_cls=AdapterModel,
                    prefix="toy_",
                    capabilities=Capabilities(mergeable=True, identity_init=True),
                )
            )

    @hookimpl
    def peft_register_layer_factories(registry):
        for peft_type, (_, layer_cls) in MUTANTS.items():

            def factory(target, adapter_name, config, context, layer_cls=layer_cls):
                if type(target) is not nn.Linear:
                    return None
                layer = layer_cls(target)
                layer.update_layer(adapter_name, config, key=context.key)
                return layer

            registry.register_layer_factory(peft_type, factory)

    module = ModuleType("toy_mutants")
    module.peft_register_methods = peft_register_methods
    module.peft_register_layer_factories = peft_register_layer_factories
    return module


@pytest.fixture
def few_examples_no_shrinking():
    """Fixed examples, no shrinking: a mutant must fail every run, and needs no minimal example."""
    previous = settings.default
    settings.register_profile(
        "kit-mutants", settings(previous, max_examples=20, phases=[Phase.generate], derandomize=True)
    )
    settings.load_profile("kit-mutants")
    yield
    settings.register_profile("kit-mutants-restore", previous)
    settings.load_profile("kit-mutants-restore")


@pytest.mark.parametrize(
    ("peft_type", "check"),
    [
        ("TOY_DOUBLE_MERGE", "merged_forward_equals_unmerged"),
        ("TOY_DOUBLE_MERGE", "merge_and_unload_keeps_base_architecture_and_outputs"),
        ("TOY_DOUBLE_MERGE", "state_machine_matches_dense_reference"),
        ("TOY_LEAKY_DISABLE", "disable_adapter_gives_base_output_and_keeps_adapter"),
        ("TOY_LEAKY_DISABLE", "state_machine_matches_dense_reference"),
    ],
)
def test_the_kit_catches_a_broken_method(peft_type, check, registry_with_only, few_examples_no_shrinking):
    registry_with_only("peft_toy.plugin")
    register_plugin(_mutant_plugin(), name="toy-mutants")
    config_cls = MUTANTS[peft_type][0]

    class TestMutant(TestToyConformance):
        def config_strategy(self, case, *, identity):
            return st.builds(
                config_cls, target_modules=st.just(list(case.target_modules)), init_weights=st.just(identity)
            )

    TestMutant.peft_type = peft_type
    with pytest.raises(AssertionError):
        getattr(TestMutant(), f"test_{check}")()
