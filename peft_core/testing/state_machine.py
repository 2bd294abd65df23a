"""A hypothesis state machine driving adapter operations against a trivially correct reference.

Rules: add an adapter, set the active ones (one or several), disable/enable adapter layers, run
inside ``disable_adapter()``, merge (optionally with ``safe_merge``), unmerge, save everything
and load it into a fresh copy of the base, and delete an adapter. After every step the live
model's output must equal the reference's for the adapters that should be active (see
:mod:`peft_core.testing.reference`): for mergeable methods, a plain dense copy of the base
carrying the probed delta of each active adapter, summed when several are active (unless the
conformance class sets ``additive_adapters = False``); otherwise a freshly rebuilt, never-merged
model. The machine runs in float32, so a mismatch means a bookkeeping bug, not rounding; dtypes
are covered by the single-step checks.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from typing import TYPE_CHECKING

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from peft_core import PeftConfig, PeftModel
from peft_core.modules_to_save import ModulesToSaveWrapper
from peft_core.testing import strategies
from peft_core.testing.models import model_output
from peft_core.testing.profiles import quiet_health_checks
from peft_core.testing.reference import DenseReference, NotProbeable, RebuiltReference
from peft_core.testing.tolerances import assert_outputs_close

if TYPE_CHECKING:
    from peft_core.testing.kit import MethodConformance

__all__ = ["run_state_machine"]

MAX_ADAPTERS = 3


class _NamedFactory:
    """Builds the machine; its name gives each conformance class its own example-database key."""

    def __init__(self, machine: type[RuleBasedStateMachine], name: str) -> None:
        self.machine = machine
        self.__name__ = name

    def __call__(self) -> RuleBasedStateMachine:
        return self.machine()


def run_state_machine(kit: MethodConformance, *, max_examples: int | None = None, steps: int = 8) -> None:
    """Run the adapter state machine for ``kit``'s method (half the profile's examples by default)."""
    mergeable = kit.capabilities.mergeable
    cases = kit.case_strategy()

    class AdapterMachine(RuleBasedStateMachine):
        @initialize(data=st.data())
        def start(self, data: st.DataObject) -> None:
            self.case = data.draw(cases, label="case")
            self.seed = data.draw(strategies.seeds(), label="seed")
            self.base = self.case.build(torch.float32, seed=self.seed)
            self.inputs = self.case.make_inputs(self.seed)
            with torch.no_grad():
                self.base_output = model_output(self.base(**self.inputs))
            self.configs: dict[str, PeftConfig] = {}
            self.dense: DenseReference | None = DenseReference(self.base) if mergeable else None
            self.rebuilt = RebuiltReference(self.base)
            self.expected: dict[tuple, torch.Tensor] = {}
            self.counter = 0
            self.active = ["default"]
            self.merged = False
            self.disabled = False
            config = data.draw(kit.config_strategy(self.case, identity=False), label="config 'default'")
            self.model = kit._adapt(copy.deepcopy(self.base), config, self.seed)
            self._register("default", config)

        def _register(self, name: str, config: PeftConfig) -> None:
            # modules_to_save copies start equal to the original; perturb them so using the wrong
            # copy (or none) shows in the output.
            generator = torch.Generator().manual_seed(self.seed + self.counter)
            with torch.no_grad():
                for module in self.model.modules():
                    if isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
                        for param in module.modules_to_save[name].parameters():
                            param.add_(0.1 * torch.randn(param.shape, generator=generator).to(param))
            self.configs[name] = config
            self.rebuilt.record(self.model, name, config)
            if self.dense is not None:
                try:
                    self.dense.record(self.model, name, config)
                except NotProbeable:
                    # A layer the dense probe does not understand: compare with rebuilt models only.
                    self.dense = None
                    self.expected.clear()

        def _owns_copies(self, name: str) -> bool:
            return bool(getattr(self.configs[name], "modules_to_save", None))

        # -------------------------------------------------------------- rules
        @precondition(lambda self: len(self.configs) < MAX_ADAPTERS and not self.merged)
        @rule(data=st.data())
        def add(self, data: st.DataObject) -> None:
            self.counter += 1
            name = f"adapter{self.counter}"
            config = data.draw(kit.config_strategy(self.case, identity=False), label=f"config {name!r}")
            kit._add_adapter(self.model, name, config, self.seed + self.counter)
            self._register(name, config)

        @rule(data=st.data())
        def set_active(self, data: st.DataObject) -> None:
            names = list(self.configs)
            drawn = data.draw(
                st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True), label="active"
            )
            # Only one active adapter may own a modules_to_save copy of a module.
            owners = [n for n in drawn if self._owns_copies(n)]
            chosen = [n for n in drawn if not self._owns_copies(n) or n == (owners[0] if owners else None)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # switching while merged unmerges, with a warning
                self.model.set_adapter(chosen)
            self.active, self.merged = chosen, False

        @precondition(lambda self: not self.merged)
        @rule()
        def toggle_disabled(self) -> None:
            if self.disabled:
                self.model.base_model.enable_adapter_layers()
            else:
                self.model.base_model.disable_adapter_layers()
            self.disabled = not self.disabled

        @precondition(lambda self: not self.merged and not self.disabled)
        @rule()
        def inside_disable_adapter(self) -> None:
            with self.model.disable_adapter(), torch.no_grad():
                output = model_output(self.model(**self.inputs))
            # Not bit for bit: merge + unmerge restores base weights only up to rounding.
            assert_outputs_close(output, self.base_output, torch.float32, "inside disable_adapter()")

        @precondition(lambda self: mergeable and not self.merged and not self.disabled)
        @rule(safe_merge=st.booleans())
        def merge(self, safe_merge: bool) -> None:
            self.model.merge_adapter(safe_merge=safe_merge)
            self.merged = True

        @precondition(lambda self: self.merged)
        @rule()
        def unmerge(self) -> None:
            self.model.unmerge_adapter()
            self.merged = False

        @rule()
        def save_and_load(self) -> None:
            names = list(self.model.peft_config)
            with tempfile.TemporaryDirectory() as tmp:
                self.model.save_pretrained(tmp)

                def where(name: str) -> str:
                    return tmp if name == "default" else os.path.join(tmp, name)

                loaded = PeftModel.from_pretrained(
                    copy.deepcopy(self.base), where(names[0]), adapter_name=names[0]
                )
                for name in names[1:]:
                    loaded.load_adapter(where(name), adapter_name=name)
            loaded.set_adapter(self.active)
            if self.disabled:
                loaded.base_model.disable_adapter_layers()
            self.model, self.merged = loaded.eval(), False

        @precondition(lambda self: len(self.configs) > 1 and not self.merged)
        @rule(data=st.data())
        def delete(self, data: st.DataObject) -> None:
            name = data.draw(st.sampled_from(sorted(self.configs)), label="delete")
            self.model.delete_adapter(name)
            del self.configs[name]
            self.rebuilt.forget(name)
            if self.dense is not None:
                self.dense.forget(name)
            remaining = [n for n in self.active if n != name]
            if remaining:
                assert self.model.active_adapters == remaining, (
                    "deleting an adapter changed the other active ones"
                )
                self.active = remaining
            else:
                assert self.model.active_adapters and set(self.model.active_adapters) <= set(self.configs)
                self.active = list(self.model.active_adapters)

        # -------------------------------------------------------------- the check
        def _reference(self) -> DenseReference | RebuiltReference:
            if self.dense is not None and (len(self.active) == 1 or self.disabled or kit.additive_adapters):
                return self.dense
            return self.rebuilt

        @invariant()
        def matches_reference(self) -> None:
            if not hasattr(self, "model"):
                return
            state = f"active={self.active} merged={self.merged} disabled={self.disabled} adapters={list(self.configs)}"
            assert self.model.active_adapters == self.active, (
                f"{state}: model says {self.model.active_adapters}"
            )
            assert set(self.model.peft_config) == set(self.configs), (
                f"{state}: model has {list(self.model.peft_config)}"
            )
            if self.merged:
                for layer in self.model.base_model.adapter_layers():
                    pending = set(self.active) & set(layer.adapter_names) - set(layer.merged_adapters)
                    assert not pending, f"{state}: {sorted(pending)} not merged in a {type(layer).__name__}"
            key = (tuple(self.active), self.disabled, tuple(self.configs))
            if key not in self.expected:
                self.expected[key] = self._reference().output(self.active, self.disabled, self.inputs)
            with torch.no_grad():
                actual = model_output(self.model(**self.inputs))
            if len(self.active) > 1 and isinstance(self._reference(), DenseReference):
                state += (
                    " (expected: the sum of each active adapter's own update; a method whose adapters "
                    "compose otherwise sets additive_adapters = False)"
                )
            assert_outputs_close(actual, self.expected[key], torch.float32, state)

    current = settings.default
    machine_settings = settings(
        current,
        max_examples=max_examples or max(2, current.max_examples // 2),
        stateful_step_count=steps,
        deadline=None,
        # The "explain" phase replays the machine many times per failure; shrinking alone is enough.
        phases=[p for p in current.phases if p is not Phase.explain],
        suppress_health_check=[
            *current.suppress_health_check,
            *quiet_health_checks(),
            HealthCheck.filter_too_much,
        ],
    )
    factory = _NamedFactory(AdapterMachine, f"{type(kit).__module__}.{type(kit).__qualname__}.AdapterMachine")
    run_state_machine_as_test(factory, settings=machine_settings)
