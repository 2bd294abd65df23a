"""A hypothesis state machine that drives adapter operations against a trivially correct reference.

The reference for any state is a *freshly built, never merged* model: the pristine base, each
adapter recreated from its config and loaded with the tensors it had when it was added, and the
same adapters active. It never runs the method's merge code, so a merge/unmerge/save/load/delete
bug that leaves the live model computing something else is caught at the step that caused it.
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

from peft_core import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft_core.testing.models import model_output

if TYPE_CHECKING:
    from peft_core.testing.kit import MethodConformance

__all__ = ["run_state_machine"]


def run_state_machine(kit: MethodConformance, *, max_examples: int | None = None, steps: int = 10) -> None:
    mergeable = kit.capabilities.mergeable
    cases = kit.model_cases()

    class AdapterMachine(RuleBasedStateMachine):
        @initialize(data=st.data())
        def start(self, data: st.DataObject) -> None:
            self.case = data.draw(st.sampled_from(cases), label="case")
            self.base = self.case.build(torch.float32)
            self.inputs = self.case.make_inputs()
            self.configs: dict[str, object] = {}
            self.tensors: dict[str, dict[str, torch.Tensor]] = {}
            config = data.draw(kit.config_strategy(self.case, identity=False), label="config default")
            self.model = get_peft_model(copy.deepcopy(self.base), config).eval()
            self._record("default", config)
            self.active = ["default"]
            self.merged = False
            self.disabled = False
            self.counter = 0

        def _record(self, name: str, config: object) -> None:
            self.configs[name] = config
            self.tensors[name] = {
                k: v.clone() for k, v in get_peft_model_state_dict(self.model, adapter_name=name).items()
            }

        def _has_saved_modules(self) -> bool:
            return any(getattr(c, "modules_to_save", None) for c in self.configs.values())

        # -------------------------------------------------------------- rules
        @precondition(lambda self: len(self.configs) < 3 and not self.merged)
        @rule(data=st.data())
        def add(self, data: st.DataObject) -> None:
            self.counter += 1
            name = f"adapter{self.counter}"
            config = data.draw(kit.config_strategy(self.case, identity=False), label=f"config {name}")
            self.model.add_adapter(name, config)
            self._record(name, config)

        @rule(data=st.data())
        def set_active(self, data: st.DataObject) -> None:
            names = list(self.configs)
            if self._has_saved_modules():
                chosen = [data.draw(st.sampled_from(names), label="active")]
            else:
                chosen = data.draw(
                    st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True),
                    label="active",
                )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # switching while merged unmerges, with a warning
                self.model.set_adapter(chosen)
            self.active = chosen
            self.merged = False

        @precondition(lambda self: not self.merged)
        @rule()
        def toggle_disabled(self) -> None:
            if self.disabled:
                self.model.base_model.enable_adapter_layers()
            else:
                self.model.base_model.disable_adapter_layers()
            self.disabled = not self.disabled

        @precondition(lambda self: mergeable and not self.merged and not self.disabled)
        @rule()
        def merge(self) -> None:
            self.model.merge_adapter()
            self.merged = True

        @precondition(lambda self: self.merged)
        @rule()
        def unmerge(self) -> None:
            self.model.unmerge_adapter()
            self.merged = False

        @precondition(lambda self: not self.merged and not self.disabled)
        @rule()
        def save_and_load(self) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                self.model.save_pretrained(tmp)
                names = list(self.configs)
                first = "default" if "default" in names else names[0]
                path = tmp if first == "default" else os.path.join(tmp, first)
                loaded = PeftModel.from_pretrained(copy.deepcopy(self.base), path, adapter_name=first)
                for name in names:
                    if name != first:
                        loaded.load_adapter(
                            os.path.join(tmp, name) if name != "default" else tmp, adapter_name=name
                        )
            loaded.set_adapter(self.active)
            self.model = loaded.eval()

        @precondition(lambda self: len(self.configs) > 1 and not self.merged)
        @rule(data=st.data())
        def delete(self, data: st.DataObject) -> None:
            name = data.draw(st.sampled_from(sorted(self.configs)), label="delete")
            self.model.delete_adapter(name)
            del self.configs[name], self.tensors[name]
            self.active = [n for n in self.active if n != name] or self.model.active_adapters

        # -------------------------------------------------------------- the check
        def _reference(self) -> torch.Tensor:
            if self.disabled:
                model = self.base
            else:
                names = list(self.configs)
                model = get_peft_model(
                    copy.deepcopy(self.base), self.configs[names[0]], adapter_name=names[0]
                )
                for name in names[1:]:
                    model.add_adapter(name, self.configs[name])
                for name in names:
                    set_peft_model_state_dict(model, self.tensors[name], adapter_name=name)
                model.set_adapter(self.active)
            with torch.no_grad():
                return model_output(model.eval()(**self.inputs))

        @invariant()
        def output_matches_reference(self) -> None:
            if not hasattr(self, "model"):
                return
            with torch.no_grad():
                actual = model_output(self.model(**self.inputs))
            expected = self._reference()
            state = f"active={self.active} merged={self.merged} disabled={self.disabled}"
            torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4, msg=lambda m: f"{state}: {m}")

    profile = settings()
    AdapterMachine.TestCase.settings = settings(
        max_examples=max_examples or max(3, profile.max_examples // 2),
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        derandomize=profile.derandomize,
        # The "explain" phase replays the machine many times per failure; shrinking alone is enough.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    )
    run_state_machine_as_test(AdapterMachine, settings=AdapterMachine.TestCase.settings)
