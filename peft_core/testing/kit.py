"""The contract every layer-wrapping method must keep, as one subclassable test class.

A plugin subclasses :class:`MethodConformance`, names its ``peft_type`` and the layer kinds it
supports, and supplies ``config_strategy``; pytest then collects every ``test_*`` check below,
each driven by hypothesis over the standard tiny models, the two dtypes and generated configs.
Checks that a method's capabilities rule out are skipped with the reason; a method that deviates
on purpose lists the check in ``deviations`` with a written reason.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from typing import ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from peft_core import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft_core.layer import AdapterLayer
from peft_core.modules_to_save import ModulesToSaveWrapper
from peft_core.plugins import get_registry
from peft_core.registry import Capabilities
from peft_core.testing.models import ModelCase, model_output, standard_model_cases

__all__ = ["MethodConformance", "tolerance"]

# Merged weights are rounded once per element, unmerged outputs are computed in two parts: the
# difference is a few ulps of the output in float32, and bfloat16's 8-bit mantissa (eps 2**-7)
# makes it about 1e-2 relative there.
_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 6e-2)}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    atol, rtol = _TOLERANCE.get(dtype, (1e-4, 1e-4))
    return {"atol": atol, "rtol": rtol}


# One check function serves every plugin's subclass, so hypothesis sees several "executors" of it;
# that is the kit's design (as in pandas' extension tests), not a sign of shared state.
_given = settings(
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.differing_executors],
    deadline=None,
)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    torch.testing.assert_close(
        actual.float(), expected.float(), **tolerance(dtype), msg=lambda m: f"{what}: {m}"
    )


class MethodConformance:
    """Subclass as ``Test<Method>Conformance`` and fill in the class attributes and ``config_strategy``."""

    peft_type: ClassVar[str] = ""
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear",)
    """Layer kinds of :func:`standard_model_cases` the method supports."""
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16)
    deviations: ClassVar[dict[str, str]] = {}
    """``{"test_name": "why this method deviates"}``: that check is skipped with the reason."""

    # ------------------------------------------------------------------ to provide
    def config_strategy(self, case: ModelCase, *, identity: bool) -> st.SearchStrategy[PeftConfig]:
        """Configs for ``case``; ``identity=True`` for the method's identity init, else a non-identity one."""
        raise NotImplementedError(f"{type(self).__name__} must implement config_strategy(case, identity=...)")

    def model_cases(self) -> list[ModelCase]:
        """The cases to draw from; override to add a model of your own."""
        cases = [c for c in standard_model_cases() if c.layer_kind in self.layer_kinds]
        if not cases:
            raise ValueError(f"No standard model case has a layer kind among {self.layer_kinds}.")
        return cases

    # ------------------------------------------------------------------ helpers
    @property
    def capabilities(self) -> Capabilities:
        return get_registry().method(self.peft_type).capabilities

    def _require(self, check: str, capability: str | None = None) -> None:
        if check in self.deviations:
            pytest.skip(f"declared deviation: {self.deviations[check]}")
        if capability is not None and not getattr(self.capabilities, capability):
            pytest.skip(f"{self.peft_type} does not declare the {capability!r} capability")

    def _draw(
        self, data: st.DataObject, *, identity: bool = False
    ) -> tuple[ModelCase, torch.dtype, PeftConfig]:
        case = data.draw(st.sampled_from(self.model_cases()), label="case")
        dtype = data.draw(st.sampled_from(self.dtypes), label="dtype")
        config = data.draw(self.config_strategy(case, identity=identity), label="config")
        return case, dtype, config

    @staticmethod
    def _forward(model: nn.Module, case: ModelCase, dtype: torch.dtype) -> torch.Tensor:
        with torch.no_grad():
            return model_output(model(**case.make_inputs(dtype=dtype)))

    def _setup(
        self, data: st.DataObject, *, identity: bool = False
    ) -> tuple[ModelCase, torch.dtype, nn.Module, PeftModel]:
        case, dtype, config = self._draw(data, identity=identity)
        base = case.build(dtype)
        return case, dtype, base, get_peft_model(copy.deepcopy(base), config).eval()

    @staticmethod
    def _base_weights(model: PeftModel) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if ".base_layer." in f".{k}." or "original_module" in k
        }

    # ------------------------------------------------------------------ checks
    @_given
    @given(data=st.data())
    def test_identity_init_gives_base_output(self, data: st.DataObject) -> None:
        self._require("test_identity_init_gives_base_output", "identity_init")
        case, dtype, base, model = self._setup(data, identity=True)
        expected = self._forward(base, case, dtype)
        # float32 should be exact up to rounding of a zero-valued update
        torch.testing.assert_close(
            self._forward(model, case, dtype).float(),
            expected.float(),
            atol=1e-6 if dtype == torch.float32 else 1e-2,
            rtol=1e-5,
        )

    @_given
    @given(data=st.data())
    def test_merged_forward_equals_unmerged(self, data: st.DataObject) -> None:
        self._require("test_merged_forward_equals_unmerged", "mergeable")
        case, dtype, _, model = self._setup(data)
        unmerged = self._forward(model, case, dtype)
        model.merge_adapter()
        _close(self._forward(model, case, dtype), unmerged, dtype, "merged vs unmerged output")

    @_given
    @given(data=st.data())
    def test_unmerge_restores_base_weights(self, data: st.DataObject) -> None:
        self._require("test_unmerge_restores_base_weights", "mergeable")
        _, dtype, _, model = self._setup(data)
        before = self._base_weights(model)
        model.merge_adapter()
        model.unmerge_adapter()
        after = self._base_weights(model)
        for key, value in before.items():
            _close(after[key], value, dtype, f"base weight {key} after merge+unmerge")

    @_given
    @given(data=st.data())
    def test_merging_twice_warns_and_applies_once(self, data: st.DataObject) -> None:
        self._require("test_merging_twice_warns_and_applies_once", "mergeable")
        case, dtype, _, model = self._setup(data)
        model.merge_adapter()
        once = self._forward(model, case, dtype)
        with pytest.warns(UserWarning, match="already merged"):
            model.merge_adapter()
        torch.testing.assert_close(self._forward(model, case, dtype), once, atol=0, rtol=0)

    @_given
    @given(data=st.data())
    def test_safe_merge_catches_nan_and_changes_nothing(self, data: st.DataObject) -> None:
        self._require("test_safe_merge_catches_nan_and_changes_nothing", "mergeable")
        _, _, _, model = self._setup(data)
        layer = next(model.base_model.adapter_layers())
        param = next(p for n, p in layer.named_parameters() if not n.startswith("base_layer"))
        with torch.no_grad():
            param.view(-1)[0] = float("nan")
        before = self._base_weights(model)
        with pytest.raises(ValueError, match="NaN"):
            model.merge_adapter(safe_merge=True)
        after = self._base_weights(model)
        for key, value in before.items():
            torch.testing.assert_close(after[key], value, atol=0, rtol=0, equal_nan=True)
        assert not any(layer.merged for layer in model.base_model.adapter_layers())

    @_given
    @given(data=st.data())
    def test_merge_and_unload_returns_the_base_architecture(self, data: st.DataObject) -> None:
        self._require("test_merge_and_unload_returns_the_base_architecture", "mergeable")
        case, dtype, base, model = self._setup(data)
        adapted = self._forward(model, case, dtype)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in merged.modules())
        assert [(n, type(m)) for n, m in merged.named_modules()] == [
            (n, type(m)) for n, m in base.named_modules()
        ]
        _close(self._forward(merged, case, dtype), adapted, dtype, "merge_and_unload output")

    @_given
    @given(data=st.data())
    def test_unload_returns_the_base_model(self, data: st.DataObject) -> None:
        self._require("test_unload_returns_the_base_model")
        case, dtype, base, model = self._setup(data)
        if self.capabilities.mergeable:
            model.merge_adapter()
        plain = model.unload()
        _close(self._forward(plain, case, dtype), self._forward(base, case, dtype), dtype, "unload output")

    @_given
    @given(data=st.data())
    def test_disable_adapter_gives_base_output(self, data: st.DataObject) -> None:
        self._require("test_disable_adapter_gives_base_output")
        case, dtype, base, model = self._setup(data)
        adapted = self._forward(model, case, dtype)
        with model.disable_adapter():
            torch.testing.assert_close(
                self._forward(model, case, dtype), self._forward(base, case, dtype), atol=0, rtol=0
            )
        torch.testing.assert_close(self._forward(model, case, dtype), adapted, atol=0, rtol=0)

    @_given
    @given(data=st.data())
    def test_save_load_round_trip(self, data: st.DataObject) -> None:
        self._require("test_save_load_round_trip")
        case, dtype, base, model = self._setup(data)
        expected = self._forward(model, case, dtype)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp).eval()
        torch.testing.assert_close(self._forward(loaded, case, dtype), expected, atol=0, rtol=0)
        ours, theirs = get_peft_model_state_dict(model), get_peft_model_state_dict(loaded)
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(theirs[key], ours[key], atol=0, rtol=0, msg=key)
        # Saving records inference_mode=True and, for task-less models, the auto_mapping.
        ignore = {"inference_mode", "auto_mapping"}
        saved_config = {k: v for k, v in loaded.peft_config["default"].to_dict().items() if k not in ignore}
        assert saved_config == {
            k: v for k, v in model.peft_config["default"].to_dict().items() if k not in ignore
        }

    @_given
    @given(data=st.data())
    def test_config_json_round_trip(self, data: st.DataObject) -> None:
        self._require("test_config_json_round_trip")
        _, _, config = self._draw(data)
        import json

        again = PeftConfig.from_dict(json.loads(config.to_json_string()))
        assert type(again) is type(config)
        assert again.to_dict() == config.to_dict()

    @_given
    @given(data=st.data())
    def test_only_adapter_parameters_train(self, data: st.DataObject) -> None:
        self._require("test_only_adapter_parameters_train")
        case, dtype, _, model = self._setup(data)
        prefix = get_registry().method(self.peft_type).prefix
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable, "an adapter must have trainable parameters"
        config = model.peft_config["default"]
        biases_train = getattr(config, "bias", "none") not in (None, "none")
        for name in trainable:
            assert prefix in name or "modules_to_save" in name or (biases_train and name.endswith("bias")), (
                name
            )
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.train()
        loss = model_output(model(**case.make_inputs(dtype=dtype))).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)}"
        assert changed, "one optimizer step changed no adapter parameter"

    @_given
    @given(data=st.data())
    def test_multiple_adapters_add_switch_delete(self, data: st.DataObject) -> None:
        self._require("test_multiple_adapters_add_switch_delete")
        case, dtype, _, model = self._setup(data)
        first = self._forward(model, case, dtype)
        other = data.draw(self.config_strategy(case, identity=False), label="second config")
        model.add_adapter("other", other)
        torch.testing.assert_close(self._forward(model, case, dtype), first, atol=0, rtol=0)
        model.set_adapter("other")
        second = self._forward(model, case, dtype)
        model.set_adapter("default")
        torch.testing.assert_close(self._forward(model, case, dtype), first, atol=0, rtol=0)
        model.delete_adapter("other")
        assert list(model.peft_config) == ["default"]
        torch.testing.assert_close(self._forward(model, case, dtype), first, atol=0, rtol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_adapter("other", other)
        assert second.shape == first.shape

    def test_state_machine(self) -> None:
        """Random sequences of adapter operations, checked against freshly built unmerged models."""
        self._require("test_state_machine")
        from peft_core.testing.state_machine import run_state_machine

        run_state_machine(self)
