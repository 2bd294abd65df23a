"""The conformance checks for methods on quantized base layers, for any registered backend.

A quantization plugin (or a method plugin) subclasses :class:`QuantizedBaseConformance`, names the
method's ``peft_type``, the backend and ``make_config``; pytest collects the ``test_*`` methods.
Each draws a small MLP (sizes, seed) with hypothesis, quantizes its linears with the backend's
``quantize_linear``, and checks the method on it:

* the method's layers wrap the quantized layers themselves (the quantized kernel runs);
* identity init and disabled adapters give the quantized base's output exactly;
* training changes only adapter tensors (the packed weights stay byte-equal) and lowers the loss;
* save and load onto a freshly quantized copy of the base give identical outputs;
* merging (gated by the backend's ``can_merge`` and the method's ``mergeable``): every merged
  weight is within the backend's documented ``weight_error_bound`` of the exact float merge,
  ``merge_and_unload`` returns a model with the backend's layers, and the output error is
  recorded (``record_property``), not hidden by a loose tolerance.
"""

from __future__ import annotations

import tempfile
import warnings
from typing import ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from peft_core import PeftConfig, PeftModel, get_peft_model
from peft_core.layer import AdapterLayer
from peft_core.plugins import get_registry
from peft_core.quantization import QuantizationBackend, backend_for
from peft_core.testing.profiles import quiet_health_checks

__all__ = ["QuantizedBaseConformance", "QuantizedMLP"]


class QuantizedMLP(nn.Module):
    """``fc_out(relu(fc_mid(relu(fc_in(x)))))``; the three linears are the targets."""

    target_modules = ("fc_in", "fc_mid", "fc_out")

    def __init__(self, n_in: int, hidden: int, n_out: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(n_in, hidden)
        self.fc_mid = nn.Linear(hidden, hidden)
        self.fc_out = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(torch.relu(self.fc_mid(torch.relu(self.fc_in(x)))))


@st.composite
def _cases(draw: st.DrawFn) -> tuple[int, int, int, int]:
    # Sizes as real models have them: inputs of whole 64-weight blocks and outputs of whole
    # 32-row tiles. bitsandbytes' AVX512-BF16 CPU kernels (taken where the CPU has them)
    # mis-quantize rows that end inside a block and cannot repack other output counts.
    n_in = draw(st.sampled_from([64, 128]))
    hidden = draw(st.sampled_from([64, 128]))
    n_out = draw(st.sampled_from([32, 64]))
    return n_in, hidden, n_out, draw(st.integers(0, 2**16))


def _given(test):
    # record_property only collects figures (sharing it across examples is fine); one check runs
    # for many subclasses, which hypothesis would otherwise report as differing executors
    checks = [*quiet_health_checks(), HealthCheck.function_scoped_fixture, HealthCheck.differing_executors]
    return settings(max_examples=4, deadline=None, suppress_health_check=checks)(given(case=_cases())(test))


class QuantizedBaseConformance:
    """Subclass as ``Test<Method><Backend>`` with ``peft_type``, ``backend_name`` and :meth:`make_config`."""

    peft_type: ClassVar[str]
    backend_name: ClassVar[str]
    trains_in_steps: ClassVar[int] = 15

    def make_config(self, target_modules: list[str], *, identity: bool) -> PeftConfig:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    @property
    def backend(self) -> QuantizationBackend:
        backends = get_registry().quantization_backends
        if self.backend_name not in backends:
            pytest.skip(f"quantization backend {self.backend_name!r} is not installed")
        return backends[self.backend_name]

    def _float_model(self, case: tuple[int, int, int, int]) -> QuantizedMLP:
        n_in, hidden, n_out, seed = case
        torch.manual_seed(seed)
        return QuantizedMLP(n_in, hidden, n_out)

    def _quantized(self, model: QuantizedMLP) -> QuantizedMLP:
        if self.backend.quantize_linear is None:
            pytest.skip(f"backend {self.backend_name!r} cannot quantize a float linear for tests")
        for name in model.target_modules:
            layer = self.backend.quantize_linear(getattr(model, name))
            if self.backend.prepare is not None:  # the base as an adapter holds it (so bases compare)
                self.backend.prepare(layer)
            setattr(model, name, layer)
        return model

    def _adapted(self, case, *, identity: bool) -> tuple[PeftModel, QuantizedMLP, torch.Tensor]:
        float_model = self._float_model(case)
        inputs = torch.randn(6, case[0], generator=torch.Generator().manual_seed(case[3]))
        base = self._quantized(_copy(float_model))
        torch.manual_seed(case[3] + 1)
        model = get_peft_model(base, self.make_config(list(QuantizedMLP.target_modules), identity=identity))
        # Quantized kernels may compute differently in training mode (bitsandbytes 8-bit does),
        # and a loaded adapter starts in eval mode: compare like with like.
        model.eval()
        return model, float_model, inputs

    def _quantized_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            name: param.detach().clone()
            for name, param in model.named_parameters()
            if not param.dtype.is_floating_point
        }

    # ------------------------------------------------------------------ checks
    def test_method_declares_quantized_bases(self) -> None:
        assert get_registry().method(self.peft_type).capabilities.quantized_bases

    @_given
    def test_layers_wrap_the_quantized_layers(self, case) -> None:
        model, _, _ = self._adapted(case, identity=True)
        layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
        assert len(layers) == len(QuantizedMLP.target_modules)
        for layer in layers:
            assert backend_for(layer.get_base_layer()) is self.backend

    @_given
    def test_identity_and_disabled_give_the_quantized_base_output(self, case) -> None:
        base = self._quantized(self._float_model(case)).eval()
        model, _, x = self._adapted(case, identity=False)
        with torch.no_grad():
            expected = base(x)
            with model.disable_adapter():
                torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
            assert not torch.equal(model(x), expected), "a non-identity adapter must change the output"
        if get_registry().method(self.peft_type).capabilities.identity_init:
            fresh, _, _ = self._adapted(case, identity=True)
            with torch.no_grad():
                torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)

    @_given
    def test_training_changes_only_adapter_tensors_and_lowers_the_loss(self, case) -> None:
        model, _, x = self._adapted(case, identity=True)
        model.train()
        frozen_before = self._quantized_state(model)
        target = torch.randn(x.shape[0], case[2], generator=torch.Generator().manual_seed(7))
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.dtype.is_floating_point for p in trainable)
        optimizer = torch.optim.AdamW(trainable, lr=3e-2)
        losses = []
        for _ in range(self.trains_in_steps):
            loss = nn.functional.mse_loss(model(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], f"loss did not go down: {losses}"
        after = self._quantized_state(model)
        assert frozen_before.keys() == after.keys()
        for name in frozen_before:
            assert torch.equal(frozen_before[name], after[name]), (
                f"quantized tensor {name} changed in training"
            )

    @_given
    def test_save_and_load_on_a_fresh_quantized_base(self, case) -> None:
        model, float_model, x = self._adapted(case, identity=False)
        with torch.no_grad():
            expected = model(x)
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            fresh_base = self._quantized(_copy(float_model))
            loaded = PeftModel.from_pretrained(fresh_base, directory)
            with torch.no_grad():
                torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)

    @_given
    def test_merge_stays_within_the_backend_bound(self, case, record_property) -> None:
        backend = self.backend
        if not get_registry().method(self.peft_type).capabilities.mergeable:
            pytest.skip(f"{self.peft_type} does not merge (Capabilities.mergeable=False)")
        if not backend.can_merge:
            model, _, _ = self._adapted(case, identity=False)
            with pytest.raises(ValueError, match="re-quantize"):
                model.merge_adapter()
            return
        model, _, x = self._adapted(case, identity=False)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
        exact = {}
        for name, layer in layers.items():
            base = layer.get_base_layer()
            # the exact float merge: the dequantized weight plus the method's own change to it
            probe = nn.Linear(base.in_features, base.out_features, bias=False)
            probe.weight = nn.Parameter(backend.dequantize(base).detach().clone(), requires_grad=False)
            exact[name] = _merged_float_weight(layer, probe)
        with torch.no_grad():
            unmerged = model(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.merge_adapter()
        if backend.merge_is_lossy:
            assert any("re-quantizes" in str(w.message) for w in caught), "a lossy merge must warn"
        for name, layer in layers.items():
            base = layer.get_base_layer()
            assert backend_for(base) is backend, "merging must keep the quantized layer"
            error = (backend.dequantize(base).float() - exact[name].float()).abs()
            if backend.weight_error_bound is not None:
                bound = backend.weight_error_bound(base, exact[name]).float()
                worst = float((error - bound).max())
                assert worst <= 0, (
                    f"{name}: merged weight off the exact merge by more than the bound ({worst:+.3g})"
                )
        with torch.no_grad():
            merged = model(x)
        scale = float(unmerged.abs().max())
        record_property("max_abs_output_error", float((merged - unmerged).abs().max()))
        record_property("output_scale", scale)
        unloaded = model.merge_and_unload()
        for name in QuantizedMLP.target_modules:
            assert backend_for(getattr(unloaded, name)) is backend
        with torch.no_grad():
            torch.testing.assert_close(unloaded(x), merged, rtol=0, atol=0)


def _copy(model: QuantizedMLP) -> QuantizedMLP:
    clone = QuantizedMLP(model.fc_in.in_features, model.fc_in.out_features, model.fc_out.out_features)
    clone.load_state_dict(model.state_dict())
    return clone


@torch.no_grad()
def _merged_float_weight(layer: AdapterLayer, probe: nn.Linear) -> torch.Tensor:
    """The weight ``layer``'s merge would give on a float base: its own ``merge_one`` run on a float probe."""
    original = layer.get_base_layer()
    holder: nn.Module = layer
    while isinstance(holder.base_layer, AdapterLayer):
        holder = holder.base_layer
    holder.base_layer = probe
    try:
        for name in layer.active_adapters:
            if name in layer.adapter_names:
                layer.merge_one(name)
        merged = probe.weight.detach().clone()
        for name in reversed(layer.active_adapters):
            if name in layer.adapter_names:
                layer.unmerge_one(name)
    finally:
        holder.base_layer = original
    return merged
